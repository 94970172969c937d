"""Request bodies of the operations API: JSON, CBOR, MessagePack and streamed multipart.

JSON, CBOR and MessagePack bodies are read whole, up to ``max_body_bytes`` (a larger one
gets 413 with a hint to use multipart), and must hold exactly one value: trailing bytes
are a 400. A ``payload`` in them (bytes, or base64 text) is decoded in a worker thread
in slices, validated before anything is written, and handed on as a stream of those
slices, so the decoded bytes exist once and the blob store hashes them as they come.

A multipart body is read field by field; the file part named ``payload`` must come
last and is handed over as a stream, never held whole in memory. Whatever follows it
is read when the stream ends: another part fails the deploy (400, before the blob is
stored), so a field placed after the payload can never be silently dropped.

Every top-level field whose name starts with ``_`` is refused before anything happens:
nothing in a client body can mark a call as replicated.

Slow bodies are cut off by two deadlines (see :class:`BodyDeadline`): an idle one
(``[limits] body_idle_timeout_s`` without a byte) and a total one that grows with the
bytes received (``min_body_bytes_per_s``), so a 1 byte/s trickle ends after about
``body_idle_timeout_s`` however large its Content-Length claims to be.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import cbor2
import msgpack
import pybase64
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

from node.errors import BadRequest, DeployFailed, ReservedField, TooLarge

__all__ = ["Body", "BodyDeadline", "read_body"]

_CHUNK = 1 << 20
_MAX_FIELD_BYTES = 64 * 1024
# Base64 is decoded in slices of this many characters (a multiple of 4): 3 MiB decoded,
# close to the blob store's 4 MiB batches.
_B64_SLICE = 4 << 20
T = TypeVar("T")


@dataclass
class Body:
    """A parsed body: its fields, and the payload as a stream still unread.

    ``payload_bytes`` is kept for callers that build a :class:`Body` themselves; the
    parser always hands a payload over as ``payload_stream``.
    """

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


class BodyDeadline:
    """The idle and total deadlines of one request body, on the event loop's clock.

    The next bytes must arrive within ``idle_s`` of the last ones, and the body as a
    whole may take ``idle_s`` plus one second per ``min_bytes_per_s`` bytes received so
    far: a client sending at least that fast never meets the total deadline, a trickle
    does whatever Content-Length it announced. ``min_bytes_per_s`` 0 turns it off.
    """

    def __init__(self, idle_s: float, min_bytes_per_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_s = idle_s
        self.min_bytes_per_s = min_bytes_per_s
        self.started = self.last = self.loop.time()
        self.received = 0

    def at(self) -> float:
        """The loop time by which the next bytes must have arrived."""
        idle = self.last + self.idle_s
        if self.min_bytes_per_s <= 0:
            return idle
        return min(idle, self.started + self.idle_s + self.received / self.min_bytes_per_s)

    def got(self, n: int) -> None:
        self.received += n
        self.last = self.loop.time()

    async def run(self, step: Awaitable[T]) -> T:
        """Await one read under the deadline.

        Raises:
            TimeoutError: the deadline passed first.
        """
        async with asyncio.timeout_at(self.at()):
            return await step

    def message(self) -> str:
        return (
            "request body was not received in time (no data for "
            f"{self.idle_s:g} s, or slower than {self.min_bytes_per_s:g} bytes/s)"
        )


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
    if text.isascii():
        return  # the common case, known without a scan
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("text must be valid Unicode (no lone surrogates)") from None


def _timeout(deadline: BodyDeadline) -> BadRequest:
    return BadRequest(deadline.message(), code="body_timeout")


async def _read_limited(request: web.Request, limit: int, deadline: BodyDeadline) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await deadline.run(request.content.readany()):
            deadline.got(len(chunk))
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except TimeoutError:
        raise _timeout(deadline) from None
    except HttpProcessingError as e:  # a body shorter than its Content-Length, bad chunking
        raise BadRequest(f"request body is malformed or incomplete: {e.message}") from None
    return b"".join(chunks)


def _too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"request body is larger than {limit} bytes; send large payloads as "
        "multipart/form-data with the file part 'payload' last",
        limit=limit,
    )


def _decode(kind: str, raw: bytes) -> Any:
    """One value from ``raw``, which must hold exactly that value."""
    try:
        if kind == "json":
            return json.loads(raw, parse_constant=_reject_constant)
        if kind == "cbor":
            fp = io.BytesIO(raw)
            value = cbor2.CBORDecoder(fp).decode()
            if fp.tell() != len(raw):
                raise BadRequest("body is not valid CBOR: trailing bytes after the value")
            return value
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except BadRequest:
        raise
    except msgpack.ExtraData:
        raise BadRequest("body is not valid MSGPACK: trailing bytes after the value") from None
    except (ValueError, TypeError, RecursionError, cbor2.CBORDecodeError) as e:
        raise BadRequest(f"body is not valid {kind.upper()}: {e}") from None
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise BadRequest(f"body is not valid {kind.upper()}: {type(e).__name__}") from None


_KINDS = {
    "application/json": "json",
    "application/cbor": "cbor",
    "application/x-msgpack": "msgpack",
    "application/msgpack": "msgpack",
    "application/vnd.msgpack": "msgpack",
}


async def read_body(
    request: web.Request,
    *,
    max_body_bytes: int,
    idle_s: float,
    min_bytes_per_s: float = 0.0,
) -> Body:
    """Parse the request body by its Content-Type.

    Raises:
        BadRequest: unsupported type, malformed or truncated body, trailing bytes, not
            an object, NaN/Infinity, a payload that is not bytes or valid base64, or a
            body slower than its deadlines (code ``body_timeout``).
        ReservedField: a field name starts with ``_``.
        TooLarge: over ``max_body_bytes``.
    """
    deadline = BodyDeadline(idle_s, min_bytes_per_s)
    ctype = request.content_type
    if ctype.startswith("multipart/"):
        return await _read_multipart(request, deadline)
    kind = _KINDS.get(ctype)
    if kind is None:
        raise BadRequest(
            f"unsupported Content-Type {ctype!r}: use application/json, application/cbor, "
            "application/x-msgpack or multipart/form-data"
        )
    raw = await _read_limited(request, max_body_bytes, deadline)
    spliced = _splice_payload(raw) if kind == "json" else None
    payload: Any
    if spliced is not None:
        value, payload = spliced
    else:
        value = _decode(kind, raw)
        payload = value.pop("payload", None) if isinstance(value, dict) else None
    del raw  # the parsed value (and the payload's bytes) are all that is kept
    if not isinstance(value, dict):
        raise BadRequest("body must be an object with an 'operation' field")
    _check_reserved(value)
    _check_values(value)
    body = Body(fields=value)
    if payload is not None:
        slices = await asyncio.to_thread(_payload_slices, payload)
        body.payload_stream = _iterate(slices)
    return body


_PAYLOAD_KEY = re.compile(rb'"payload"[ \t\r\n]*:[ \t\r\n]*"')


@dataclass(frozen=True, slots=True)
class _Base64Text:
    """A base64 string still in the raw body's bytes (never made a ``str``)."""

    view: memoryview


def _splice_payload(raw: bytes) -> tuple[Any, _Base64Text] | None:
    """Parse a JSON body without scanning its base64 payload as JSON text.

    The payload string is cut out of ``raw`` (found as the first ``"payload": "`` key,
    ending at the next quote, with no escapes in between), a unique marker is put in
    its place, and the rest is parsed as usual. The cut is used only if the marker comes
    back as the top-level ``payload`` value; otherwise (a nested key, escapes, a
    duplicate key, anything odd) the caller parses the whole body the ordinary way, so
    the result is always what ``json.loads`` would give. Saves a full scan and a copy
    of the largest field.
    """
    match = _PAYLOAD_KEY.search(raw)
    if match is None:
        return None
    start = match.end()
    end = raw.find(b'"', start)
    if end < 0 or raw.find(b"\\", start, end) >= 0:
        return None
    token = uuid.uuid4().hex  # a JSON escape in the text, a NUL in the parsed value
    text = raw[:start] + b"\\u0000cairn-payload-" + token.encode() + raw[end:]
    try:
        value = _decode("json", text)
    except BadRequest:
        return None
    if not isinstance(value, dict) or value.get("payload") != "\0cairn-payload-" + token:
        return None
    del value["payload"]
    return value, _Base64Text(memoryview(raw)[start:end])


def _payload_slices(payload: object) -> list[bytes]:
    """The payload's bytes in slices of about 3 MiB: bytes as they are (sliced), base64
    decoded slice by slice (which also validates it: nothing is written for bad input)."""
    if isinstance(payload, bytes | bytearray):
        view = memoryview(payload)
        return [bytes(view[i : i + _CHUNK * 3]) for i in range(0, len(view), _CHUNK * 3)]
    if isinstance(payload, _Base64Text):
        if len(payload.view) % 4:
            raise _bad_base64()
        return _b64_slices(payload.view)
    if not isinstance(payload, str):
        raise BadRequest("'payload' must be bytes or a base64 string", field="payload")
    if not payload.isascii() or len(payload) % 4:
        raise _bad_base64()
    return _b64_slices(payload)


def _b64_slices(payload: str | memoryview) -> list[bytes]:
    try:
        # pybase64 decodes and validates with SIMD, ~40x faster than binascii here.
        return [
            pybase64.b64decode(payload[i : i + _B64_SLICE], validate=True)
            for i in range(0, len(payload), _B64_SLICE)
        ]
    except (binascii.Error, ValueError):
        raise _bad_base64() from None


def _bad_base64() -> BadRequest:
    return BadRequest("'payload' must be base64 (or bytes in CBOR/MessagePack)", field="payload")


async def _iterate(slices: list[bytes]) -> AsyncIterator[bytes]:
    """Hand the slices on, dropping each once it is taken (memory falls as they go)."""
    slices.reverse()
    while slices:
        yield slices.pop()


# aiohttp *warns* about a malformed Content-Disposition (and then gives the part no
# name, which is refused below); where warnings are errors, they arrive as exceptions.
_BAD_DISPOSITION = (BadContentDispositionHeader, BadContentDispositionParam)


async def _read_multipart(request: web.Request, deadline: BodyDeadline) -> Body:
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, HttpProcessingError) as e:
        raise BadRequest(f"malformed multipart body: {e}") from None
    fields: dict[str, Any] = {}
    body = Body(fields=fields, form=True)
    while True:
        try:
            part = await deadline.run(reader.next())
        except TimeoutError:
            raise _timeout(deadline) from None
        except (ValueError, HttpProcessingError, *_BAD_DISPOSITION) as e:
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
            body.payload_stream = _stream_part(reader, part, deadline)
            break
        if name in fields:
            raise BadRequest(f"multipart field '{name}' is given twice", field=name)
        if len(fields) >= 100:
            raise BadRequest("too many multipart fields")
        value = await _read_field(part, name, deadline)
        try:
            fields[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"multipart field '{name}' is not UTF-8 text", field=name) from None
        _check_text(fields[name])
    return body


async def _read_field(part: BodyPartReader, name: str, deadline: BodyDeadline) -> bytes:
    """One non-payload field, refused once it passes 64 KiB (never buffered beyond that)."""
    data = bytearray()
    try:
        while chunk := await deadline.run(part.read_chunk(16 * 1024)):
            deadline.got(len(chunk))
            data += chunk
            if len(data) > _MAX_FIELD_BYTES:
                raise TooLarge(f"multipart field '{name}' is larger than {_MAX_FIELD_BYTES} bytes")
        return bytes(part.decode(data))
    except TimeoutError:
        raise _timeout(deadline) from None
    except (ValueError, HttpProcessingError) as e:  # truncated part, bad transfer encoding
        raise BadRequest(f"malformed multipart field '{name}': {e}", field=name) from None


async def _stream_part(
    reader: MultipartReader, part: BodyPartReader, deadline: BodyDeadline
) -> AsyncIterator[bytes]:
    """The payload part's bytes; at its end, the body must end too.

    Raises:
        OSError: the upload stalled, was too slow or broke off (the deploy fails with
            ``upload_failed``).
        DeployFailed: ``upload_failed`` (400) when another part follows the payload.
    """
    try:
        while chunk := await deadline.run(part.read_chunk(_CHUNK)):
            deadline.got(len(chunk))
            yield chunk
        after = await deadline.run(reader.next())
    except TimeoutError:
        raise OSError(f"payload upload stalled: {deadline.message()}") from None
    except (ValueError, HttpProcessingError, *_BAD_DISPOSITION) as e:
        raise OSError(f"payload upload broke off: {e}") from None
    if after is not None:
        name = getattr(after, "name", None) or "(unnamed)"
        raise DeployFailed(
            f"multipart part '{name}' comes after the payload part; the payload part must "
            "be last (nothing from this upload was kept)",
            code="upload_failed",
            phase="receive",
            field=name,
        )
