"""N real ``cairn node run`` processes with real mutual TLS on loopback, for cluster tests.

The cluster is laid out by :mod:`node.cli.local.layout` exactly as ``cairn cluster up``
does it (CA, node certificates, per-node configs with ``[[peers]]``), but on free ports
picked for the test. Each node is a :class:`procs.NodeProcess`, so a test can stop,
SIGKILL and restart any of them. Every wait has a deadline; nothing sleeps to
synchronise.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from procs import ADMIN_PASSWORD, ADMIN_USER, NodeProcess, wait_for

from node.cli.local.layout import ClusterLayout, NodeLayout, materialize, plan_cluster_ports

__all__ = [
    "ADMIN_PASSWORD",
    "ADMIN_USER",
    "TERMINAL",
    "Cluster",
    "ClusterNode",
    "free_ports",
    "tree_bytes",
]

TERMINAL = ("success", "failed", "rolled_back")
#: Fast liveness so that a stopped peer is noticed quickly in tests.
FAST_REPLICATION: dict[str, Any] = {"heartbeat_s": 0.5, "dead_after_s": 2.0, "reconnect_max_s": 0.5}


def _toml_table(name: str, values: dict[str, Any]) -> str:
    lines = [f"[{name}]"]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (held open until all are picked)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (symlinks followed at the top): path → bytes."""
    base = root.resolve()
    return {
        p.relative_to(base).as_posix(): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file()
    }


class ClusterNode(NodeProcess):
    """A node process that knows its place in the cluster layout."""

    layout: NodeLayout

    @classmethod
    def of(cls, layout: NodeLayout, root: Path) -> ClusterNode:
        node = cls(name=layout.name, root=root, admin_port=layout.admin_port, host=layout.host)
        node.layout = layout
        return node

    def ok(self, operation: str, **fields: Any) -> Any:
        """An operation that must answer 200; returns the body."""
        code, body = self.op(operation, **fields)
        assert code == 200, f"{self.name} {operation}: {code} {body}"
        return body

    def status(self) -> dict[str, Any]:
        return dict(self.ok("cluster_status"))

    def peer_states(self) -> dict[str, str]:
        return {p["name"]: p["state"] for p in self.status().get("peers", [])}

    def deployment(self, deployment_id: str) -> dict[str, Any] | None:
        code, body = self.op("get_deployment", deployment_id=deployment_id)
        if code == 404:
            return None
        assert code == 200, f"{self.name} get_deployment: {code} {body}"
        return dict(body)

    def current(self, project: str) -> Path:
        return self.data_dir / "components" / project / "current"

    def current_files(self, project: str) -> dict[str, bytes]:
        cur = self.current(project)
        return tree_bytes(cur) if cur.exists() else {}

    def active_release(self, project: str) -> str | None:
        cur = self.current(project)
        return cur.resolve().name if cur.is_symlink() else None

    def blob_files(self, payload_hash: str) -> list[Path]:
        """Every file of this node's blob store named by ``payload_hash`` (stored or partial)."""
        return sorted(p for p in (self.data_dir / "blobs").rglob(payload_hash) if p.is_file())

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """A local cluster of real node processes under ``root``."""

    def __init__(
        self,
        root: Path,
        count: int = 3,
        *,
        replication: dict[str, Any] | None = None,
        extra_toml: str = "",
        node_toml: dict[str, str] | None = None,
    ) -> None:
        """Lay the cluster out (nothing starts).

        Args:
            root: the cluster directory.
            count: number of nodes.
            replication: ``[replication]`` keys on top of :data:`FAST_REPLICATION`.
            extra_toml: more TOML tables for every node.
            node_toml: more TOML tables per node name.
        """
        ports = free_ports(2 * count)
        self.layout: ClusterLayout = plan_cluster_ports(root, ports[:count], ports[count:])
        common = _toml_table("replication", {**FAST_REPLICATION, **(replication or {})})
        common += extra_toml
        extra = {n.name: common + (node_toml or {}).get(n.name, "") for n in self.layout.nodes}
        materialize(self.layout, extra_toml=extra)
        self.nodes = [ClusterNode.of(n, root) for n in self.layout.nodes]

    def __getitem__(self, name: str) -> ClusterNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def __iter__(self) -> Any:
        return iter(self.nodes)

    @property
    def running(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.is_running()]

    def start(self, *, connected: bool = True, timeout_s: float = 30.0) -> Cluster:
        for n in self.nodes:
            n.start(wait=False)
        for n in self.nodes:
            n.wait_healthy(timeout_s)
        if connected:
            self.wait_connected(timeout_s=timeout_s)
        return self

    def wait_connected(
        self, among: Iterable[ClusterNode] | None = None, *, timeout_s: float = 30.0
    ) -> None:
        """Wait until every node of ``among`` (default: all running) sees the others connected."""
        group = list(among) if among is not None else self.running
        names = {n.name for n in group}

        def all_connected() -> bool:
            for n in group:
                states = n.peer_states()
                if any(states.get(other) != "connected" for other in names - {n.name}):
                    return False
            return True

        wait_for(all_connected, timeout_s=timeout_s, interval_s=0.1,
                 what=f"{sorted(names)} to be connected")  # fmt: skip

    def wait_peer_state(
        self, observer: ClusterNode, peer: str, state: str, *, timeout_s: float = 20.0
    ) -> None:
        wait_for(lambda: observer.peer_states().get(peer) == state, timeout_s=timeout_s,
                 interval_s=0.1, what=f"{observer.name} to see {peer} {state}")  # fmt: skip

    def wait_deployment(
        self,
        node: ClusterNode,
        deployment_id: str,
        done: Callable[[dict[str, Any]], bool] = lambda d: d["status"] in TERMINAL,
        *,
        timeout_s: float = 60.0,
        what: str = "the deployment to finish",
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            d = node.deployment(deployment_id)
            return d if d is not None and done(d) else None

        return dict(wait_for(check, timeout_s=timeout_s, interval_s=0.1,
                             what=f"{what} on {node.name}"))  # fmt: skip

    def wait_everywhere(
        self,
        deployment_id: str,
        done: Callable[[dict[str, Any]], bool] = lambda d: d["status"] in TERMINAL,
        *,
        nodes: Iterable[ClusterNode] | None = None,
        timeout_s: float = 60.0,
    ) -> dict[str, dict[str, Any]]:
        """Wait until the deployment satisfies ``done`` on every node; returns each copy."""
        return {
            n.name: self.wait_deployment(n, deployment_id, done, timeout_s=timeout_s)
            for n in (list(nodes) if nodes is not None else self.running)
        }

    def deploy(
        self, node: ClusterNode, project: str, payload: bytes, **fields: Any
    ) -> tuple[int, Any]:
        """``deploy_component`` with a base64 payload through ``node``."""
        return node.op(
            "deploy_component",
            project=project,
            payload=base64.b64encode(payload).decode(),
            timeout_s=120.0,
            **fields,
        )

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL for any that hangs)."""
        for n in self.nodes:
            if n.is_running() and n.proc is not None:
                n.proc.terminate()
        for n in self.nodes:
            try:
                n.stop(timeout_s=15.0)
            except Exception:
                n.kill()

    def logs(self) -> str:
        return "\n".join(f"===== {n.name} =====\n{n.log()[-6000:]}" for n in self.nodes)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: What replicates of a deployment row, as ``list_deployments`` shows it.
RECORD_KEYS = ("project", "status", "payload_hash", "origin_node", "expected_nodes", "error",
               "superseded_by", "rollback_of", "peer_results", "completed_at")  # fmt: skip


def node_records(node: ClusterNode) -> dict[str, dict[str, Any]]:
    """Every deployment row a node holds, by id (what replicates of it)."""
    rows = node.ok("list_deployments", limit=1000)["deployments"]
    return {d["deployment_id"]: {k: d[k] for k in RECORD_KEYS} for d in rows}


def node_desired(node: ClusterNode) -> dict[str, str | None]:
    """Each project's desired deployment id, as the node reports it."""
    return {p["project"]: p["desired_deployment_id"]
            for p in node.ok("get_components")["components"]}  # fmt: skip
