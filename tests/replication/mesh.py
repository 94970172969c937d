"""In-process replication nodes for the replication tests: real TLS, real SQLite.

Each :class:`Mesh` owns a CA in ``tmp_path``, issues node certificates on demand, and
starts :class:`~replication.service.ReplicationService` instances over real stores on
loopback ports. Waiting is always on a condition with a deadline (:func:`wait_until`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import wait_until
from procs import free_port

from node.auth import hash_password
from replication.channel import TlsTransport
from replication.membership import PeerAddress
from replication.service import ReplicationService
from replication.session import Settings
from replication.signing import Keyring, NodeSigner
from replication.sslctx import client_ssl_context, server_ssl_context
from replication.tls import NodeCertFiles, cluster_id_for_ca, init_ca, issue_node_cert
from storage.accounts import Accounts
from storage.blobs import BlobStore
from storage.hlc import HybridClock
from storage.records import DeploymentStatus
from storage.store import Store

__all__ = ["FAST", "HASH", "Mesh", "Node", "dump", "new_deployment", "wait_until"]

#: A valid stored password (scrypt with the smallest allowed cost: cheap in tests).
HASH = hash_password("not-a-real-password", n=1 << 10)

HOSTS = ("127.0.0.1", "localhost")
# Quick heartbeats and reconnects so failure tests end in well under a second or two.
FAST = Settings(
    heartbeat_s=0.2, dead_after_s=1.5, reconnect_min_s=0.05, reconnect_max_s=0.3, fetch_wait_s=2.0
)
_REPLICATED = {
    "deployments": "deployment_id",
    "deployment_events": "deployment_id, seq",
    "event_batches": "deployment_id, first_seq",
    "node_results": "deployment_id, node",
    "node_components": "node, project",
    "pins": "deployment_id, node",
    "payload_drops": "deployment_id, node",
    "users": "username",
    "roles": "role",
    "members": "name",
}


async def dump(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Every replicated table's rows, in key order: equal dumps mean identical state."""
    out = {}
    for table, order in _REPLICATED.items():
        rows = await store.db.fetchall(f"SELECT * FROM {table} ORDER BY {order}")
        out[table] = [dict(r) for r in rows]
    return out


def new_deployment(node: str, project: str = "web") -> dict[str, Any]:
    """Fields of a fresh ``pending`` deployment row originated by ``node``."""
    return {
        "deployment_id": str(uuid.uuid4()), "project": project, "kind": "deploy",
        "package_identifier": None, "payload_hash": "ab" * 32, "payload_size": 10,
        "status": DeploymentStatus.PENDING, "phase": "receive", "expected_nodes": [node],
        "activate_nodes": [], "origin_node": node, "restart_mode": None, "replicated": True,
        "ignore_replication_errors": False, "timeout_ms": 1000,
        "started_at": int(time.time() * 1000), "completed_at": None, "user": "admin",
        "rollback_of": None, "superseded_by": None, "error": None,
    }  # fmt: skip


@dataclass
class Node:
    """One in-process node: its store, blobs and (while running) its service."""

    name: str
    port: int
    store: Store
    blobs: BlobStore
    certs: NodeCertFiles
    signer: NodeSigner
    service: ReplicationService | None = None
    peers: list[PeerAddress] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    @property
    def accounts(self) -> Accounts:
        return Accounts(self.store)

    @property
    def svc(self) -> ReplicationService:
        assert self.service is not None, f"{self.name} is not running"
        return self.service


class Mesh:
    """A CA plus any number of nodes in one event loop."""

    def __init__(self, tmp_path: Path, settings: Settings = FAST) -> None:
        self.root = tmp_path
        self.ca_dir = tmp_path / "ca"
        init_ca(self.ca_dir)
        self.ca = self.ca_dir / "ca.pem"
        self.cluster_id = cluster_id_for_ca(self.ca.read_bytes())
        self.settings = settings
        self.nodes: dict[str, Node] = {}

    def issue(self, name: str, **kw: Any) -> NodeCertFiles:
        return issue_node_cert(self.ca_dir, self.root / "certs", name, HOSTS, **kw)

    def transport(self, certs: NodeCertFiles, port: int = 0) -> TlsTransport:
        """A transport presenting ``certs`` (listening on ``port`` once started)."""
        return TlsTransport(
            host="127.0.0.1",
            port=port,
            server_ssl=server_ssl_context(certs.cert, certs.key, self.ca),
            client_ssl=client_ssl_context(certs.cert, certs.key, self.ca),
            limits=self.settings.limits,
            connect_timeout_s=2.0,
            close_timeout_s=0.5,
        )

    async def add(self, *names: str, clocks: Mapping[str, HybridClock] | None = None) -> list[Node]:
        """Create nodes (stores, blobs, certificates, ports) that all know each other.

        Args:
            clocks: a node's hybrid clock (over a fake wall, say), by name.
        """
        for name in names:
            data = self.root / name
            data.mkdir(parents=True, exist_ok=True)
            certs = self.issue(name)
            signer = NodeSigner.load(certs.cert, certs.key)
            clock = (clocks or {}).get(name)
            store = await Store.open(data / "cairn.db", node=name, signer=signer, clock=clock)
            self.nodes[name] = Node(
                name, free_port(), store, BlobStore(data / "blobs"), certs, signer
            )
        for node in self.nodes.values():
            node.peers = [
                PeerAddress(o.name, o.url) for o in self.nodes.values() if o.name != node.name
            ]
        return [self.nodes[n] for n in names]

    async def start(self, name: str, settings: Settings | None = None) -> ReplicationService:
        node = self.nodes[name]
        assert node.service is None
        keyring = Keyring(self.ca.read_bytes())
        keyring.add(node.signer.cert_der)
        node.service = ReplicationService(
            node=name, store=node.store, blobs=node.blobs, cluster_id=self.cluster_id,
            peers=node.peers, transport=self.transport(node.certs, node.port),
            settings=settings or self.settings, keyring=keyring,
            own_cert=node.signer.cert_der,
        )  # fmt: skip
        await node.service.start()
        return node.service

    async def stop(self, name: str) -> None:
        node = self.nodes[name]
        if node.service is not None:
            await node.service.stop()
            node.service = None

    async def connected(self, *names: str, timeout_s: float = 15.0) -> None:
        """Wait until every named node's pull channels to the other named nodes are up."""

        def ready() -> bool:
            return all(
                set(names) - {n} <= self.nodes[n].svc.connected()
                and set(names) - {n} <= self.nodes[n].svc.subscribers()
                for n in names
            )

        await wait_until(ready, timeout_s=timeout_s, what=f"{names} connected")

    async def close(self) -> None:
        for name in list(self.nodes):
            await self.stop(name)
        for node in self.nodes.values():
            await node.store.close()
