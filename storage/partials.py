"""Resumable peer fetches of blobs: ``partial/<hash>`` files grown by appends.

A fetch appends what arrives to its partial, resumes from the partial's length after an
interruption, and ends by checking size and sha256 and renaming the fsynced partial into
the store, so a named blob never holds the wrong bytes. :class:`~storage.blobs.BlobStore`
delegates its ``*_partial`` methods here.

The sha256 is computed as the bytes are appended, in the same worker thread call that
writes them, over exactly the buffers written: finishing a fetch then costs an fsync,
not a second read and hash of the whole file. The descriptor and the running hash of a
partial stay open between appends (a handful at most; the least recently used idle one
is closed beyond that). Whenever the file on disk is not the one the running hash
covers (another store instance appended to it, it was replaced, or a node restarted),
the hash is rebuilt from the file's bytes first, so the digest checked at the end is
always the digest of the file's content.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from storage.blob_io import (
    HASH_RE,
    check_hash,
    ensure_dir,
    hash_file,
    in_thread,
    listdir,
    write_all,
)
from storage.durable import fsync_path
from storage.errors import BlobCorrupt, BlobMissing
from storage.faults import Faults

__all__ = ["PartialFetches"]

#: Partials kept open (descriptor and running hash) between appends, at most.
_MAX_OPEN = 16
_REHASH_BYTES = 4 << 20


class _Open:
    """An open partial: its descriptor, the inode it names, and the hash of its bytes.

    Taken out of :attr:`PartialFetches._open` while a thread call uses it (appends and
    finishes of one hash are serialised by that hash's lock), so nothing closes it
    under a thread.
    """

    __slots__ = ("fd", "hasher", "ino", "length")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        st = os.fstat(fd)
        self.ino = st.st_ino
        self.length = 0
        self.hasher: Any = hashlib.sha256()
        self._rehash(st.st_size)

    def _rehash(self, size: int) -> None:
        """Hash the file's first ``size`` bytes (a resumed or foreign-grown partial)."""
        self.hasher = hashlib.sha256()
        pos = 0
        while pos < size:
            data = os.pread(self.fd, min(_REHASH_BYTES, size - pos), pos)
            if not data:
                break
            self.hasher.update(data)
            pos += len(data)
        self.length = pos

    def current(self, path: Path) -> bool:
        """Whether ``path`` still names this inode (it was not dropped or replaced)."""
        try:
            return path.stat().st_ino == self.ino
        except FileNotFoundError:
            return False

    def sync(self) -> None:
        """Catch the running hash up with the file if something else changed it."""
        size = os.fstat(self.fd).st_size
        if size != self.length:
            self._rehash(size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PartialFetches:
    """The partial fetches under ``directory`` (created on first append).

    Every method taking a ``hash`` raises ValueError unless it is 64 lowercase hex.

    Args:
        directory: where partials live.
        blob_path: where the stored blob of a hash goes.
        faults: crash-point seam: ``blob.partial_before_rename``.
    """

    def __init__(self, directory: Path, blob_path: Callable[[str], Path], faults: Faults) -> None:
        self.directory = directory
        self._blob_path = blob_path
        self._faults = faults
        # One lock per partial makes "check length, append" one step; an entry goes away
        # once no transfer of that hash holds it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        #: Open partials, least recently used first (dicts keep insertion order).
        self._open: dict[str, _Open] = {}

    def offset(self, hash: str) -> int:
        """Bytes already fetched into the partial of ``hash`` (0 if none)."""
        try:
            return (self.directory / check_hash(hash)).stat().st_size
        except FileNotFoundError:
            return 0

    def _lock(self, hash: str) -> asyncio.Lock:
        if (lock := self._locks.get(hash)) is None:
            lock = self._locks[hash] = asyncio.Lock()
        return lock

    async def append(self, hash: str, offset: int, data: bytes | Sequence[bytes]) -> int:
        """Append ``data`` (one buffer, or several in order) at ``offset``, which must be
        the partial's current length; the running hash takes the same buffers.

        Returns:
            The partial's new length.

        Raises:
            ValueError: ``offset`` is not the current length; nothing is written.
        """
        path = self.directory / check_hash(hash)
        bufs = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
        async with self._lock(hash):
            st = self._open.pop(hash, None)
            box: list[_Open] = []
            try:
                length = await in_thread(self._append, path, st, offset, bufs, box)
            except ValueError:
                if box:
                    self._keep(hash, box[0])
                raise
            except BaseException:
                if box:
                    box[0].close()
                raise
            self._keep(hash, box[0])
            return length

    @staticmethod
    def _append(
        path: Path, st: _Open | None, offset: int, bufs: list[Any], box: list[_Open]
    ) -> int:
        if st is None or not st.current(path):
            if st is not None:
                st.close()
            flags = os.O_RDWR | os.O_APPEND
            if offset == 0:  # only a fetch from the start creates the file
                flags |= os.O_CREAT
                ensure_dir(path.parent)
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError:
                raise ValueError(f"partial {path.name} is 0 bytes, not {offset}") from None
            try:
                st = _Open(fd)
            except BaseException:
                os.close(fd)
                raise
        else:
            st.sync()
        box.append(st)
        if offset != st.length:
            raise ValueError(f"partial {path.name} is {st.length} bytes, not {offset}")
        write_all(st.fd, bufs)
        for buf in bufs:
            st.hasher.update(buf)
            st.length += len(buf)
        return st.length

    def _keep(self, hash: str, st: _Open) -> None:
        """Keep ``st`` open for the next append; close the least recently used beyond
        :data:`_MAX_OPEN`."""
        self._open[hash] = st  # most recently used last (dicts keep insertion order)
        while len(self._open) > _MAX_OPEN:
            self._open.pop(next(iter(self._open))).close()

    async def finish(self, hash: str, size: int) -> None:
        """Check a completed fetch, fsync it and move it to its blob path.

        Raises:
            BlobCorrupt: size or sha256 differ; the partial is deleted.
            BlobMissing: there is no partial for ``hash`` (and ``size`` is not 0).
        """
        path = self.directory / check_hash(hash)
        async with self._lock(hash):
            st = self._open.pop(hash, None)
            try:
                await in_thread(self._finish, path, hash, size, st)
            finally:
                if st is not None:
                    st.close()

    def _finish(self, path: Path, hash: str, size: int, st: _Open | None) -> None:
        if size == 0 and not path.exists():
            ensure_dir(path.parent)
            path.touch()  # an empty payload needs no append, so may have no partial
        try:
            found = path.stat().st_size
        except FileNotFoundError as e:
            raise BlobMissing(f"no partial fetch of {hash}") from e
        # Size first: a wrong length is caught without reading the file.
        ok = found == size
        if ok:
            if st is not None and st.current(path):
                st.sync()
                digest = st.hasher.hexdigest()  # the bytes as written, hashed as written
            else:
                digest = hash_file(path)
            ok = digest == hash
        if not ok:
            path.unlink(missing_ok=True)
            raise BlobCorrupt(f"fetched bytes do not match {hash} ({found} bytes)")
        if st is not None and st.current(path):
            os.fsync(st.fd)
        else:
            fsync_path(path)
        dest = self._blob_path(hash)
        ensure_dir(dest.parent)
        self._faults.hit("blob.partial_before_rename")
        os.replace(path, dest)
        fsync_path(dest.parent)

    def drop(self, hash: str) -> None:
        """Forget the partial fetch of ``hash``; idempotent."""
        path = self.directory / check_hash(hash)
        if (st := self._open.pop(hash, None)) is not None:
            st.close()
        path.unlink(missing_ok=True)

    def strays(self) -> list[Path]:
        """Entries of ``directory`` not named by a hash: no fetch resumes from them."""
        return [p for p in listdir(self.directory) if not HASH_RE.fullmatch(p.name)]
