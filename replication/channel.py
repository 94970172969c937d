"""The peer channel: the only module that touches a WebSocket.

A :class:`Channel` carries decoded :data:`~replication.messages.Message` values between
two nodes. Its ``peer`` is the other side's node name as the TLS session proved it —
never a frame — and everything above this module takes identity from there.

:class:`TlsTransport` is the production :class:`Transport`. The listener is an aiohttp
app with one route (``GET /cairn/peer/v1``, WebSocket upgrade) on the peer port, served
over :func:`replication.sslctx.server_ssl_context` (mutual TLS, CERT_REQUIRED); any other
method or path there is a 404. The dialler uses :func:`replication.sslctx.client_ssl_context`
with the peer's node name as ``server_hostname``, so TLS itself checks that the node that
answered is the one meant, and the name is read back from the certificate as well.

Foreign errors (aiohttp, ssl, OS) are translated here: a channel that ends raises
:class:`ChannelClosed`, a dial that fails raises :class:`DialError`, an oversize or
undecodable frame raises :class:`~replication.errors.ProtocolError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from yarl import URL

from replication.codec import DEFAULT_LIMITS, FrameLimits, decode, encode
from replication.errors import CertificateError, HandshakeError, ProtocolError, ReplicationError
from replication.messages import Message
from replication.sslctx import peer_name_from_ssl

__all__ = [
    "PEER_PATH",
    "Accept",
    "Channel",
    "ChannelClosed",
    "DialError",
    "TlsTransport",
    "Transport",
    "TransportError",
    "WebSocketChannel",
]

log = structlog.get_logger(__name__)

PEER_PATH = "/cairn/peer/v1"
# A WebSocket close reason must fit in a control frame (125 bytes with the code).
_MAX_REASON_BYTES = 120


class ChannelClosed(ReplicationError):
    """The channel ended: closed by either side, the network, or shutdown."""


class DialError(ReplicationError):
    """A channel to a peer could not be opened (network, TLS or HTTP refusal)."""


class TransportError(ReplicationError):
    """The transport cannot start (the peer port cannot be bound)."""


class Channel(Protocol):
    """A session's message pipe to one authenticated peer."""

    @property
    def peer(self) -> str:
        """The other side's node name, from its verified certificate."""
        ...

    @property
    def remote(self) -> str:
        """The other side's address, for logs."""
        ...

    async def send(self, msg: Message) -> None:
        """Send one frame.

        Raises:
            ChannelClosed: the channel is closed.
            ProtocolError: the message cannot be encoded within the frame limits.
        """
        ...

    async def receive(self) -> Message:
        """Wait for the next frame. Only one task may receive at a time.

        Raises:
            ChannelClosed: the channel ended.
            ProtocolError: the frame is oversize, malformed or not binary.
        """
        ...

    async def close(self, reason: str = "", *, protocol_error: bool = False) -> None:
        """Close the channel (idempotent); ``reason`` goes to the peer."""
        ...


#: What a listener does with each authenticated inbound channel, until it returns.
Accept = Callable[[Channel], Awaitable[None]]


class Transport(Protocol):
    """Opens and accepts channels (a seam: the fault suite wraps or replaces it)."""

    async def start(self, accept: Accept) -> None:
        """Start listening; call ``accept`` for each inbound channel.

        Raises:
            TransportError: the listener cannot start.
        """
        ...

    async def dial(self, peer: str, url: str) -> Channel:
        """Open a channel to node ``peer`` at ``url``.

        Raises:
            DialError: it could not be reached, or TLS/HTTP refused.
            HandshakeError: the node that answered is not ``peer``.
        """
        ...

    async def close(self) -> None:
        """Stop listening and release every connection."""
        ...


_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class WebSocketChannel:
    """A :class:`Channel` over one aiohttp WebSocket (either end).

    Frames are binary WebSocket messages, one msgpack frame each. Sends are serialised
    by a lock so frames from several tasks never interleave.
    """

    def __init__(
        self, ws: _WebSocket, *, peer: str, remote: str, limits: FrameLimits = DEFAULT_LIMITS
    ) -> None:
        self._ws = ws
        self._peer = peer
        self._remote = remote
        self._limits = limits
        self._lock = asyncio.Lock()

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def remote(self) -> str:
        return self._remote

    @property
    def closed(self) -> bool:
        return self._ws.closed

    async def send(self, msg: Message) -> None:
        await self.send_raw(encode(msg, self._limits))

    async def send_raw(self, frame: bytes) -> None:
        """Send pre-encoded bytes as one frame (for tests and fault injection).

        Raises:
            ChannelClosed: the channel is closed.
        """
        async with self._lock:
            if self._ws.closed:
                raise ChannelClosed(f"channel to {self._peer!r} is closed")
            try:
                await self._ws.send_bytes(frame)
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
                raise ChannelClosed(f"channel to {self._peer!r} broke: {e}") from e

    async def receive(self) -> Message:
        msg = await self._ws.receive()
        if msg.type is WSMsgType.BINARY:
            return decode(msg.data, self._limits)
        if msg.type is WSMsgType.TEXT:
            raise ProtocolError("a text frame arrived; the peer protocol is binary")
        if msg.type is WSMsgType.ERROR:
            exc = msg.data
            if getattr(exc, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                raise ProtocolError(f"frame exceeds {self._limits.max_frame_bytes} bytes")
            raise ChannelClosed(f"channel to {self._peer!r} failed: {exc}")
        raise ChannelClosed(f"{self._peer!r} closed the channel (code {self._ws.close_code})")

    async def close(self, reason: str = "", *, protocol_error: bool = False) -> None:
        code = WSCloseCode.PROTOCOL_ERROR if protocol_error else WSCloseCode.OK
        # Best effort: a channel whose connection is already gone is closed enough.
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await self._ws.close(code=code, message=reason.encode()[:_MAX_REASON_BYTES])


class _AuditedSSLObject(ssl.SSLObject):
    """Logs why a TLS handshake on the peer port failed (no certificate, another CA,
    expired...): asyncio drops those errors silently, and an operator needs the line."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLSyscallError):
            raise  # the handshake is still in progress, or the socket broke
        except ssl.SSLError as e:
            log.warning("peer_tls_refused", reason=e.reason or "tls_error", detail=str(e))
            raise


class TlsTransport:
    """Mutual-TLS WebSocket transport on the peer port.

    Args:
        host: address the listener binds.
        port: port the listener binds (0 picks a free one; see :attr:`port`).
        server_ssl: from :func:`replication.sslctx.server_ssl_context`.
        client_ssl: from :func:`replication.sslctx.client_ssl_context`.
        limits: frame limits; also the WebSocket's maximum message size.
        connect_timeout_s: how long a dial may take to connect and handshake.
        close_timeout_s: how long a close waits for the peer's close frame.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        server_ssl: ssl.SSLContext,
        client_ssl: ssl.SSLContext,
        limits: FrameLimits = DEFAULT_LIMITS,
        connect_timeout_s: float = 5.0,
        close_timeout_s: float = 2.0,
    ) -> None:
        server_ssl.sslobject_class = _AuditedSSLObject
        self._host, self._port = host, port
        self._server_ssl, self._client_ssl = server_ssl, client_ssl
        self._limits = limits
        self._connect_timeout_s = connect_timeout_s
        self._close_timeout_s = close_timeout_s
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._accept: Accept | None = None

    def reload(self, cert: Path, key: Path) -> None:
        """Present a renewed certificate in every TLS session from now on.

        Raises:
            CertificateError: the pair cannot be loaded (the contexts are unchanged).
        """
        for ctx in (self._server_ssl, self._client_ssl):
            try:
                ctx.load_cert_chain(certfile=cert, keyfile=key)
            except (OSError, ValueError) as e:
                raise CertificateError(f"cannot load certificate {cert} with key {key}: {e}") from e

    @property
    def port(self) -> int:
        """The bound peer port once started (else the configured one)."""
        if self._runner is not None and self._runner.addresses:
            return int(self._runner.addresses[0][1])
        return self._port

    async def start(self, accept: Accept) -> None:
        self._accept = accept
        app = web.Application(client_max_size=4096)
        app.router.add_route("*", PEER_PATH, self._handle)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=self._close_timeout_s
        )
        await runner.setup()
        site = web.TCPSite(
            runner, self._host, self._port, ssl_context=self._server_ssl, reuse_address=True
        )
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise TransportError(
                f"cannot listen on peer port {self._host}:{self._port}: {e.strerror or e}"
            ) from None
        self._runner = runner

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            max_msg_size=self._limits.max_frame_bytes, compress=False, autoping=True,
            heartbeat=None, timeout=self._close_timeout_s,
        )  # fmt: skip
        if request.method != "GET" or not ws.can_prepare(request).ok or self._accept is None:
            raise web.HTTPNotFound()
        remote = request.remote or "unknown"
        transport = request.transport
        try:
            peer = peer_name_from_ssl(transport.get_extra_info("ssl_object") if transport else None)
        except CertificateError as e:
            log.warning("peer_refused", remote=remote, reason=str(e))
            raise web.HTTPForbidden() from None
        await ws.prepare(request)
        channel = WebSocketChannel(ws, peer=peer, remote=remote, limits=self._limits)
        try:
            await self._accept(channel)
        finally:
            await channel.close()
        return ws

    async def dial(self, peer: str, url: str) -> Channel:
        target = URL(url)
        if target.path in ("", "/"):
            target = target.with_path(PEER_PATH)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout_s),
            )
        try:
            ws = await self._session.ws_connect(
                target, ssl=self._client_ssl, server_hostname=peer, compress=0,
                max_msg_size=self._limits.max_frame_bytes, autoping=True, heartbeat=None,
                timeout=aiohttp.ClientWSTimeout(ws_close=self._close_timeout_s),
            )  # fmt: skip
        except aiohttp.WSServerHandshakeError as e:
            raise DialError(f"{url} answered HTTP {e.status} instead of a peer channel") from e
        except aiohttp.ClientConnectorCertificateError as e:
            raise DialError(f"TLS certificate of {url} refused: {e.certificate_error}") from e
        except aiohttp.ClientConnectorError as e:
            reason = e.os_error.strerror or str(e.os_error) or type(e.os_error).__name__
            raise DialError(f"cannot reach {peer!r} at {url}: {reason}") from e
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise DialError(f"cannot reach {peer!r} at {url}: {e or type(e).__name__}") from e
        channel = WebSocketChannel(ws, peer=peer, remote=str(target.origin()), limits=self._limits)
        try:
            name = peer_name_from_ssl(ws.get_extra_info("ssl_object"))
        except CertificateError as e:
            await channel.close("bad certificate")
            raise HandshakeError(f"{url} presented no usable node certificate: {e}") from e
        if name != peer:
            await channel.close("wrong node")
            raise HandshakeError(f"dialled node {peer!r} at {url} but {name!r} answered")
        return channel

    async def close(self) -> None:
        self._accept = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
