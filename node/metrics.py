"""Prometheus metrics of one node (a registry per app: no global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from storage.blobs import BlobStore
from storage.store import Store

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Request latencies, deploys by status, payload bytes, replication figures."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Histogram(
            "cairn_request_duration_seconds",
            "Admin API request latency",
            ["operation", "status"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
        )
        self.deployments = Gauge(
            "cairn_deployments", "Deployment records on this node by status", ["status"], registry=r
        )
        self.blob_count = Gauge(
            "cairn_payload_blobs", "Payload blobs stored on this node", registry=r
        )
        self.blob_bytes = Gauge(
            "cairn_payload_bytes", "Bytes of payload blobs stored on this node", registry=r
        )
        self.received_bytes = Counter(
            "cairn_payload_received_bytes", "Payload bytes received by deploys", registry=r
        )
        self.peer_connected = Gauge(
            "cairn_peer_connected", "1 when the peer channel is up", ["peer"], registry=r
        )
        self.peer_lag = Gauge(
            "cairn_peer_lag_changes", "Changes behind a peer", ["peer"], registry=r
        )

    async def render(
        self, store: Store, blobs: BlobStore, cluster: dict[str, Any] | None = None
    ) -> bytes:
        """Refresh the gauges read from storage (and the cluster status, if clustered)
        and return the exposition text."""
        rows = await store.db.fetchall(
            "SELECT status, COUNT(*) AS n FROM deployments GROUP BY status"
        )
        self.deployments.clear()
        for row in rows:
            self.deployments.labels(status=row["status"]).set(row["n"])
        count, size = blobs.stats()
        self.blob_count.set(count)
        self.blob_bytes.set(size)
        self.peer_connected.clear()
        self.peer_lag.clear()
        for peer in (cluster or {}).get("peers", []):
            self.peer_connected.labels(peer=peer["name"]).set(int(peer["state"] == "connected"))
            if peer.get("lag_changes") is not None:
                self.peer_lag.labels(peer=peer["name"]).set(peer["lag_changes"])
        out: bytes = generate_latest(self.registry)
        return out
