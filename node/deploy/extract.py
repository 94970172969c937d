"""Safe extraction of a tar or tar.gz payload into a fresh release directory.

The archive is read by :mod:`node.deploy.tarstream` and :mod:`node.deploy.tarheaders`,
never by :mod:`tarfile`'s extraction code, and it is read twice. The first pass applies
every rule of :mod:`node.deploy.payload_rules` to every header and reads the stream to
its end without writing anything, so a refused payload costs a header parse per member
and leaves no trace. Only then does the second pass write: files are created with
``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to descriptors of directories this extraction
created itself, inside a private temp directory published with one rename, so a failure
at any point leaves nothing at the destination. ``docs/payloads.md`` has the rules and
the reasons.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from node.deploy.payload_rules import DIRTYPE, ExtractLimits, Rules
from node.deploy.tarheaders import MemberHeader, read_headers
from node.deploy.tarstream import BLOCK_SIZE, TarStream, open_stream, show_name, unsafe_payload
from storage.durable import fsync_path
from storage.faults import NO_FAULTS, Faults

__all__ = ["DEFAULT_LIMITS", "ExtractLimits", "ExtractResult", "extract_release", "sweep_temp"]

DEFAULT_LIMITS = ExtractLimits()

_DIR_CACHE = 16
# Stream bytes allowed beyond the files' data: headers, extended headers and padding.
_STREAM_BYTES_PER_MEMBER = 8 << 10
_STREAM_SLACK_BYTES = 16 << 20
_PAX_RECORDS_PER_MEMBER = 8
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class ExtractResult:
    files: int
    dirs: int
    bytes: int
    flattened: bool


def _members(f: BinaryIO, limits: ExtractLimits) -> tuple[TarStream, Iterator[MemberHeader]]:
    """A stream over ``f`` under the limits, and its member headers."""
    overhead = limits.max_members * _STREAM_BYTES_PER_MEMBER + _STREAM_SLACK_BYTES
    src = open_stream(
        f,
        max_ratio=limits.max_ratio,
        ratio_floor_bytes=limits.ratio_floor_bytes,
        max_bytes=limits.max_total_bytes + overhead,
    )
    return src, read_headers(src, limits.max_members * _PAX_RECORDS_PER_MEMBER)


def _check_archive(f: BinaryIO, limits: ExtractLimits) -> None:
    """The first pass: every rule, every header and the whole stream; writes nothing."""
    src, headers = _members(f, limits)
    rules = Rules(limits)
    for header in headers:
        rules.check(header)
        if header.size:
            src.skip(header.size + (-header.size % BLOCK_SIZE))
    src.finish()


class _Tree:
    """Creates directories and files under the temp root without following any symlink.

    A directory is only ever entered if this extraction created it (its device and
    inode are recorded), so a file can land nowhere else. Descriptors of recently used
    directories are cached by path, so a member costs one lookup in the common case and
    one path resolution plus a syscall per missing level otherwise.
    """

    def __init__(self, root: Path) -> None:
        self._root_fd = os.open(root, _DIR_FLAGS)
        st = os.fstat(self._root_fd)
        self._ours = {(st.st_dev, st.st_ino)}
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self.dirs = 0

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        os.close(self._root_fd)

    def _remember(self, path: bytes, fd: int) -> int:
        self._cache[path] = fd
        if len(self._cache) > _DIR_CACHE:
            os.close(self._cache.popitem(last=False)[1])
        return fd

    def _open_ours(self, path: bytes, name: bytes) -> int | None:
        """An existing directory this extraction made, or None if ``path`` is missing."""
        try:
            fd = os.open(path, _DIR_FLAGS, dir_fd=self._root_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise unsafe_payload(
                    f"member {show_name(name)}: {show_name(path)} is not a directory"
                ) from e
            raise
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) not in self._ours:
            os.close(fd)
            raise unsafe_payload(
                f"member {show_name(name)}: {show_name(path)} is not a directory of this release"
            )
        return fd

    def dir_fd(self, path: bytes, name: bytes) -> int:
        """A descriptor for directory ``path``, creating missing levels (mode 0755)."""
        if not path:
            return self._root_fd
        fd = self._cache.get(path)
        if fd is not None:
            self._cache.move_to_end(path)
            return fd
        # Walk up to the nearest directory that is cached or exists, then create down.
        missing: list[bytes] = []
        parent = path
        fd = self._root_fd
        while parent:
            cached = self._cache.get(parent)
            if cached is not None:
                self._cache.move_to_end(parent)
                fd = cached
                break
            found = self._open_ours(parent, name)
            if found is not None:
                fd = self._remember(parent, found)
                break
            missing.append(parent)
            parent = parent.rpartition(b"/")[0]
        for level in reversed(missing):
            leaf = level.rpartition(b"/")[2]
            os.mkdir(leaf, 0o700, dir_fd=fd)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=fd)
            os.fchmod(fd, 0o755)  # explicit, so the result does not depend on the umask
            st = os.fstat(fd)
            self._ours.add((st.st_dev, st.st_ino))
            self.dirs += 1
            self._remember(level, fd)
        return fd

    def create_file(self, path: bytes, name: bytes) -> int:
        parent, _, leaf = path.rpartition(b"/")
        parent_fd = self.dir_fd(parent, name)
        try:
            return os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=parent_fd)
        except FileExistsError as e:  # only on a file system that folds case
            raise unsafe_payload(f"member {show_name(name)}: the name exists already") from e


def _write_archive(f: BinaryIO, tree: _Tree, limits: ExtractLimits, faults: Faults) -> Rules:
    """The second pass: the same headers and rules again, now writing."""
    src, headers = _members(f, limits)
    rules = Rules(limits)
    for h in headers:
        path = rules.check(h)
        if h.kind == DIRTYPE:
            tree.dir_fd(path, h.name)
        else:
            fd = tree.create_file(path, h.name)
            try:
                src.copy_to(fd, h.size)
                os.fchmod(fd, 0o755 if h.mode & 0o111 else 0o644)
                # A nonsensical mtime is not worth failing a deploy for.
                with contextlib.suppress(ValueError, OverflowError, OSError):
                    os.utime(fd, (h.mtime, h.mtime))
            finally:
                os.close(fd)
            src.skip(-h.size % BLOCK_SIZE)
        faults.hit("extract.member")
    return rules


def extract_release(
    blob_path: Path,
    dest: Path,
    limits: ExtractLimits = DEFAULT_LIMITS,
    faults: Faults = NO_FAULTS,
) -> ExtractResult:
    """Extract a tar or tar.gz blob into the new directory ``dest``.

    Synchronous and blocking: run it in a worker thread. The archive is read twice: once
    to check it whole (nothing is written for a refused payload), once to write it into
    a sibling ``.tmp-<name>-*`` directory that is renamed to ``dest`` at the end. If the
    archive's root holds exactly one directory, that directory becomes ``dest``
    (``flattened=True``). File modes are masked to 0755/0644, directories 0755.

    Args:
        blob_path: the stored payload (gzip-compressed or plain tar).
        dest: the release directory to create; must not exist; its parent must.
        limits: member count, size, ratio and path length bounds.
        faults: crash-point seam (``extract.member``, ``extract.before_publish``).

    Returns:
        Counts of files, directories and file bytes written, and whether the single root
        directory was flattened.

    Raises:
        DeployFailed: ``bad_payload`` if the blob is not one well-formed gzip/tar
            archive; ``unsafe_payload`` if a member breaks a rule or the archive a limit
            (the message names the member and the rule).
        FileExistsError: ``dest`` already exists (a caller bug).
        OSError: the node's own filesystem failed (disk full, permissions).
    """
    if os.path.lexists(dest):
        raise FileExistsError(f"release directory {dest} already exists")
    with open(blob_path, "rb", buffering=0) as f:
        _check_archive(f, limits)
        f.seek(0)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
        try:
            tree = _Tree(tmp)
            try:
                rules = _write_archive(f, tree, limits, faults)
            finally:
                tree.close()
            root = None if rules.many_roots else rules.root
            flatten = root is not None and stat.S_ISDIR(os.lstat(tmp / os.fsdecode(root)).st_mode)
            faults.hit("extract.before_publish")
            _publish(tmp, dest, os.fsdecode(root) if flatten and root is not None else None)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dirs = tree.dirs - 1 if flatten else tree.dirs
    return ExtractResult(files=rules.files, dirs=dirs, bytes=rules.bytes, flattened=flatten)


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
