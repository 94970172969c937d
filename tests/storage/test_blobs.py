"""BlobStore against real files in tmp_path: ingest, dedupe, limits, cleanup on error and
cancellation, ranges, verify, delete, resumable partials, sweep, crash points, memory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from storage.blobs import BlobInfo, BlobStore
from storage.errors import BlobCorrupt, BlobMissing, BlobTooLarge

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
EMPTY = hashlib.sha256(b"").hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def agen(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


class RecordingFaults:
    """Records crash points; raises at ``fail_at`` to stand in for a failure there."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.hits: list[str] = []
        self.fail_at = fail_at

    def hit(self, name: str) -> None:
        self.hits.append(name)
        if name == self.fail_at:
            raise RuntimeError(f"fault at {name}")


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


# -- ingest -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([], id="empty"),
        pytest.param([b"hello"], id="one-chunk"),
        pytest.param([b"a", b"", b"bc"] * 1000, id="tiny-chunks"),
        pytest.param(split(os.urandom(9 * MiB + 123), 777_777), id="across-batches"),
        pytest.param([os.urandom(10 * MiB)], id="chunk-larger-than-batch"),
    ],
)
async def test_ingest_stores_bytes_under_their_sha256(
    store: BlobStore, chunks: list[bytes]
) -> None:
    data = b"".join(chunks)
    info = await store.ingest(agen(chunks), max_bytes=len(data))
    assert info == BlobInfo(sha(data), len(data))
    path = store.root / "sha256" / info.hash[:2] / info.hash
    assert store.path(info.hash) == path
    assert path.read_bytes() == data
    assert store.has(info.hash) and store.size(info.hash) == len(data)
    assert files(store.root / "tmp") == []


async def test_identical_payloads_are_stored_once(store: BlobStore) -> None:
    data = os.urandom(5 * MiB)
    first = await store.ingest(agen(split(data, MiB)), max_bytes=len(data))
    second = await store.ingest(agen(split(data, 3000)), max_bytes=len(data))
    concurrent = await asyncio.gather(
        *(store.ingest(agen(split(data, MiB)), max_bytes=len(data)) for _ in range(3))
    )
    assert {first, second, *concurrent} == {BlobInfo(sha(data), len(data))}
    assert files(store.root) == [store.path(first.hash)]
    assert store.stats() == (1, len(data))


async def test_ingest_file_matches_streamed_ingest(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(6 * MiB + 5)
    src = tmp_path / "payload.tar.gz"
    src.write_bytes(data)
    assert await store.ingest_file(src, max_bytes=len(data)) == BlobInfo(sha(data), len(data))
    with pytest.raises(BlobTooLarge):
        await store.ingest_file(src, max_bytes=len(data) - 1)
    with pytest.raises(FileNotFoundError):
        await store.ingest_file(tmp_path / "absent", max_bytes=len(data))
    assert files(store.root / "tmp") == []


async def test_too_large_stops_at_the_limit_and_leaves_nothing(store: BlobStore) -> None:
    consumed: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(100):
            consumed.append(i)
            yield bytes(MiB)

    with pytest.raises(BlobTooLarge):
        await store.ingest(chunks(), max_bytes=10 * MiB)
    assert consumed == list(range(11))  # the 11th MiB is the first byte over
    assert files(store.root) == []
    exact = await store.ingest(agen([bytes(MiB)] * 10), max_bytes=10 * MiB)
    assert exact.size == 10 * MiB


async def test_error_from_the_stream_removes_the_temp_file(store: BlobStore) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(13):
            yield os.urandom(MiB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.ingest(chunks(), max_bytes=1 << 30)
    assert files(store.root) == []


async def test_cancel_mid_stream_removes_the_temp_file(store: BlobStore) -> None:
    stalled, never = asyncio.Event(), asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(12):  # three batches: the first is surely on disk
            yield os.urandom(MiB)
        stalled.set()
        await never.wait()
        yield b"unreachable"

    task = asyncio.create_task(store.ingest(chunks(), max_bytes=1 << 30))
    await stalled.wait()
    assert len(files(store.root / "tmp")) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files(store.root) == []


async def test_cancel_waits_for_the_worker_thread_before_cleaning_up(tmp_path: Path) -> None:
    entered, release = threading.Event(), threading.Event()

    class BlockingFaults:
        def hit(self, name: str) -> None:
            if name == "blob.after_write":  # runs in the worker thread
                entered.set()
                release.wait(30)
                raise RuntimeError("failed after being released")

    store = BlobStore(tmp_path / "blobs", faults=BlockingFaults())
    task = asyncio.create_task(store.ingest(agen([b"x" * 100]), max_bytes=100))
    await asyncio.to_thread(entered.wait, 30)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.05)
    assert not done, "cancellation must not return while the thread still owns the file"
    assert len(files(store.root / "tmp")) == 1
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files(store.root) == []


async def test_crash_points_are_hit_in_order(tmp_path: Path) -> None:
    faults = RecordingFaults()
    store = BlobStore(tmp_path / "blobs", faults=faults)
    await store.ingest(agen([b"payload"]), max_bytes=100)
    assert faults.hits == ["blob.after_write", "blob.before_rename"]
    faults.hits.clear()
    await store.ingest(agen([b"payload"]), max_bytes=100)
    assert faults.hits == ["blob.after_write"]  # dedupe: nothing to rename


@pytest.mark.parametrize("point", ["blob.after_write", "blob.before_rename"])
async def test_failure_at_a_crash_point_stores_nothing(tmp_path: Path, point: str) -> None:
    store = BlobStore(tmp_path / "blobs", faults=RecordingFaults(fail_at=point))
    with pytest.raises(RuntimeError, match=point):
        await store.ingest(agen([b"payload"]), max_bytes=100)
    assert not store.has(sha(b"payload"))
    assert files(store.root) == []


# -- lookup, read, verify, delete -------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "abc", EMPTY.upper(), EMPTY[:-1] + "g", EMPTY + "0", "../" + EMPTY[3:]]
)
async def test_malformed_hashes_are_rejected(store: BlobStore, bad: str) -> None:
    for call in (store.path, store.has, store.size, store.partial_offset, store.drop_partial):
        with pytest.raises(ValueError):
            call(bad)
    with pytest.raises(ValueError):
        await store.delete(bad)
    with pytest.raises(ValueError):
        await store.append_partial(bad, 0, b"x")


async def test_absent_blob(store: BlobStore) -> None:
    assert not store.has(EMPTY)
    with pytest.raises(BlobMissing):
        store.size(EMPTY)
    with pytest.raises(BlobMissing):
        await store.verify(EMPTY)
    with pytest.raises(BlobMissing):
        [c async for c in store.read(EMPTY)]


DATA = bytes(range(256)) * 4 + b"tail"  # 1028 bytes


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, None),
        (0, len(DATA)),
        (10, 20),
        (6, 7),
        (len(DATA) - 1, None),
        (5, 5),  # empty range
        (len(DATA), None),  # start at the end: nothing
        (len(DATA) + 50, None),  # start past the end: nothing
        (100, len(DATA) + 1000),  # end past the end: clamped
    ],
)
async def test_read_range(tmp_path: Path, start: int, end: int | None) -> None:
    store = BlobStore(tmp_path / "blobs", chunk_bytes=7)
    info = await store.ingest(agen([DATA]), max_bytes=len(DATA))
    chunks = [c async for c in store.read(info.hash, start, end)]
    assert b"".join(chunks) == DATA[start:end]
    assert all(0 < len(c) <= 7 for c in chunks)


@pytest.mark.parametrize(("start", "end"), [(-1, None), (10, 9)])
async def test_read_rejects_bad_ranges(store: BlobStore, start: int, end: int | None) -> None:
    info = await store.ingest(agen([DATA]), max_bytes=len(DATA))
    with pytest.raises(ValueError):
        [c async for c in store.read(info.hash, start, end)]


async def test_read_in_progress_survives_delete(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", chunk_bytes=100)
    info = await store.ingest(agen([DATA]), max_bytes=len(DATA))
    reader = store.read(info.hash)
    first = await anext(reader)
    assert await store.delete(info.hash) == len(DATA)
    assert first + b"".join([c async for c in reader]) == DATA


async def test_verify_detects_corruption(store: BlobStore) -> None:
    data = os.urandom(3 * MiB)
    info = await store.ingest(agen([data]), max_bytes=len(data))
    assert await store.verify(info.hash)
    path = store.path(info.hash)
    with path.open("r+b") as f:
        f.seek(MiB)
        f.write(bytes([data[MiB] ^ 1]))
    assert not await store.verify(info.hash)


async def test_delete_is_idempotent(store: BlobStore) -> None:
    a = await store.ingest(agen([b"a" * 10]), max_bytes=100)
    b = await store.ingest(agen([b"b" * 20]), max_bytes=100)
    assert store.stats() == (2, 30)
    assert await store.delete(a.hash) == 10
    assert await store.delete(a.hash) == 0
    assert not store.has(a.hash) and store.has(b.hash)
    assert store.stats() == (1, 20)


# -- in use: held blobs are never deleted -------------------------------------------------


async def unused() -> bool:
    return True


async def test_a_held_blob_is_never_deleted(store: BlobStore) -> None:
    info = await store.ingest(agen([b"payload"]), max_bytes=100)
    with store.holding(info.hash):
        with store.holding(info.hash):
            assert await store.delete_unused(info.hash, unused) == 0
        assert store.held(info.hash)
        assert await store.delete_unused(info.hash, unused) == 0
    assert not store.held(info.hash)
    assert store.has(info.hash)

    async def still_referenced() -> bool:
        return False

    assert await store.delete_unused(info.hash, still_referenced) == 0
    assert store.has(info.hash)
    assert await store.delete_unused(info.hash, unused) == len(b"payload")
    assert not store.has(info.hash)
    assert await store.delete_unused(info.hash, unused) == 0


async def test_an_ingest_can_return_with_its_blob_held(store: BlobStore) -> None:
    info = await store.ingest(agen([b"fresh"]), max_bytes=100, hold=True)
    assert store.held(info.hash)
    assert await store.delete_unused(info.hash, unused) == 0
    store.release(info.hash)
    assert not store.held(info.hash)
    assert await store.delete_unused(info.hash, unused) == 5


async def test_a_hold_taken_while_the_delete_checks_its_references_keeps_the_blob(
    store: BlobStore,
) -> None:
    info = await store.ingest(agen([b"staged"]), max_bytes=100)
    checking, held = asyncio.Event(), asyncio.Event()

    async def unused_slowly() -> bool:
        checking.set()
        await held.wait()  # a stage starts reading the blob meanwhile
        return True

    async def stage() -> None:
        await checking.wait()
        with store.holding(info.hash):
            held.set()
            assert await deleting == 0
            assert store.has(info.hash)

    deleting = asyncio.ensure_future(store.delete_unused(info.hash, unused_slowly))
    await stage()
    assert store.has(info.hash)


async def test_holding_checks_the_hash(store: BlobStore) -> None:
    with pytest.raises(ValueError), store.holding("not-a-hash"):
        pass


# -- resumable fetch --------------------------------------------------------------------


async def test_partial_append_resume_finish(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 17)
    h, pieces = sha(data), split(data, 300_000)
    store = BlobStore(tmp_path / "blobs")
    assert store.partial_offset(h) == 0
    for piece in pieces[:3]:
        assert await store.append_partial(
            h, store.partial_offset(h), piece
        ) == store.partial_offset(h)
    # A restarted node (new store on the same root) resumes from the bytes on disk.
    store = BlobStore(tmp_path / "blobs")
    assert store.partial_offset(h) == 900_000
    for piece in pieces[3:]:
        await store.append_partial(h, store.partial_offset(h), piece)
    assert await store.finish_partial(h, len(data)) == BlobInfo(h, len(data))
    assert store.partial_offset(h) == 0
    assert b"".join([c async for c in store.read(h)]) == data
    assert files(store.root) == [store.path(h)]


async def test_append_at_the_wrong_offset_changes_nothing(store: BlobStore) -> None:
    h = sha(b"abcdef")
    await store.append_partial(h, 0, b"abc")
    for offset in (0, 2, 4):
        with pytest.raises(ValueError):
            await store.append_partial(h, offset, b"def")
    assert store.partial_offset(h) == 3
    results = await asyncio.gather(
        store.append_partial(h, 3, b"def"),
        store.append_partial(h, 3, b"def"),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["ValueError", "int"]
    assert await store.finish_partial(h, 6) == BlobInfo(h, 6)


@pytest.mark.parametrize(
    ("received", "size"),
    [(b"abcdeX", 6), (b"abcde", 6), (b"abcdefg", 6), (b"abcdef", 5)],
    ids=["wrong-bytes", "short", "long", "wrong-size"],
)
async def test_finish_with_wrong_bytes_is_corrupt(
    store: BlobStore, received: bytes, size: int
) -> None:
    h = sha(b"abcdef")
    await store.append_partial(h, 0, received)
    with pytest.raises(BlobCorrupt):
        await store.finish_partial(h, size)
    assert store.partial_offset(h) == 0
    assert not store.has(h)
    assert files(store.root) == []


async def test_finish_edge_cases(store: BlobStore) -> None:
    with pytest.raises(BlobMissing):
        await store.finish_partial(sha(b"x"), 1)
    assert await store.finish_partial(EMPTY, 0) == BlobInfo(EMPTY, 0)  # nothing to append
    assert store.has(EMPTY) and store.size(EMPTY) == 0
    existing = await store.ingest(agen([b"x"]), max_bytes=1)
    await store.append_partial(existing.hash, 0, b"x")
    assert await store.finish_partial(existing.hash, 1) == existing
    assert files(store.root / "partial") == []


async def test_crash_point_before_partial_rename(tmp_path: Path) -> None:
    h = sha(b"abc")
    store = BlobStore(tmp_path / "blobs", faults=RecordingFaults("blob.partial_before_rename"))
    await store.append_partial(h, 0, b"abc")
    with pytest.raises(RuntimeError):
        await store.finish_partial(h, 3)
    assert store.partial_offset(h) == 3 and not store.has(h)
    assert await BlobStore(tmp_path / "blobs").finish_partial(h, 3) == BlobInfo(h, 3)


async def test_partial_changed_by_another_store_is_hashed_as_it_is(tmp_path: Path) -> None:
    """The running hash covers the file's bytes, whoever appended them or replaced it."""
    one, two = BlobStore(tmp_path / "blobs"), BlobStore(tmp_path / "blobs")
    h = sha(b"abcdefghi")
    await one.append_partial(h, 0, b"abc")
    await two.append_partial(h, 3, b"def")  # grown behind one's back
    await one.append_partial(h, 6, [b"g", b"hi"])
    assert await one.finish_partial(h, 9) == BlobInfo(h, 9)

    h2 = sha(b"xyzdef")
    await one.append_partial(h2, 0, b"abc")  # one keeps this partial open
    two.drop_partial(h2)
    await two.append_partial(h2, 0, b"xyz")  # ...and it is replaced
    await one.append_partial(h2, 3, b"def")
    assert await one.finish_partial(h2, 6) == BlobInfo(h2, 6)
    assert await one.verify(h2)

    h3 = sha(b"abcdef")
    await one.append_partial(h3, 0, b"abc")
    two.drop_partial(h3)
    with pytest.raises(ValueError, match="0 bytes, not 3"):  # gone: no resume past nothing
        await one.append_partial(h3, 3, b"def")
    assert files(tmp_path / "blobs" / "partial") == []


async def test_many_partials_at_once(store: BlobStore) -> None:
    datas = [os.urandom(5000 + i) for i in range(40)]  # more than stay open at once
    for piece in range(5):
        for data in datas:
            await store.append_partial(
                sha(data), piece * 1000, data[piece * 1000 : (piece + 1) * 1000]
            )
    for data in datas:
        await store.append_partial(sha(data), 5000, data[5000:])
        assert await store.finish_partial(sha(data), len(data)) == BlobInfo(sha(data), len(data))
    assert all([await store.verify(sha(d)) for d in datas])


async def test_file_reader_reads_ahead(store: BlobStore) -> None:
    from storage.blob_io import FileReader

    data = os.urandom(3 * MiB + 5)
    info = await store.ingest(agen([data]), max_bytes=len(data))
    reader = FileReader(store.path(info.hash))
    assert reader.size == len(data)
    got, pos = [], 0
    while pos < len(data):
        chunk = await reader.read(pos, MiB, then=MiB)
        got.append(chunk)
        pos += len(chunk)
    assert b"".join(got) == data
    assert await reader.read(10, 5) == data[10:15]  # not the range read ahead: read now
    await store.delete(info.hash)
    assert await reader.read(0, 4, then=4) == data[:4]  # still open: still readable
    await reader.close()  # waits for the read in flight
    await reader.close()
    with pytest.raises(FileNotFoundError):
        FileReader(store.path(info.hash))


async def test_drop_partial_is_idempotent(store: BlobStore) -> None:
    h = sha(b"abc")
    await store.append_partial(h, 0, b"ab")
    store.drop_partial(h)
    store.drop_partial(h)
    assert store.partial_offset(h) == 0


# -- sweep ------------------------------------------------------------------------------


async def test_sweep_removes_leftovers_and_keeps_blobs_and_partials(store: BlobStore) -> None:
    blob = await store.ingest(agen([b"keep me"]), max_bytes=100)
    good_partial = sha(b"resumable")
    await store.append_partial(good_partial, 0, b"resum")
    root = store.root
    other = sha(b"other")
    wrong_dir = "00" if other[:2] != "00" else "01"
    leftovers = [
        root / "tmp" / "ingest-1.tmp",
        root / "tmp" / "nested",
        root / "sha256" / blob.hash[:2] / "ingest-2.tmp",
        root / "sha256" / blob.hash[:2] / (blob.hash + ".tmp"),
        root / "sha256" / wrong_dir / other,  # a hash in the wrong prefix directory
        root / "sha256" / "zz",
        root / "sha256" / "stray",
        root / "partial" / "not-a-hash",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name in ("nested", "zz"):
            (path / "deep").mkdir(parents=True)
            (path / "deep" / "f").write_bytes(b"x")
        else:
            path.write_bytes(b"x")
    assert sorted(store.sweep()) == sorted(leftovers)
    assert files(root) == sorted([store.path(blob.hash), root / "partial" / good_partial])
    assert store.sweep() == []
    assert BlobStore(root / "never-created").sweep() == []


@pytest.mark.parametrize(
    ("point", "script"),
    [
        ("blob.before_rename", "await s.ingest(agen([b'abc']), max_bytes=3)"),
        (
            "blob.partial_before_rename",
            "await s.append_partial(H, 0, b'abc'); await s.finish_partial(H, 3)",
        ),
    ],
    ids=["ingest", "partial"],
)
def test_real_crash_leaves_what_sweep_and_resume_handle(
    tmp_path: Path, point: str, script: str
) -> None:
    code = f"""
import asyncio, sys
from pathlib import Path
from storage.blobs import BlobStore
from storage.faults import EnvCrashPoints
H = {sha(b"abc")!r}
async def agen(chunks):
    for c in chunks:
        yield c
async def main():
    s = BlobStore(Path(sys.argv[1]), faults=EnvCrashPoints())
    {script}
asyncio.run(main())
"""
    root = tmp_path / "blobs"
    env = {**os.environ, "CAIRN_CRASHPOINT": point}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(root)], cwd=REPO, env=env, timeout=60, check=False
    )
    assert proc.returncode == -9  # SIGKILL at the crash point
    store = BlobStore(root)
    h = sha(b"abc")
    assert not store.has(h)
    if point == "blob.before_rename":
        left = files(root / "tmp")
        assert len(left) == 1 and left[0].read_bytes() == b"abc"
        assert store.sweep() == left
    else:
        assert store.sweep() == []
        assert store.partial_offset(h) == 3
        assert asyncio.run(store.finish_partial(h, 3)) == BlobInfo(h, 3)
    assert files(root) == ([store.path(h)] if point != "blob.before_rename" else [])


# -- memory -----------------------------------------------------------------------------


async def test_ingest_memory_stays_bounded(store: BlobStore) -> None:
    expected = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(256):
            chunk = bytes([i]) * MiB  # a fresh 1 MiB object each time
            expected.update(chunk)
            yield chunk

    tracemalloc.start()
    try:
        info = await store.ingest(chunks(), max_bytes=1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info == BlobInfo(expected.hexdigest(), 256 * MiB)
    print(f"peak traced memory {peak / MiB:.1f} MiB")
    assert peak < 32 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
