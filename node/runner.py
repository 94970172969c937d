"""Running one node in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import time

import structlog
from aiohttp import web

from node.app import ClusterFactory, create_app
from node.config import Config, unknown_env_warning
from storage.entries import UNSIGNED, Signer

__all__ = ["StartupError", "serve"]

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The node cannot start; the message is one line naming the problem."""


def _cluster_factory(config: Config) -> ClusterFactory | None:
    if not config.clustered:
        return None
    from node.cluster import cluster_factory

    return cluster_factory


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to the admin address (``listen`` comes when the site starts).

    Raises:
        StartupError: the host does not resolve, or the port is in use or not allowed.
    """
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"cannot resolve admin host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"admin port {where} is already in use") from None
        raise StartupError(f"cannot listen on {where}: {e.strerror}") from None
    return sock


async def serve(config: Config, *, faults: object | None = None) -> None:
    """Start the node, serve until a stop signal, then shut down cleanly.

    Raises:
        StartupError: the admin port is in use or cannot be bound, or storage fails.
    """
    from storage.faults import EnvCrashPoints

    unknown_env = unknown_env_warning(os.environ)
    if unknown_env is not None:  # a mistyped variable must not be silently ignored
        log.warning("unknown_env_variables", detail=unknown_env)
    signer: Signer = UNSIGNED
    if config.clustered:
        from node.cluster import load_signer
        from replication.errors import CertificateError

        try:
            signer = load_signer(config)
        except CertificateError as e:
            raise StartupError(str(e)) from None
    app = create_app(
        config, faults=EnvCrashPoints(), cluster_factory=_cluster_factory(config), signer=signer
    )
    ssl_ctx = None
    if config.admin.tls_cert is not None and config.admin.tls_key is not None:
        from replication.sslctx import admin_ssl_context

        ssl_ctx = admin_ssl_context(config.admin.tls_cert, config.admin.tls_key)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=5.0,
        # aiohttp arms this timer from the moment a connection opens until a request's
        # headers are complete, so it is also the header deadline for slow clients.
        keepalive_timeout=config.limits.header_timeout_s,
    )
    started = time.monotonic()
    # Bound before storage opens: a node that cannot serve touches nothing (no
    # migration, no temp sweep, no recovery of rows another running node is working on).
    sock = _bind(config.admin.host, config.admin.port)
    try:
        await runner.setup()
    except Exception as e:
        sock.close()
        await runner.cleanup()
        raise StartupError(f"node {config.node.name} failed to start: {e}") from e
    site = web.SockSite(runner, sock, ssl_context=ssl_ctx)
    try:
        await site.start()
    except OSError as e:
        sock.close()
        await runner.cleanup()
        raise StartupError(
            f"cannot listen on {config.admin.host}:{config.admin.port}: {e.strerror}"
        ) from None
    scheme = "https" if ssl_ctx else "http"
    log.info(
        "node_started",
        node=config.node.name,
        admin=f"{scheme}://{config.admin.host}:{config.admin.port}",
    )
    print(
        f"cairn node {config.node.name} listening on {scheme}://{config.admin.host}:{config.admin.port}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("node_stopping", node=config.node.name)
        await runner.cleanup()
        log.info(
            "node_stopped", node=config.node.name, uptime_s=round(time.monotonic() - started, 1)
        )
