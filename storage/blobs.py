"""Node-local content-addressed payload store (files only; presence is recorded in SQL).

Layout under ``root``::

    sha256/<first 2 hex>/<hash>   stored blobs, immutable, named by their sha256
    tmp/<random>.tmp              ingests in progress (removed on error, swept at start)
    partial/<hash>                resumable fetches from peers (kept across restarts)

A blob becomes visible only by an atomic ``os.replace`` of a fully written and fsynced
file, followed by an fsync of its directory, so a crash never leaves a named blob with
the wrong bytes. File I/O and hashing run in worker threads; every thread call is
awaited to completion even when the caller is cancelled, so cleanup never races a
thread that still uses a descriptor or a temp file.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from storage.errors import BlobCorrupt, BlobMissing, BlobTooLarge, StorageError
from storage.faults import NO_FAULTS, Faults

__all__ = ["BlobInfo", "BlobStore"]

T = TypeVar("T")

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_PREFIX_RE = re.compile(r"[0-9a-f]{2}")
# Ingest hands the writer thread this much at a time: big enough that the per-call
# overhead vanishes and hashlib drops the GIL, small enough to keep memory flat.
_BATCH_BYTES = 4 << 20
_IOV_MAX = 1024  # Linux limit on buffers per writev call


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob: its sha256 (lowercase hex) and size in bytes."""

    hash: str
    size: int


def _check_hash(hash: str) -> str:
    if not isinstance(hash, str) or not _HASH_RE.fullmatch(hash):
        raise ValueError(f"not a sha256 hex digest: {hash!r}")
    return hash


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """Create ``path`` and missing parents, fsyncing each parent that gained an entry."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return  # a concurrent caller made it (and fsyncs the parent)
    _fsync_dir(path.parent)


def _write_all(fd: int, bufs: list[bytes]) -> None:
    for i in range(0, len(bufs), _IOV_MAX):
        group = bufs[i : i + _IOV_MAX]
        done = os.writev(fd, group)
        # Short writes are rare on regular files (signals, ENOSPC) but must not lose bytes.
        for buf in group:
            if done >= len(buf):
                done -= len(buf)
                continue
            view = memoryview(buf)[done:]
            done = 0
            while view:
                view = view[os.write(fd, view) :]


def _hash_file(path: Path, chunk_bytes: int) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
            size += n
    return hasher.hexdigest(), size


def _submit(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    return asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


async def _settle(fut: asyncio.Future[Any]) -> None:
    """Wait for a thread call to end, even through further cancellations, then re-raise one."""
    cancelled = False
    while not fut.done():
        try:
            # asyncio.wait never cancels ``fut``, unlike a bare await.
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            cancelled = True
    if not fut.cancelled():
        fut.exception()  # mark retrieved: the error already unwinding is the one to report
    if cancelled:
        raise asyncio.CancelledError


async def _await(fut: asyncio.Future[T]) -> T:
    """Await a thread call; on cancellation wait for the thread before re-raising.

    A cancelled ``asyncio.to_thread`` returns at once while its thread keeps running; the
    caller's cleanup (closing a descriptor, unlinking a temp file) would then race it.
    OS errors from store files enter here and leave as :class:`StorageError`.
    """
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await _settle(fut)
        raise
    except OSError as e:
        raise StorageError(f"blob store I/O failed: {e}") from e


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await _await(_submit(fn, *args))


class _Sink:
    """A temp file being filled and hashed; its methods run in one worker thread at a time."""

    __slots__ = ("_dir", "fd", "hasher", "path")

    def __init__(self, tmp_dir: Path) -> None:
        self._dir = tmp_dir
        self.fd = -1
        self.path: Path | None = None
        self.hasher = hashlib.sha256()

    def _open(self) -> None:
        # Opened lazily inside the first thread call so that a cancellation can never
        # leave behind a file that nothing knows about.
        if self.fd < 0:
            _ensure_dir(self._dir)
            self.fd, name = tempfile.mkstemp(dir=self._dir, prefix="ingest-", suffix=".tmp")
            self.path = Path(name)

    def write(self, bufs: list[bytes]) -> None:
        self._open()
        for buf in bufs:
            self.hasher.update(buf)
        _write_all(self.fd, bufs)

    def seal(self, bufs: list[bytes]) -> None:
        self.write(bufs)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class BlobStore:
    """Content-addressed blobs under ``root``; see the module docstring for the layout.

    Args:
        root: directory owned by the store; created on first write.
        faults: crash-point seam (``blob.after_write``, ``blob.before_rename``,
            ``blob.partial_before_rename``).
        chunk_bytes: size of the chunks :meth:`read` yields and of file reads.
    """

    def __init__(
        self, root: Path, *, faults: Faults = NO_FAULTS, chunk_bytes: int = 1 << 20
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.root = Path(root)
        self._faults = faults
        self._chunk_bytes = chunk_bytes
        self._blobs = self.root / "sha256"
        self._tmp = self.root / "tmp"
        self._partial = self.root / "partial"
        # One lock per partial so the length check and the append are one step; entries
        # vanish once no transfer of that hash holds its lock.
        self._partial_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    # -- lookup -------------------------------------------------------------------------

    def path(self, hash: str) -> Path:
        """Where the blob ``hash`` lives (whether or not it is present).

        Raises:
            ValueError: ``hash`` is not 64 lowercase hex characters.
        """
        _check_hash(hash)
        return self._blobs / hash[:2] / hash

    def has(self, hash: str) -> bool:
        """Whether the blob is stored here. Raises ValueError for a malformed hash."""
        return self.path(hash).is_file()

    def size(self, hash: str) -> int:
        """Size in bytes of a stored blob.

        Raises:
            BlobMissing: the blob is not stored here.
            ValueError: malformed hash.
        """
        try:
            return self.path(hash).stat().st_size
        except FileNotFoundError as e:
            raise BlobMissing(hash) from e

    def stats(self) -> tuple[int, int]:
        """Return ``(count, total bytes)`` of stored blobs; walks the tree, O(blobs)."""
        count = total = 0
        for prefix in self._scan(self._blobs):
            if not prefix.is_dir():
                continue
            for entry in self._scan(prefix):
                if _HASH_RE.fullmatch(entry.name) and entry.is_file():
                    count += 1
                    total += entry.stat().st_size
        return count, total

    # -- ingest -------------------------------------------------------------------------

    async def ingest(self, chunks: AsyncIterable[bytes], *, max_bytes: int) -> BlobInfo:
        """Stream ``chunks`` into the store, hashing as they arrive.

        Memory stays bounded (two batches of about 4 MiB) whatever the payload size:
        one batch is hashed and written in a thread while the next is collected.
        Identical payloads are stored once.

        Args:
            chunks: the payload bytes, in order.
            max_bytes: the largest payload accepted.

        Returns:
            The blob's hash and size.

        Raises:
            BlobTooLarge: more than ``max_bytes`` arrived; nothing is stored.
            StorageError: the filesystem failed.
            Anything ``chunks`` raises, and CancelledError; the temp file is removed
            before any exception leaves.
        """
        sink = _Sink(self._tmp)
        pending: asyncio.Future[None] | None = None
        batch: list[bytes] = []
        batched = size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise BlobTooLarge(f"payload exceeds {max_bytes} bytes")
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _BATCH_BYTES:
                    if pending is not None:
                        await _await(pending)
                    pending = _submit(sink.write, batch)
                    batch, batched = [], 0
            if pending is not None:
                await _await(pending)
            pending = _submit(sink.seal, batch)
            await _await(pending)
            pending = None
            info = BlobInfo(sink.hasher.hexdigest(), size)
            await _in_thread(self._install, sink, info)
            return info
        except BaseException:
            try:
                if pending is not None:
                    await _settle(pending)
            finally:
                sink.discard()
            raise

    async def ingest_file(self, path: Path, *, max_bytes: int) -> BlobInfo:
        """Copy a local file into the store; same contract as :meth:`ingest`.

        Raises:
            FileNotFoundError: ``path`` does not exist (the caller's input, not the store's).
            BlobTooLarge: the file is larger than ``max_bytes``.
        """
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size > max_bytes:
                raise BlobTooLarge(f"payload exceeds {max_bytes} bytes")
            async with aclosing(self._fd_chunks(fd)) as chunks:
                return await self.ingest(chunks, max_bytes=max_bytes)
        finally:
            os.close(fd)

    async def _fd_chunks(self, fd: int) -> AsyncIterator[bytes]:
        while data := await _in_thread(os.read, fd, self._chunk_bytes):
            yield data

    def _install(self, sink: _Sink, info: BlobInfo) -> None:
        assert sink.path is not None
        self._faults.hit("blob.after_write")
        dest = self.path(info.hash)
        try:
            # A same-size file with this name holds these bytes: keep it, drop ours. A
            # different size means a damaged copy, which the rename below heals.
            if dest.stat().st_size == info.size:
                sink.discard()
                return
        except FileNotFoundError:
            pass
        _ensure_dir(dest.parent)
        self._faults.hit("blob.before_rename")
        os.replace(sink.path, dest)
        _fsync_dir(dest.parent)

    # -- read, verify, delete -----------------------------------------------------------

    async def read(self, hash: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream the byte range ``[start, end)`` of a blob in chunks of ``chunk_bytes``.

        ``end`` past the blob's size is clamped to it, and ``start`` at or past the size
        yields nothing: the HTTP layer answers 416 from :meth:`size` before reading.
        Errors surface on the first iteration. The open descriptor keeps the bytes
        readable to the end even if the blob is deleted meanwhile.

        Raises:
            BlobMissing: the blob is not stored here.
            ValueError: malformed hash, ``start < 0`` or ``end < start``.
        """
        path = self.path(hash)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range [{start}, {end})")
        try:
            # open() is a metadata step, cheap enough for the loop; reads go to threads.
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise BlobMissing(hash) from e
        try:
            size = os.fstat(fd).st_size
            stop = size if end is None else min(end, size)
            pos = start
            while pos < stop:
                data = await _in_thread(os.pread, fd, min(self._chunk_bytes, stop - pos), pos)
                if not data:
                    raise BlobCorrupt(f"{hash} shrank while being read")
                pos += len(data)
                yield data
        finally:
            os.close(fd)

    async def verify(self, hash: str) -> bool:
        """Re-hash the stored blob and return whether it still matches its name.

        Raises:
            BlobMissing: the blob is not stored here.
        """
        return await _in_thread(self._verify, self.path(hash), hash)

    def _verify(self, path: Path, hash: str) -> bool:
        try:
            return _hash_file(path, self._chunk_bytes)[0] == hash
        except FileNotFoundError as e:
            raise BlobMissing(hash) from e

    async def delete(self, hash: str) -> int:
        """Remove a blob; idempotent.

        Returns:
            Bytes freed, 0 if the blob was absent.
        """
        return await _in_thread(self._delete, self.path(hash))

    @staticmethod
    def _delete(path: Path) -> int:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        _fsync_dir(path.parent)
        return size

    # -- resumable fetch ----------------------------------------------------------------

    def partial_offset(self, hash: str) -> int:
        """Bytes already fetched into ``partial/<hash>`` (0 if none): where to resume."""
        try:
            return (self._partial / _check_hash(hash)).stat().st_size
        except FileNotFoundError:
            return 0

    def _partial_lock(self, hash: str) -> asyncio.Lock:
        lock = self._partial_locks.get(hash)
        if lock is None:
            lock = self._partial_locks[hash] = asyncio.Lock()
        return lock

    async def append_partial(self, hash: str, offset: int, data: bytes) -> int:
        """Append ``data`` to the partial fetch of ``hash`` at ``offset``; not fsynced.

        Returns:
            The partial's new length.

        Raises:
            ValueError: malformed hash, or ``offset`` is not the partial's current length
                (the file is left as it was).
        """
        path = self._partial / _check_hash(hash)
        async with self._partial_lock(hash):
            return await _in_thread(self._append, path, offset, data)

    @staticmethod
    def _append(path: Path, offset: int, data: bytes) -> int:
        _ensure_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            length = os.fstat(fd).st_size
            if offset != length:
                raise ValueError(f"partial {path.name} is {length} bytes, not {offset}")
            _write_all(fd, [data])
            return length + len(data)
        finally:
            os.close(fd)

    async def finish_partial(self, hash: str, size: int) -> BlobInfo:
        """Check a completed fetch and move it into the store.

        Returns:
            The stored blob.

        Raises:
            BlobCorrupt: size or sha256 differ; the partial is deleted.
            BlobMissing: there is no partial for ``hash`` (and ``size`` is not 0).
            ValueError: malformed hash.
        """
        path = self._partial / _check_hash(hash)
        async with self._partial_lock(hash):
            return await _in_thread(self._finish, path, BlobInfo(hash, size))

    def _finish(self, path: Path, info: BlobInfo) -> BlobInfo:
        if info.size == 0 and not path.exists():
            _ensure_dir(path.parent)
            path.touch()  # an empty payload needs no append, so may have no partial yet
        try:
            found = path.stat().st_size
        except FileNotFoundError as e:
            raise BlobMissing(f"no partial fetch of {info.hash}") from e
        digest = _hash_file(path, self._chunk_bytes)[0] if found == info.size else None
        if digest != info.hash:
            path.unlink(missing_ok=True)
            raise BlobCorrupt(f"fetched bytes do not match {info.hash} ({found} bytes)")
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dest = self.path(info.hash)
        _ensure_dir(dest.parent)
        self._faults.hit("blob.partial_before_rename")
        os.replace(path, dest)
        _fsync_dir(dest.parent)
        return info

    def drop_partial(self, hash: str) -> None:
        """Forget a partial fetch of ``hash``; idempotent."""
        (self._partial / _check_hash(hash)).unlink(missing_ok=True)

    # -- start-up -----------------------------------------------------------------------

    def sweep(self) -> list[Path]:
        """Remove what interrupted work left behind; call at start, before any ingest.

        Removes everything under ``tmp/``, anything in ``sha256/`` that is not a blob at
        its proper place, and partials whose name is not a hash. Well-named partials are
        kept: a fetch resumes from them.

        Returns:
            The paths removed.
        """
        removed = list(self._scan(self._tmp))
        for prefix in self._scan(self._blobs):
            if not (_PREFIX_RE.fullmatch(prefix.name) and prefix.is_dir()):
                removed.append(prefix)
                continue
            for entry in self._scan(prefix):
                if (
                    not (_HASH_RE.fullmatch(entry.name) and entry.name[:2] == prefix.name)
                    or not entry.is_file()
                ):
                    removed.append(entry)
        removed += [p for p in self._scan(self._partial) if not _HASH_RE.fullmatch(p.name)]
        for p in removed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        return removed

    @staticmethod
    def _scan(directory: Path) -> list[Path]:
        try:
            return sorted(directory.iterdir())
        except FileNotFoundError:
            return []
