"""Fetching payload blobs from peers: chunked, flow-controlled, resumable, shared.

Two layers:

- :class:`BlobReceiver` is the receiving half of blob transfers on one channel. It asks
  with ``Want(hash, offset)``, keeps the sender's chunk credit topped up to
  ``chunk_credit`` (one ``BlobCredit`` back per chunk written), appends each chunk to
  the blob store's partial file, and ends the attempt on ``End`` or ``Missing``.
  A chunk out of order or beyond credit is a protocol violation.
- :class:`BlobFetcher` is what the deploy code calls (the ``BlobFetcher`` protocol). It
  asks connected peers in turn, each attempt resuming from the partial file's length,
  so a transfer broken by a disconnect continues from where it stopped, possibly from
  another peer; it verifies sha256 and size before the blob appears in the store.
  Concurrent fetches of one hash share one transfer, which belongs to the fetcher (a
  caller that gives up does not abort it), and a hash already stored is never asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from replication.channel import Channel, ChannelClosed
from replication.errors import ProtocolError
from replication.messages import BlobCredit, Chunk, End, Missing, Want
from replication.session import Clock
from storage.blobs import BlobStore
from storage.errors import BlobCorrupt, BlobMissing, StorageError

__all__ = ["BlobFetcher", "BlobReceiver", "Source"]

log = structlog.get_logger(__name__)


@dataclass
class _Incoming:
    """One blob arriving: where the next chunk must start (``offset``), what is on disk
    (``written``), and the chunks received but not yet written."""

    hash: str
    size: int
    offset: int
    done: asyncio.Future[int]
    written: int = 0
    received: int = 0
    pending: list[bytes] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None
    #: The frame that ended the transfer (End or Missing), settled once writes are done.
    end: End | Missing | None = None
    dead: bool = False


class BlobReceiver:
    """Blob transfers arriving on one channel.

    Chunks are written to the partial file by a writer task per transfer, never inline:
    the channel's read loop hands a chunk over and goes on reading (a change batch
    behind a chunk is not held up by the disk). Chunks that arrive while a write is in
    flight go to disk together in the next write (one thread call, one ``writev``), and
    the chunk credit comes back once they are written, so what waits in memory is
    bounded by the credit.

    Args:
        channel: the (dialled) channel the sender serves blobs on.
        blobs: where partial and finished blobs go.
        chunk_credit: chunks the sender may have in flight on this channel.
        max_transfers: blobs the sender serves at once; more requests wait their turn
            (a blob asked for counts until its ``End`` or ``Missing`` arrives, also
            one its caller gave up on).
        on_bytes: called with the length of each write (for counters).
    """

    def __init__(
        self,
        channel: Channel,
        blobs: BlobStore,
        *,
        chunk_credit: int,
        max_transfers: int = 16,
        on_bytes: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.channel = channel
        self.blobs = blobs
        self.chunk_credit = chunk_credit
        self.on_bytes = on_bytes
        self._slots = asyncio.Semaphore(max_transfers)
        self._outstanding = 0  # chunk credit granted and not yet used
        self._active: dict[str, _Incoming] = {}
        self._abandoned: set[str] = set()  # asked for, no longer wanted: drain quietly
        self._closed: BaseException | None = None

    def transfers(self) -> list[dict[str, Any]]:
        """Blobs in flight from this peer, for status."""
        return [
            {"hash": t.hash, "direction": "receive", "offset": t.offset, "size": t.size,
             "bytes": t.received}
            for t in self._active.values()
        ]  # fmt: skip

    async def request(self, hash: str, size: int, offset: int) -> int:
        """Ask for ``hash`` from ``offset`` and wait until every byte is in the partial.

        Returns only once no write of this attempt is in flight, so the partial's
        length is where a next attempt resumes.

        Returns:
            Bytes received in this attempt.

        Raises:
            BlobMissing: the peer does not have the blob.
            BlobCorrupt: the peer sent more bytes than ``size``, or a wrong size at
                the end; the partial is dropped.
            ChannelClosed: the channel ended first (the partial keeps what arrived).
            StorageError: the partial could not be written.
        """
        if hash in self._active:
            raise RuntimeError(f"blob {hash} is already being fetched on this channel")
        await self._slots.acquire()  # released when its End or Missing arrives
        if self._closed is not None:
            self._slots.release()
            raise ChannelClosed(f"channel to {self.channel.peer!r} is closed")
        if hash in self._active or hash in self._abandoned:
            self._slots.release()
            raise RuntimeError(f"blob {hash} is already being fetched on this channel")
        t = _Incoming(hash, size, offset, asyncio.get_running_loop().create_future())
        t.written = offset
        self._active[hash] = t
        try:
            await self.channel.send(Want(hash, offset))
            if (grant := self.chunk_credit - self._outstanding) > 0:
                self._outstanding += grant
                await self.channel.send(BlobCredit(grant))
            return await t.done
        except BaseException:
            if self._active.pop(hash, None) is not None and not t.done.done():
                self._abandoned.add(hash)  # the sender may still be sending it
            t.dead = True
            raise
        finally:
            if t.writer is not None and not t.writer.done():
                await asyncio.wait([t.writer])  # never cancels it: the partial settles

    def close(self, reason: str) -> None:
        """Fail every transfer in flight with ChannelClosed (the channel ended)."""
        self._closed = ChannelClosed(reason)
        for t in self._active.values():
            if not t.done.done():
                t.done.set_exception(ChannelClosed(reason))
        self._active.clear()

    async def on_frame(self, msg: Chunk | End | Missing) -> None:
        """Handle a blob frame from the sender.

        Raises:
            ProtocolError: a frame for a blob not asked for, out of order or beyond credit.
        """
        if isinstance(msg, Chunk):
            await self._on_chunk(msg)
            return
        t = self._active.pop(msg.hash, None)
        if t is None:
            if msg.hash not in self._abandoned:
                raise ProtocolError(f"{msg.TYPE} for blob {msg.hash}, which was not asked for")
            self._abandoned.discard(msg.hash)
            self._slots.release()
            return
        self._slots.release()
        t.end = msg
        if t.writer is None or t.writer.done():
            self._settle(t)
        # else the writer settles it once the chunks before this frame are on disk

    def _settle(self, t: _Incoming) -> None:
        """The transfer ended and every chunk is written: resolve its waiter."""
        msg = t.end
        if t.done.done() or msg is None:
            return
        if isinstance(msg, Missing):
            t.done.set_exception(BlobMissing(f"{self.channel.peer!r} has no blob {msg.hash}"))
        elif msg.size != t.size or t.offset != t.size:
            self.blobs.drop_partial(t.hash)
            t.done.set_exception(
                BlobCorrupt(f"{self.channel.peer!r} ended blob {t.hash} at {t.offset} bytes "
                            f"of {msg.size}; the record says {t.size}")
            )  # fmt: skip
        else:
            t.done.set_result(t.received)

    async def _on_chunk(self, chunk: Chunk) -> None:
        self._outstanding -= 1
        if self._outstanding < 0:
            raise ProtocolError("a chunk arrived beyond the chunk credit granted")
        if not chunk.data:
            raise ProtocolError("an empty chunk arrived")
        t = self._active.get(chunk.hash)
        if t is None and chunk.hash not in self._abandoned:
            raise ProtocolError(f"a chunk of blob {chunk.hash} arrived, which was not asked for")
        if t is None:  # abandoned: drop it, and the credit comes back at once
            await self._grant(1)
            return
        if chunk.offset != t.offset:
            raise ProtocolError(f"chunk at offset {chunk.offset}, expected {t.offset}")
        if t.offset + len(chunk.data) > t.size:
            del self._active[t.hash]
            self._abandoned.add(t.hash)
            t.dead = True
            self.blobs.drop_partial(t.hash)
            t.done.set_exception(
                BlobCorrupt(f"{self.channel.peer!r} sent more than {t.size} bytes of {t.hash}")
            )
            await self._grant(1 + len(t.pending))
            t.pending.clear()
            return
        t.offset += len(chunk.data)
        t.pending.append(chunk.data)
        if t.writer is None or t.writer.done():
            t.writer = asyncio.create_task(self._write(t), name=f"blob-write-{t.hash[:12]}")

    async def _write(self, t: _Incoming) -> None:
        """Write what arrived, batch by batch, until nothing waits; then settle."""
        while t.pending and not t.dead:
            bufs, t.pending = t.pending, []
            n = sum(len(b) for b in bufs)
            try:
                await self.blobs.append_partial(t.hash, t.written, bufs)
            except (StorageError, ValueError) as e:
                # The disk failed, or the partial is not where this attempt thought
                # (it changed under us): this attempt ends; the fetch decides.
                t.dead = True
                if self._active.get(t.hash) is t:
                    del self._active[t.hash]
                    self._abandoned.add(t.hash)
                if not t.done.done():
                    err = (
                        e
                        if isinstance(e, StorageError)
                        else StorageError(f"partial of {t.hash} is not where expected: {e}")
                    )
                    t.done.set_exception(err)
                await self._grant(len(bufs) + len(t.pending))
                t.pending.clear()
                return
            t.written += n
            t.received += n
            self.on_bytes(n)
            await self._grant(len(bufs))
        if t.dead and t.pending:
            await self._grant(len(t.pending))
            t.pending.clear()
        self._settle(t)

    async def _grant(self, chunks: int) -> None:
        """Give ``chunks`` of credit back (nothing once the channel is closed)."""
        if self._closed is not None:
            return
        self._outstanding += chunks
        with contextlib.suppress(ChannelClosed):  # the session is ending; its reader knows
            await self.channel.send(BlobCredit(chunks))


#: A connected peer that can be asked for blobs: its name and its receiver.
Source = tuple[str, BlobReceiver]


class BlobFetcher:
    """Brings blobs into the local store from whichever connected peer has them.

    Args:
        blobs: the local blob store.
        sources: the connected peers to ask, in the order to ask them.
        wait_for_connect: waits up to the given seconds for a peer to (re)connect;
            True if one did.
        clock: the clock seam.
        wait_s: how long a transfer waits for a peer when none is connected (or after
            a disconnect), measured from its last progress.
        all_connected: whether every member peer is connected. When every connected
            peer says it lacks the blob but some member is not connected yet (the
            deploy's origin, say, right after a start), the transfer waits for it.
    """

    def __init__(
        self,
        blobs: BlobStore,
        *,
        sources: Callable[[], list[Source]],
        wait_for_connect: Callable[[float], Awaitable[bool]],
        clock: Clock,
        wait_s: float,
        all_connected: Callable[[], bool] = lambda: True,
    ) -> None:
        self.blobs = blobs
        self._sources = sources
        self._all_connected = all_connected
        self._wait_for_connect = wait_for_connect
        self._clock = clock
        self._wait_s = wait_s
        self._running: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    async def fetch(self, payload_hash: str, size: int) -> None:
        """Bring blob ``payload_hash`` of ``size`` bytes into the store, verified.

        Raises:
            BlobMissing: no connected peer has it (or none connected in time).
            BlobCorrupt: the bytes received do not match; nothing is stored.
            StorageError: the local store failed.
        """
        if self.blobs.has(payload_hash):
            return
        task = self._running.get(payload_hash)
        if task is None:
            if self._closed:
                raise BlobMissing(f"blob {payload_hash}: replication is stopping")
            task = asyncio.create_task(
                self._transfer(payload_hash, size), name=f"blob-{payload_hash[:12]}"
            )
            self._running[payload_hash] = task
            task.add_done_callback(self._forget)
        # Shielded: one caller giving up must not abort a transfer others wait on.
        await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[None]) -> None:
        for key, value in list(self._running.items()):
            if value is task:
                del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: callers that still wait got it already

    async def close(self) -> None:
        """Cancel every transfer and wait for them (partials stay for a later resume)."""
        self._closed = True
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _transfer(self, hash: str, size: int) -> None:
        deadline = self._clock.monotonic() + self._wait_s
        while not self.blobs.has(hash):
            sources = self._sources()
            missing: list[str] = []
            for name, receiver in sources:
                offset = self.blobs.partial_offset(hash)
                if offset > size:  # longer than the blob: cannot be a prefix of it
                    self.blobs.drop_partial(hash)
                    offset = 0
                try:
                    got = await receiver.request(hash, size, offset)
                except BlobMissing:
                    missing.append(name)
                    continue
                except ChannelClosed:
                    # Resume from the partial on the next peer, or on this one when it
                    # is back; progress buys more time.
                    if self.blobs.partial_offset(hash) > offset:
                        deadline = self._clock.monotonic() + self._wait_s
                    log.info("blob_transfer_interrupted", hash=hash, peer=name, offset=offset)
                    continue
                await self.blobs.finish_partial(hash, size)  # BlobCorrupt drops the partial
                log.info(
                    "blob_fetched", hash=hash, peer=name, size=size, bytes=got, resumed_from=offset
                )
                return
            if sources and len(missing) == len(sources) and self._all_connected():
                raise BlobMissing(f"no connected peer has blob {hash} (asked {', '.join(missing)})")
            left = deadline - self._clock.monotonic()
            if left <= 0:
                asked = f" (asked {', '.join(missing)})" if missing else ""
                raise BlobMissing(
                    f"blob {hash} is not on this node and no peer that has it is connected{asked}"
                )
            await self._wait_for_connect(min(left, 1.0))
