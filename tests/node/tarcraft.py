"""Tar archives written byte by byte, for the tricks :mod:`tarfile` will not write.

Every field can be given raw; the checksum is computed unless one is forced. Nothing here
checks anything: the point is to write what a hostile or merely odd tool would.
"""

from __future__ import annotations

import gzip

__all__ = [
    "END",
    "checksum",
    "data",
    "gnu_long",
    "gz",
    "header",
    "octal",
    "pax",
    "pax_records",
    "signed_checksum",
    "with_checksum",
]

END = bytes(1024)


def octal(value: int, width: int) -> bytes:
    """``value`` as zero-padded octal, NUL-ended, in a field of ``width`` bytes."""
    return b"%0*o\0" % (width - 1, value)


def checksum(block: bytes | bytearray) -> int:
    """The unsigned checksum, counting the checksum field as spaces."""
    return sum(block[:148]) + 8 * 0x20 + sum(block[156:])


def signed_checksum(block: bytes | bytearray) -> int:
    """The checksum with bytes read as signed (old tars wrote that; readers take both)."""
    blanked = bytes(block[:148]) + b" " * 8 + bytes(block[156:])
    return sum(x - 256 if x > 127 else x for x in blanked)


def with_checksum(block: bytes | bytearray, value: int | None = None) -> bytes:
    """``block`` with its checksum field set (to ``value`` if given, else the right one)."""
    out = bytearray(block)
    out[148:156] = b"%06o\0 " % (checksum(out) if value is None else value)
    return bytes(out)


def _put(block: bytearray, start: int, width: int, value: bytes) -> None:
    if len(value) > width:
        raise ValueError(f"{value!r} does not fit in {width} bytes")
    block[start : start + width] = value.ljust(width, b"\0")


def header(
    name: bytes = b"f",
    *,
    size: int = 0,
    kind: bytes = b"0",
    mode: int = 0o644,
    linkname: bytes = b"",
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    mtime: int = 1_700_000_000,
    fields: dict[str, bytes] | None = None,
    chksum: int | None = None,
) -> bytes:
    """One 512-byte header block.

    Args:
        fields: raw values for ``mode``, ``uid``, ``gid``, ``size``, ``mtime``,
            ``devmajor``, ``devminor`` or ``name`` that replace the computed ones (each
            padded with NULs to its width).
        chksum: a checksum value to write instead of the right one.
    """
    b = bytearray(512)
    raw = {
        "name": (0, 100, name),
        "mode": (100, 8, octal(mode, 8)),
        "uid": (108, 8, octal(0, 8)),
        "gid": (116, 8, octal(0, 8)),
        "size": (124, 12, octal(size, 12)),
        "mtime": (136, 12, octal(mtime, 12)),
        "devmajor": (329, 8, octal(0, 8)),
        "devminor": (337, 8, octal(0, 8)),
    }
    for key, value in (fields or {}).items():
        start, width, _ = raw[key]
        raw[key] = (start, width, value)
    for start, width, value in raw.values():
        _put(b, start, width, value)
    b[156:157] = kind
    _put(b, 157, 100, linkname)
    b[257:265] = magic.ljust(8, b"\0")[:8]
    _put(b, 265, 32, b"root")
    _put(b, 297, 32, b"root")
    _put(b, 345, 155, prefix)
    return with_checksum(b, chksum)


def data(content: bytes) -> bytes:
    """Member data padded to whole blocks."""
    return content + bytes(-len(content) % 512)


def pax_records(records: list[tuple[bytes, bytes]]) -> bytes:
    """Pax records, each ``"<len> <key>=<value>\\n"`` with the right length."""
    out = b""
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n += 1
        out += str(n).encode() + body
    return out


def pax(records: list[tuple[bytes, bytes]] | bytes, kind: bytes = b"x") -> bytes:
    """A pax extended header (``x``) or global header (``g``) with its data blocks."""
    body = records if isinstance(records, bytes) else pax_records(records)
    return header(b"./PaxHeaders/f", size=len(body), kind=kind) + data(body)


def gnu_long(text: bytes, kind: bytes = b"L") -> bytes:
    """A GNU long name (``L``) or long link (``K``) header with its data, NUL-ended."""
    body = text + b"\0"
    return header(b"././@LongLink", size=len(body), kind=kind, magic=b"ustar  \0") + data(body)


def gz(raw: bytes) -> bytes:
    """``raw`` as one gzip member (mtime 0, so the bytes are reproducible)."""
    return gzip.compress(raw, mtime=0)
