"""The glue between a node and its replication service.

``create_app(config, cluster_factory=cluster_factory, signer=...)`` runs
:func:`cluster_factory` as a cleanup context once storage is open: it builds the
mutual-TLS transport, the keyring of member certificates and a
:class:`~replication.service.ReplicationService` from the node's
:class:`~node.config.Config`, and yields the :class:`~node.app.ClusterHooks` the deploy
code sees. ``replication`` never imports ``node``: this module is where the two meet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web

from node.app import ClusterHooks
from node.appkeys import BLOBS, CONFIG, STORE
from node.certwatch import CertWatch
from node.config import Config, ReplicationConfig
from node.deploy.reconciler import Reconciler
from node.tasks import TaskSet
from replication.channel import TlsTransport
from replication.codec import DEFAULT_LIMITS
from replication.errors import CertificateError
from replication.membership import PeerAddress
from replication.service import ReplicationService
from replication.session import Settings
from replication.signing import Keyring, NodeSigner
from replication.sslctx import client_ssl_context, server_ssl_context
from replication.tls import check_node_credentials, cluster_id_for_ca
from storage.trim import TrimPolicy

__all__ = ["ReplicationHooks", "cluster_factory", "load_signer", "settings_from"]

log = structlog.get_logger(__name__)


class ReplicationHooks(ClusterHooks):
    """The node's view of a running :class:`ReplicationService`."""

    def __init__(
        self, service: ReplicationService, signer: NodeSigner, certs: CertWatch | None = None
    ) -> None:
        self.service = service
        self.view = service
        self.fetcher = service
        self.signer = signer
        self.certs = certs
        self.status = self._status

    async def _status(self) -> dict[str, Any]:
        status = await self.service.status()
        if self.certs is not None:  # none in the simulator, which has no certificate files
            status.update(self.certs.status())
        return status

    def on_ready(self, reconciler: Reconciler) -> None:
        """Rescan deployments whenever a peer (re)connects: rows may have moved meanwhile."""
        self.service.on_connected(lambda _peer: reconciler.kick())

    async def caught_up(self, timeout_s: float) -> bool:
        return await self.service.caught_up(timeout_s)

    async def wait_caught_up(self) -> None:
        # A node with no reachable peer converges on what it has; one that can reach
        # peers waits until it holds what they hold, so a returning or new node stages
        # only the releases it will run. Bounded: a peer that never lets it catch up
        # does not stop convergence for good.
        await self.service.caught_up(CONVERGE_WAIT_S, unless_alone=True)

    def summary(self) -> dict[str, Any]:
        return {"peers_connected": len(self.service.connected())}


#: The longest convergence waits for this node to catch up with its connected peers.
CONVERGE_WAIT_S = 300.0


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
        max_clock_offset_s=config.max_clock_offset_s,
        limits=DEFAULT_LIMITS,
    )


def load_signer(config: Config) -> NodeSigner:
    """This node's signing key: the key of its cluster certificate.

    Raises:
        CertificateError: the TLS material is missing, unusable or for another node.
    """
    if config.tls is None:
        raise CertificateError("a cluster node needs [tls] cert and key")
    tls = config.tls
    check_node_credentials(tls.cert, tls.key, tls.ca, config.node.name)
    return NodeSigner.load(tls.cert, tls.key)


async def cluster_factory(app: web.Application) -> AsyncIterator[ClusterHooks]:
    """Run replication for the node's lifetime (an aiohttp cleanup context body).

    Yields:
        The hooks the node wires into its deploy context.

    Raises:
        ValueError: the config has no ``[peer]``/``[tls]`` sections.
        CertificateError: the TLS material is missing, unusable or for another node.
        TransportError: the peer port cannot be bound.
    """
    config = app[CONFIG]
    if config.peer is None or config.tls is None:
        raise ValueError("replication needs the [peer] and [tls] sections")
    tls = config.tls
    signer = load_signer(config)
    store = app[STORE]
    keyring = Keyring(tls.ca.read_bytes())
    for key_id, der in await store.certs():
        try:
            keyring.add(der)
        except CertificateError as e:  # another CA now: those entries cannot be relayed
            log.warning("stored_cert_refused", key_id=key_id, error=str(e))
    own = keyring.add(signer.cert_der)
    await store.put_cert(own.key_id, own.node, own.der, own.not_before_ms, own.not_after_ms)
    settings = settings_from(config.replication)
    transport = TlsTransport(
        host=config.peer.host,
        port=config.peer.port,
        server_ssl=server_ssl_context(tls.cert, tls.key, tls.ca),
        client_ssl=client_ssl_context(tls.cert, tls.key, tls.ca),
        limits=settings.limits,
    )
    r = config.replication
    service = ReplicationService(
        node=config.node.name,
        store=store,
        blobs=app[BLOBS],
        cluster_id=cluster_id_for_ca(tls.ca.read_bytes()),
        peers=[PeerAddress(p.name, p.url) for p in config.peers],
        transport=transport,
        settings=settings,
        keyring=keyring,
        own_cert=signer.cert_der,
        trim_policy=TrimPolicy(
            max_age_s=r.log_max_age_s, max_entries=r.log_max_entries,
            audit_max_entries=r.audit_max_entries,
        ),
        maintain_s=r.maintain_s,
    )  # fmt: skip
    certs = CertWatch(
        node=config.node.name, cert=tls.cert, key=tls.key, ca=tls.ca, transport=transport,
        store=store, keyring=keyring, warn_days=tls.expiry_warning_days,
        check_s=tls.reload_check_s,
    )  # fmt: skip
    certs.load_expiry()
    await service.start()
    tasks = TaskSet("certificates")
    tasks.spawn(certs.run(), name="certificate-watch")
    try:
        yield ReplicationHooks(service, signer, certs)
    finally:
        await tasks.close()
        await service.stop()
