"""Crash points on real node processes: arm a point, make the cluster reach it, recover.

A :class:`Case` names a fault point, the node it is armed on (``origin``: n1, where the
deploys are sent; ``peer``: n2), the kind (``kill``, or ``oserror``/``error``/
``missing``) and what makes the cluster reach it (a deploy, a deploy that fails on n3, a
node converging after it was away, a payload delete, the maintenance pass). The node is
restarted with ``CAIRN_FAULTS=<point>=<kind>:once``; the trigger runs; a killed node is
started again without faults; once the cluster is quiet every checker of
:mod:`faultlab.checkers` runs on every node (no row left running, every node on the same
release, records identical, blobs intact, nothing temporary or partial left behind).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import threading
from dataclasses import dataclass
from typing import Any

from cluster_harness import Cluster, ClusterNode
from helpers import component
from procs import wait_for

from faultlab.checkers import Snapshot, check_all, converged, snapshot
from faultlab.history import History, Op

__all__ = ["PROJECT", "Case", "CrashRig"]

PROJECT = "cp"
ORIGIN, PEER, BYSTANDER = "n1", "n2", "n3"
_counter = itertools.count(1)


@dataclass(frozen=True)
class Case:
    point: str
    role: str  # "origin" (n1) or "peer" (n2)
    trigger: str = "deploy"  # deploy, failed_deploy, converge, delete, maintain
    kind: str = "kill"

    @property
    def victim(self) -> str:
        return ORIGIN if self.role == "origin" else PEER

    @property
    def id(self) -> str:
        return f"{self.role}-{self.point}" + ("" if self.kind == "kill" else f"-{self.kind}")


class CrashRig:
    """Runs :class:`Case` s one after another on one 3-node cluster."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.history = History(0)

    # -- the cluster ----------------------------------------------------------------------

    def node(self, name: str) -> ClusterNode:
        return self.c[name]

    def ensure_up(self) -> None:
        """Every node running without armed faults, connected (a failed case may have left
        one down)."""
        for n in self.c:
            if n.env.pop("CAIRN_FAULTS", None) is not None or not n.is_running():
                n.kill()
                n.start(wait=False)
        for n in self.c:
            n.wait_healthy(60)
        self.c.wait_connected(timeout_s=60)

    def arm(self, name: str, spec: str) -> None:
        """Restart ``name`` with ``CAIRN_FAULTS=spec``; returns once it serves, or once it
        died (a point reached while starting: catch-up, recovery)."""
        n = self.node(name)
        n.stop()
        n.env["CAIRN_FAULTS"] = spec
        n.start(wait=False)

        def up_or_dead() -> bool:
            if not n.is_running():
                return True
            try:
                states = n.peer_states()
            except (OSError, ValueError, AssertionError):
                return False
            return all(states.get(o.name) == "connected" for o in self.c if o.name != name)

        wait_for(up_or_dead, timeout_s=90, interval_s=0.2, what=f"{name} to start armed")

    def revive(self, name: str) -> None:
        """Start ``name`` again without faults (after the point killed it)."""
        n = self.node(name)
        n.env.pop("CAIRN_FAULTS", None)
        n.kill()
        n.start(wait=False)
        n.wait_healthy(60)
        self.c.wait_connected(timeout_s=90)

    # -- operations -----------------------------------------------------------------------

    def deploy(self, via: str = ORIGIN, *, fail_on: str | None = None, **fields: Any) -> Op:
        """A deploy of a new release of :data:`PROJECT` with install and check hooks."""
        check = "test -f index.html && echo checked"
        if fail_on is not None:
            check = f'test "$CAIRN_NODE" != "{fail_on}" && echo checked'
        payload = component(
            install='echo "installing on $CAIRN_NODE"', check=check, v=str(next(_counter))
        )
        return self.history.call(
            self.node(via),
            "deploy",
            "deploy_component",
            timeout_s=240,
            project=PROJECT,
            payload=base64.b64encode(payload).decode(),
            deployment_timeout=90_000,
            **fields,
        )

    def in_thread(self, job: Any) -> tuple[threading.Thread, list[Op]]:
        out: list[Op] = []
        t = threading.Thread(target=lambda: out.append(job()), daemon=True)
        t.start()
        return t, out

    # -- checks ---------------------------------------------------------------------------

    def settle(self, timeout_s: float = 150) -> list[Snapshot]:
        """Snapshots of every node once nothing runs and the nodes agree (or the deadline)."""
        last: list[list[Snapshot]] = []

        def quiet() -> bool:
            last[:] = [[snapshot(n) for n in self.c]]
            return converged(last[0], self.history)

        with contextlib.suppress(TimeoutError):
            wait_for(quiet, timeout_s=timeout_s, interval_s=1.0, what="the cluster to settle")
        return last[0]

    def begin(self) -> None:
        """A new case: its own history (answers of earlier cases are theirs)."""
        self.history = History(0)

    def anomalies(self) -> dict[str, list[str]]:
        return check_all(self.settle(), self.history, None)

    def active(self) -> set[str | None]:
        return {n.active_release(PROJECT) for n in self.c}
