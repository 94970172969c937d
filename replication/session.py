"""What both ends of a peer session share: settings, the clock seam, liveness, ``race``.

Nothing here touches a socket. The clock is a constructor argument everywhere it is
used, so tests (and the fault suite) can drive heartbeats and backoff with a fake one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar

from replication.codec import DEFAULT_LIMITS, FrameLimits
from replication.errors import ReplicationError
from replication.messages import Ping

__all__ = [
    "CAPS",
    "SYSTEM_CLOCK",
    "Clock",
    "Liveness",
    "PeerSilent",
    "Settings",
    "SystemClock",
    "heartbeat",
    "race",
    "uncancelled",
]

T = TypeVar("T")

#: Capabilities this build offers at the handshake.
CAPS = ("blobs", "changes")


class PeerSilent(ReplicationError):
    """No frame arrived from the peer for longer than ``dead_after_s``."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Tunables of the replication service (``[replication]`` in the node config).

    Raises:
        ValueError: a value that cannot work (a chunk that cannot fit in a frame, zero
            credit, a dead-peer timeout shorter than the heartbeat).
    """

    heartbeat_s: float = 2.0
    dead_after_s: float = 8.0
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0
    batch_changes: int = 500
    credit_batches: int = 8
    chunk_bytes: int = 1 << 20
    chunk_credit: int = 16
    #: How long a blob fetch waits for some peer to be connected before BlobMissing.
    fetch_wait_s: float = 10.0
    #: Blobs one subscriber may have in flight at once on the sender.
    max_transfers: int = 16
    #: A change whose version is further ahead of this node's clock is parked.
    max_clock_offset_s: float = 60.0
    limits: FrameLimits = field(default=DEFAULT_LIMITS)

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0 or self.dead_after_s <= self.heartbeat_s:
            raise ValueError("dead_after_s must be longer than a positive heartbeat_s")
        if self.reconnect_min_s <= 0 or self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least a positive reconnect_min_s")
        if min(self.batch_changes, self.credit_batches, self.chunk_credit) < 1:
            raise ValueError("batch_changes, credit_batches and chunk_credit must be >= 1")
        if not 0 < self.chunk_bytes <= self.limits.max_frame_bytes - 1024:
            raise ValueError("chunk_bytes must leave room for a frame header in max_frame_bytes")
        if self.max_transfers < 1 or self.fetch_wait_s < 0:
            raise ValueError("max_transfers must be >= 1 and fetch_wait_s >= 0")

    @property
    def batch_bytes(self) -> int:
        """Change data per Changes frame: half a frame, the rest is headroom."""
        return self.limits.max_frame_bytes // 2


class Clock(Protocol):
    """Time as the replication service sees it (a seam for tests)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def wall_ms(self) -> int:
        """Wall-clock epoch milliseconds (for status)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class Liveness:
    """When a session last heard from its peer, and the round trip of the last Ping."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.last = clock.monotonic()
        self.last_wall_ms = clock.wall_ms()
        self.rtt_ms: float | None = None

    def saw(self) -> None:
        """Record that a frame arrived."""
        self.last = self._clock.monotonic()
        self.last_wall_ms = self._clock.wall_ms()

    def pong(self, sent_wall_ms: int) -> None:
        """Record the round trip of a Ping sent at ``sent_wall_ms``."""
        self.rtt_ms = float(max(0, self._clock.wall_ms() - sent_wall_ms))


class _Sender(Protocol):
    @property
    def peer(self) -> str: ...

    async def send(self, msg: Ping) -> None: ...


async def heartbeat(
    channel: _Sender, liveness: Liveness, *, clock: Clock, interval_s: float, dead_after_s: float
) -> NoReturn:
    """Ping the peer every ``interval_s``; give up once it has been silent too long.

    Raises:
        PeerSilent: nothing arrived for more than ``dead_after_s``.
        ChannelClosed: the channel closed while sending.
    """
    while True:
        await clock.sleep(interval_s)
        silent_s = clock.monotonic() - liveness.last
        if silent_s > dead_after_s:
            raise PeerSilent(f"node {channel.peer!r} was silent for {silent_s:.1f} s")
        await channel.send(Ping(t=clock.wall_ms()))


async def race(*coros: Coroutine[Any, Any, Any]) -> None:
    """Run ``coros`` as tasks until the first one ends, then cancel and await the rest.

    A session is several loops over one channel (reader, writer, heartbeat); when any
    ends, the session is over. Nothing outlives this call, even when it is cancelled.

    Raises:
        Whatever the first task to end raised.
    """
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if t in done and not t.cancelled() and (exc := t.exception()) is not None:
            raise exc


async def uncancelled(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile.

    Used for the write of a received batch: it commits whole, and a service that is
    being stopped returns only once that write is over (no commit left in flight).

    Raises:
        CancelledError: after ``coro`` finished, if the caller was cancelled meanwhile.
        Whatever ``coro`` raised otherwise.
    """
    task = asyncio.create_task(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise asyncio.CancelledError
    return task.result()
