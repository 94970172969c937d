"""Resumable peer fetches of blobs: ``partial/<hash>`` files grown by appends.

A fetch appends what arrives to its partial, resumes from the partial's length after an
interruption, and ends by checking size and sha256 and renaming the fsynced partial into
the store, so a named blob never holds the wrong bytes. :class:`~storage.blobs.BlobStore`
delegates its ``*_partial`` methods here.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable
from pathlib import Path

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

    async def append(self, hash: str, offset: int, data: bytes) -> int:
        """Append ``data`` at ``offset``, which must be the partial's current length.

        Returns:
            The partial's new length.

        Raises:
            ValueError: ``offset`` is not the current length; nothing is written.
        """
        path = self.directory / check_hash(hash)
        async with self._lock(hash):
            return await in_thread(self._append, path, offset, data)

    @staticmethod
    def _append(path: Path, offset: int, data: bytes) -> int:
        ensure_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if offset != (length := os.fstat(fd).st_size):
                raise ValueError(f"partial {path.name} is {length} bytes, not {offset}")
            write_all(fd, [data])
            return length + len(data)
        finally:
            os.close(fd)

    async def finish(self, hash: str, size: int) -> None:
        """Check a completed fetch, fsync it and move it to its blob path.

        Raises:
            BlobCorrupt: size or sha256 differ; the partial is deleted.
            BlobMissing: there is no partial for ``hash`` (and ``size`` is not 0).
        """
        path = self.directory / check_hash(hash)
        async with self._lock(hash):
            await in_thread(self._finish, path, hash, size)

    def _finish(self, path: Path, hash: str, size: int) -> None:
        if size == 0 and not path.exists():
            ensure_dir(path.parent)
            path.touch()  # an empty payload needs no append, so may have no partial
        try:
            found = path.stat().st_size
        except FileNotFoundError as e:
            raise BlobMissing(f"no partial fetch of {hash}") from e
        # Size first: a wrong length is caught without reading the file.
        if found != size or hash_file(path) != hash:
            path.unlink(missing_ok=True)
            raise BlobCorrupt(f"fetched bytes do not match {hash} ({found} bytes)")
        fsync_path(path)
        dest = self._blob_path(hash)
        ensure_dir(dest.parent)
        self._faults.hit("blob.partial_before_rename")
        os.replace(path, dest)
        fsync_path(dest.parent)

    def drop(self, hash: str) -> None:
        """Forget the partial fetch of ``hash``; idempotent."""
        (self.directory / check_hash(hash)).unlink(missing_ok=True)

    def strays(self) -> list[Path]:
        """Entries of ``directory`` not named by a hash: no fetch resumes from them."""
        return [p for p in listdir(self.directory) if not HASH_RE.fullmatch(p.name)]
