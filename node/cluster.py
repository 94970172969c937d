"""The glue between a node and its replication service.

``create_app(config, cluster_factory=cluster_factory)`` runs :func:`cluster_factory` as
a cleanup context once storage is open: it checks the TLS material, builds the
mutual-TLS transport and a :class:`~replication.service.ReplicationService` from the
node's :class:`~node.config.Config`, and yields the :class:`~node.app.ClusterHooks` the
deploy code sees. ``replication`` never imports ``node``: this module is where the two
meet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog

from node.app import ClusterHooks
from node.appkeys import Services
from node.config import Config, ReplicationConfig
from node.deploy.reconciler import Reconciler
from replication.channel import TlsTransport
from replication.codec import DEFAULT_LIMITS
from replication.membership import PeerAddress
from replication.service import ReplicationService
from replication.session import Settings
from replication.sslctx import client_ssl_context, server_ssl_context
from replication.tls import check_node_credentials, cluster_id_for_ca

__all__ = ["ReplicationHooks", "cluster_factory", "settings_from"]

log = structlog.get_logger(__name__)


class ReplicationHooks(ClusterHooks):
    """The node's view of a running :class:`ReplicationService`."""

    def __init__(self, service: ReplicationService) -> None:
        self.service = service
        self.view = service
        self.fetcher = service
        self.status = service.status

    def on_ready(self, reconciler: Reconciler) -> None:
        """Rescan deployments whenever a peer (re)connects: rows may have moved meanwhile."""
        self.service.on_connected(lambda _peer: reconciler.kick())


def settings_from(config: ReplicationConfig) -> Settings:
    """The replication service's settings from the node's ``[replication]`` section.

    Raises:
        ValueError: the values cannot work together (named in the message).
    """
    return Settings(
        heartbeat_s=config.heartbeat_s,
        dead_after_s=config.dead_after_s,
        reconnect_min_s=config.reconnect_min_s,
        reconnect_max_s=config.reconnect_max_s,
        batch_changes=config.batch_changes,
        credit_batches=config.credit_batches,
        chunk_bytes=config.chunk_bytes,
        chunk_credit=config.chunk_credit,
        fetch_wait_s=config.dead_after_s,
        limits=DEFAULT_LIMITS,
    )


async def cluster_factory(config: Config, services: Services) -> AsyncIterator[ClusterHooks]:
    """Run replication for the node's lifetime (an aiohttp cleanup context body).

    Yields:
        The hooks the node wires into its deploy context.

    Raises:
        ValueError: the config has no ``[peer]``/``[tls]`` sections.
        CertificateError: the TLS material is missing, unusable or for another node.
        TransportError: the peer port cannot be bound.
    """
    if config.peer is None or config.tls is None:
        raise ValueError("replication needs the [peer] and [tls] sections")
    tls = config.tls
    check_node_credentials(tls.cert, tls.key, tls.ca, config.node.name)
    settings = settings_from(config.replication)
    transport = TlsTransport(
        host=config.peer.host,
        port=config.peer.port,
        server_ssl=server_ssl_context(tls.cert, tls.key, tls.ca),
        client_ssl=client_ssl_context(tls.cert, tls.key, tls.ca),
        limits=settings.limits,
    )
    service = ReplicationService(
        node=config.node.name,
        store=services.store,
        blobs=services.ctx.blobs,
        cluster_id=cluster_id_for_ca(tls.ca.read_bytes()),
        peers=[PeerAddress(p.name, p.url) for p in config.peers],
        transport=transport,
        settings=settings,
    )
    await service.start()
    try:
        yield ReplicationHooks(service)
    finally:
        await service.stop()
