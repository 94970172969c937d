"""The payload rules of SPEC §7, applied to member headers without touching the disk.

:class:`Rules` takes the headers of :func:`node.deploy.tarheaders.read_headers` in
archive order and refuses, at the member that breaks it, anything that is not a regular
file or a directory, a name that is absolute, holds ``..`` or a control character, is
too long or repeats an earlier one after normalisation (``a/b``, ``a//b``, ``./a/b``,
``a/./b``), a file where a directory must be or the reverse, and an archive over the
member, entry or total size limit. Its cost is a few microseconds a member, so a limit is
reached cheaply. ``docs/payloads.md`` has the reasons for each rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from node.deploy.tarheaders import MemberHeader
from node.deploy.tarstream import show_name, unsafe_payload

__all__ = ["DIRTYPE", "MAX_DEPTH", "ExtractLimits", "Rules"]

DIRTYPE = b"5"
_NAME_MAX = 255
# Path components per member. Python 3.11's shutil.rmtree and os.walk recurse once per
# level and fail near 1000 levels (a 4096-byte path allows 2048), which would leave a
# release that can never be removed; no real tree comes near 256.
MAX_DEPTH = 256
# C0 controls, DEL, and C1 controls as UTF-8 (a terminal may act on U+009B as CSI).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]|\xc2[\x80-\x9f]")
# Bytes that may start a control character: one search over the name, the exact
# pattern only if it finds one (U+00A0 to U+00FF also start with 0xC2).
_SUSPECT = re.compile(rb"[\x00-\x1f\x7f\xc2]")
_FILE_TYPES = frozenset({b"0", b"\0", b"7"})  # regular, old-style regular, contiguous
_TYPE_NAMES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"6": "FIFO",
    b"S": "sparse file",
    b"V": "volume label",
    b"M": "multi-volume continuation",
    b"D": "GNU dump directory",
    b"N": "GNU old long name",
}


@dataclass(frozen=True, slots=True)
class ExtractLimits:
    """Bounds on what one payload may expand to (SPEC §7 defaults).

    ``max_members`` bounds both the member headers and the entries extraction creates
    (members plus the directories their paths imply without listing them).
    """

    max_members: int = 100_000
    max_total_bytes: int = 16 * 1024**3
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 64 * 1024**2
    max_path_len: int = 4096


def _normalise(name: bytes, limits: ExtractLimits) -> bytes:
    """A member name as a normalised relative path (``b""`` is the root), or refuse it."""
    if not name:
        raise unsafe_payload("member with an empty name")
    if _CONTROL.search(name):
        raise unsafe_payload(f"member {show_name(name)}: control character in name")
    if len(name) > limits.max_path_len:
        raise unsafe_payload(
            f"member {show_name(name)}: path longer than {limits.max_path_len} bytes"
        )
    if name.startswith(b"/"):
        raise unsafe_payload(f"member {show_name(name)}: absolute path")
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise unsafe_payload(f"member {show_name(name)}: '..' in path")
    if parts and max(map(len, parts)) > _NAME_MAX:
        raise unsafe_payload(
            f"member {show_name(name)}: path component longer than {_NAME_MAX} bytes"
        )
    if len(parts) > MAX_DEPTH:
        raise unsafe_payload(f"member {show_name(name)}: more than {MAX_DEPTH} path components")
    return b"/".join(parts)


class _Layout:
    """The tree the archive describes, checked member by member without the disk.

    Paths are kept as their ``hash()`` (SipHash, keyed per process), so memory stays
    near 100 bytes an entry whatever the names' length. A collision could only refuse an
    archive, or let a clash through to the writing pass, whose ``O_EXCL`` creation and
    inode checks refuse it there: what lands on disk never depends on this model.
    """

    _FILE, _DIR, _IMPLIED = 0, 1, 2

    def __init__(self, max_entries: int) -> None:
        self._kinds: dict[int, int] = {}
        self._max = max_entries
        self._last_parent = b""  # a directory known to be in the layout
        self._root_listed = False

    def _new(self, key: int, kind: int, name: bytes) -> None:
        if len(self._kinds) >= self._max:
            raise unsafe_payload(
                f"member {show_name(name)}: more than {self._max} files and directories"
            )
        self._kinds[key] = kind

    def add(self, path: bytes, is_dir: bool, name: bytes) -> None:
        """Record member ``name`` at ``path``, or refuse a duplicate or a clash."""
        if not path:
            if self._root_listed:
                raise unsafe_payload(f"member {show_name(name)}: duplicate name")
            self._root_listed = True
            return
        key = hash(path)
        kind = self._kinds.get(key)
        if kind == self._IMPLIED and is_dir:
            self._kinds[key] = self._DIR  # listed after a member inside it: fine
            return
        if kind is not None:
            if kind == self._IMPLIED:
                raise unsafe_payload(f"member {show_name(name)}: a directory with this name exists")
            raise unsafe_payload(f"member {show_name(name)}: duplicate name")
        self._new(key, self._DIR if is_dir else self._FILE, name)
        parent = top = path.rpartition(b"/")[0]
        if parent == self._last_parent:
            return
        # Walk up until a directory already in the layout; each step adds an entry, so
        # the walk costs at most one hash per entry over the whole archive.
        while parent:
            pkey = hash(parent)
            pkind = self._kinds.get(pkey)
            if pkind is None:
                self._new(pkey, self._IMPLIED, name)
            elif pkind == self._FILE:
                raise unsafe_payload(
                    f"member {show_name(name)}: {show_name(parent)} is not a directory"
                )
            else:
                break
            parent = parent.rpartition(b"/")[0]
        self._last_parent = top


class Rules:
    """SPEC §7 applied to each member header in archive order; touches no disk."""

    def __init__(self, limits: ExtractLimits) -> None:
        self.limits = limits
        self.members = 0
        self.files = 0
        self.bytes = 0
        self.root: bytes | None = None  # the one top-level name, while there is one
        self.many_roots = False
        self._layout = _Layout(limits.max_members)
        self._max_members = limits.max_members
        self._max_bytes = limits.max_total_bytes
        self._plain_len = min(_NAME_MAX, limits.max_path_len)  # bounds depth and parts
        self._under_root = b"/"  # no normalised path starts with it

    def check(self, h: MemberHeader) -> bytes:
        """The member's normalised path, or refuse the member.

        Raises:
            DeployFailed: ``unsafe_payload`` naming the member and the rule.
        """
        self.members += 1
        if self.members > self._max_members:
            raise unsafe_payload(
                f"member {show_name(h.name)}: more than {self._max_members} members"
            )
        kind, name = h.kind, h.name
        is_dir = kind == DIRTYPE
        if not is_dir and kind not in _FILE_TYPES:
            what = _TYPE_NAMES.get(kind, f"member type {kind!r}")
            raise unsafe_payload(f"member {show_name(name)}: {what} is not allowed")
        if h.link:  # GNU tar and tarfile ignore it; some readers make a hard link of it
            raise unsafe_payload(f"member {show_name(name)}: link target on a non-link member")
        if not name:
            raise unsafe_payload("member with an empty name")
        slash = name[-1] == 0x2F
        if slash and not is_dir:  # GNU tar makes a directory of it, tarfile a file
            raise unsafe_payload(f"member {show_name(name)}: file name ends with '/'")
        # The common case, already normal, checked with few calls; anything else (a
        # "." or ".." or empty component, a long name) goes through _normalise.
        path = name[:-1] if slash else name
        parts = path.split(b"/")
        if (
            len(path) > self._plain_len
            or b"" in parts
            or b"." in parts
            or b".." in parts
            or (_SUSPECT.search(path) is not None and _CONTROL.search(path) is not None)
        ):
            path = _normalise(name, self.limits)
        if is_dir:
            if h.size:  # GNU tar skips a directory's data, tarfile reads it as headers
                raise unsafe_payload(f"member {show_name(name)}: directory with data")
        elif not path:
            raise unsafe_payload(f"member {show_name(name)}: the archive root is not a directory")
        elif self.bytes + h.size > self._max_bytes:
            raise unsafe_payload(
                f"member {show_name(name)}: extracted size exceeds {self._max_bytes} bytes"
            )
        else:
            self.files += 1
            self.bytes += h.size
        self._layout.add(path, is_dir, name)
        if path and not self.many_roots and not path.startswith(self._under_root):
            top = path.partition(b"/")[0]
            if self.root is None:
                self.root, self._under_root = top, top + b"/"
            elif top != self.root:
                self.many_roots = True
        return path
