"""Parsing tar headers: one :class:`MemberHeader` per member, as tar readers agree.

:func:`read_headers` parses the 512-byte headers itself rather than through
:mod:`tarfile`, so a header costs a few microseconds and a member limit is reached
cheaply, and folds pax and GNU extended headers into the member they precede. Wherever
GNU tar and Python's :mod:`tarfile` would read the same bytes differently, the archive
is refused instead of picking a side (``docs/payloads.md`` lists every case).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple
from zlib import adler32

from node.deploy.tarstream import BLOCK_SIZE, TarStream, bad_payload, show_name, unsafe_payload
from node.errors import DeployFailed

__all__ = ["MAX_EXT_HEADER", "MemberHeader", "byte_sum", "read_headers"]

MAX_EXT_HEADER = 1 << 20  # one pax / GNU long-name header's data, read into memory
_MAX_GLOBAL_HEADERS = 16
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_OCTAL_MAX_11 = 0o77777777777  # the largest size 11 octal digits hold

_LONGNAME, _LONGLINK, _PAX, _SOLARIS_PAX, _GLOBAL = b"L", b"K", b"x", b"X", b"g"
_EXTENDED = frozenset({_LONGNAME, _LONGLINK, _PAX, _SOLARIS_PAX, _GLOBAL})
_AREGTYPE, _DIRTYPE, _SPARSE = b"\0", b"5", b"S"
# Keys that change what is read or where it goes; a global header may not set them.
_GLOBAL_REFUSED = (b"path", b"linkpath", b"size")

# Each byte's high bit, to count the bytes a signed checksum reads as negative.
_HIGH_BIT = bytes(i >> 7 for i in range(256))
# Octal digits as "0", NUL and space as themselves, anything else as "x": a numeric
# field in the canonical layout translates to a fixed template.
_OCTAL_SHAPE = bytes(
    0x30 if chr(i) in "01234567" else i if i in (0, 0x20) else 0x78 for i in range(256)
)


def byte_sum(data: bytes) -> int:
    """``sum(data)`` for at most 512 bytes, at C speed.

    adler32's low half is 1 + the byte sum modulo 65521, which is exact for up to 256
    bytes (at most 65280); the two halves are summed separately.
    """
    return (zlib.adler32(data[:256]) & 0xFFFF) + (zlib.adler32(data[256:]) & 0xFFFF) - 2


class MemberHeader(NamedTuple):
    """One member, with its extended headers applied, as GNU tar and tarfile both read it.

    A named tuple rather than a frozen dataclass, and ``mode`` and ``mtime`` parsed only
    when asked for: one is built per member, and the member limit must be cheap to
    reach (the fields were checked when the header was read).

    Attributes:
        kind: the type flag; an old-style regular file whose name ends in ``/`` is
            reported as a directory (``b"5"``).
        name: the raw path: the pax ``path``, else the GNU long name, else
            ``prefix/name`` (the prefix only under POSIX ustar magic).
        size: bytes of data that follow the header (the pax ``size`` if given).
        link: the link target if the member names one (``linkname``, a GNU ``K`` long
            link or a pax ``linkpath``), else ``b""``.
        block: the member's 512-byte header.
        pax_mtime: the pax ``mtime`` text (own, else global), if any.
    """

    kind: bytes
    name: bytes
    size: int
    link: bytes
    block: bytes
    pax_mtime: bytes | None

    @property
    def mode(self) -> int:
        """The mode bits from the header."""
        return _number(self.block[100:108]) or 0

    @property
    def mtime(self) -> float:
        """The pax ``mtime`` if it is a number, else the header's."""
        header = _number(self.block[136:148]) or 0
        return _mtime(self.pax_mtime, header)


def _number(field: bytes) -> int | None:
    """A numeric header field as GNU tar and tarfile both read it; None if they differ.

    Accepted: octal digits with spaces around them, ended by NUL or the field's end; an
    empty field (``0``); base-256 (first byte 0x80, or 0xFF for negative). Refused:
    anything ``int()`` takes that GNU tar does not (signs, ``_``, tabs), a leading NUL
    followed by more (tarfile reads 0, GNU tar skips the NUL and reads on), and a field
    of spaces only (GNU tar refuses it).
    """
    lead = field[0]
    if lead == 0x80:
        return int.from_bytes(field[1:], "big")
    if lead == 0xFF:
        return int.from_bytes(field[1:], "big") - (1 << (8 * (len(field) - 1)))
    text = field.partition(b"\0")[0].strip(b" ")
    if not text:
        if lead == 0 and field[1:2].strip(b"\0"):
            return None
        return 0 if 0 in field else None
    if not text.isdigit():
        return None
    try:
        return int(text, 8)
    except ValueError:  # an 8 or a 9
        return None


def _checksum_ok(block: bytes, recorded: int) -> bool:
    """Whether ``recorded`` is the block's unsigned or signed checksum (tar takes both).

    Both sums count the checksum field as eight spaces.
    """
    field = block[148:156]
    unsigned = byte_sum(block) - ((zlib.adler32(field) & 0xFFFF) - 1) + 8 * 0x20
    if recorded == unsigned:
        return True
    high = (zlib.adler32(block.translate(_HIGH_BIT)) & 0xFFFF) - 1 - sum(b >> 7 for b in field)
    return recorded == unsigned - 256 * high


# The numbers as GNU tar, tarfile, libarchive and Go write them: zero-padded octal,
# NUL-ended, the checksum followed by a space (mode .. chksum, as _OCTAL_SHAPE shows
# them); devmajor and devminor likewise, or all NUL.
_CANONICAL = b"0000000\0" * 3 + b"00000000000\0" * 2 + b"000000\0 "
_CANONICAL_DEV = (b"0000000\0" * 2, bytes(16))
_NUMBERS = (
    ("mode", 100, 108),
    ("uid", 108, 116),
    ("gid", 116, 124),
    ("size", 124, 136),
    ("mtime", 136, 148),
    ("devmajor", 329, 337),
    ("devminor", 337, 345),
)


def _header_size(block: bytes, src: TarStream) -> int:
    """Check the block's checksum and every number field; return the size it declares.

    The general path, for what :func:`read_headers` does not take inline (numbers not in
    the canonical layout, a signed checksum, a wrong one). Every numeric field is
    checked, not only the size: tarfile refuses a header with any malformed number, so
    accepting one would read further than it does.
    """
    recorded = _number(block[148:156])
    if recorded is None or not _checksum_ok(block, recorded):
        raise bad_payload(f"bad checksum in {src.where}")
    values = {}
    for field, start, end in _NUMBERS:
        value = _number(block[start:end])
        if value is None:
            raise bad_payload(f"malformed {field} field in {src.where}")
        values[field] = value
    if values["size"] < 0:  # base-256 sizes can be negative; it would undercount bytes
        raise bad_payload(f"negative size in {src.where}")
    return values["size"]


def _cstring(data: bytes, what: str, src: TarStream) -> bytes:
    """A GNU long name: both readers stop at its first NUL; hiding more behind it is refused."""
    text, _, rest = data.partition(b"\0")
    if rest.strip(b"\0"):
        raise unsafe_payload(f"{what} {show_name(text)} in {src.where} has data after a NUL")
    return text


def _parse_pax(data: bytes, src: TarStream, allowance: int) -> tuple[dict[bytes, bytes], int]:
    """Parse pax records (``"<len> <key>=<value>\\n"``) that tile ``data`` exactly.

    GNU tar refuses anything else (trailing NULs included) while tarfile stops quietly at
    the first record it cannot match, so strict framing is the only common reading.
    Later records win over earlier ones with the same key, as in both readers.

    Returns:
        The records and how many were read (at most ``allowance``).
    """
    records: dict[bytes, bytes] = {}
    pos, count, end = 0, 0, len(data)
    while pos < end:
        count += 1
        if count > allowance:
            raise unsafe_payload(f"too many pax records (at {src.where})")
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        stop = pos + length
        if length <= len(digits) + 1 or stop > end or data[stop - 1] != 0x0A:
            raise bad_payload(f"malformed pax header in {src.where}")
        key, eq, value = data[space + 1 : stop - 1].partition(b"=")
        if not eq or not key:
            raise bad_payload(f"malformed pax record in {src.where}")
        records[key] = value
        pos = stop
    return records, count


def _pax_size(value: bytes, header_size: int, src: TarStream) -> int:
    if not value.isdigit():
        raise bad_payload(f"malformed pax size in {src.where}")
    size = int(value)
    # A writer puts 0 (tarfile) or the field's maximum in the header when the size does
    # not fit; any other disagreement would desynchronise a reader that ignores pax.
    if header_size not in (0, size) and not (header_size == _OCTAL_MAX_11 < size):
        raise bad_payload(
            f"pax size {size} disagrees with the header's {header_size} in {src.where}"
        )
    return size


def _mtime(value: bytes | None, default: int) -> float:
    if value is not None:
        try:
            return float(value)
        except ValueError:
            pass  # cosmetic: a nonsensical pax mtime falls back to the header's
    return float(default)


@dataclass(slots=True)
class _Pending:
    """Extended headers read for the member that comes next."""

    pax: dict[bytes, bytes] | None = None
    long_name: bytes | None = None
    long_link: bytes | None = None


class _Extensions:
    """The extended headers met so far: the next member's, and the global ones."""

    def __init__(self, max_pax_records: int) -> None:
        self.pending: _Pending | None = None
        self.after_global = False  # a global header waits for its member
        self.global_mtime: bytes | None = None
        self._globals = 0
        self._records_left = max_pax_records

    def read(self, kind: bytes, size: int, src: TarStream) -> None:
        """Read one extended header's data (after its header block) and record it."""
        if size > MAX_EXT_HEADER:
            raise unsafe_payload(f"extended header of {size} bytes in {src.where} is too large")
        data = src.read(size)
        padding = src.read(-size % BLOCK_SIZE)
        if len(data) < size or len(padding) < -size % BLOCK_SIZE:
            raise bad_payload(f"archive is truncated in an extended header ({src.where})")
        if padding.strip(b"\0"):
            # tarfile parses the padding as more pax records, and GNU tar and tarfile
            # read a long name on to its first NUL; only NULs keep them to the data.
            raise bad_payload(f"data in the padding of an extended header ({src.where})")
        if kind == _GLOBAL:
            self._global(data, src)
            return
        pending = self.pending = self.pending or _Pending()
        # Two of a kind for one member: GNU tar applies the last, tarfile the first.
        if kind == _LONGNAME:
            if pending.long_name is not None:
                raise bad_payload(f"two GNU long names for one member in {src.where}")
            pending.long_name = _cstring(data, "GNU long name", src)
        elif kind == _LONGLINK:
            if pending.long_link is not None:
                raise bad_payload(f"two GNU long links for one member in {src.where}")
            pending.long_link = _cstring(data, "GNU long link", src)
        else:
            if pending.pax is not None:
                raise bad_payload(f"two pax headers for one member in {src.where}")
            pending.pax = self._records(data, src)

    def _records(self, data: bytes, src: TarStream) -> dict[bytes, bytes]:
        records, used = _parse_pax(data, src, self._records_left)
        self._records_left -= used
        if any(key.startswith(b"GNU.sparse.") for key in records):
            raise unsafe_payload(f"sparse files are not supported ({src.where})")
        return records

    def _global(self, data: bytes, src: TarStream) -> None:
        self._globals += 1
        if self._globals > _MAX_GLOBAL_HEADERS:
            raise unsafe_payload(f"more than {_MAX_GLOBAL_HEADERS} global pax headers")
        if self.pending is not None:
            raise bad_payload(f"global pax header between a member's headers ({src.where})")
        records = self._records(data, src)
        # tarfile and GNU tar apply a global path or size to every later member.
        for key in _GLOBAL_REFUSED:
            if key in records:
                raise unsafe_payload(f"global pax header sets {key.decode()!r} ({src.where})")
        self.global_mtime = records.get(b"mtime", self.global_mtime)
        self.after_global = True


def read_headers(src: TarStream, max_pax_records: int) -> Iterator[MemberHeader]:
    """The members' headers, in archive order, up to the end-of-archive marker.

    The consumer must skip or copy each member's data (and its padding to
    :data:`BLOCK_SIZE`) before asking for the next header. It should call
    :meth:`TarStream.finish` after the last one.

    Args:
        src: the stream, at the archive's start.
        max_pax_records: pax records allowed in the whole archive.

    Raises:
        DeployFailed: ``bad_payload`` if the stream is not a tar archive, is truncated,
            has a malformed header or one GNU tar and tarfile would read differently;
            ``unsafe_payload`` for an oversized extended header, too many pax records or
            global headers, a global header that sets a path, link or size, or a sparse
            member.
    """
    ext = _Extensions(max_pax_records)
    first = True
    while True:
        block = src.block()
        if len(block) < BLOCK_SIZE:
            if first:
                raise bad_payload("payload is not a tar or tar.gz archive")
            raise bad_payload("archive is truncated (no end-of-archive marker)")
        if block == _ZERO_BLOCK:
            # tarfile reads the header after any extended one, global too, and fails
            # at the end of the archive; GNU tar does not.
            if ext.pending is not None or ext.after_global:
                raise bad_payload("archive ends after an extended header")
            return
        # The common case inline, because every call counts towards the member limit's
        # cost: the numbers in the canonical layout and the unsigned checksum right
        # (the three runs around the checksum field sum exactly, see byte_sum). Anything
        # else goes through _header_size, which checks every field and names the fault.
        if (
            block[100:156].translate(_OCTAL_SHAPE) == _CANONICAL
            and block[329:345].translate(_OCTAL_SHAPE) in _CANONICAL_DEV
            and block[148:154]
            == b"%06o"
            % (
                (adler32(block[:148]) & 0xFFFF)
                + (adler32(block[156:256]) & 0xFFFF)
                + (adler32(block[256:]) & 0xFFFF)
                + (8 * 0x20 - 3)
            )
        ):
            size = int(block[124:135], 8)
        else:
            try:
                size = _header_size(block, src)
            except DeployFailed as e:
                if first:
                    raise bad_payload("payload is not a tar or tar.gz archive") from e
                raise
        first = False
        kind = block[156:157]
        if kind in _EXTENDED:
            ext.read(kind, size, src)
            continue
        if ext.pending is None and not block[157] and not block[345] and kind != _AREGTYPE:
            # No extended header, link, prefix or old-style type: the name field alone.
            name = block[:100].rstrip(b"\0")
            if 0 in name:
                name = name[: name.index(0)]
            header = _new_header(MemberHeader, (kind, name, size, b"", block, ext.global_mtime))
        else:
            header = _member(block, kind, size, ext.pending, ext.global_mtime, src)
        ext.pending, ext.after_global = None, False
        src.member = header.name
        yield header
        src.members += 1
        src.member = None


def _field(field: bytes) -> bytes:
    """A string field up to its first NUL, as both readers read it."""
    text = field.rstrip(b"\0")
    return text[: text.index(0)] if 0 in text else text


def _member(
    block: bytes,
    kind: bytes,
    size: int,
    pending: _Pending | None,
    global_mtime: bytes | None,
    src: TarStream,
) -> MemberHeader:
    """Fold the pending extended headers into the member's own header."""
    field_name = _field(block[:100])
    name = field_name
    link = _field(block[157:257]) if block[157] else b""
    if block[345] and kind != _SPARSE:
        prefix = _field(block[345:500])
        if block[257:263] != b"ustar\0":
            # GNU tar reads a prefix only under POSIX magic; tarfile under any.
            raise bad_payload(f"prefix field in a non-POSIX header ({src.where})")
        name = prefix + b"/" + field_name
    pax_mtime = global_mtime
    if pending is not None:
        pax = pending.pax or {}
        if pending.long_name is not None:
            if b"path" in pax:  # GNU tar takes the pax path, tarfile the outer of the two
                raise bad_payload(f"both a GNU long name and a pax path in {src.where}")
            name = pending.long_name
        name = pax.get(b"path", name)
        if pending.long_link is not None:
            if b"linkpath" in pax:
                raise bad_payload(f"both a GNU long link and a pax linkpath in {src.where}")
            link = pending.long_link
        link = pax.get(b"linkpath", link)
        if b"size" in pax:
            size = _pax_size(pax[b"size"], size, src)
        pax_mtime = pax.get(b"mtime", global_mtime)
    if kind == _AREGTYPE:
        # tarfile decides "directory" from the name field alone, GNU tar from the final
        # name; they agree only if both end in "/" or neither does.
        slash = name.endswith(b"/")
        if slash != field_name.endswith(b"/"):
            raise bad_payload(f"member {show_name(name)}: ambiguous old-style directory")
        if slash:
            kind = _DIRTYPE
    # tuple.__new__ directly: the named tuple's own __new__ is a Python-level frame.
    return _new_header(MemberHeader, (kind, name, size, link, block, pax_mtime))


_new_header = tuple.__new__
