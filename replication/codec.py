"""msgpack encoding of the peer protocol's frames, and strict validation of what arrives.

A frame is one msgpack map ``{"t": <TYPE>, <field>: <value>, ...}``. A field named ``t``
(Ping, Pong) travels as ``ts``; change entries inside Changes are untagged maps.

:func:`decode` treats its input as hostile: every way a frame can be wrong raises
:class:`~replication.errors.ProtocolError` (msgpack's own exceptions are translated here,
once), and anything it returns is a fully validated :data:`~replication.messages.Message`.

Limits are enforced in three places, cheapest first: the frame's byte size before
unpacking; msgpack's per-container length caps while unpacking (so a header cannot
claim more elements than the frame could hold); and an iterative walk of the decoded
structure for nesting depth, total item count and leaf types. msgpack-python has no depth
limit of its own, and the walk never recurses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final

import msgpack

from replication.errors import ProtocolError
from replication.messages import (
    NODE_NAME_RE,
    OPS,
    BlobCredit,
    ChangeEntry,
    Changes,
    Chunk,
    Credit,
    End,
    Hello,
    Message,
    Missing,
    Ping,
    Pong,
    Refuse,
    Subscribe,
    Want,
    Welcome,
)

__all__ = ["DEFAULT_LIMITS", "FrameLimits", "decode", "encode"]

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_HASH_RE: Final = re.compile(r"[0-9a-f]{64}")
_CLUSTER_ID_RE: Final = re.compile(r"[0-9a-f]{16}")
_CAP_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TABLE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_CAPS: Final = 64
_MAX_REASON_CHARS: Final = 4096
_MAX_KEY_CHARS: Final = 4096
_MAX_USER_CHARS: Final = 1024
_LEAF_TYPES: Final = (str, bytes, bool, type(None))
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
    if isinstance(msg, Changes):
        wire["entries"] = [{f.name: getattr(e, f.name) for f in fields(e)} for e in msg.entries]
    try:
        frame: bytes = msgpack.packb(wire, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
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
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError(f"a frame must be bytes, not {type(frame).__name__}")
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(
            f"frame of {len(frame)} bytes exceeds the limit of {limits.max_frame_bytes} bytes"
        )
    cap = min(limits.max_items, len(frame))
    try:
        obj = msgpack.unpackb(
            frame,
            use_list=True,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_string_map,
            max_str_len=len(frame),
            max_bin_len=len(frame),
            max_array_len=cap,
            max_map_len=cap,
            max_ext_len=0,  # no extension types (timestamps included) in this protocol
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises a zoo of ValueError/TypeError subclasses
        raise ProtocolError(f"malformed frame: {e}") from e
    _walk(obj, limits)
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


# -- structure checks -----------------------------------------------------------------


def _string_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise ProtocolError("map keys must be strings")
        if key in out:
            raise ProtocolError(f"duplicate map key {key!r}")
        out[key] = value
    return out


def _walk(root: object, limits: FrameLimits) -> None:
    """Check depth, item count and leaf types without recursion."""
    items = 0
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limits.max_depth:
                raise ProtocolError(f"frame nests deeper than {limits.max_depth} levels")
            items += len(node)
            if items > limits.max_items:
                raise ProtocolError(f"frame holds more than {limits.max_items} items")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(node, int) and not isinstance(node, bool):
            if not _INT64_MIN <= node <= _INT64_MAX:
                raise ProtocolError("integer out of the signed 64-bit range")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ProtocolError("non-finite float in frame")
        elif not isinstance(node, _LEAF_TYPES):
            raise ProtocolError(f"unsupported value of type {type(node).__name__} in frame")


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

    def data(self, name: str) -> dict[str, Any] | list[Any] | None:
        v = self.obj[name]
        if v is not None and type(v) not in (dict, list):
            raise self._fail(name, "a map, an array or nil")
        return v  # type: ignore[no-any-return]  # contents already checked by _walk


def _handshake(cls: type[Hello] | type[Welcome]) -> Callable[[_Fields], Message]:
    def build(f: _Fields) -> Message:
        return cls(
            proto=f.uint("proto"),
            cluster_id=f.text("cluster_id", 16, _CLUSTER_ID_RE),
            node=f.node("node"),
            caps=f.caps(),
        )

    return build


def _entry(obj: object) -> ChangeEntry:
    if not isinstance(obj, dict):
        raise ProtocolError("changes.entries must hold maps")
    f = _Fields(obj, ChangeEntry)
    op = f.text("op", 16)
    if op not in OPS:
        raise ProtocolError(f"change.op must be one of {sorted(OPS)}, got {op!r}")
    return ChangeEntry(
        seq=f.uint("seq"),
        tbl=f.text("tbl", 64, _TABLE_RE),
        key=f.text("key", _MAX_KEY_CHARS),
        version=f.uint("version"),
        origin=f.node("origin"),
        op=op,
        data=f.data("data"),
        user=f.opt_text("user", _MAX_USER_CHARS),
        t=f.uint("t"),
    )


def _changes(f: _Fields) -> Message:
    entries = tuple(_entry(e) for e in f.array("entries"))
    last_seq, head_seq = f.uint("last_seq"), f.uint("head_seq")
    after_seq, lag_bytes = f.uint("after_seq"), f.uint("lag_bytes")
    previous = after_seq
    for e in entries:
        if e.seq <= previous:
            raise ProtocolError("changes.entries are not in increasing seq order after after_seq")
        previous = e.seq
    if previous > last_seq or last_seq > head_seq:
        raise ProtocolError("changes must satisfy after_seq < entry seqs <= last_seq <= head_seq")
    return Changes(
        entries=entries,
        last_seq=last_seq,
        head_seq=head_seq,
        after_seq=after_seq,
        lag_bytes=lag_bytes,
    )


_DECODERS: Final[dict[str, tuple[type[Any], Callable[[_Fields], Message]]]] = {
    Hello.TYPE: (Hello, _handshake(Hello)),
    Welcome.TYPE: (Welcome, _handshake(Welcome)),
    Refuse.TYPE: (Refuse, lambda f: Refuse(reason=f.text("reason", _MAX_REASON_CHARS))),
    Subscribe.TYPE: (
        Subscribe,
        lambda f: Subscribe(after_seq=f.uint("after_seq"), credit=f.uint("credit")),
    ),
    Credit.TYPE: (Credit, lambda f: Credit(batches=f.uint("batches"))),
    Changes.TYPE: (Changes, _changes),
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
