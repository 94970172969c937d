"""Packing a component directory as a tar.gz payload.

Used by ``cairn deploy DIR`` and by ``deploy_component {package: <local dir>}``. Skips
``.git`` and whatever ``.cairnignore`` names (one glob pattern per line, ``#`` comments;
a pattern with a ``/`` is matched against the path from the root, one without against
every path component; a trailing ``/`` matches directories only). Only regular files and
directories are packed: links would be refused by the node anyway.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import tarfile
from pathlib import Path
from typing import IO

__all__ = ["IgnoreRules", "pack_directory"]


class IgnoreRules:
    """Patterns from a ``.cairnignore`` file."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = [p.strip() for p in patterns if p.strip() and not p.strip().startswith("#")]

    @classmethod
    def load(cls, root: Path) -> IgnoreRules:
        f = root / ".cairnignore"
        return cls(f.read_text(encoding="utf-8").splitlines() if f.is_file() else [])

    def ignored(self, rel: str, is_dir: bool) -> bool:
        parts = rel.split("/")
        if ".git" in parts:
            return True
        for pattern in self.patterns:
            dir_only = pattern.endswith("/")
            pat = pattern.rstrip("/")
            if dir_only and not is_dir:
                continue
            if "/" in pat:
                if fnmatch.fnmatchcase(rel, pat.lstrip("/")):
                    return True
            elif any(
                fnmatch.fnmatchcase(part, pat) for part in (parts[-1:] if dir_only else parts)
            ):
                return True
        return False


def pack_directory(root: Path, out: IO[bytes], *, level: int = 6) -> int:
    """Write ``root``'s tree as a gzip-compressed tar to ``out``.

    Returns:
        The number of regular files packed.

    Raises:
        NotADirectoryError: ``root`` is not a directory.
    """
    if not root.is_dir():
        raise NotADirectoryError(str(root))
    rules = IgnoreRules.load(root)
    count = 0
    with (
        gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
            dirnames[:] = sorted(
                d
                for d in dirnames
                if not rules.ignored(f"{rel_dir}/{d}".lstrip("/"), True)
                and not os.path.islink(os.path.join(dirpath, d))
            )
            for d in dirnames:
                rel = f"{rel_dir}/{d}".lstrip("/")
                tar.add(os.path.join(dirpath, d), arcname=rel, recursive=False)
            for name in sorted(filenames):
                rel = f"{rel_dir}/{name}".lstrip("/")
                full = os.path.join(dirpath, name)
                if rules.ignored(rel, False) or os.path.islink(full) or not os.path.isfile(full):
                    continue
                tar.add(full, arcname=rel, recursive=False)
                count += 1
    return count
