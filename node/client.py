"""An async client of the operations API, used by the ``cairn`` command line.

Speaks what SPEC section 4 and 6 define: ``POST /`` with a JSON body and Basic auth, a
multipart upload (fields first, the ``payload`` file part last, streamed from disk with a
byte-progress callback), and Server-Sent Events read with
:class:`~node.sse_parser.SseParser`, a pure parser of the ``id:``/``event:``/``data:``
framing with no I/O in it.
:meth:`Client.follow` tails a deployment and resumes with ``Last-Event-ID`` after a
dropped connection; :meth:`Client.deploy` falls back to it when the deploy's own stream
breaks off once the deployment id is known.

aiohttp's exceptions are translated once, here, into this tree::

    ClientError
    ├── ConnectError   the target could not be reached (refused, DNS, TLS, timeout)
    ├── AuthError      401: missing or wrong credentials
    ├── ApiError       any other error answer: HTTP status plus the error body
    └── StreamError    an event stream broke off and could not be resumed
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from node.sse_parser import SseComment, SseMessage, SseParser

__all__ = [
    "ApiError",
    "AuthError",
    "Client",
    "ClientError",
    "ConnectError",
    "Download",
    "SseComment",
    "SseMessage",
    "SseParser",
    "StreamError",
    "StreamEvent",
    "Upload",
    "deploy_result_from_record",
]

_CHUNK = 256 * 1024


class ClientError(Exception):
    """Base of every error this client raises."""


class ConnectError(ClientError):
    """The target could not be reached."""


class ApiError(ClientError):
    """The node answered with an error.

    Attributes:
        status: the HTTP status.
        body: the JSON error body (``{"error", "code", ...}``), or a synthetic one.
    """

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(self.describe())

    @property
    def code(self) -> str:
        return str(self.body.get("code", "error"))

    def describe(self) -> str:
        """One line: the message and its code."""
        return f"{self.body.get('error', 'request failed')} [{self.code}]"


class AuthError(ApiError):
    """401: no credentials, or wrong ones."""


class StreamError(ClientError):
    """An event stream ended without its terminal event and could not be resumed."""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A message of a deployment stream with its JSON data decoded.

    ``seq`` is the event's ``id:``: None for the stream's own ``reset``, ``done`` and
    ``error``. A deploy also logs events named ``error`` (with a seq); only one without
    a seq ends the stream.
    """

    event: str
    data: Any
    seq: int | None = None

    @property
    def terminal(self) -> bool:
        return self.seq is None and self.event in ("done", "error")


def _decode_event(msg: SseMessage) -> StreamEvent:
    try:
        data = json.loads(msg.data)
    except ValueError:
        raise StreamError(f"event {msg.event!r} carries data that is not JSON") from None
    seq = int(msg.id) if msg.id is not None and msg.id.isdigit() else None
    return StreamEvent(msg.event, data, seq)


# -- uploads and downloads ----------------------------------------------------------------

#: Called with the bytes sent so far after each chunk has been handed to the socket.
Progress = Callable[[int], None]


@dataclass
class Upload:
    """A payload file to send as the multipart part ``payload``.

    ``on_progress`` is called with the running total of file bytes written to the
    connection; its last call is ``size`` exactly (the same unit as the total).
    """

    path: Path
    on_progress: Progress | None = None
    size: int = field(init=False)
    sent: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.size = self.path.stat().st_size

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes, counting each chunk as sent once the connection took it."""
        self.sent = 0
        with self.path.open("rb") as f:
            while True:
                chunk = await asyncio.to_thread(f.read, _CHUNK)
                if not chunk:
                    break
                yield chunk
                # aiohttp resumes this generator only after it has written (and, when
                # the buffer was full, drained) the chunk: count it as sent now.
                self.sent += len(chunk)
                if self.on_progress is not None:
                    self.on_progress(self.sent)


@dataclass(frozen=True, slots=True)
class Download:
    """What :meth:`Client.download` wrote."""

    size: int
    sha256: str
    expected_sha256: str | None
    filename: str | None


def deploy_result_from_record(record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Shape a terminal deployment record like ``deploy_component``'s own answer.

    Used when the deploy's stream broke off and the end was read from
    ``get_deployment`` instead.

    Returns:
        ``(succeeded, body)``: the success body, or an error body with
        ``deployment_id``, ``phase`` and ``failed_nodes``.
    """
    did = record.get("deployment_id")
    results = record.get("peer_results") or []
    if record.get("status") == "success":
        verb = "dropped" if record.get("kind") == "drop" else "deployed"
        return True, {
            "message": f"Successfully {verb}: {record.get('project')}",
            "deployment_id": did,
            "peer_results": results,
        }
    err = record.get("error") or {}
    return False, {
        "error": err.get("message", f"deploy ended {record.get('status')}"),
        "code": err.get("code", str(record.get("status"))),
        "deployment_id": did,
        "phase": err.get("phase", record.get("phase")),
        "failed_nodes": [r["node"] for r in results if r.get("status") == "failed"],
    }


# -- the client ---------------------------------------------------------------------------


class Client:
    """One target node and one set of credentials. Use as ``async with``.

    Args:
        target: the node's admin URL (``http://host:port`` or ``https://...``).
        user, password: Basic credentials (None sends none).
        ca_file: CA bundle to verify an ``https`` target with.
        connect_timeout_s: how long to wait for a connection.
        idle_timeout_s: a stream that sends nothing (not even a ping) this long counts as
            dropped; a plain request that takes longer fails.
    """

    def __init__(
        self,
        target: str,
        *,
        user: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 90.0,
    ) -> None:
        self.target = target.rstrip("/") + "/"
        self._headers: dict[str, str] = {}
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._ssl: ssl.SSLContext | bool = True
        if ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=idle_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool (also done by ``async with``)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open HTTP session (only inside ``async with``)."""
        if self._session is None:
            raise RuntimeError("use the client as 'async with Client(...)'")
        return self._session

    # -- requests -------------------------------------------------------------------------

    async def _post(
        self,
        fields: dict[str, Any],
        *,
        upload: Upload | None = None,
        accept: str = "application/json",
        last_event_id: int | None = None,
    ) -> aiohttp.ClientResponse:
        headers = dict(self._headers, Accept=accept)
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        data: Any
        if upload is None:
            data = json.dumps(fields).encode()
            headers["Content-Type"] = "application/json"
        else:
            data = aiohttp.MultipartWriter("form-data")
            for name, value in fields.items():
                part = data.append(_form_value(value))
                part.set_content_disposition("form-data", name=name)
            part = data.append(upload.chunks(), {"Content-Type": "application/gzip"})
            part.set_content_disposition("form-data", name="payload", filename=upload.path.name)
        try:
            resp = await self.session.post(self.target, data=data, headers=headers, ssl=self._ssl)
        except aiohttp.ClientConnectorError as e:
            raise ConnectError(f"cannot reach {self.target}: {_reason(e)}") from e
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ConnectError(f"request to {self.target} failed: {_reason(e)}") from e
        if resp.status >= 400:
            await _raise_for(resp)
        return resp

    async def op(self, operation: str, **fields: Any) -> Any:
        """Run one operation and return its JSON answer.

        Raises:
            ConnectError: the target could not be reached, or answered nonsense.
            AuthError: 401.
            ApiError: any other error answer.
        """
        resp = await self._post({"operation": operation, **fields})
        async with resp:
            try:
                return await resp.json(content_type=None)
            except (ValueError, aiohttp.ClientError, TimeoutError) as e:
                raise ConnectError(f"unreadable answer from {self.target}: {_reason(e)}") from e

    async def stream(
        self,
        operation: str,
        *,
        upload: Upload | None = None,
        last_event_id: int | None = None,
        comments: bool = False,
        **fields: Any,
    ) -> AsyncIterator[StreamEvent | SseComment]:
        """One SSE request: yields its events (and comments if asked) until it closes.

        Raises:
            ConnectError, AuthError, ApiError: before the stream starts.
            StreamError: the connection broke off (the caller decides whether to resume).
        """
        resp = await self._post(
            {"operation": operation, **fields},
            upload=upload,
            accept="text/event-stream",
            last_event_id=last_event_id,
        )
        async with resp:
            if resp.content_type != "text/event-stream":
                raise StreamError(
                    f"{self.target} answered {resp.content_type or 'no content type'}, "
                    "not an event stream"
                )
            parser = SseParser()
            try:
                async for chunk in resp.content.iter_any():
                    for item in parser.feed(chunk):
                        if isinstance(item, SseComment):
                            if comments:
                                yield item
                        else:
                            yield _decode_event(item)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise StreamError(f"the event stream broke off: {_reason(e)}") from e

    async def follow(
        self,
        deployment_id: str,
        *,
        after: int | None = None,
        resume_for_s: float = 60.0,
    ) -> AsyncIterator[StreamEvent]:
        """Tail a deployment until its ``done`` or ``error``, resuming after drops.

        A dropped connection (or one that closed without a terminal event) is reopened
        with ``Last-Event-ID`` set to the last seq seen; events are de-duplicated by seq,
        so the caller sees each at most once. ``reset`` is passed on (the events between
        the resume point and the stored tail were dropped by retention).

        Args:
            after: start after this seq (None replays the whole stored log).
            resume_for_s: give up when no connection could be made for this long.

        Raises:
            AuthError, ApiError: the node refused the request (also on a reconnect).
            StreamError: no connection could be re-established in time.
        """
        last = after
        backoff = 0.1
        down_since: float | None = None
        connected = False
        while True:
            try:
                async for item in self.stream(
                    "get_deployment", deployment_id=deployment_id, last_event_id=last
                ):
                    connected, down_since, backoff = True, None, 0.1
                    assert isinstance(item, StreamEvent)
                    if item.seq is not None:
                        if last is not None and item.seq <= last:
                            continue
                        last = item.seq
                    yield item
                    if item.terminal:
                        return
            except (StreamError, ConnectError) as e:
                if not connected:
                    raise  # never reached it: nothing to resume
                reason: Exception = e
            else:
                reason = StreamError("the event stream closed before its end")
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > resume_for_s:
                raise StreamError(f"{reason}; gave up resuming after {resume_for_s:.0f} s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def deploy(
        self, fields: dict[str, Any], *, upload: Upload | None = None
    ) -> AsyncIterator[StreamEvent]:
        """``deploy_component`` as a stream of events ending in ``done`` or ``error``.

        If the stream breaks off once the deployment id is known, the rest is read with
        :meth:`follow`; its ``done`` (a record) is reshaped as the deploy's own answer,
        or as an ``error`` when the deploy failed.

        Raises:
            ConnectError, AuthError, ApiError: before the deploy was accepted.
            StreamError: the stream broke off before the deployment id was known.
        """
        deployment_id: str | None = None
        last: int | None = None
        try:
            async for item in self.stream("deploy_component", upload=upload, **fields):
                assert isinstance(item, StreamEvent)
                if item.event == "deployment" and isinstance(item.data, dict):
                    deployment_id = item.data.get("deployment_id")
                last = item.seq if item.seq is not None else last
                yield item
                if item.terminal:
                    return
        except StreamError:
            if deployment_id is None:
                raise
        if deployment_id is None:
            raise StreamError("the deploy's event stream closed before its end")
        async for item in self.follow(deployment_id, after=last):
            if item.event == "done":
                ok, body = deploy_result_from_record(item.data.get("result") or {})
                yield StreamEvent("done", {"result": body}) if ok else StreamEvent("error", body)
                return
            yield item

    async def download(self, deployment_id: str, out: IO[bytes]) -> Download:
        """Stream a deployment's payload into ``out`` while hashing it.

        Raises:
            ConnectError, AuthError, ApiError: the request failed (410 when pruned).
            StreamError: the transfer broke off.
        """
        resp = await self._post(
            {"operation": "get_deployment_payload", "deployment_id": deployment_id},
            accept="application/gzip, application/x-tar",
        )
        digest = hashlib.sha256()
        size = 0
        async with resp:
            try:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(out.write, chunk)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise StreamError(f"the download broke off: {_reason(e)}") from e
            disposition = resp.content_disposition
            return Download(
                size=size,
                sha256=digest.hexdigest(),
                expected_sha256=resp.headers.get("X-Payload-Sha256"),
                filename=disposition.filename if disposition else None,
            )


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _reason(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        if e.os_error.errno:  # asyncio words a refused connect as "Connect call failed (...)"
            return os.strerror(e.os_error.errno)
        return e.os_error.strerror or str(e.os_error)
    if isinstance(e, TimeoutError):
        return "timed out"
    text = str(e) or type(e).__name__
    return text.splitlines()[0]


async def _raise_for(resp: aiohttp.ClientResponse) -> None:
    async with resp:
        try:
            body = await resp.json(content_type=None)
        except (ValueError, aiohttp.ClientError, TimeoutError):
            body = None
    if not isinstance(body, dict) or "error" not in body:
        body = {"error": f"HTTP {resp.status} {resp.reason or ''}".strip(), "code": "http_error"}
    raise (AuthError if resp.status == 401 else ApiError)(resp.status, body)
