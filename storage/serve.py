"""What a node sends a subscriber: the entries of one log after a position.

A log is served *dense* from the change log while it holds every entry after the
position (``held_from`` in :class:`storage.records.LogInfo`), and *compacted* below that:
the rows whose current version was written by that log, in log order, each with the
signed entry that wrote it (and the entries of that log parked here, which have no row
yet). A compacted range carries fewer entries than it covers (an
entry overwritten by a later one is not needed), which is how a node catches up by
current state rather than by history: a new node, or one behind the trimmed point,
receives the rows, then follows the log. Both forms are signed entries, verified alike.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from storage.entries import SignedEntry
from storage.tables import REPLICATED

if TYPE_CHECKING:
    from storage.db import Database
    from storage.logstate import LogState

__all__ = ["LogChunk", "LogReads"]

_PARKED: Final = 1  # changelog.state of an entry waiting for this node's clock


@dataclass(frozen=True, slots=True)
class LogChunk:
    """Entries of one log covering ``(after, last]``; ``compacted`` when some entries of
    that range are deliberately absent (their rows were overwritten since)."""

    log_id: str
    after: int
    last: int
    compacted: bool
    entries: list[SignedEntry]

    @property
    def size(self) -> int:
        return sum(len(e.body) + len(e.sig) for e in self.entries)


def _entry(r: Any) -> SignedEntry:
    return SignedEntry(
        r["log_id"], int(r["oseq"]), r["writer"], r["key_id"], bytes(r["entry"]), bytes(r["sig"])
    )


class LogReads:
    """Reads of the change logs for senders (a mixin of :class:`storage.store.Store`)."""

    db: Database
    logs: LogState

    async def read_log(
        self, log_id: str, after: int, *, max_entries: int, max_bytes: int
    ) -> LogChunk:
        """Entries of ``log_id`` after ``after``: at most ``max_entries`` and about
        ``max_bytes`` (at least one entry when there is any)."""
        info = self.logs.get(log_id)
        if info is None or after >= info.head:
            return LogChunk(log_id, after, after, False, [])
        if after + 1 >= info.held_from:
            return await self._dense(log_id, after, max_entries, max_bytes)
        return await self._compacted(log_id, after, info.held_from - 1, max_entries, max_bytes)

    async def _dense(self, log_id: str, after: int, limit: int, max_bytes: int) -> LogChunk:
        rows = await self.db.fetchall(
            "SELECT log_id, oseq, writer, key_id, entry, sig FROM changelog "
            "WHERE log_id = ? AND oseq > ? ORDER BY oseq LIMIT ?",
            (log_id, after, limit),
        )
        out: list[SignedEntry] = []
        used = 0
        for r in rows:
            e = _entry(r)
            if out and used + len(e.body) > max_bytes:
                break
            out.append(e)
            used += len(e.body)
        last = out[-1].oseq if out else after
        return LogChunk(log_id, after, last, False, out)

    async def _compacted(
        self, log_id: str, after: int, end: int, limit: int, max_bytes: int
    ) -> LogChunk:
        runs = []
        for spec in REPLICATED.values():
            rows = await self.db.fetchall(
                f"SELECT log_id, oseq, origin AS writer, key_id, entry, sig FROM {spec.name} "
                "WHERE log_id = ? AND oseq > ? AND oseq <= ? ORDER BY oseq LIMIT ?",
                (log_id, after, end, limit),
            )
            runs.append([_entry(r) for r in rows])
        # Entries parked here (too far ahead of this node's clock to apply yet) have no
        # row: they are served from the change log, or the range would skip them for good.
        parked = await self.db.fetchall(
            "SELECT log_id, oseq, writer, key_id, entry, sig FROM changelog WHERE log_id = ? "
            "AND oseq > ? AND oseq <= ? AND state = ? ORDER BY oseq LIMIT ?",
            (log_id, after, end, _PARKED, limit),
        )
        runs.append([_entry(r) for r in parked])
        # Each table was read up to ``limit`` rows: a table cut off there may hold more
        # rows after its last one read, so the range can only extend that far.
        cut = min((run[-1].oseq for run in runs if len(run) == limit), default=end)
        out: list[SignedEntry] = []
        used = 0
        stopped = False
        for e in heapq.merge(*runs, key=lambda x: x.oseq):
            if e.oseq > cut:
                break
            if len(out) >= limit or (out and used + len(e.body) > max_bytes):
                stopped = True
                break
            out.append(e)
            used += len(e.body)
        last = out[-1].oseq if stopped else cut
        return LogChunk(log_id, after, last, True, out)
