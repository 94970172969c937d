"""The change logs a node holds: its own, and every log it received entries of.

``logs`` (one row per log id) says, for each log, how far this node has received it
(``head``) and from where its local change log holds every entry (``held_from``); older
entries were trimmed, or arrived as a compacted catch-up, and are served from the rows
they wrote. :class:`LogState` keeps that table in memory for the hot paths (a sender
deciding whether there is anything to send, the lag a status page shows) and updates it
only after the transaction that changed the table has committed.
"""

from __future__ import annotations

from dataclasses import replace

from storage.changelog import Tx
from storage.db import Database
from storage.records import LogInfo

__all__ = ["LogState"]


class LogState:
    """In-memory view of the ``logs`` table; writes go through a :class:`Tx`."""

    def __init__(self, own_log_id: str, node: str) -> None:
        self.own = own_log_id
        self.node = node
        self._logs: dict[str, LogInfo] = {}

    @classmethod
    async def load(cls, db: Database, own_log_id: str, node: str) -> LogState:
        state = cls(own_log_id, node)
        for r in await db.fetchall("SELECT * FROM logs"):
            state._logs[r["log_id"]] = LogInfo(
                r["log_id"], r["writer"], int(r["head"]), int(r["held_from"]), int(r["bytes"]),
                int(r["verified"]),
            )  # fmt: skip
        return state

    def get(self, log_id: str, tx: Tx | None = None) -> LogInfo | None:
        """The log's state (as ``tx`` has changed it so far, when given)."""
        if tx is not None and log_id in tx.logs:
            info: LogInfo = tx.logs[log_id]
            return info
        return self._logs.get(log_id)

    def all(self) -> list[LogInfo]:
        return sorted(self._logs.values(), key=lambda i: (i.writer, i.log_id))

    def head(self, log_id: str) -> int:
        info = self._logs.get(log_id)
        return info.head if info is not None else 0

    def positions(self) -> dict[str, int]:
        """``{log_id: head}`` for every log held (what a subscriber reports)."""
        return {i.log_id: i.head for i in self._logs.values()}

    @property
    def own_head(self) -> int:
        return self.head(self.own)

    def put(self, tx: Tx, info: LogInfo) -> None:
        """Change a log's state in ``tx`` (written by :meth:`flush`)."""
        tx.logs[info.log_id] = info

    async def flush(self, tx: Tx) -> None:
        """Write the logs ``tx`` changed; the memory view follows once it commits."""
        if not tx.logs:
            return
        changed: list[LogInfo] = list(tx.logs.values())
        await tx.conn.executemany(
            "INSERT INTO logs (log_id, writer, head, held_from, bytes, verified, first_seen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (log_id) DO UPDATE SET "
            "head = excluded.head, held_from = excluded.held_from, bytes = excluded.bytes, "
            "verified = excluded.verified",
            [
                (i.log_id, i.writer, i.head, i.held_from, i.bytes, i.verified, tx.now_ms)
                for i in changed
            ],
        )

        def publish() -> None:
            for info in changed:
                self._logs[info.log_id] = info

        tx.after_commit.append(publish)

    def advanced(
        self, info: LogInfo, *, head: int, added_bytes: int, compacted: bool, verified: bool
    ) -> LogInfo:
        """``info`` after receiving up to ``head``; a compacted range leaves the local
        log without the entries below it; a ``verified`` range (every entry present, or
        the writer's own word) moves the verified position too."""
        held_from = head + 1 if compacted else info.held_from
        return replace(
            info,
            head=max(info.head, head),
            held_from=held_from,
            bytes=info.bytes + added_bytes,
            verified=max(info.verified, head) if verified else info.verified,
        )

    def sent_position(self, log_id: str, *, from_writer: bool) -> int:
        """The position to ask a peer for ``log_id`` from: the verified one when asking
        the log's own writer (so it fills in what a relay may have left out)."""
        info = self._logs.get(log_id)
        if info is None:
            return 0
        return min(info.head, info.verified) if from_writer else info.head
