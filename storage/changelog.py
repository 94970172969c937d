"""The change log, peer cursors, and the change feed.

Every write to a replicated table appends one entry to ``changelog`` in the same
transaction (:meth:`Tx.log`). Peers pull entries after their stored cursor; the
receiver commits its cursor in the same transaction as the changes it applied.

:class:`ChangeFeed` is the in-process notification fired after each commit, for local
writes and applied remote changes alike: the deploy coordinator, reconciler, SSE streams
and the replication senders all wake on it instead of polling.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
import msgpack

from storage.records import Change, Notice

__all__ = ["ChangeFeed", "Subscription", "Tx", "decode_change", "encode_data"]

#: Notice table name published whenever the change log grew.
CHANGELOG = "changelog"


def encode_data(data: Any) -> bytes:
    """Pack a change's data for the ``changelog.data`` column."""
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def decode_change(row: Any) -> Change:
    """Build a :class:`Change` from a ``changelog`` row."""
    raw = bytes(row["data"])
    return Change(
        seq=int(row["seq"]),
        tbl=row["tbl"],
        key=row["key"],
        version=int(row["version"]),
        origin=row["origin"],
        op=row["op"],
        data=msgpack.unpackb(raw, raw=False),
        user=row["user"],
        t=int(row["t"]),
        size=len(raw),
    )


class Subscription:
    """A subscriber's queue of notices. Read with :meth:`get`; close when done.

    The queue is bounded: a subscriber that falls more than ``maxsize`` notices behind
    loses the backlog and sees ``overflowed`` set, and must re-read state from storage.
    """

    def __init__(self, predicate: Callable[[Notice], bool], maxsize: int) -> None:
        self._predicate = predicate
        self._queue: deque[Notice] = deque()
        self._maxsize = maxsize
        self._wake = asyncio.Event()
        self.overflowed = False

    def _push(self, notice: Notice) -> None:
        if not self._predicate(notice):
            return
        if len(self._queue) >= self._maxsize:
            self._queue.clear()
            self.overflowed = True
        self._queue.append(notice)
        self._wake.set()

    async def get(self, timeout_s: float | None = None) -> list[Notice]:
        """Wait for notices (at most ``timeout_s``) and return all that are queued."""
        if not self._queue:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout_s)
            except TimeoutError:
                return []
        out = list(self._queue)
        self._queue.clear()
        return out

    def drain(self) -> list[Notice]:
        """Return queued notices without waiting."""
        out = list(self._queue)
        self._queue.clear()
        return out


class ChangeFeed:
    """Fan-out of commit notices to in-process subscribers."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    @contextmanager
    def subscribe(
        self, predicate: Callable[[Notice], bool] | None = None, *, maxsize: int = 100_000
    ) -> Iterator[Subscription]:
        """Subscribe for the duration of a ``with`` block (never leaks a subscriber)."""
        sub = Subscription(predicate or (lambda _n: True), maxsize)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    def publish(self, notices: list[Notice]) -> None:
        for notice in notices:
            for sub in list(self._subs):
                sub._push(notice)


@dataclass
class Tx:
    """An open write transaction plus the notices to publish once it commits."""

    conn: aiosqlite.Connection
    now_ms: int
    notices: list[Notice] = field(default_factory=list)
    logged: int = 0

    async def log(
        self,
        tbl: str,
        key: str,
        *,
        version: int,
        origin: str,
        op: str,
        data: Any,
        user: str | None = None,
        t: int | None = None,
    ) -> None:
        """Append a change-log entry in this transaction.

        ``t`` is when the change was made: now for a local write, the writer's time for
        a change applied from a peer (so the audit log reads the same on every node).
        """
        await self.conn.execute(
            "INSERT INTO changelog (tbl, key, version, origin, op, data, user, t) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                tbl,
                key,
                version,
                origin,
                op,
                encode_data(data),
                user,
                self.now_ms if t is None else t,
            ),
        )
        self.logged += 1

    async def log_many(
        self, entries: list[tuple[str, str, int, str, str, Any, str | None, int]]
    ) -> None:
        """Append many entries ``(tbl, key, version, origin, op, data, user, t)`` in order."""
        if not entries:
            return
        await self.conn.executemany(
            "INSERT INTO changelog (tbl, key, version, origin, op, data, user, t) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (tbl, key, v, o, op, encode_data(data), user, t)
                for tbl, key, v, o, op, data, user, t in entries
            ],
        )
        self.logged += len(entries)

    def notify(self, notice: Notice) -> None:
        self.notices.append(notice)
