"""Free space as the deploy code sees it: the seam, and what a full disk looks like.

The deploy steps ask a :class:`SpaceGuard` before they write (a deploy's start, a blob
fetch, an extraction) and while a payload streams in; the real guard is
:class:`node.deploy.pressure.DiskPressure`, which reclaims first and refuses with
``insufficient_storage`` (507) only when reclaiming cannot make room. A node without one
(:class:`Unguarded`) admits everything. Whatever the guard says, a write can still meet a
full disk (another process filled it): :func:`node.errors.is_disk_full` recognises that error
wherever it is wrapped, so the step that met it ends ``insufficient_storage`` as well.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Protocol

from node.errors import DeployFailed

__all__ = [
    "INSUFFICIENT_STORAGE",
    "SpaceGuard",
    "Unguarded",
    "extraction_estimate",
    "insufficient",
]

INSUFFICIENT_STORAGE = "insufficient_storage"


class SpaceGuard(Protocol):
    """What the deploy steps ask before (and while) they write to the data directory."""

    async def admit(self, need_bytes: int, *, phase: str, blob_bytes: int = 0) -> None:
        """Return once ``need_bytes`` more (``blob_bytes`` of them into the blob store)
        fit above the watermark, reclaiming first if they do not.

        Raises:
            DeployFailed: ``insufficient_storage`` (507) when even reclaiming leaves too
                little room; ``phase`` is the failing phase.
        """
        ...

    async def ingesting(self, received_bytes: int) -> None:
        """Called while a payload streams into the blob store, every few MiB.

        Raises:
            DeployFailed: ``insufficient_storage`` (phase ``receive``): the disk went
                below the watermark, or the blob store past its cap, and reclaiming did
                not help. The blob store removes the partial file.
        """
        ...

    def status(self) -> dict[str, Any]:
        """The ``storage`` entry of ``cluster_status`` (figures of this node)."""
        ...


class Unguarded:
    """A guard that admits everything (tests, and nodes built without one)."""

    async def admit(self, need_bytes: int, *, phase: str, blob_bytes: int = 0) -> None:
        return None

    async def ingesting(self, received_bytes: int) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {}


def insufficient(message: str, *, phase: str, **extra: Any) -> DeployFailed:
    """The failure of a deploy that does not fit on this node's disk (507)."""
    return DeployFailed(message, code=INSUFFICIENT_STORAGE, phase=phase, **extra)


def extraction_estimate(path: Path, size: int, limit: int) -> int:
    """Bytes extracting the payload at ``path`` (``size`` bytes) will probably write.

    A gzip stream records its uncompressed size (modulo 4 GiB) in its last four bytes,
    which for a ``tar.gz`` is the size of the tar, an upper bound of what it extracts to
    (plus directory entries). A plain tar extracts to at most its own size. The estimate
    is never below ``size`` and never above ``limit`` (the extraction limit, beyond which
    the deploy fails anyway). An unreadable file estimates as ``size``.
    """
    estimate = size
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
            if magic == b"\x1f\x8b" and size >= 18:
                f.seek(-4, os.SEEK_END)
                (isize,) = struct.unpack("<I", f.read(4))
                # ISIZE wraps at 4 GiB: a larger tar shows as less than it is, so a wrapped
                # value never lowers the estimate below the compressed size.
                estimate = max(size, isize)
    except OSError:
        return min(size, limit)
    return min(estimate, limit)
