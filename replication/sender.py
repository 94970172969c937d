"""Serving one subscriber: its changes from this node's log, and the blobs it wants.

The dialler of a channel is the receiver of the listener's change log. After the
handshake it sends ``Subscribe(after_seq, credit)``; from then on this session:

- sends ``Changes`` batches read with :meth:`storage.store.Store.changes_after`,
  skipping entries the subscriber wrote itself, never more batches in flight than the
  credit it granted (each applied batch grants one more). When caught up it waits on the
  change feed's ``changelog`` notices, never polling. Batches are sized to fit the
  codec's frame limits (bytes and items).
- streams each wanted blob as ``Chunk`` frames, one per unit of chunk credit, then
  ``End`` (or ``Missing``). Change batches always go first: a chunk is sent only when no
  batch is ready to go, so a large blob never delays row replication by more than one
  chunk. Several wanted blobs take turns, a chunk each.
- answers ``Ping`` with ``Pong`` and pings the subscriber in turn.

Anything the subscriber sends out of protocol ends the session with ProtocolError.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from replication.channel import Channel
from replication.errors import ProtocolError
from replication.messages import (
    BlobCredit,
    ChangeEntry,
    Changes,
    Chunk,
    Credit,
    End,
    Message,
    Missing,
    Ping,
    Pong,
    Subscribe,
    Want,
)
from replication.session import Clock, Liveness, Settings, heartbeat, race
from storage.blobs import BlobStore
from storage.changelog import CHANGELOG, Subscription
from storage.errors import BlobMissing
from storage.records import Change
from storage.store import Store

__all__ = ["SendStats", "SenderSession", "fit_batch"]

log = structlog.get_logger(__name__)

# Bounds on what a subscriber may grant: far above what any sane receiver asks for, low
# enough that counters cannot be pushed to silly values.
_MAX_CREDIT = 10_000
# Bytes a Changes frame spends around each entry's data (field names, seq, version, ...).
_ENTRY_OVERHEAD_BYTES = 160


@dataclass
class SendStats:
    """What this node sent one peer, across sessions."""

    batches_sent: int = 0
    changes_sent: int = 0
    blob_bytes_sent: int = 0


@dataclass
class _Outgoing:
    """One blob being sent: next offset, total size (-1: we do not have it)."""

    hash: str
    pos: int
    size: int
    sent: int = field(default=0)


def _items(value: Any) -> int:
    """Containers' entries in ``value``, as the codec counts them (iteratively)."""
    count, stack = 0, [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            count += len(node)
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            count += len(node)
            stack.extend(node)
    return count


def fit_batch(
    changes: list[Change], last: int, settings: Settings
) -> tuple[tuple[ChangeEntry, ...], int]:
    """Cut a run of changes to what one frame can carry.

    Args:
        changes: entries read after the cursor, in seq order.
        last: the seq the read covered up to (past skipped entries).
        settings: frame limits and batch size.

    Returns:
        The entries to send and the ``last_seq`` the batch covers: ``last`` if all fit,
        else the seq of the last entry that fits (the rest go in the next batch).
    """
    limits = settings.limits
    budget_bytes = limits.max_frame_bytes * 9 // 10
    budget_items = limits.max_items * 9 // 10
    used_bytes, used_items = 256, 16  # the frame's own fields
    out: list[ChangeEntry] = []
    for c in changes:
        size = c.size + len(c.key) + len(c.tbl) + _ENTRY_OVERHEAD_BYTES
        items = 9 + _items(c.data)
        if out and (used_bytes + size > budget_bytes or used_items + items > budget_items):
            return tuple(out), out[-1].seq
        used_bytes += size
        used_items += items
        out.append(
            ChangeEntry(
                seq=c.seq, tbl=c.tbl, key=c.key, version=c.version, origin=c.origin, op=c.op,
                data=c.data, user=c.user, t=c.t,
            )
        )  # fmt: skip
    return tuple(out), last


class SenderSession:
    """Serves one authenticated subscriber on one channel until either side stops.

    Args:
        channel: the channel, after a successful handshake.
        store: this node's store (the change log is read from it).
        blobs: this node's blob store (wanted blobs are read from it).
        settings: batch sizes, heartbeats, limits.
        clock: the clock seam.
        stats: counters for this peer, kept across sessions by the caller.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        store: Store,
        blobs: BlobStore,
        settings: Settings,
        clock: Clock,
        stats: SendStats,
    ) -> None:
        self.channel = channel
        self.peer = channel.peer
        self.store = store
        self.blobs = blobs
        self.settings = settings
        self.clock = clock
        self.stats = stats
        self.liveness = Liveness(clock)
        self._after = 0
        self._credit = 0
        self._chunk_credit = 0
        self._dirty = True  # there may be changes after the cursor to send
        self._initial = True  # the first batch goes out even if empty: it carries the lag
        self._wake = asyncio.Event()
        self._transfers: dict[str, _Outgoing] = {}

    def transfers(self) -> list[dict[str, Any]]:
        """Blobs in flight to this subscriber, for status."""
        return [
            {"hash": t.hash, "direction": "send", "offset": t.pos, "size": t.size, "bytes": t.sent}
            for t in self._transfers.values()
        ]

    async def run(self) -> None:
        """Serve until the channel ends.

        Raises:
            ChannelClosed, PeerSilent: the session ended.
            ProtocolError: the subscriber broke the protocol.
        """
        first = await self.channel.receive()
        self.liveness.saw()
        if not isinstance(first, Subscribe):
            raise ProtocolError(f"expected subscribe after the handshake, got {first.TYPE}")
        self._after, self._credit = first.after_seq, self._bounded(first.credit)
        head = await self.store.head_seq()
        if self._after > head:
            # The subscriber has seen more of this log than it holds (a restored or
            # replaced data directory): it is served from its cursor once the log grows.
            log.warning("subscriber_cursor_ahead", peer=self.peer, cursor=self._after, head=head)
            self._initial = False
        log.info("subscriber_started", peer=self.peer, after_seq=self._after, head_seq=head)
        s = self.settings
        with self.store.feed.subscribe(lambda n: n.tbl == CHANGELOG, maxsize=1) as sub:
            await race(
                self._read(),
                self._write(),
                self._watch(sub),
                heartbeat(
                    self.channel, self.liveness, clock=self.clock, interval_s=s.heartbeat_s,
                    dead_after_s=s.dead_after_s,
                ),
            )  # fmt: skip

    def _bounded(self, credit: int) -> int:
        if credit > _MAX_CREDIT:
            raise ProtocolError(f"credit of {credit} is beyond {_MAX_CREDIT}")
        return credit

    async def _watch(self, sub: Subscription) -> None:
        while True:
            await sub.get()
            self._dirty = True
            self._wake.set()

    async def _read(self) -> None:
        while True:
            msg = await self.channel.receive()
            self.liveness.saw()
            await self._on(msg)
            self._wake.set()

    async def _on(self, msg: Message) -> None:
        if isinstance(msg, Credit):
            self._credit = self._bounded(self._credit + msg.batches)
        elif isinstance(msg, BlobCredit):
            self._chunk_credit = self._bounded(self._chunk_credit + msg.chunks)
        elif isinstance(msg, Want):
            self._want(msg)
        elif isinstance(msg, Ping):
            await self.channel.send(Pong(t=msg.t))
        elif isinstance(msg, Pong):
            self.liveness.pong(msg.t)
        else:
            raise ProtocolError(f"unexpected {msg.TYPE} frame from subscriber {self.peer!r}")

    def _want(self, want: Want) -> None:
        if want.hash in self._transfers:
            raise ProtocolError(f"blob {want.hash} is already being sent")
        if len(self._transfers) >= self.settings.max_transfers:
            raise ProtocolError(f"more than {self.settings.max_transfers} blobs wanted at once")
        try:
            size = self.blobs.size(want.hash)
        except BlobMissing:
            size = -1
        self._transfers[want.hash] = _Outgoing(want.hash, want.offset, size)

    async def _write(self) -> None:
        while True:
            # Cleared before looking, so a wake-up during a step is never lost.
            self._wake.clear()
            if not await self._step():
                await self._wake.wait()

    async def _step(self) -> bool:
        """Send the most urgent frame that may go now; False if none may."""
        if self._credit > 0 and self._dirty and await self._send_batch():
            return True
        if not self._transfers:
            return False
        done = [t for t in self._transfers.values() if t.size < 0 or t.pos >= t.size]
        if done:  # End and Missing need no credit
            t = done[0]
            del self._transfers[t.hash]
            await self.channel.send(Missing(t.hash) if t.size < 0 else End(t.hash, t.size))
            log.info("blob_sent", peer=self.peer, hash=t.hash, size=t.size, bytes=t.sent)
            return True
        if self._chunk_credit <= 0:
            return False
        await self._send_chunk(next(iter(self._transfers.values())))
        return True

    async def _send_batch(self) -> bool:
        after = self._after
        self._dirty = False  # a notice arriving from here on sets it again
        s = self.settings
        changes, last = await self.store.changes_after(
            after, limit=s.batch_changes, max_bytes=s.batch_bytes, skip_origin=self.peer
        )
        if last == after and not self._initial:
            return False
        entries, last = fit_batch(changes, last, s)
        head = max(await self.store.head_seq(), last)
        lag_bytes = await self.store.backlog_bytes(last, skip_origin=self.peer)
        await self.channel.send(
            Changes(entries, last_seq=last, head_seq=head, after_seq=after, lag_bytes=lag_bytes)
        )
        self._after, self._initial, self._dirty = last, False, True
        self._credit -= 1
        self.stats.batches_sent += 1
        self.stats.changes_sent += len(entries)
        return True

    async def _send_chunk(self, t: _Outgoing) -> None:
        end = min(t.size, t.pos + self.settings.chunk_bytes)
        try:
            reader = cast(AsyncGenerator[bytes, None], self.blobs.read(t.hash, t.pos, end))
            async with aclosing(reader) as parts:
                data = b"".join([part async for part in parts])
        except BlobMissing:
            data = b""
        if not data:  # deleted (or truncated) under us: the subscriber asks elsewhere
            t.size = -1
            return
        await self.channel.send(Chunk(t.hash, t.pos, data))
        t.pos += len(data)
        t.sent += len(data)
        self._chunk_credit -= 1
        self.stats.blob_bytes_sent += len(data)
        # Take turns between blobs: this one goes to the back of the line.
        self._transfers[t.hash] = self._transfers.pop(t.hash)
