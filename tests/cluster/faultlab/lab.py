"""A cluster of real node processes whose every peer link goes through the fault proxy.

The layout is the one ``cairn cluster up`` makes (:mod:`node.cli.local.layout`: CA, node
certificates, configs), on free loopback ports, but each node's ``[[peers]]`` URL for
another node is the proxy of that directed link, so a test can cut, stall, delay or reset
``a->b`` without touching ``b->a``. Nodes can be SIGKILLed, SIGSTOPped and SIGCONTed,
restarted with fault points armed (``CAIRN_FAULTS``), and spare nodes can join with
``add_node`` and leave with ``remove_node``.

A spare's own links to the initial nodes are per direction as well; the links into a
spare are one proxy shared by every dialler (``*->spare``), because ``add_node`` stores
one URL for the whole cluster.
"""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster_harness import FAST_REPLICATION, ClusterNode, free_ports
from procs import wait_for

from faultlab.proxy import Link, ProxyHub
from node.cli.local.layout import (
    ClusterLayout,
    NodeLayout,
    materialize,
    plan_cluster_ports,
    render_node_config,
)

__all__ = ["ANY", "FaultLab"]

#: The source name of a link shared by every dialler (the links into a spare).
ANY = "*"


def _toml_table(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


class FaultLab:
    """``count`` nodes (``n1..``) plus ``spares`` nodes that may join later.

    Args:
        root: the cluster directory.
        count: nodes started with the cluster.
        spares: nodes laid out (certificates issued) but started only by :meth:`join`.
        replication: ``[replication]`` keys on top of the fast test defaults.
        extra_toml: more TOML for every node's config.
    """

    def __init__(
        self,
        root: Path,
        count: int = 3,
        *,
        spares: int = 0,
        replication: dict[str, Any] | None = None,
        extra_toml: str = "",
    ) -> None:
        total = count + spares
        ports = free_ports(2 * total)
        self.root = root
        self.layout: ClusterLayout = plan_cluster_ports(root, ports[:total], ports[total:])
        self.initial = [n.name for n in self.layout.nodes[:count]]
        self.spares = [n.name for n in self.layout.nodes[count:]]
        self.extra = _toml_table("replication", {**FAST_REPLICATION, **(replication or {})})
        self.extra += extra_toml
        materialize(self.layout, extra_toml={n.name: self.extra for n in self.layout.nodes})
        self.hub = ProxyHub()
        self.nodes: dict[str, ClusterNode] = {}
        self.members: list[str] = list(self.initial)
        self.removed: list[str] = []
        self.paused: set[str] = set()
        for n in self.layout.nodes:
            self.nodes[n.name] = ClusterNode.of(n, root)
        for a in self.initial:
            for b in self.initial:
                if a != b:
                    self.hub.add(a, b, self.layout.node(b).peer_port)
        for s in self.spares:
            self.hub.add(ANY, s, self.layout.node(s).peer_port)
            for b in self.initial:
                self.hub.add(s, b, self.layout.node(b).peer_port)
        for name in self.initial:
            self._write_config(name, self.initial)
        for name in self.spares:
            self._write_config(name, self.initial)

    # -- layout -----------------------------------------------------------------------

    def _write_config(self, name: str, peers: list[str]) -> None:
        """``name``'s config, with each peer's URL pointing at the link's proxy."""
        me = self.layout.node(name)
        proxied: list[NodeLayout] = [me]
        for p in peers:
            if p == name:
                continue
            link = self.hub.link(name, p)
            proxied.append(replace(self.layout.node(p), peer_port=link.port))
        view = ClusterLayout(self.layout.root, tuple(proxied))
        me.config_path.write_text(render_node_config(view, name, extra_toml=self.extra))

    # -- access -----------------------------------------------------------------------

    def __getitem__(self, name: str) -> ClusterNode:
        return self.nodes[name]

    @property
    def running(self) -> list[ClusterNode]:
        """Members whose process runs (paused ones included)."""
        return [self.nodes[m] for m in self.members if self.nodes[m].is_running()]

    @property
    def responsive(self) -> list[ClusterNode]:
        """Members whose process runs and is not paused."""
        return [n for n in self.running if n.name not in self.paused]

    @property
    def down(self) -> list[str]:
        """Members whose process is not running."""
        return [m for m in self.members if not self.nodes[m].is_running()]

    def links(self) -> list[Link]:
        """Links between current members (the shared links into a spare included)."""
        return [
            x
            for x in self.hub.links.values()
            if x.dst in self.members and (x.src == ANY or x.src in self.members)
        ]

    # -- life cycle -------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> FaultLab:
        for name in self.initial:
            self.nodes[name].start(wait=False)
        for name in self.initial:
            self.nodes[name].wait_healthy(timeout_s)
        self.wait_connected(timeout_s=timeout_s)
        return self

    def wait_connected(self, *, timeout_s: float = 60.0) -> None:
        """Every running member sees every other running member connected."""
        group = [n for n in self.running]
        names = {n.name for n in group}

        def connected() -> bool:
            for n in group:
                states = n.peer_states()
                if any(states.get(o) != "connected" for o in names - {n.name}):
                    return False
            return True

        wait_for(
            connected, timeout_s=timeout_s, interval_s=0.2, what=f"{sorted(names)} to be connected"
        )

    def kill(self, name: str) -> None:
        """SIGKILL (a crash); a paused process is killed as well."""
        self.nodes[name].kill()

    def pause(self, name: str) -> None:
        """SIGSTOP: the process is frozen, its sockets stay open."""
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGSTOP)
            self.paused.add(name)

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        self.paused.discard(name)
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)

    def restart(
        self, name: str, *, faults: str | None = None, wait: bool = True, timeout_s: float = 60.0
    ) -> None:
        """Start ``name`` again (after a kill or a stop), optionally with fault points
        armed (``CAIRN_FAULTS`` syntax, ``point=kind[:once],...``)."""
        node = self.nodes[name]
        node.kill()
        node.env.pop("CAIRN_FAULTS", None)
        if faults:
            node.env["CAIRN_FAULTS"] = faults
        node.start(wait=False)
        if wait:
            node.wait_healthy(timeout_s)

    def join_url(self, name: str) -> str:
        """The URL ``add_node`` gives for spare ``name`` (its shared inbound link)."""
        return self.hub.link(ANY, name).url

    def admit(self, name: str, *, timeout_s: float = 90.0) -> None:
        """Spare ``name`` was added (``add_node`` answered): start it, as a member."""
        self.members.append(name)
        self.nodes[name].start(wait=False)
        self.nodes[name].wait_healthy(timeout_s)

    def expel(self, name: str) -> None:
        """``name`` was removed (``remove_node`` answered): it is no member, and stops."""
        if name in self.members:
            self.members.remove(name)
            self.removed.append(name)
        self.resume(name)
        self.nodes[name].kill()

    def heal(self) -> None:
        """Every link a plain pipe again, every paused member running."""
        self.hub.heal_all()
        for name in self.members:
            self.resume(name)

    def stop(self) -> None:
        """Stop every process (SIGCONT first so SIGTERM can land) and the proxy."""
        for node in self.nodes.values():
            self.resume(node.name)
            if node.is_running() and node.proc is not None:
                node.proc.terminate()
        for node in self.nodes.values():
            try:
                node.stop(timeout_s=15.0)
            except Exception:
                node.kill()
        self.hub.close()

    def logs(self, tail: int = 6000) -> str:
        return "\n".join(f"===== {n} =====\n{self.nodes[n].log()[-tail:]}" for n in self.nodes)
