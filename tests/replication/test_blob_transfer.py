"""Blob transfer between in-process services: dedupe, sharing, resume, corruption."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mesh import FAST, HASH, Mesh, wait_until

from replication.blobs import BlobReceiver
from replication.channel import ChannelClosed
from replication.errors import ProtocolError
from replication.messages import BlobCredit, Chunk, End, Message, Missing, Want
from storage.blobs import BlobInfo, BlobStore
from storage.errors import BlobCorrupt, BlobMissing

MiB = 1 << 20
# Small chunks and one chunk of credit: a transfer takes long enough to interrupt.
SLOW = replace(FAST, chunk_bytes=64 << 10, chunk_credit=1)


async def put_blob(blobs: BlobStore, data: bytes) -> BlobInfo:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), MiB):
            yield data[i : i + MiB]

    return await blobs.ingest(chunks(), max_bytes=1 << 30)


async def read_blob(blobs: BlobStore, hash: str) -> bytes:
    return b"".join([c async for c in blobs.read(hash)])


async def peer_status(mesh: Mesh, node: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in (await mesh.nodes[node].svc.status())["peers"]}


async def test_fetch_verifies_and_a_second_fetch_transfers_nothing(mesh: Mesh) -> None:
    a, b = await mesh.add("a", "b")
    await mesh.start("a")
    await mesh.start("b")
    await mesh.connected("a", "b")
    data = os.urandom(3 * MiB + 123)
    info = await put_blob(a.blobs, data)

    await b.svc.fetch(info.hash, info.size)
    assert await read_blob(b.blobs, info.hash) == data
    assert (await b.svc.status())["blob_bytes_received"] == info.size
    assert (await a.svc.status())["blob_bytes_sent"] == info.size
    assert b.blobs.partial_offset(info.hash) == 0  # the partial became the blob

    await b.svc.fetch(info.hash, info.size)  # already here: nobody is asked
    await asyncio.gather(*(b.svc.fetch(info.hash, info.size) for _ in range(3)))
    assert (await b.svc.status())["blob_bytes_received"] == info.size
    assert (await a.svc.status())["blob_bytes_sent"] == info.size
    assert b.blobs.stats() == (1, info.size)


async def test_concurrent_fetches_share_one_transfer(mesh: Mesh) -> None:
    a, b = await mesh.add("a", "b")
    await mesh.start("a")
    await mesh.start("b", SLOW)
    await mesh.connected("a", "b")
    info = await put_blob(a.blobs, os.urandom(2 * MiB))
    await asyncio.gather(*(b.svc.fetch(info.hash, info.size) for _ in range(5)))
    assert (await b.svc.status())["blob_bytes_received"] == info.size
    assert await b.blobs.verify(info.hash)


async def test_more_blobs_at_once_than_a_sender_serves_wait_their_turn(mesh: Mesh) -> None:
    # A node converging many projects at once asks one peer for many blobs: the sender
    # serves at most max_transfers per subscriber, so the receiver must queue the rest
    # (asking for more was a protocol error that dropped the channel, forever).
    a, b = await mesh.add("a", "b")
    await mesh.start("a", replace(FAST, max_transfers=4))
    await mesh.start("b", replace(FAST, max_transfers=4))
    await mesh.connected("a", "b")
    infos = [await put_blob(a.blobs, os.urandom(100_000 + i)) for i in range(13)]
    await asyncio.gather(*(b.svc.fetch(i.hash, i.size) for i in infos))
    for info in infos:
        assert await b.blobs.verify(info.hash)
    assert (await peer_status(mesh, "b"))["a"]["disconnects"] == 0


async def test_resume_after_interruption_sends_only_the_rest(mesh: Mesh) -> None:
    a, b = await mesh.add("a", "b")
    await mesh.start("a", SLOW)
    await mesh.start("b", SLOW)
    await mesh.connected("a", "b")
    data = os.urandom(8 * MiB)
    info = await put_blob(a.blobs, data)

    first = asyncio.create_task(b.svc.fetch(info.hash, info.size))
    await wait_until(lambda: b.blobs.partial_offset(info.hash) >= MiB, what="1 MiB fetched")
    await mesh.stop("b")  # the receiving node goes away mid-transfer
    with pytest.raises(asyncio.CancelledError):
        await first
    offset = b.blobs.partial_offset(info.hash)
    assert MiB <= offset < info.size and not b.blobs.has(info.hash)
    await wait_until(lambda: not a.svc.subscribers(), what="a's session with b over")
    sent_before = (await a.svc.status())["blob_bytes_sent"]

    await mesh.start("b", SLOW)
    await mesh.connected("a", "b")
    # Where the resume starts: a write of the first attempt still in its thread when the
    # test looked above may have landed since.
    offset = b.blobs.partial_offset(info.hash)
    await b.svc.fetch(info.hash, info.size)
    assert await read_blob(b.blobs, info.hash) == data
    resumed = (await b.svc.status())["blob_bytes_received"]
    sent_again = (await a.svc.status())["blob_bytes_sent"] - sent_before
    assert resumed == sent_again == info.size - offset
    assert sent_again < info.size


async def test_resume_from_another_peer(mesh: Mesh) -> None:
    a, b, c = await mesh.add("a", "b", "c")
    for n in (a, b, c):
        await mesh.start(n.name, SLOW)
    await mesh.connected("a", "b", "c")
    data = os.urandom(8 * MiB)
    info = await put_blob(a.blobs, data)
    assert await put_blob(c.blobs, data) == info

    fetch = asyncio.create_task(b.svc.fetch(info.hash, info.size))  # asks a first
    await wait_until(lambda: b.blobs.partial_offset(info.hash) >= MiB, what="1 MiB from a")
    await mesh.stop("a")
    await fetch
    assert await read_blob(b.blobs, info.hash) == data
    peers = await peer_status(mesh, "b")
    from_a, from_c = peers["a"]["blob_bytes_received"], peers["c"]["blob_bytes_received"]
    assert from_a >= MiB and 0 < from_c < info.size
    assert from_a + from_c == info.size


async def test_corrupt_bytes_raise_and_store_nothing(mesh: Mesh) -> None:
    a, b = await mesh.add("a", "b")
    await mesh.start("a")
    await mesh.start("b")
    await mesh.connected("a", "b")
    info = await put_blob(a.blobs, os.urandom(MiB))
    a.blobs.path(info.hash).write_bytes(os.urandom(info.size))  # bit rot on the sender

    with pytest.raises(BlobCorrupt):
        await b.svc.fetch(info.hash, info.size)
    assert not b.blobs.has(info.hash)
    assert b.blobs.partial_offset(info.hash) == 0


async def test_missing_blob(mesh: Mesh) -> None:
    _a, b = await mesh.add("a", "b")
    await mesh.start("a")
    await mesh.start("b", replace(FAST, fetch_wait_s=0.3))
    await mesh.connected("a", "b")
    unknown = hashlib.sha256(b"nobody has this").hexdigest()
    with pytest.raises(BlobMissing, match="no connected peer has blob"):
        await b.svc.fetch(unknown, 15)
    await mesh.stop("a")
    await wait_until(lambda: not b.svc.connected(), what="a gone")
    with pytest.raises(BlobMissing, match="no peer that has it is connected"):
        await b.svc.fetch(unknown, 15)


async def test_a_fetch_waits_for_a_member_not_yet_connected(mesh: Mesh) -> None:
    # b reaches c, which lacks the blob, before it reaches a, which has it (a deploy's
    # origin right after a start): "nobody has it" is not the answer until every
    # member has been asked.
    a, b, _c = await mesh.add("a", "b", "c")
    await mesh.start("b", replace(FAST, fetch_wait_s=20))
    await mesh.start("c")
    await mesh.connected("b", "c")
    data = os.urandom(MiB)
    info = await put_blob(a.blobs, data)
    fetch = asyncio.create_task(b.svc.fetch(info.hash, info.size))
    await asyncio.sleep(0.5)  # c has been asked, and said no
    assert not fetch.done()
    await mesh.start("a")
    await asyncio.wait_for(fetch, 20)
    assert await read_blob(b.blobs, info.hash) == data


async def test_change_batches_are_not_starved_by_a_transfer(mesh: Mesh) -> None:
    a, b = await mesh.add("a", "b")
    await mesh.start("a", SLOW)
    await mesh.start("b", SLOW)
    await mesh.connected("a", "b")
    info = await put_blob(a.blobs, os.urandom(32 * MiB))
    fetch = asyncio.create_task(b.svc.fetch(info.hash, info.size))
    await wait_until(lambda: b.blobs.partial_offset(info.hash) > 0, what="transfer started")
    await a.accounts.put_user("urgent", password_hash=HASH, role="r", by="admin")
    await wait_until(lambda: b.accounts.get_user("urgent"), what="row replicated")
    in_flight = (await peer_status(mesh, "b"))["a"]["transfers"]
    assert not b.blobs.has(info.hash) and in_flight[0]["hash"] == info.hash
    await fetch


# -- the receiving half against a scripted sender -------------------------------------


class ScriptedChannel:
    """A channel that records what is sent and never receives."""

    peer = "x"
    remote = "test"

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def send(self, msg: Message) -> None:
        self.sent.append(msg)

    async def receive(self) -> Message:
        raise AssertionError("not used")

    async def close(self, reason: str = "", *, protocol_error: bool = False) -> None:
        return None


async def test_receiver_enforces_order_credit_and_size(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(100)
    h = hashlib.sha256(data).hexdigest()
    ch = ScriptedChannel()
    rx = BlobReceiver(ch, blobs, chunk_credit=2)
    request = asyncio.create_task(rx.request(h, 100, 0))
    await wait_until(lambda: len(ch.sent) == 2)
    assert ch.sent == [Want(h, 0), BlobCredit(2)]
    await rx.on_frame(Chunk(h, 0, data[:60]))
    # The chunk is written by the transfer's writer, and its credit comes back after.
    await wait_until(lambda: BlobCredit(1) in ch.sent, what="the first chunk written")
    with pytest.raises(ProtocolError, match="expected 60"):
        await rx.on_frame(Chunk(h, 10, data[10:20]))
    await rx.on_frame(Chunk(h, 60, data[60:]))
    await rx.on_frame(End(h, 100))
    assert await request == 100
    await blobs.finish_partial(h, 100)
    assert blobs.has(h)

    with pytest.raises(ProtocolError, match="not asked for"):
        await rx.on_frame(Missing(h))
    other = hashlib.sha256(b"other").hexdigest()
    over = asyncio.create_task(rx.request(other, 5, 0))
    await wait_until(lambda: len(ch.sent) >= 5)
    await rx.on_frame(Chunk(other, 0, b"toolong"))  # more than the record's size
    with pytest.raises(BlobCorrupt, match="more than 5 bytes"):
        await over
    assert blobs.partial_offset(other) == 0
    await rx.on_frame(End(other, 7))  # the abandoned transfer drains quietly
    greedy = BlobReceiver(ScriptedChannel(), blobs, chunk_credit=1)
    with pytest.raises(ProtocolError, match="beyond the chunk credit"):
        await greedy.on_frame(Chunk(other, 0, b"x"))


class GatedBlobs(BlobStore):
    """A blob store whose partial writes wait for ``gate`` (a slow disk), recording each."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()
        self.writes: list[int] = []

    async def append_partial(self, hash: str, offset: int, data: Any) -> int:
        await self.gate.wait()
        self.writes.append(len(data))
        return await super().append_partial(hash, offset, data)


async def test_receiver_hands_chunks_to_a_writer_and_credits_once_written(
    tmp_path: Path,
) -> None:
    blobs = GatedBlobs(tmp_path / "blobs")
    data = os.urandom(300)
    h = hashlib.sha256(data).hexdigest()
    ch = ScriptedChannel()
    rx = BlobReceiver(ch, blobs, chunk_credit=3)
    request = asyncio.create_task(rx.request(h, 300, 0))
    await wait_until(lambda: len(ch.sent) == 2)
    # The disk is stuck, yet every frame is taken at once: the read loop never waits on it.
    for i in range(3):
        await asyncio.wait_for(rx.on_frame(Chunk(h, i * 100, data[i * 100 : (i + 1) * 100])), 1)
    await asyncio.wait_for(rx.on_frame(End(h, 300)), 1)
    assert ch.sent == [Want(h, 0), BlobCredit(3)] and not request.done()
    blobs.gate.set()
    assert await request == 300  # only once every chunk is on disk
    # The first chunk went alone; the two that queued behind it in one write.
    assert blobs.writes == [1, 2]
    assert ch.sent[2:] == [BlobCredit(1), BlobCredit(2)]
    await blobs.finish_partial(h, 300)
    assert await read_blob(blobs, h) == data


async def test_a_closed_channel_ends_the_request_after_its_writes(tmp_path: Path) -> None:
    blobs = GatedBlobs(tmp_path / "blobs")
    data = os.urandom(200)
    h = hashlib.sha256(data).hexdigest()
    ch = ScriptedChannel()
    rx = BlobReceiver(ch, blobs, chunk_credit=4)
    request = asyncio.create_task(rx.request(h, 200, 0))
    await wait_until(lambda: len(ch.sent) == 2)
    await rx.on_frame(Chunk(h, 0, data[:100]))
    rx.close("gone")
    await asyncio.sleep(0)
    assert not request.done()  # the chunk it holds is still being written
    blobs.gate.set()
    with pytest.raises(ChannelClosed):
        await request
    assert blobs.partial_offset(h) == 100  # where the next attempt resumes
