"""Write transactions and the change feed.

:class:`Tx` is an open write transaction plus what it must do once it commits: publish
its notices, and update the in-memory view of the change logs (:mod:`storage.logstate`).

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

from storage.records import Notice

__all__ = ["CHANGELOG", "ChangeFeed", "Subscription", "Tx"]

#: Notice table name published whenever a change log grew.
CHANGELOG = "changelog"


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
    """An open write transaction, the notices to publish once it commits, and callbacks
    to run after the commit (never after a rollback)."""

    conn: aiosqlite.Connection
    now_ms: int
    notices: list[Notice] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    #: Entries appended to any change log in this transaction.
    logged: int = 0
    #: Logs whose state this transaction changed (``log_id`` → LogInfo), written once
    #: just before the commit (see :class:`storage.logstate.LogState`).
    logs: dict[str, Any] = field(default_factory=dict)

    def notify(self, notice: Notice) -> None:
        self.notices.append(notice)
