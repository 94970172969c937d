"""File primitives the blob store and its partial fetches share.

Hash-name checks, directory creation and full writes, and thread calls that are waited
for even when the caller is cancelled, so cleanup never races a thread still using a
descriptor or temp file. OS errors of a thread call leave as :class:`StorageError`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from storage.durable import fsync_path
from storage.errors import StorageError

__all__ = [
    "HASH_RE",
    "FileReader",
    "await_thread",
    "check_hash",
    "ensure_dir",
    "hash_file",
    "in_thread",
    "listdir",
    "settle",
    "submit",
    "write_all",
]

T = TypeVar("T")

#: A blob's name: its sha256 as 64 lowercase hex digits.
HASH_RE = re.compile(r"[0-9a-f]{64}")
_IOV_MAX = 1024  # Linux limit on buffers per writev call


def check_hash(hash: str) -> str:
    """Return ``hash`` if it is 64 lowercase hex digits; raise ValueError otherwise."""
    if not isinstance(hash, str) or not HASH_RE.fullmatch(hash):
        raise ValueError(f"not a sha256 hex digest: {hash!r}")
    return hash


def ensure_dir(path: Path) -> None:
    """Create ``path`` and missing parents, fsyncing each parent that gained an entry."""
    if not path.is_dir():
        ensure_dir(path.parent)
        path.mkdir(exist_ok=True)  # a concurrent caller may have made it meanwhile
        fsync_path(path.parent)


def write_all(fd: int, bufs: list[bytes]) -> None:
    """Write every byte of ``bufs`` to ``fd``, in order."""
    for i in range(0, len(bufs), _IOV_MAX):
        group = bufs[i : i + _IOV_MAX]
        done = os.writev(fd, group)
        # Short writes are rare on regular files but must not lose bytes.
        for buf in group:
            view, done = memoryview(buf)[done:], max(0, done - len(buf))
            while view:
                view = view[os.write(fd, view) :]


def hash_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def listdir(directory: Path) -> list[Path]:
    """The entries of ``directory``, sorted; none if it does not exist."""
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []


def submit(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Start ``fn(*args)`` in the default executor; await it with :func:`await_thread`."""
    return asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


async def settle(*futs: asyncio.Future[Any]) -> None:
    """Wait for thread calls to end, even through further cancellations, then re-raise one."""
    cancelled = False
    while not all(f.done() for f in futs):
        try:
            await asyncio.wait(futs)  # unlike a bare await, never cancels them
        except asyncio.CancelledError:
            cancelled = True
    for f in futs:
        if not f.cancelled():
            f.exception()  # mark retrieved: the error already unwinding is the one to report
    if cancelled:
        raise asyncio.CancelledError


async def await_thread(fut: asyncio.Future[T]) -> T:
    """Await a thread call; if cancelled, wait for the thread to finish before re-raising.

    A cancelled ``asyncio.to_thread`` returns at once while its thread keeps running, and
    the caller's cleanup (closing a descriptor, unlinking a temp file) would race it.
    OS errors from the store's files enter here and leave as :class:`StorageError`.
    """
    await settle(fut)
    try:
        return fut.result()
    except OSError as e:
        raise StorageError(f"blob store I/O failed: {e}") from e


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a thread and return its result, as :func:`await_thread` does."""
    return await await_thread(submit(fn, *args))


class FileReader:
    """Reads one file front to back in a worker thread, keeping the next read in flight.

    Made for streaming a blob to a peer: while the caller sends one range, the next one
    is already being read, and the descriptor stays open from the first read to
    :meth:`close` (so the bytes stay readable even if the file is deleted meanwhile).

    Args:
        path: the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)  # a metadata step, cheap on the loop
        self.size = os.fstat(self._fd).st_size
        self._ahead: tuple[int, int, asyncio.Future[bytes]] | None = None

    async def read(self, pos: int, n: int, *, then: int = 0) -> bytes:
        """The bytes ``[pos, pos + n)`` (fewer at the end of the file); then start
        reading the ``then`` bytes that follow, for the next call.

        Raises:
            StorageError: the read failed.
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (pos, n):
            data = await await_thread(ahead[2])
        else:
            if ahead is not None:
                await settle(ahead[2])
            data = await in_thread(os.pread, self._fd, n, pos)
        if then > 0 and len(data) == n:
            nxt = pos + n
            self._ahead = (nxt, then, submit(os.pread, self._fd, then, nxt))
        return data

    async def close(self) -> None:
        """Wait for a read in flight, then close the descriptor; idempotent."""
        ahead, self._ahead = self._ahead, None
        try:
            if ahead is not None:
                await settle(ahead[2])
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
