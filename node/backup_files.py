"""The files of a backup: written to a directory or a tar, read back verified.

A backup holds regular files (each with its size, sha256 and mode in the manifest),
directories and symlinks (release contents) under three roots: ``cairn.db``,
``blobs/`` and ``components/``, plus ``manifest.json``. Reading back never trusts the
archive: every name is checked (relative, no ``..``, under a known root), only regular
files, directories and symlinks are accepted, every file is hashed as it is written, and
symlinks are created only once every file is in place (so no file is written through
one). :func:`read_backup` returns what it wrote and the manifest for the caller to
compare.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

__all__ = [
    "MANIFEST",
    "ArchiveError",
    "DirSink",
    "FileInfo",
    "Sink",
    "TarSink",
    "Written",
    "check_name",
    "make_symlinks",
    "open_sink",
    "read_backup",
]

MANIFEST = "manifest.json"
_ROOTS = ("cairn.db", "blobs", "components")
_CHUNK = 1 << 20


class ArchiveError(Exception):
    """The backup cannot be written or read as it is; the message is one line."""


@dataclass(frozen=True, slots=True)
class FileInfo:
    size: int
    sha256: str
    mode: int

    def as_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "mode": self.mode}


def check_name(name: str) -> str:
    """``name`` if it is a safe relative path under one of the backup's roots.

    Raises:
        ArchiveError: anything else (absolute, ``..``, empty parts, control characters).
    """
    path = PurePosixPath(name)
    parts = path.parts
    if (
        not parts
        or path.is_absolute()
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 32 for c in name)
        or (name != MANIFEST and parts[0] not in _ROOTS)
        or str(path) != name
    ):
        raise ArchiveError(f"the backup holds an entry with a name it may not have: {name!r}")
    return name


def _copy(src: IO[bytes], dst: IO[bytes], size: int | None = None) -> tuple[int, str]:
    """Copy (at most ``size`` bytes), hashing; returns (bytes, sha256)."""
    h = hashlib.sha256()
    n = 0
    while size is None or n < size:
        want = _CHUNK if size is None else min(_CHUNK, size - n)
        chunk = src.read(want)
        if not chunk:
            break
        h.update(chunk)
        dst.write(chunk)
        n += len(chunk)
    return n, h.hexdigest()


class _Hashing:
    """A file object that hashes what is read through it (what a tar member holds)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        self.read_bytes += len(data)
        return data


class Sink:
    """Where a backup is written."""

    def file(self, name: str, src: IO[bytes], size: int, mode: int) -> FileInfo:
        raise NotImplementedError

    def data(self, name: str, data: bytes) -> FileInfo:
        raise NotImplementedError

    def directory(self, name: str) -> None:
        raise NotImplementedError

    def symlink(self, name: str, target: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class DirSink(Sink):
    """A backup as a directory tree (every file and directory fsynced on close)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700)
        self._dirs: set[Path] = {root}

    def _parent(self, name: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._dirs.add(path.parent)
        return path

    def file(self, name: str, src: IO[bytes], size: int, mode: int) -> FileInfo:
        path = self._parent(name)
        with open(path, "xb") as dst:
            n, digest = _copy(src, dst, size)
            dst.flush()
            os.fsync(dst.fileno())
        if n != size:
            raise ArchiveError(f"{name} changed size while it was copied")
        os.chmod(path, mode)
        return FileInfo(n, digest, mode)

    def data(self, name: str, data: bytes) -> FileInfo:
        path = self._parent(name)
        with open(path, "xb") as dst:
            dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
        return FileInfo(len(data), hashlib.sha256(data).hexdigest(), 0o644)

    def directory(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        self._dirs.add(self.root / name)

    def symlink(self, name: str, target: str) -> None:
        os.symlink(target, self._parent(name))

    def close(self) -> None:
        for d in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class TarSink(Sink):
    """A backup as one tar file (gzip-compressed for ``.tar.gz``/``.tgz``)."""

    def __init__(self, path: Path, *, gzip: bool) -> None:
        self.path = path
        self._f = open(path, "xb")  # noqa: SIM115 - closed in close()
        fmt = tarfile.PAX_FORMAT
        if gzip:
            self._tar = tarfile.open(fileobj=self._f, mode="w:gz", format=fmt)  # noqa: SIM115
        else:
            self._tar = tarfile.open(fileobj=self._f, mode="w", format=fmt)  # noqa: SIM115

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = 0
        return info

    def file(self, name: str, src: IO[bytes], size: int, mode: int) -> FileInfo:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = size
        reader = _Hashing(src)
        try:
            self._tar.addfile(info, reader)
        except OSError as e:  # tarfile: "unexpected end of data"
            raise ArchiveError(f"{name} changed size while it was copied") from e
        return FileInfo(size, reader.hash.hexdigest(), mode)

    def data(self, name: str, data: bytes) -> FileInfo:
        import io

        return self.file(name, io.BytesIO(data), len(data), 0o644)

    def directory(self, name: str) -> None:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, 0o755))

    def symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self._tar.addfile(info)

    def close(self) -> None:
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def open_sink(out: Path, work: Path) -> Sink:
    """A sink writing the backup named ``out`` at the temporary path ``work``: a tar for
    ``.tar``, ``.tar.gz`` and ``.tgz``, else a directory."""
    name = out.name
    if name.endswith((".tar.gz", ".tgz")):
        return TarSink(work, gzip=True)
    if name.endswith(".tar"):
        return TarSink(work, gzip=False)
    return DirSink(work)


# -- reading ------------------------------------------------------------------------------


@dataclass
class Written:
    """What :func:`read_backup` wrote under its destination."""

    files: dict[str, FileInfo] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def _entries(source: Path) -> Iterator[tuple[str, str, IO[bytes] | None, str]]:
    """``(name, kind, stream, link target)`` of every entry of a backup directory or tar;
    ``kind`` is ``file``, ``dir`` or ``symlink``."""
    if source.is_dir():
        for top, dirs, files in os.walk(source):
            for d in sorted(dirs):
                p = Path(top) / d
                rel = p.relative_to(source).as_posix()
                if p.is_symlink():
                    yield rel, "symlink", None, os.readlink(p)
                else:
                    yield rel, "dir", None, ""
            for f in sorted(files):
                p = Path(top) / f
                rel = p.relative_to(source).as_posix()
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    yield rel, "symlink", None, os.readlink(p)
                elif stat.S_ISREG(st.st_mode):
                    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
                    with os.fdopen(fd, "rb") as stream:
                        yield rel, "file", stream, ""
                else:
                    raise ArchiveError(f"{rel} in the backup is not a file or a directory")
        return
    try:
        tar = tarfile.open(source, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as e:
        raise ArchiveError(f"{source} is not a backup directory or tar: {e}") from e
    with tar:
        try:
            for member in tar:
                if member.isreg():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    yield member.name, "file", extracted, ""
                elif member.isdir():
                    yield member.name.rstrip("/"), "dir", None, ""
                elif member.issym():
                    yield member.name, "symlink", None, member.linkname
                else:
                    raise ArchiveError(f"{member.name} in the backup is not a file or a directory")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ArchiveError(f"{source} is damaged: {e}") from e


def read_backup(source: Path, dest: Path) -> Written:
    """Write the backup at ``source`` (a directory or a tar) into the new directory
    ``dest``, hashing every file; the manifest is parsed, not written.

    Raises:
        ArchiveError: a bad name or entry type, a file through a symlink, no manifest.
    """
    if not source.exists():
        raise ArchiveError(f"{source} does not exist")
    out = Written()
    dest.mkdir(mode=0o700)
    for name, kind, stream, target in _entries(source):
        check_name(name)
        if name == MANIFEST:
            if kind != "file" or stream is None:
                raise ArchiveError("the backup's manifest is not a file")
            try:
                out.manifest = json.loads(stream.read(16 << 20))
            except ValueError as e:
                raise ArchiveError(f"the backup's manifest is not JSON: {e}") from e
            continue
        path = dest / name
        if kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "symlink":
            out.symlinks[name] = target
        else:
            assert stream is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:
                n, digest = _copy(stream, f)
                f.flush()
                os.fsync(f.fileno())
            out.files[name] = FileInfo(n, digest, 0o644)
    if not isinstance(out.manifest, dict) or not out.manifest:
        raise ArchiveError("the backup has no manifest.json")
    for name in out.symlinks:
        if any(name.startswith(f"{link}/") for link in out.symlinks) or any(
            f.startswith(f"{name}/") for f in out.files
        ):
            raise ArchiveError(f"the backup writes through its symlink {name!r}")
    return out


def make_symlinks(dest: Path, symlinks: dict[str, str]) -> None:
    """Create the backup's symlinks under ``dest`` (last, once every file is written)."""
    for name, target in sorted(symlinks.items()):
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
