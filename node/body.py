"""Request bodies of the operations API: JSON, CBOR, MessagePack and streamed multipart.

JSON, CBOR and MessagePack bodies are read whole, up to ``max_body_bytes`` (a larger one
gets 413 with a hint to use multipart). A multipart body is read field by field; the file
part named ``payload`` must come last and is handed over as a stream, never held whole
in memory. Every top-level field whose name starts with ``_`` is refused before
anything happens: nothing in a client body can mark a call as replicated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import cbor2
import msgpack
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from node.errors import BadRequest, ReservedField, TooLarge

__all__ = ["Body", "read_body"]

_CHUNK = 1 << 20
_MAX_FIELD_BYTES = 64 * 1024


@dataclass
class Body:
    """A parsed body: its fields, and the payload (bytes, or a stream still unread)."""

    fields: dict[str, Any]
    form: bool = False
    payload_bytes: bytes | None = None
    payload_stream: AsyncIterator[bytes] | None = None

    @property
    def operation(self) -> str:
        op = self.fields.get("operation")
        if not isinstance(op, str) or not op:
            raise BadRequest("'operation' is required and must be a string", field="operation")
        return op


def _check_reserved(fields: dict[str, Any]) -> None:
    for name in fields:
        if not isinstance(name, str):
            raise BadRequest("field names must be strings")
        if name.startswith("_"):
            raise ReservedField(
                f"field '{name}' is reserved: names starting with '_' are not accepted",
                field=name,
            )


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"JSON {name} is not a valid value")


def _check_values(value: Any, depth: int = 0) -> None:
    """Refuse NaN/Infinity, deep nesting, and text that is not valid Unicode.

    JSON can spell lone surrogates (``"\\ud800"``), which no UTF-8 consumer (SQLite,
    the filesystem, scrypt) accepts; they are refused here, once, as bad input.
    """
    if depth > 64:
        raise BadRequest("body is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest("NaN and Infinity are not valid values")
    if isinstance(value, str):
        _check_text(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str):
                _check_text(k)
            _check_values(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_values(v, depth + 1)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("text must be valid Unicode (no lone surrogates)") from None


async def _read_limited(request: web.Request, limit: int, idle_s: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await asyncio.wait_for(request.content.readany(), idle_s)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"request body is larger than {limit} bytes; send large payloads as "
        "multipart/form-data with the file part 'payload' last",
        limit=limit,
    )


def _decode(kind: str, raw: bytes) -> Any:
    try:
        if kind == "json":
            return json.loads(raw, parse_constant=_reject_constant)
        if kind == "cbor":
            return cbor2.loads(raw)
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except BadRequest:
        raise
    except (ValueError, TypeError, RecursionError, cbor2.CBORDecodeError) as e:
        raise BadRequest(f"body is not valid {kind.upper()}: {e}") from None
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise BadRequest(f"body is not valid {kind.upper()}: {type(e).__name__}") from None


async def read_body(request: web.Request, *, max_body_bytes: int, idle_s: float) -> Body:
    """Parse the request body by its Content-Type.

    Raises:
        BadRequest: unsupported type, malformed body, not an object, NaN/Infinity.
        ReservedField: a field name starts with ``_``.
        TooLarge: over ``max_body_bytes``.
    """
    ctype = request.content_type
    if ctype.startswith("multipart/"):
        return await _read_multipart(request, idle_s)
    kinds = {
        "application/json": "json",
        "application/cbor": "cbor",
        "application/x-msgpack": "msgpack",
        "application/msgpack": "msgpack",
        "application/vnd.msgpack": "msgpack",
    }
    kind = kinds.get(ctype)
    if kind is None:
        raise BadRequest(
            f"unsupported Content-Type {ctype!r}: use application/json, application/cbor, "
            "application/x-msgpack or multipart/form-data"
        )
    try:
        raw = await _read_limited(request, max_body_bytes, idle_s)
    except TimeoutError:
        raise BadRequest("request body was not received in time", code="body_timeout") from None
    value = _decode(kind, raw)
    if not isinstance(value, dict):
        raise BadRequest("body must be an object with an 'operation' field")
    _check_reserved(value)
    _check_values(value)
    body = Body(fields=value)
    payload = value.pop("payload", None)
    if isinstance(payload, bytes | bytearray):
        body.payload_bytes = bytes(payload)
    elif isinstance(payload, str):
        try:
            body.payload_bytes = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(
                "'payload' must be base64 (or bytes in CBOR/MessagePack)", field="payload"
            ) from None
    elif payload is not None:
        raise BadRequest("'payload' must be bytes or a base64 string", field="payload")
    return body


async def _read_multipart(request: web.Request, idle_s: float) -> Body:
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, HttpProcessingError) as e:
        raise BadRequest(f"malformed multipart body: {e}") from None
    fields: dict[str, Any] = {}
    body = Body(fields=fields, form=True)
    while True:
        try:
            part = await asyncio.wait_for(reader.next(), idle_s)
        except TimeoutError:
            raise BadRequest("request body was not received in time", code="body_timeout") from None
        except (ValueError, HttpProcessingError) as e:
            raise BadRequest(f"malformed multipart body: {e}") from None
        if part is None:
            break
        if isinstance(part, MultipartReader):
            raise BadRequest("nested multipart bodies are not accepted")
        name = part.name
        if not name:
            raise BadRequest("every multipart part needs a name")
        _check_reserved({name: None})
        if name == "payload":
            body.payload_stream = _stream_part(part, idle_s)
            break
        if len(fields) >= 100:
            raise BadRequest("too many multipart fields")
        value = await _read_field(part, name, idle_s)
        try:
            fields[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"multipart field '{name}' is not UTF-8 text", field=name) from None
    return body


async def _read_field(part: BodyPartReader, name: str, idle_s: float) -> bytes:
    """One non-payload field, refused once it passes 64 KiB (never buffered beyond that)."""
    data = bytearray()
    try:
        while chunk := await asyncio.wait_for(part.read_chunk(16 * 1024), idle_s):
            data += chunk
            if len(data) > _MAX_FIELD_BYTES:
                raise TooLarge(f"multipart field '{name}' is larger than {_MAX_FIELD_BYTES} bytes")
        return bytes(part.decode(data))
    except TimeoutError:
        raise BadRequest("request body was not received in time", code="body_timeout") from None
    except (ValueError, HttpProcessingError) as e:  # truncated part, bad transfer encoding
        raise BadRequest(f"malformed multipart field '{name}': {e}", field=name) from None


async def _stream_part(part: BodyPartReader, idle_s: float) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await asyncio.wait_for(part.read_chunk(_CHUNK), idle_s)
        except TimeoutError:
            raise OSError("payload upload stalled") from None
        if not chunk:
            return
        yield chunk
