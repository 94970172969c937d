"""Strict msgpack: the one place that unpacks bytes a peer sent.

:func:`unpack` treats its input as hostile. Limits are enforced cheapest first: the byte
size before unpacking; msgpack's per-container length caps while unpacking (so a header
cannot claim more elements than the input could hold); then an iterative walk of the
decoded value for nesting depth, total item count and leaf types (msgpack-python has no
depth limit of its own, and the walk never recurses). Map keys must be distinct strings;
extension types, non-finite floats and integers beyond 64 bits are refused. Every
failure raises :class:`PackError`, msgpack's own exceptions included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import msgpack

__all__ = ["PackError", "PackLimits", "pack", "unpack"]

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_LEAF_TYPES: Final = (str, bytes, bool, type(None))


class PackError(ValueError):
    """Bytes that are not one acceptable msgpack value (or a value that cannot be packed)."""


@dataclass(frozen=True, slots=True)
class PackLimits:
    """Bounds on one unpacked value: bytes, nesting depth, and total container items."""

    max_bytes: int = 16 * 1024 * 1024
    max_depth: int = 32
    max_items: int = 100_000


def pack(value: Any) -> bytes:
    """Pack ``value`` (strings as str, bytes as bin).

    Raises:
        PackError: the value holds something msgpack cannot encode.
    """
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise PackError(f"cannot encode value: {e}") from e
    return packed


def unpack(data: bytes | bytearray | memoryview, limits: PackLimits) -> Any:
    """Unpack exactly one value from ``data`` (trailing bytes are an error).

    Raises:
        PackError: too large, malformed, too deep, too many items, trailing bytes,
            duplicate or non-string map keys, or an unsupported value.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PackError(f"expected bytes, not {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise PackError(f"{len(data)} bytes exceed the limit of {limits.max_bytes} bytes")
    cap = min(limits.max_items, len(data))
    try:
        value = msgpack.unpackb(
            data,
            use_list=True,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_string_map,
            max_str_len=len(data),
            max_bin_len=len(data),
            max_array_len=cap,
            max_map_len=cap,
            max_ext_len=0,
        )
    except PackError:
        raise
    except Exception as e:  # msgpack raises a zoo of ValueError/TypeError subclasses
        raise PackError(f"malformed msgpack: {e}") from e
    _walk(value, limits)
    return value


def _string_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise PackError("map keys must be strings")
        if key in out:
            raise PackError(f"duplicate map key {key!r}")
        out[key] = value
    return out


def _walk(root: object, limits: PackLimits) -> None:
    """Check depth, item count and leaf types without recursion."""
    items = 0
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limits.max_depth:
                raise PackError(f"value nests deeper than {limits.max_depth} levels")
            items += len(node)
            if items > limits.max_items:
                raise PackError(f"value holds more than {limits.max_items} items")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(node, int) and not isinstance(node, bool):
            if not _INT64_MIN <= node <= _INT64_MAX:
                raise PackError("integer out of the signed 64-bit range")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise PackError("non-finite float")
        elif not isinstance(node, _LEAF_TYPES):
            raise PackError(f"unsupported value of type {type(node).__name__}")
