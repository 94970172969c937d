"""Serving one subscriber: entries of the logs it asked for, and the blobs it wants.

The dialler of a channel is the receiver. After the handshake it sends ``Subscribe``
(what it holds of each log, and the scope: this node's own log only, or every log this
node holds except those it pulls from their writers directly). From then on this session:

- sends ``Batch`` frames, never more in flight than the credit granted (each applied
  batch grants one more). A batch takes entries from the subscribed logs in turn, dense
  from the change log or compacted from the rows (:mod:`storage.serve`), up to a byte
  budget that keeps it well inside a frame. When caught up it waits on the change
  feed, never polling. Before the first entry signed by a key this session has not yet
  mentioned, the certificate behind it goes out in a ``Certs`` frame.
- streams each wanted blob as ``Chunk`` frames, one per unit of chunk credit, then
  ``End`` (or ``Missing``). Batches always go first: a chunk is sent only when no batch is
  ready, so a large blob never delays row replication by more than one chunk.
- answers ``Ping`` with ``Pong`` and pings the subscriber in turn, and reports the
  positions the subscriber acknowledges (``on_positions``) so trimming knows them.

Anything the subscriber sends out of protocol ends the session with ProtocolError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from replication.channel import Channel
from replication.errors import ProtocolError
from replication.messages import (
    RELAY,
    Batch,
    BlobCredit,
    Certs,
    Chunk,
    Credit,
    End,
    LogRange,
    Message,
    Missing,
    Ping,
    Pong,
    Subscribe,
    Want,
    WireEntry,
)
from replication.session import Clock, Liveness, Settings, heartbeat, race
from storage.blob_io import FileReader
from storage.blobs import BlobStore
from storage.changelog import CHANGELOG, Subscription
from storage.entries import UNSIGNED_KEY_ID
from storage.store import Store

__all__ = ["SendStats", "SenderSession"]

log = structlog.get_logger(__name__)

# Bounds on what a subscriber may grant: far above what any sane receiver asks for, low
# enough that counters cannot be pushed to silly values.
_MAX_CREDIT = 10_000
# Bytes a Batch spends around each entry (routing fields, array headers).
_ENTRY_OVERHEAD_BYTES = 160

#: Finds the certificate (DER) behind a key id, or None.
CertLookup = Callable[[str], bytes | None]
#: Told the positions a subscriber holds (``{log_id: oseq}``).
OnPositions = Callable[[str, Mapping[str, int]], None]


@dataclass
class SendStats:
    """What this node sent one peer, across sessions."""

    batches_sent: int = 0
    entries_sent: int = 0
    bytes_sent: int = 0
    blob_bytes_sent: int = 0


@dataclass
class _Outgoing:
    """One blob being sent: next offset, total size (-1: we do not have it), and the
    open file it is read from (one chunk read ahead)."""

    hash: str
    pos: int
    size: int
    reader: FileReader | None = None
    sent: int = field(default=0)


class SenderSession:
    """Serves one authenticated subscriber on one channel until either side stops.

    Args:
        channel: the channel, after a successful handshake.
        peer_log_id: the subscriber's own log (it is never sent back to it).
        store: this node's store.
        blobs: this node's blob store.
        settings: batch sizes, heartbeats, limits.
        clock: the clock seam.
        stats: counters for this peer, kept across sessions by the caller.
        certs: finds certificates by key id.
        on_positions: told what the subscriber holds, as it says so.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        peer_log_id: str,
        store: Store,
        blobs: BlobStore,
        settings: Settings,
        clock: Clock,
        stats: SendStats,
        certs: CertLookup,
        on_positions: OnPositions,
    ) -> None:
        self.channel = channel
        self.peer = channel.peer
        self.peer_log_id = peer_log_id
        self.store = store
        self.blobs = blobs
        self.settings = settings
        self.clock = clock
        self.stats = stats
        self._certs = certs
        self._on_positions = on_positions
        self.liveness = Liveness(clock)
        self._credit = 0
        self._chunk_credit = 0
        self._scope = "own"
        self._exclude: frozenset[str] = frozenset()
        #: Per served log: the last position sent (or the subscriber's, at first).
        self._sent: dict[str, int] = {}
        self._reported: dict[str, int] = {}
        self._certs_sent: set[str] = set()
        self._dirty = True
        # The first batch of each subscription goes out even if empty: it carries the
        # lag, which tells the subscriber it is caught up in this scope.
        self._initial = True
        self._turn = 0
        self._wake = asyncio.Event()
        self._transfers: dict[str, _Outgoing] = {}
        self.lag_entries = 0

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
        self._subscribe(first)
        log.info("subscriber_started", peer=self.peer, scope=self._scope)
        s = self.settings
        try:
            with self.store.feed.subscribe(lambda n: n.tbl == CHANGELOG, maxsize=1) as sub:
                await race(
                    self._read(),
                    self._write(),
                    self._watch(sub),
                    heartbeat(
                        self.channel, self.liveness, clock=self.clock,
                        interval_s=s.heartbeat_s, dead_after_s=s.dead_after_s,
                    ),
                )  # fmt: skip
        finally:
            for t in list(self._transfers.values()):
                await self._close(t)
            self._transfers.clear()

    def _bounded(self, credit: int) -> int:
        if credit > _MAX_CREDIT:
            raise ProtocolError(f"credit of {credit} is beyond {_MAX_CREDIT}")
        return credit

    def _subscribe(self, msg: Subscribe) -> None:
        self._credit = self._bounded(self._credit + msg.credit)
        self._scope = msg.scope
        self._exclude = frozenset(msg.exclude)
        # Serve from what the subscriber says it holds: batches still in flight are
        # then sent again (it drops what it has), and nothing is ever skipped.
        self._reported.update(msg.positions)
        self._sent = {log_id: msg.positions.get(log_id, 0) for log_id in self._served()}
        self._on_positions(self.peer, msg.positions)
        self._dirty = True
        self._initial = True

    def _served(self) -> list[str]:
        """The logs this subscription covers, right now."""
        own = self.store.log_id
        if self._scope != RELAY:
            return [own]
        return [
            info.log_id
            for info in self.store.logs.all()
            if info.log_id not in self._exclude and info.log_id != self.peer_log_id
        ]

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
            if msg.positions:
                self._reported.update(msg.positions)
                self._on_positions(self.peer, msg.positions)
        elif isinstance(msg, Subscribe):
            self._subscribe(msg)
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
            reader: FileReader | None = FileReader(self.blobs.path(want.hash))
        except FileNotFoundError:
            reader = None
        size = reader.size if reader is not None else -1
        self._transfers[want.hash] = _Outgoing(want.hash, want.offset, size, reader)

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
            await self._close(t)
            await self.channel.send(Missing(t.hash) if t.size < 0 else End(t.hash, t.size))
            log.info("blob_sent", peer=self.peer, hash=t.hash, size=t.size, bytes=t.sent)
            return True
        if self._chunk_credit <= 0:
            return False
        await self._send_chunk(next(iter(self._transfers.values())))
        return True

    async def _send_batch(self) -> bool:
        self._dirty = False  # a notice arriving from here on sets it again
        s = self.settings
        budget = s.batch_bytes
        entries: list[WireEntry] = []
        ranges: list[LogRange] = []
        served = self._served()
        for log_id in served:
            self._sent.setdefault(log_id, self._reported.get(log_id, 0))
        # Take turns between logs, so one long log does not starve the others.
        order = served[self._turn % len(served) :] + served[: self._turn % len(served)]
        self._turn += 1
        for log_id in order:
            after = self._sent[log_id]
            if budget <= 0 or len(entries) >= s.batch_changes:
                self._dirty = True
                break
            chunk = await self.store.read_log(
                log_id, after, max_entries=s.batch_changes - len(entries), max_bytes=budget
            )
            if chunk.last == after:
                continue
            ranges.append(LogRange(log_id, after, chunk.last, chunk.compacted))
            for e in chunk.entries:
                entries.append(WireEntry(e.log_id, e.oseq, e.writer, e.key_id, e.body, e.sig))
                budget -= len(e.body) + len(e.sig) + _ENTRY_OVERHEAD_BYTES
            self._sent[log_id] = chunk.last
            if chunk.last < self.store.logs.head(log_id):
                self._dirty = True  # more of this log next time
        if not ranges and not self._initial:
            self.lag_entries = 0
            return False
        await self._send_certs(entries)
        self.lag_entries = sum(
            max(0, self.store.logs.head(log_id) - self._sent.get(log_id, 0)) for log_id in served
        )
        await self.channel.send(
            Batch(tuple(ranges), tuple(entries), lag_entries=self.lag_entries,
                  lag_bytes=self._lag_bytes(served))
        )  # fmt: skip
        self._initial = False
        self._credit -= 1
        self.stats.batches_sent += 1
        self.stats.entries_sent += len(entries)
        self.stats.bytes_sent += sum(len(e.body) for e in entries)
        return True

    def _lag_bytes(self, served: list[str]) -> int:
        """An estimate: entries behind times the log's average entry size."""
        total = 0
        for log_id in served:
            info = self.store.logs.get(log_id)
            if info is None or info.head <= 0:
                continue
            behind = max(0, info.head - self._sent.get(log_id, 0))
            total += behind * info.bytes // max(1, info.head)
        return total

    async def _send_certs(self, entries: list[WireEntry]) -> None:
        wanted = {e.key_id for e in entries} - self._certs_sent - {UNSIGNED_KEY_ID}
        ders = []
        for key_id in sorted(wanted):
            der = self._certs(key_id)
            if der is not None:
                ders.append(der)
            self._certs_sent.add(key_id)
        if ders:
            await self.channel.send(Certs(tuple(ders)))

    async def _send_chunk(self, t: _Outgoing) -> None:
        step = self.settings.chunk_bytes
        n = min(step, t.size - t.pos)
        data = b""
        if t.reader is not None:
            # The chunk after this one is read while this one is encrypted and sent.
            after = t.pos + n
            data = await t.reader.read(t.pos, n, then=min(step, t.size - after))
        if len(data) < n or not data:  # truncated under us: the subscriber asks elsewhere
            await self._close(t)
            t.size = -1
            return
        await self.channel.send(Chunk(t.hash, t.pos, data))
        t.pos += len(data)
        t.sent += len(data)
        self._chunk_credit -= 1
        self.stats.blob_bytes_sent += len(data)
        # Take turns between blobs: this one goes to the back of the line.
        self._transfers[t.hash] = self._transfers.pop(t.hash)

    @staticmethod
    async def _close(t: _Outgoing) -> None:
        reader, t.reader = t.reader, None
        if reader is not None:
            await reader.close()
