"""An async client of the operations API, used by the ``cairn`` command line.

Speaks what SPEC section 4 and 6 define: ``POST /`` with a JSON body and Basic auth, a
multipart upload (fields first, the ``payload`` file part last, streamed from disk with a
byte-progress callback), and Server-Sent Events read with
:class:`~node.cli.api.sse.SseParser`, a pure parser of the ``id:``/``event:``/``data:``
framing with no I/O in it.
:meth:`Client.follow` tails a deployment and resumes with ``Last-Event-ID`` after a
dropped connection; :meth:`Client.deploy` falls back to it when the deploy's own stream
breaks off once the deployment id is known (the logic of both is in
:mod:`node.cli.api.stream`).

aiohttp's exceptions are translated once, here, into the tree of :mod:`node.cli.api.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from node.cli.api.errors import (
    ApiError,
    AuthError,
    ConnectError,
    StreamError,
    describe_os_error,
)
from node.cli.api.sse import SseComment, SseMessage, SseParser
from node.cli.api.stream import StreamEvent, decode_event, deploy_events, follow_events

__all__ = ["Client", "Download", "SseComment", "SseMessage", "SseParser", "Upload"]

_CHUNK = 256 * 1024


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
            raise ConnectError(self._unreachable(e)) from e
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ConnectError(
                f"the request to {self.shown} failed: {_reason(e)}; is --target "
                "(CAIRN_TARGET) the admin port of a cairn node?"
            ) from e
        if resp.status >= 400:
            await _raise_for(resp, str(fields.get("operation") or "") or None)
        return resp

    @property
    def shown(self) -> str:
        """The target as the operator typed it (for messages)."""
        return self.target.rstrip("/")

    def _unreachable(self, e: aiohttp.ClientConnectorError) -> str:
        """Why the connection failed, and what to check."""
        where = f"cannot reach {self.shown}"
        if isinstance(e, aiohttp.ClientConnectorCertificateError):
            return (
                f"{where}: its TLS certificate could not be verified "
                f"({_reason(e.certificate_error)}); pass the cluster CA with --ca (CAIRN_CA)"
            )
        if isinstance(e, aiohttp.ClientSSLError):
            return (
                f"{where}: {_reason(e.os_error)}; is it an https port, and does "
                "--target (CAIRN_TARGET) use the right scheme?"
            )
        reason = _reason(e)
        if reason.startswith("cannot resolve"):
            return f"{where}: {reason}; check --target (CAIRN_TARGET)"
        return f"{where}: {reason}; is the node running, and is --target (CAIRN_TARGET) right?"

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
                raise ConnectError(
                    f"{self.shown} answered something that is not JSON ({_reason(e)}); "
                    "is --target (CAIRN_TARGET) the admin port of a cairn node?"
                ) from e

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
                            yield decode_event(item)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise StreamError(f"the event stream broke off: {_reason(e)}") from e

    def follow(
        self,
        deployment_id: str,
        *,
        after: int | None = None,
        resume_for_s: float = 60.0,
    ) -> AsyncIterator[StreamEvent]:
        """Tail a deployment until its ``done`` or ``error``, resuming after drops.

        See :func:`node.cli.api.stream.follow_events`: events are seen at most once.

        Args:
            after: start after this seq (None replays the whole stored log).
            resume_for_s: give up when no connection could be made for this long.

        Raises:
            AuthError, ApiError: the node refused the request (also on a reconnect).
            StreamError: no connection could be re-established in time.
        """

        def open_stream(last: int | None) -> AsyncIterator[StreamEvent | SseComment]:
            return self.stream("get_deployment", deployment_id=deployment_id, last_event_id=last)

        return follow_events(open_stream, after=after, resume_for_s=resume_for_s)

    def deploy(
        self, fields: dict[str, Any], *, upload: Upload | None = None
    ) -> AsyncIterator[StreamEvent]:
        """``deploy_component`` as a stream of events ending in ``done`` or ``error``.

        If the stream breaks off once the deployment id is known, the rest is read with
        :meth:`follow` (see :func:`node.cli.api.stream.deploy_events`).

        Raises:
            ConnectError, AuthError, ApiError: before the deploy was accepted.
            StreamError: the stream broke off before the deployment id was known.
        """
        return deploy_events(
            self.stream("deploy_component", upload=upload, **fields),
            lambda deployment_id, last: self.follow(deployment_id, after=last),
        )

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
    """Plain words for a foreign exception (never ``[Errno 111] ...``)."""
    if isinstance(e, aiohttp.ClientConnectorError):
        # asyncio words a refused connect as "Connect call failed (...)": use the errno.
        return describe_os_error(e.os_error)
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the node closed the connection"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "the answer was cut short"
    return describe_os_error(e)


async def _raise_for(resp: aiohttp.ClientResponse, operation: str | None) -> None:
    async with resp:
        try:
            body = await resp.json(content_type=None)
        except (ValueError, aiohttp.ClientError, TimeoutError):
            body = None
    if not isinstance(body, dict) or "error" not in body:
        body = {"error": f"HTTP {resp.status} {resp.reason or ''}".strip(), "code": "http_error"}
    raise (AuthError if resp.status == 401 else ApiError)(resp.status, body, operation=operation)
