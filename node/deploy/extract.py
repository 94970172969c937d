"""Safe streaming extraction of a tar or tar.gz payload into a fresh release directory.

The archive is read by :mod:`node.deploy.tarstream` rather than by :mod:`tarfile`'s
extraction code, so that every rule of SPEC §7 is enforced here before a byte reaches the
disk: regular files and directories only; no absolute paths, ``..``, control characters,
over-long paths or duplicate names; bounded member count, total size and decompression
ratio. Files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to directory
descriptors opened with ``O_NOFOLLOW``, inside a private temp directory that is published
with one rename, so a failure at any point leaves nothing at the destination.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from node.deploy.tarstream import (
    BLOCK_SIZE,
    TarStream,
    bad_payload,
    open_stream,
    read_headers,
    unsafe_payload,
)
from storage.durable import fsync_path
from storage.faults import NO_FAULTS, Faults

__all__ = ["ExtractLimits", "ExtractResult", "extract_release", "sweep_temp"]

_NAME_MAX = 255
_DIR_CACHE = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_TYPE_NAMES = {
    tarfile.LNKTYPE: "hard link",
    tarfile.SYMTYPE: "symbolic link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class ExtractLimits:
    """Bounds on what one payload may expand to (SPEC §7 defaults)."""

    max_members: int = 100_000
    max_total_bytes: int = 16 * 1024**3
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 64 * 1024**2
    max_path_len: int = 4096


@dataclass(frozen=True, slots=True)
class ExtractResult:
    files: int
    dirs: int
    bytes: int
    flattened: bool


def _show(name: str, limit: int = 200) -> str:
    """A member name for a message: escaped, and bounded (a pax path can be huge)."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _member_parts(name: str, limits: ExtractLimits) -> tuple[str, ...]:
    """Normalise a member name to path components (``()`` is the root), or refuse it."""
    if not name:
        raise unsafe_payload("member with an empty name")
    if _CONTROL.search(name):
        raise unsafe_payload(f"member {_show(name)}: control character in name")
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_len:
        raise unsafe_payload(f"member {_show(name)}: path longer than {limits.max_path_len}")
    if name.startswith("/"):
        raise unsafe_payload(f"member {_show(name)}: absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise unsafe_payload(f"member {_show(name)}: '..' in path")
    if any(len(p.encode("utf-8", "surrogateescape")) > _NAME_MAX for p in parts):
        raise unsafe_payload(f"member {_show(name)}: path component longer than {_NAME_MAX} bytes")
    return parts


class _Tree:
    """Creates directories and files under the temp root without following any symlink."""

    def __init__(self, root: Path) -> None:
        self._root_fd = os.open(root, _DIR_FLAGS)
        self._cache: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self.dirs = 0

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        os.close(self._root_fd)

    def dir_fd(self, parts: tuple[str, ...], member: str) -> int:
        """A descriptor for directory ``parts``, creating missing levels (mode 0755)."""
        i = len(parts)
        while i and parts[:i] not in self._cache:
            i -= 1
        fd = self._root_fd
        if i:
            fd = self._cache[parts[:i]]
            self._cache.move_to_end(parts[:i])
        for j in range(i, len(parts)):
            fd = self._enter(fd, parts[j], member)
            self._cache[parts[: j + 1]] = fd
            if len(self._cache) > _DIR_CACHE:
                os.close(self._cache.popitem(last=False)[1])
        return fd

    def _enter(self, parent: int, name: str, member: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            pass
        except (NotADirectoryError, OSError) as e:
            raise unsafe_payload(f"member {_show(member)}: {_show(name)} is not a directory") from e
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        os.fchmod(fd, 0o755)  # explicit, so the result does not depend on the umask
        self.dirs += 1
        return fd

    def create_file(self, parts: tuple[str, ...], member: str) -> int:
        parent = self.dir_fd(parts[:-1], member)
        try:
            return os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError as e:
            raise unsafe_payload(
                f"member {_show(member)}: a directory with this name exists"
            ) from e


class _Extractor:
    def __init__(self, src: TarStream, tree: _Tree, limits: ExtractLimits, faults: Faults) -> None:
        self.src, self.tree, self.limits, self.faults = src, tree, limits, faults
        self.members = 0
        self.files = 0
        self.bytes = 0
        self.seen: set[tuple[str, ...]] = set()
        self.roots: set[str] = set()

    def run(self) -> None:
        for header in read_headers(self.src):
            self._member(header.info, header.name, header.pax)

    def _member(self, info: tarfile.TarInfo, name: str, pax: Mapping[str, str]) -> None:
        self.members += 1
        self.src.where = f"member {_show(name)}"
        if self.members > self.limits.max_members:
            raise unsafe_payload(
                f"member {_show(name)}: more than {self.limits.max_members} members"
            )
        kind = info.type
        if kind == tarfile.AREGTYPE and name.endswith("/"):
            kind = tarfile.DIRTYPE
        if kind != tarfile.DIRTYPE and kind not in _FILE_TYPES:
            what = _TYPE_NAMES.get(kind, f"member type {kind!r}")
            raise unsafe_payload(f"member {_show(name)}: {what} is not allowed")
        if kind != tarfile.DIRTYPE and name.endswith("/"):
            raise unsafe_payload(f"member {_show(name)}: file name ends with '/'")
        parts = _member_parts(name, self.limits)
        if parts in self.seen:
            raise unsafe_payload(f"member {_show(name)}: duplicate name")
        self.seen.add(parts)
        size = info.size
        if "size" in pax:
            if not pax["size"].isdigit():
                raise bad_payload(f"member {_show(name)}: malformed pax size")
            size = int(pax["size"])
        if kind == tarfile.DIRTYPE:
            if size:
                raise unsafe_payload(f"member {_show(name)}: directory with data")
            if parts:
                self.tree.dir_fd(parts, name)
        elif not parts:
            raise unsafe_payload(f"member {_show(name)}: the archive root is not a directory")
        else:
            self._file(parts, name, size, info, pax)
        if parts:
            self.roots.add(parts[0])
        self.faults.hit("extract.member")

    def _file(
        self,
        parts: tuple[str, ...],
        name: str,
        size: int,
        info: tarfile.TarInfo,
        pax: Mapping[str, str],
    ) -> None:
        if self.bytes + size > self.limits.max_total_bytes:
            raise unsafe_payload(
                f"member {_show(name)}: extracted size exceeds {self.limits.max_total_bytes} bytes"
            )
        fd = self.tree.create_file(parts, name)
        try:
            self.src.copy_to(fd, size)
            self.src.skip(-size % BLOCK_SIZE)
            os.fchmod(fd, 0o755 if info.mode & 0o111 else 0o644)
            try:
                mtime = float(pax["mtime"]) if "mtime" in pax else float(info.mtime)
                os.utime(fd, (mtime, mtime))
            except (ValueError, OverflowError, OSError):
                pass  # a nonsensical mtime is not worth failing a deploy for
        finally:
            os.close(fd)
        self.files += 1
        self.bytes += size


def extract_release(
    blob_path: Path,
    dest: Path,
    limits: ExtractLimits = ExtractLimits(),
    faults: Faults = NO_FAULTS,
) -> ExtractResult:
    """Extract a tar or tar.gz blob into the new directory ``dest``.

    Synchronous and blocking: run it in a worker thread. The archive is streamed once;
    members go into a sibling ``.tmp-<name>-*`` directory that is renamed to ``dest`` at
    the end. If the archive's root holds exactly one directory, that directory becomes
    ``dest`` (``flattened=True``). File modes are masked to 0755/0644, directories 0755.

    Args:
        blob_path: the stored payload (gzip-compressed or plain tar).
        dest: the release directory to create; must not exist; its parent must.
        limits: member count, size, ratio and path length bounds.
        faults: crash-point seam (``extract.member``, ``extract.before_publish``).

    Returns:
        Counts of files, directories and file bytes written, and whether the single root
        directory was flattened.

    Raises:
        DeployFailed: ``bad_payload`` if the blob is not gzip/tar or is truncated or
            corrupt; ``unsafe_payload`` if a member breaks a rule (the message names it).
        FileExistsError: ``dest`` already exists (a caller bug).
        OSError: the node's own filesystem failed (disk full, permissions).
    """
    if os.path.lexists(dest):
        raise FileExistsError(f"release directory {dest} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        with open(blob_path, "rb", buffering=0) as f:
            src = open_stream(f, limits.max_ratio, limits.ratio_floor_bytes)
            tree = _Tree(tmp)
            try:
                ex = _Extractor(src, tree, limits, faults)
                ex.run()
                src.drain()
            finally:
                tree.close()
        root = next(iter(ex.roots)) if len(ex.roots) == 1 else None
        flatten = root is not None and stat.S_ISDIR(os.lstat(tmp / root).st_mode)
        faults.hit("extract.before_publish")
        _publish(tmp, dest, root if flatten else None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dirs = tree.dirs - 1 if flatten else tree.dirs
    return ExtractResult(files=ex.files, dirs=dirs, bytes=ex.bytes, flattened=flatten)


def _publish(tmp: Path, dest: Path, root: str | None) -> None:
    """Rename ``tmp`` (or its single root directory ``root``) to ``dest``."""
    src = tmp / root if root is not None else tmp
    if root is None:
        os.chmod(tmp, 0o755)
    if os.path.lexists(dest):  # rename(2) would silently replace an empty directory
        raise FileExistsError(f"release directory {dest} already exists")
    os.rename(src, dest)
    try:
        if root is not None:
            os.rmdir(tmp)
        fsync_path(dest.parent)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def sweep_temp(parent: Path) -> list[Path]:
    """Remove ``.tmp-*`` entries that a crash left under ``parent``.

    Call it only when nothing is extracting into ``parent`` (at start).

    Args:
        parent: a releases (or project) directory; a missing one is fine.

    Returns:
        The paths removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".tmp-"):
            continue
        if stat.S_ISDIR(entry.stat(follow_symlinks=False).st_mode):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
        removed.append(Path(entry.path))
    return removed
