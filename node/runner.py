"""Running one node in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import errno
import signal
import time

import structlog
from aiohttp import web

from node.app import ClusterFactory, create_app
from node.config import Config

__all__ = ["StartupError", "serve"]

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The node cannot start; the message is one line naming the problem."""


def _cluster_factory(config: Config) -> ClusterFactory | None:
    if not config.clustered:
        return None
    from replication.service import cluster_factory

    return cluster_factory


async def serve(config: Config, *, faults: object | None = None) -> None:
    """Start the node, serve until a stop signal, then shut down cleanly.

    Raises:
        StartupError: the admin port is in use or cannot be bound, or storage fails.
    """
    from storage.faults import EnvCrashPoints

    app = create_app(config, faults=EnvCrashPoints(), cluster_factory=_cluster_factory(config))
    ssl_ctx = None
    if config.admin.tls_cert is not None and config.admin.tls_key is not None:
        from replication.tls import admin_ssl_context

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
    try:
        await runner.setup()
    except Exception as e:
        await runner.cleanup()
        raise StartupError(f"node {config.node.name} failed to start: {e}") from e
    site = web.TCPSite(
        runner, config.admin.host, config.admin.port, ssl_context=ssl_ctx, reuse_address=True
    )
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(
                f"admin port {config.admin.host}:{config.admin.port} is already in use"
            ) from None
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
