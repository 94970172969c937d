"""Reading a tar or tar.gz payload as a stream of bytes, under resource guards.

Pure reading, no filesystem. :class:`TarStream` hands out the decompressed bytes with the
guards applied per chunk, before a byte is used: the decompression ratio, the total
decompressed size and the number of gzip members. The headers in the stream are parsed
by :mod:`node.deploy.tarheaders`; what a member may be and where it may go is decided by
:mod:`node.deploy.extract`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from node.errors import DeployFailed

__all__ = [
    "BLOCK_SIZE",
    "TarStream",
    "bad_payload",
    "open_stream",
    "show_name",
    "unsafe_payload",
]

BLOCK_SIZE = 512
_CHUNK = 1 << 20  # decompressed bytes handed out per step
# Compressed bytes fed to zlib per step. zlib copies the unconsumed tail on every call,
# so a highly compressed stream costs at most this much copying per _CHUNK of output.
_INPUT_CHUNK = 64 << 10
_GZIP_MEMBERS_FREE = 1024  # gzip members allowed on top of one per _GZIP_MEMBER_BYTES
_GZIP_MEMBER_BYTES = 16 << 10


def unsafe_payload(message: str) -> DeployFailed:
    """The error for an archive that breaks a rule (SPEC §7)."""
    return DeployFailed(message, code="unsafe_payload", phase="extract")


def bad_payload(message: str) -> DeployFailed:
    """The error for a payload that is not one well-formed tar or tar.gz archive."""
    return DeployFailed(message, code="bad_payload", phase="extract")


def show_name(name: bytes, limit: int = 200) -> str:
    """A member name for a message: escaped, and bounded (a pax path can be huge)."""
    text = repr(name.decode("utf-8", "surrogateescape"))
    return text if len(text) <= limit else f"{text[:limit]}..."


class TarStream:
    """The decompressed tar stream, with the resource guards applied per chunk.

    Args:
        f: the payload, read from its current position.
        max_ratio: the most decompressed bytes allowed per compressed byte, enforced
            once more than ``ratio_floor_bytes`` have been decompressed.
        ratio_floor_bytes: output below which any ratio is allowed.
        max_bytes: the most decompressed bytes allowed in all.
    """

    def __init__(
        self, f: BinaryIO, max_ratio: float, ratio_floor_bytes: int, max_bytes: int
    ) -> None:
        self._f = f
        self._max_ratio = max_ratio
        self._ratio_floor_bytes = ratio_floor_bytes
        self._max_bytes = max_bytes
        self._buf = b""
        self._pos = 0
        self.produced = 0
        # Where the stream is, for messages; formatted only when one is raised.
        self.members = 0
        self.member: bytes | None = None

    @property
    def where(self) -> str:
        if self.member is not None:
            return f"member {show_name(self.member)}"
        return f"the header after member {self.members}" if self.members else "the first header"

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
        # Checked before the chunk is handed out, so nothing past a limit is used.
        if self.produced > self._max_bytes:
            raise unsafe_payload(f"archive expands to more than {self._max_bytes} bytes")
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

    def block(self) -> bytes:
        """The next header block; shorter only at the end of the stream."""
        end = self._pos + BLOCK_SIZE
        if end <= len(self._buf):  # the common case, without the generator
            block = self._buf[self._pos : end]
            self._pos = end
            return block
        return self.read(BLOCK_SIZE)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        return b"".join(self._views(n, strict=False))

    def copy_to(self, fd: int, n: int) -> None:
        """Write exactly the next ``n`` bytes to ``fd``."""
        for view in self._views(n):
            while view:
                view = view[os.write(fd, view) :]

    def skip(self, n: int) -> None:
        """Pass over exactly the next ``n`` bytes."""
        left = len(self._buf) - self._pos
        if n <= left:
            self._pos += n
            return
        for _ in self._views(n):
            pass

    def finish(self) -> None:
        """Read to the end: after the end-of-archive marker only zeros may follow.

        Reading to the end is also what makes a gzip stream's trailer (CRC and length)
        and any further gzip member be checked.

        Raises:
            DeployFailed: ``bad_payload`` for data after the marker or a corrupt end.
        """
        self.member = None
        rest = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        while True:
            if rest.strip(b"\0"):
                raise bad_payload(
                    f"archive has data after its end-of-archive marker (after member"
                    f" {self.members}); GNU tar and tarfile stop reading there"
                )
            if not self._fill():
                return
            rest, self._buf = self._buf, b""


class _GzipStream(TarStream):
    def __init__(
        self, f: BinaryIO, max_ratio: float, ratio_floor_bytes: int, max_bytes: int
    ) -> None:
        super().__init__(f, max_ratio, ratio_floor_bytes, max_bytes)
        self._d = zlib.decompressobj(wbits=31)
        self._tail = b""  # compressed input read but not yet consumed
        self._read_in = 0
        self._eof = False
        self._gzip_members = 1

    def consumed(self) -> int:
        return self._read_in - len(self._tail)

    def _input(self) -> bytes:
        data = self._f.read(_INPUT_CHUNK)
        self._read_in += len(data)
        return data

    def _next_member(self) -> None:
        # Each gzip member costs a header parse and a fresh inflater; bounding them by
        # the output keeps a stream of empty members as cheap as its output.
        self._gzip_members += 1
        if self._gzip_members > _GZIP_MEMBERS_FREE + self.produced // _GZIP_MEMBER_BYTES:
            raise unsafe_payload(
                f"gzip stream has more than {self._gzip_members - 1} members"
                f" for {self.produced} bytes of output"
            )
        self._d = zlib.decompressobj(wbits=31)

    def _next_chunk(self) -> bytes:
        while not self._eof:
            if self._d.eof:
                # Another gzip member may follow (pigz, cat a.gz b.gz); zero padding is
                # skipped as gzip(1) and Python's gzip module skip it.
                self._tail = self._tail.lstrip(b"\0")
                if not self._tail:
                    self._tail = self._input()
                    self._eof = not self._tail
                    continue
                self._next_member()
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


def open_stream(
    f: BinaryIO, *, max_ratio: float, ratio_floor_bytes: int, max_bytes: int
) -> TarStream:
    """A stream over ``f``: gunzipped if it starts with the gzip magic, else read as is.

    Raises:
        DeployFailed: ``bad_payload`` if ``f`` is empty.
    """
    start = f.tell()
    magic = f.read(2)
    f.seek(start)
    if not magic:
        raise bad_payload("payload is empty")
    kind = _GzipStream if magic == b"\x1f\x8b" else TarStream
    return kind(f, max_ratio, ratio_floor_bytes, max_bytes)
