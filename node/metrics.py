"""Prometheus metrics of one node (a registry per app: no global state)."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from storage.blobs import BlobStore
from storage.records import Deployment
from storage.store import Store
from storage.tables import DEPLOYMENTS

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _version() -> str:
    try:
        return metadata.version("cairn")
    except metadata.PackageNotFoundError:
        return "unknown"


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
        self.build_info = Gauge(
            "cairn_build_info", "This node's build", ["version", "python"], registry=r
        )
        self.build_info.labels(version=_version(), python=platform.python_version()).set(1)
        self.deploy_outcomes = Counter(
            "cairn_deploy_outcomes",
            "Deploys this node originated that ended, by status and error code",
            ["status", "code"],
            registry=r,
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
        self.quarantined = Gauge(
            "cairn_replication_quarantined_total",
            "Changes from a peer quarantined (from their writer, but breaking the rules)",
            ["peer"],
            registry=r,
        )
        self.refused = Gauge(
            "cairn_replication_refused_total",
            "Changes from a peer refused (not signed by their writer)",
            ["peer"],
            registry=r,
        )
        self.parked = Gauge(
            "cairn_replication_parked",
            "Changes parked because their version is too far ahead of this node's clock",
            registry=r,
        )
        self.cert_expiry = Gauge(
            "cairn_certificate_expiry_timestamp_seconds",
            "When this node's cluster certificate expires (epoch seconds)",
            registry=r,
        )
        self.changelog_entries = Gauge(
            "cairn_changelog_entries", "Entries held in this node's change log", registry=r
        )
        self.changelog_trimmed = Gauge(
            "cairn_changelog_trimmed_total",
            "Change log entries trimmed, by reason",
            ["reason"],
            registry=r,
        )

        self.storage_free = Gauge(
            "cairn_storage_free_bytes", "Free bytes on the data directory's filesystem",
            registry=r,
        )  # fmt: skip
        self.storage_watermark = Gauge(
            "cairn_storage_watermark_bytes",
            "Free bytes the node keeps: below them it reclaims and refuses deploys",
            registry=r,
        )
        self.storage_pressure = Gauge(
            "cairn_storage_pressure",
            "1 while free space is below the watermark or the blob store above its cap",
            registry=r,
        )
        self.storage_reclaimed = Gauge(
            "cairn_storage_reclaimed_bytes_total",
            "Bytes reclaimed under disk pressure since start, by step",
            ["step"],
            registry=r,
        )
        self.storage_refused = Gauge(
            "cairn_storage_refused_deploys_total",
            "Deploy steps refused with insufficient_storage since start",
            registry=r,
        )

    async def watch_outcomes(self, store: Store) -> None:
        """Count every deploy this node originates as it ends (until cancelled)."""
        with store.feed.subscribe(
            lambda n: n.tbl == DEPLOYMENTS.name and not n.remote, maxsize=10_000
        ) as sub:
            while True:
                for notice in await sub.get():
                    for d in notice.rows:
                        if isinstance(d, Deployment) and d.terminal and d.origin == store.node:
                            code = (d.error or {}).get("code") or "none"
                            self.deploy_outcomes.labels(status=str(d.status), code=code).inc()

    async def render(
        self,
        store: Store,
        blobs: BlobStore,
        cluster: dict[str, Any] | None = None,
        *,
        storage: dict[str, Any] | None = None,
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
            name = peer["name"]
            self.peer_connected.labels(peer=name).set(int(peer["state"] == "connected"))
            if peer.get("lag_changes") is not None:
                self.peer_lag.labels(peer=name).set(peer["lag_changes"])
            self.quarantined.labels(peer=name).set(peer.get("quarantined", 0))
            self.refused.labels(peer=name).set(peer.get("refused", 0))
        parked = await store.db.fetchone("SELECT COUNT(*) AS n FROM changelog WHERE state = 1")
        self.parked.set(int(parked["n"]) if parked else 0)
        if (cluster or {}).get("cert_expires_at"):
            self.cert_expiry.set((cluster or {})["cert_expires_at"] / 1000)
        log = (cluster or {}).get("changelog") or {}
        if log.get("entries") is not None:
            self.changelog_entries.set(log["entries"])
        for reason in ("members", "age", "size"):
            self.changelog_trimmed.labels(reason=reason).set(log.get(f"trimmed_by_{reason}", 0))
        if storage:
            self.storage_free.set(storage["free_bytes"])
            self.storage_watermark.set(storage["watermark_bytes"])
            self.storage_pressure.set(int(storage["under_pressure"]))
            for step, n in storage["reclaimed_bytes"].items():
                self.storage_reclaimed.labels(step=step).set(n)
            self.storage_refused.set(storage["refused_deploys"])
        out: bytes = generate_latest(self.registry)
        return out
