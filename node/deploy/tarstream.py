"""Reading a tar or tar.gz payload as a stream of validated member headers.

Pure reading, no filesystem: :class:`TarStream` hands out the decompressed bytes with the
decompression-bomb guard applied per chunk, and :func:`read_headers` turns the stream into
one :class:`MemberHeader` per member, with pax and GNU long-name extended headers folded
in. Only the 512-byte header decoding is borrowed (:meth:`tarfile.TarInfo.frombuf`). What a
member may be and where it may go is decided by :mod:`node.deploy.extract`.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from node.errors import DeployFailed

__all__ = [
    "BLOCK_SIZE",
    "MemberHeader",
    "TarStream",
    "bad_payload",
    "open_stream",
    "read_headers",
    "unsafe_payload",
]

BLOCK_SIZE = 512
_CHUNK = 1 << 20  # decompressed bytes handed out per step
_INPUT_CHUNK = 256 << 10  # compressed bytes read per step; zlib copies the unconsumed tail
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_MAX_EXT_HEADER = 1 << 20  # pax / GNU long-name headers are read into memory
_EXT_TYPES = frozenset(
    {
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    }
)


def unsafe_payload(message: str) -> DeployFailed:
    """The error for an archive that breaks a rule (SPEC §7)."""
    return DeployFailed(message, code="unsafe_payload", phase="extract")


def bad_payload(message: str) -> DeployFailed:
    """The error for a payload that is not a readable tar or tar.gz archive."""
    return DeployFailed(message, code="bad_payload", phase="extract")


@dataclass(frozen=True, slots=True)
class MemberHeader:
    """One member's header, with its extended headers applied.

    ``name`` is the pax ``path``, else the GNU long name, else the ustar name; ``pax``
    holds the member's own pax records (global ones are dropped).
    """

    info: tarfile.TarInfo
    name: str
    pax: Mapping[str, str]


class TarStream:
    """The decompressed tar stream, with the decompression-bomb guard applied per chunk.

    Args:
        f: the payload, read from its current position.
        max_ratio: the most decompressed bytes allowed per compressed byte, enforced
            once more than ``ratio_floor_bytes`` have been decompressed.
        ratio_floor_bytes: output below which any ratio is allowed.
    """

    def __init__(self, f: BinaryIO, max_ratio: float, ratio_floor_bytes: int) -> None:
        self._f = f
        self._max_ratio = max_ratio
        self._ratio_floor_bytes = ratio_floor_bytes
        self._buf = b""
        self._pos = 0
        self.produced = 0
        self.where = "archive header"  # names the member in a ratio error

    def consumed(self) -> int:
        """Compressed bytes consumed so far."""
        return self.produced

    def _next_chunk(self) -> bytes:
        return self._f.read(_CHUNK)

    def _fill(self) -> bool:
        chunk = self._next_chunk()
        if not chunk:
            return False
        self.produced += len(chunk)
        # Checked before the chunk is handed out, so nothing past the limit is written.
        if self.produced > self._ratio_floor_bytes and self.produced > self._max_ratio * max(
            self.consumed(), 1
        ):
            raise unsafe_payload(
                f"decompression ratio exceeds {self._max_ratio:g} at {self.where}"
                " (decompression bomb?)"
            )
        self._buf, self._pos = chunk, 0
        return True

    def _views(self, n: int, strict: bool = True) -> Iterator[memoryview]:
        """The next ``n`` bytes, as views into the current chunks."""
        while n > 0:
            if self._pos == len(self._buf) and not self._fill():
                if strict:
                    raise bad_payload(f"archive is truncated in {self.where}")
                return
            take = min(len(self._buf) - self._pos, n)
            yield memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            n -= take

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        return b"".join(self._views(n, strict=False))

    def copy_to(self, fd: int, n: int) -> None:
        """Write exactly the next ``n`` bytes to ``fd``."""
        for view in self._views(n):
            while view:
                view = view[os.write(fd, view) :]

    def skip(self, n: int) -> None:
        for _ in self._views(n):
            pass

    def drain(self) -> None:
        """Read to the end, so gzip truncation and CRC errors after the tar end are seen."""
        self._buf, self._pos = b"", 0
        self.where = "data after the end of the archive"
        while self._fill():
            pass


class _GzipStream(TarStream):
    def __init__(self, f: BinaryIO, max_ratio: float, ratio_floor_bytes: int) -> None:
        super().__init__(f, max_ratio, ratio_floor_bytes)
        self._d = zlib.decompressobj(wbits=31)
        self._tail = b""  # compressed input read but not yet consumed
        self._read_in = 0
        self._eof = False

    def consumed(self) -> int:
        return self._read_in - len(self._tail)

    def _input(self) -> bytes:
        data = self._f.read(_INPUT_CHUNK)
        self._read_in += len(data)
        return data

    def _next_chunk(self) -> bytes:
        while not self._eof:
            if self._d.eof:
                # Another gzip member may follow (pigz, cat a.gz b.gz); zero padding is allowed.
                self._tail = self._tail.lstrip(b"\0")
                if not self._tail:
                    self._tail = self._input()
                    self._eof = not self._tail
                    continue
                self._d = zlib.decompressobj(wbits=31)
            if not self._tail:
                self._tail = self._input()
                if not self._tail:
                    raise bad_payload("gzip data is truncated")
            try:
                out = self._d.decompress(self._tail, _CHUNK)
            except zlib.error as e:
                raise bad_payload(f"gzip data is corrupt: {e}") from e
            self._tail = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
            if out:
                return out
        return b""


def open_stream(f: BinaryIO, max_ratio: float, ratio_floor_bytes: int) -> TarStream:
    """A stream over ``f``: gunzipped if it starts with the gzip magic, else read as is.

    Raises:
        DeployFailed: ``bad_payload`` if ``f`` is empty.
    """
    magic = f.read(2)
    f.seek(0)
    if not magic:
        raise bad_payload("payload is empty")
    if magic == b"\x1f\x8b":
        return _GzipStream(f, max_ratio, ratio_floor_bytes)
    return TarStream(f, max_ratio, ratio_floor_bytes)


def _parse_pax(data: bytes, where: str) -> dict[str, str]:
    """Parse pax records (``"<len> <key>=<value>\\n"``)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        end = pos + length
        if length <= len(digits) + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise bad_payload(f"malformed pax header in {where}")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise bad_payload(f"malformed pax record in {where}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def read_headers(src: TarStream) -> Iterator[MemberHeader]:
    """The members' headers, in archive order, up to the end-of-archive marker.

    The consumer must read or skip each member's data (and its padding to
    :data:`BLOCK_SIZE`) before asking for the next header.

    Raises:
        DeployFailed: ``bad_payload`` if the stream is not a tar archive, is truncated or
            has a malformed header; ``unsafe_payload`` for an oversized extended header
            or a sparse file.
    """
    pax: dict[str, str] = {}
    long_name: str | None = None
    first = True
    members = 0
    while True:
        src.where = f"header after member {members}"
        block = src.read(BLOCK_SIZE)
        if len(block) < BLOCK_SIZE:
            if first:
                raise bad_payload("payload is not a tar or tar.gz archive")
            raise bad_payload("archive is truncated (no end-of-archive marker)")
        if block == _ZERO_BLOCK:
            if pax or long_name is not None:
                raise bad_payload("archive ends after an extended header")
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            if first:
                raise bad_payload("payload is not a tar or tar.gz archive") from e
            raise bad_payload(f"invalid tar header after member {members}: {e}") from e
        first = False
        if info.size < 0:  # base-256 sizes can be negative; it would undercount bytes
            raise bad_payload(f"negative size in tar header after member {members}")
        if info.type in _EXT_TYPES:
            if info.size > _MAX_EXT_HEADER:
                raise unsafe_payload(f"extended header of {info.size} bytes is too large")
            data = src.read(info.size)
            if len(data) < info.size:
                raise bad_payload("archive is truncated in an extended header")
            src.skip(-info.size % BLOCK_SIZE)
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type != tarfile.GNUTYPE_LONGLINK:
                records = _parse_pax(data, src.where)
                if any(k.startswith("GNU.sparse.") for k in records):
                    raise unsafe_payload("sparse files are not supported")
                if info.type != tarfile.XGLTYPE:  # global records carry nothing we use
                    pax.update(records)
            continue
        name = pax.get("path", long_name if long_name is not None else info.name)
        yield MemberHeader(info, name, pax)
        # Counted on resuming, after the consumer has handled the member.
        members += 1
        pax, long_name = {}, None
