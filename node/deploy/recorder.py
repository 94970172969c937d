"""One deployment's row and event log, as written by its origin node.

Events get consecutive ``seq`` numbers from storage. Install output lines are buffered
and written in batches (one transaction per batch, at most every ``flush_interval_s``),
so a hook that prints thousands of lines costs a bounded number of transactions. Every
other event first flushes the buffer in the same transaction, so the order of the log is
the order things happened. The terminal status is committed in the same transaction as
the ``finished`` event, so no subscriber can see ``finished`` before the status.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from storage.records import Deployment, DeploymentStatus, Event
from storage.store import Store

__all__ = ["MAX_EVENT_LINE_BYTES", "Recorder"]

#: The longest hook output line an ``install`` event carries.
MAX_EVENT_LINE_BYTES = 4096


class Recorder:
    """Writes the row changes and events of one deployment."""

    def __init__(
        self,
        store: Store,
        deployment_id: str,
        *,
        flush_interval_s: float = 0.05,
        max_buffered: int = 1000,
    ) -> None:
        self.store = store
        self.deployment_id = deployment_id
        self._interval = flush_interval_s
        self._max = max_buffered
        self._buffer: list[tuple[str, dict[str, Any]]] = []
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None

    async def write(
        self, changes: dict[str, Any] | None = None, *events: tuple[str, dict[str, Any]]
    ) -> tuple[Deployment, list[Event]]:
        """Flush buffered lines, then apply ``changes`` and append ``events`` atomically."""
        async with self._lock:
            batch, self._buffer = [*self._buffer, *events], []
            if not batch and not changes:
                d = await self.store.get_deployment(self.deployment_id)
                assert d is not None
                return d, []
            return await self.store.write_deployment(self.deployment_id, changes, batch)

    async def event(self, name: str, **data: Any) -> None:
        await self.write(None, (name, data))

    async def phase(self, phase: str, state: str, status: DeploymentStatus | None = None) -> None:
        """Record a phase boundary (and move the status when one is given)."""
        changes: dict[str, Any] = {"phase": phase}
        if status is not None:
            changes["status"] = status
        await self.write(changes, ("phase", {"phase": phase, "status": state}))

    async def line(self, stream: str, line: str) -> None:
        """Buffer one line of hook output as an ``install`` event (cut to
        :data:`MAX_EVENT_LINE_BYTES` of UTF-8: the event log is a view, the hook output
        tail in the result keeps more)."""
        encoded = line.encode("utf-8", "replace")
        if len(encoded) > MAX_EVENT_LINE_BYTES:
            line = encoded[:MAX_EVENT_LINE_BYTES].decode("utf-8", "ignore") + " [cut]"
        self._buffer.append(("install", {"stream": stream, "line": line}))
        if len(self._buffer) >= self._max:
            await self.flush()
        elif self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._interval)
        await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            await self.write(None)

    async def close(self) -> None:
        """Flush and stop the timer (call when the deploy is over).

        The write comes first, under the lock: it waits for a timer that is writing a
        batch right now (cancelling that one would roll its lines back), and once it
        holds the lock a pending timer can only be asleep or about to write an empty
        batch, so cancelling it loses nothing.
        """
        await self.write(None)
        if self._timer is not None and not self._timer.done():
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
