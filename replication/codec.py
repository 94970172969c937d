"""msgpack encoding of the peer protocol's frames, and strict validation of what arrives.

A frame is one msgpack map ``{"t": <TYPE>, <field>: <value>, ...}``. A field named ``t``
(Ping, Pong) travels as ``ts``. Inside a Batch, ranges and entries are arrays (their
fields in declaration order), which keeps the per-entry overhead small.

:func:`decode` treats its input as hostile: every way a frame can be wrong raises
:class:`~replication.errors.ProtocolError`, and anything it returns is a fully
validated :data:`~replication.messages.Message`. The byte-level checks (size before
unpacking, per-container caps, nesting depth, item count, leaf types, duplicate keys)
are :func:`storage.packing.unpack`'s, translated here once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final

from replication.errors import ProtocolError
from replication.messages import (
    NODE_NAME_RE,
    OWN,
    RELAY,
    Batch,
    BlobCredit,
    Certs,
    Chunk,
    Credit,
    End,
    Hello,
    LogRange,
    Message,
    Missing,
    Ping,
    Pong,
    Refuse,
    Subscribe,
    Want,
    Welcome,
    WireEntry,
)
from storage.entries import MAX_ENTRY_BYTES, is_log_id
from storage.packing import PackError, PackLimits, pack, unpack

__all__ = ["DEFAULT_LIMITS", "FrameLimits", "decode", "encode"]

_INT64_MAX: Final = 2**63 - 1
_HASH_RE: Final = re.compile(r"[0-9a-f]{64}")
_CLUSTER_ID_RE: Final = re.compile(r"[0-9a-f]{16}")
_CAP_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_KEY_ID_RE: Final = re.compile(r"[0-9a-f]{32}|unsigned")
_MAX_CAPS: Final = 64
_MAX_REASON_CHARS: Final = 4096
_MAX_LOGS: Final = 4096
_MAX_CERTS: Final = 256
_MAX_CERT_BYTES: Final = 16 * 1024
_MAX_SIG_BYTES: Final = 512
# The frame tag is "t", so a message field named t (Ping, Pong) travels as "ts".
_TIME_KEY: Final = "ts"


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """Bounds on a single decoded frame.

    ``max_items`` bounds the total number of array elements and map entries in the frame
    (and so the length of any one container).
    """

    max_frame_bytes: int = 16 * 1024 * 1024
    max_depth: int = 32
    max_items: int = 100_000


DEFAULT_LIMITS: Final = FrameLimits()


def encode(msg: Message, limits: FrameLimits = DEFAULT_LIMITS) -> bytes:
    """Encode a message as one frame.

    Args:
        msg: the message.
        limits: the frame must fit ``limits.max_frame_bytes``, as the peer will check.

    Returns:
        The msgpack bytes of the frame.

    Raises:
        ProtocolError: the message holds values msgpack cannot encode, or is too large.
    """
    wire: dict[str, Any] = {"t": msg.TYPE}
    for f in fields(msg):
        wire[_TIME_KEY if f.name == "t" else f.name] = getattr(msg, f.name)
    if isinstance(msg, Batch):
        wire["ranges"] = [[r.log_id, r.after, r.last, r.compacted] for r in msg.ranges]
        wire["entries"] = [
            [e.log_id, e.oseq, e.writer, e.key_id, e.body, e.sig] for e in msg.entries
        ]
    try:
        frame = pack(wire)
    except PackError as e:
        raise ProtocolError(f"cannot encode {msg.TYPE} frame: {e}") from e
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(
            f"{msg.TYPE} frame of {len(frame)} bytes exceeds the limit of "
            f"{limits.max_frame_bytes} bytes"
        )
    return frame


def decode(frame: bytes | bytearray | memoryview, limits: FrameLimits = DEFAULT_LIMITS) -> Message:
    """Decode and validate one frame.

    Args:
        frame: the bytes of exactly one frame.
        limits: size, depth and item bounds.

    Returns:
        The message, with every field of the right type and within range.

    Raises:
        ProtocolError: the frame is oversize, malformed, too deep, has trailing bytes,
            an unknown type, a missing or extra field, or a field of the wrong type or
            out of range.
    """
    try:
        obj = unpack(
            frame,
            PackLimits(max_bytes=limits.max_frame_bytes, max_depth=limits.max_depth,
                       max_items=limits.max_items),
        )  # fmt: skip
    except PackError as e:
        raise ProtocolError(f"malformed frame: {e}") from e
    if not isinstance(obj, dict):
        raise ProtocolError("a frame must be a map")
    kind = obj.get("t")
    if not isinstance(kind, str) or kind not in _DECODERS:
        raise ProtocolError(f"unknown frame type {kind!r}")
    cls, build = _DECODERS[kind]
    del obj["t"]
    if _TIME_KEY in obj and "t" in _field_names(cls):
        obj["t"] = obj.pop(_TIME_KEY)
    return build(_Fields(obj, cls))


# -- field validation -----------------------------------------------------------------


def _field_names(cls: type[Any]) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


class _Fields:
    """The fields of one map, checked to be exactly those of ``cls``."""

    def __init__(self, obj: dict[str, Any], cls: type[Any]) -> None:
        self.what = getattr(cls, "TYPE", "change")
        names = _field_names(cls)
        missing, extra = names - obj.keys(), obj.keys() - names
        if missing:
            raise ProtocolError(f"{self.what} frame lacks field(s) {', '.join(sorted(missing))}")
        if extra:
            raise ProtocolError(
                f"{self.what} frame has unknown field(s) {', '.join(sorted(extra))}"
            )
        self.obj = obj

    def _fail(self, name: str, expected: str) -> ProtocolError:
        got = type(self.obj[name]).__name__
        return ProtocolError(f"{self.what}.{name} must be {expected}, got {got}")

    def uint(self, name: str) -> int:
        v = self.obj[name]
        if type(v) is not int or not 0 <= v <= _INT64_MAX:  # bool is not an int here
            raise self._fail(name, "an integer from 0 to 2**63-1")
        return v

    def text(self, name: str, max_chars: int, pattern: re.Pattern[str] | None = None) -> str:
        v = self.obj[name]
        if type(v) is not str or not 0 < len(v) <= max_chars:
            raise self._fail(name, f"a string of 1 to {max_chars} characters")
        if pattern is not None and not pattern.fullmatch(v):
            raise ProtocolError(f"{self.what}.{name} is not of the form {pattern.pattern}")
        return v

    def opt_text(self, name: str, max_chars: int) -> str | None:
        return None if self.obj[name] is None else self.text(name, max_chars)

    def node(self, name: str) -> str:
        return self.text(name, 64, NODE_NAME_RE)

    def hash(self, name: str = "hash") -> str:
        return self.text(name, 64, _HASH_RE)

    def blob(self, name: str) -> bytes:
        v = self.obj[name]
        if type(v) is not bytes:
            raise self._fail(name, "bytes")
        return v

    def array(self, name: str) -> list[Any]:
        v = self.obj[name]
        if type(v) is not list:
            raise self._fail(name, "an array")
        return v

    def caps(self, name: str = "caps") -> tuple[str, ...]:
        caps = self.array(name)
        if len(caps) > _MAX_CAPS:
            raise ProtocolError(f"{self.what}.{name} lists more than {_MAX_CAPS} capabilities")
        for c in caps:
            if type(c) is not str or not _CAP_RE.fullmatch(c):
                raise ProtocolError(f"{self.what}.{name} holds an invalid capability {c!r}")
        return tuple(caps)

    def log_id(self, name: str) -> str:
        v = self.obj[name]
        if not is_log_id(v):
            raise self._fail(name, "a log id")
        assert isinstance(v, str)
        return v


def _handshake(cls: type[Hello] | type[Welcome]) -> Callable[[_Fields], Message]:
    def build(f: _Fields) -> Message:
        node = f.node("node")
        log_id = f.log_id("log_id")
        if not log_id.startswith(node + "/"):
            raise ProtocolError(f"{f.what}.log_id must be a log of node {node!r}")
        return cls(
            proto=f.uint("proto"),
            cluster_id=f.text("cluster_id", 16, _CLUSTER_ID_RE),
            node=node,
            caps=f.caps(),
            log_id=log_id,
        )

    return build


def _positions(f: _Fields, name: str) -> dict[str, int]:
    v = f.obj[name]
    if type(v) is not dict or len(v) > _MAX_LOGS:
        raise f._fail(name, f"a map of at most {_MAX_LOGS} log positions")
    for log_id, oseq in v.items():
        if not is_log_id(log_id) or type(oseq) is not int or not 0 <= oseq <= _INT64_MAX:
            raise ProtocolError(f"{f.what}.{name} must map log ids to positions")
    return dict(v)


def _subscribe(f: _Fields) -> Message:
    scope = f.text("scope", 8)
    if scope not in (OWN, RELAY):
        raise ProtocolError(f"subscribe.scope must be {OWN!r} or {RELAY!r}")
    exclude = f.array("exclude")
    if len(exclude) > _MAX_LOGS or not all(is_log_id(x) for x in exclude):
        raise ProtocolError("subscribe.exclude must be a list of log ids")
    return Subscribe(
        positions=_positions(f, "positions"), scope=scope, exclude=tuple(exclude),
        credit=f.uint("credit"),
    )  # fmt: skip


def _range(obj: object) -> LogRange:
    if type(obj) is not list or len(obj) != 4:
        raise ProtocolError("batch.ranges must hold [log_id, after, last, compacted]")
    log_id, after, last, compacted = obj
    if not is_log_id(log_id) or type(compacted) is not bool:
        raise ProtocolError("batch range has a bad log id or compacted flag")
    for n in (after, last):
        if type(n) is not int or not 0 <= n <= _INT64_MAX:
            raise ProtocolError("batch range bounds must be non-negative integers")
    if last < after:
        raise ProtocolError("batch range ends before it starts")
    return LogRange(log_id, after, last, compacted)


def _wire_entry(obj: object) -> WireEntry:
    if type(obj) is not list or len(obj) != 6:
        raise ProtocolError("batch.entries must hold [log_id, oseq, writer, key_id, body, sig]")
    log_id, oseq, writer, key_id, body, sig = obj
    if not is_log_id(log_id) or not isinstance(writer, str) or not log_id.startswith(writer + "/"):
        raise ProtocolError("batch entry has a bad log id or writer")
    if type(oseq) is not int or not 0 < oseq <= _INT64_MAX:
        raise ProtocolError("batch entry oseq must be a positive integer")
    if type(key_id) is not str or not _KEY_ID_RE.fullmatch(key_id):
        raise ProtocolError("batch entry key_id is malformed")
    if type(body) is not bytes or not 0 < len(body) <= MAX_ENTRY_BYTES:
        raise ProtocolError(f"batch entry body must be 1 to {MAX_ENTRY_BYTES} bytes")
    if type(sig) is not bytes or len(sig) > _MAX_SIG_BYTES:
        raise ProtocolError("batch entry signature is malformed")
    return WireEntry(log_id, oseq, writer, key_id, body, sig)


def _batch(f: _Fields) -> Message:
    ranges = tuple(_range(r) for r in f.array("ranges"))
    if len(ranges) > _MAX_LOGS:
        raise ProtocolError("batch covers too many logs")
    entries = tuple(_wire_entry(e) for e in f.array("entries"))
    return Batch(ranges, entries, lag_entries=f.uint("lag_entries"), lag_bytes=f.uint("lag_bytes"))


def _certs(f: _Fields) -> Message:
    certs = f.array("certs")
    if len(certs) > _MAX_CERTS or not all(
        type(c) is bytes and 0 < len(c) <= _MAX_CERT_BYTES for c in certs
    ):
        raise ProtocolError(f"certs must hold at most {_MAX_CERTS} DER certificates")
    return Certs(tuple(certs))


_DECODERS: Final[dict[str, tuple[type[Any], Callable[[_Fields], Message]]]] = {
    Hello.TYPE: (Hello, _handshake(Hello)),
    Welcome.TYPE: (Welcome, _handshake(Welcome)),
    Refuse.TYPE: (Refuse, lambda f: Refuse(reason=f.text("reason", _MAX_REASON_CHARS))),
    Subscribe.TYPE: (Subscribe, _subscribe),
    Credit.TYPE: (
        Credit,
        lambda f: Credit(batches=f.uint("batches"), positions=_positions(f, "positions")),
    ),
    Batch.TYPE: (Batch, _batch),
    Certs.TYPE: (Certs, _certs),
    Want.TYPE: (Want, lambda f: Want(hash=f.hash(), offset=f.uint("offset"))),
    Chunk.TYPE: (
        Chunk,
        lambda f: Chunk(hash=f.hash(), offset=f.uint("offset"), data=f.blob("data")),
    ),
    End.TYPE: (End, lambda f: End(hash=f.hash(), size=f.uint("size"))),
    Missing.TYPE: (Missing, lambda f: Missing(hash=f.hash())),
    BlobCredit.TYPE: (BlobCredit, lambda f: BlobCredit(chunks=f.uint("chunks"))),
    Ping.TYPE: (Ping, lambda f: Ping(t=f.uint("t"))),
    Pong.TYPE: (Pong, lambda f: Pong(t=f.uint("t"))),
}
