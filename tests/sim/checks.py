"""The checkers run after every history, once everything is healed and has settled.

Each returns a list of anomalies (empty: the guarantee held). They read the nodes'
databases and blob stores directly, and what the simulator recorded while the history
ran (every deployment status a node committed, every client answer).

| guarantee | checker |
|---|---|
| every node holds the same replicated state | :func:`same_state` |
| every node runs the project's desired release | :func:`same_active` |
| a terminal status never changes | :func:`terminal_final` |
| no row is left running past its deadline | :func:`no_stuck_rows` |
| an acknowledged success is a success everywhere | :func:`acked_everywhere` |
| a blob's bytes match its name | :func:`blobs_intact` |
| honest nodes never refuse or quarantine each other | :func:`no_refusals` |
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storage.blob_io import hash_file
from storage.records import TERMINAL, DeploymentStatus
from storage.store import Store
from storage.tables import REPLICATED

from .node import SimNode

__all__ = [
    "NodeState",
    "acked_everywhere",
    "blobs_intact",
    "digest",
    "no_refusals",
    "no_stuck_rows",
    "read_state",
    "same_active",
    "same_state",
    "terminal_final",
]

#: Every replicated table (and the events read from event batches), in key order.
_TABLES: dict[str, str] = {
    **{spec.name: ", ".join(spec.key_cols) for spec in REPLICATED.values()},
    "deployment_events": "deployment_id, seq",
}


async def digest(store: Store) -> dict[str, str]:
    """A canonical digest of each replicated table: every column of every row, the
    entry envelope (log id, position, body, signature, key id) included."""
    out = {}
    for table in sorted(_TABLES):
        h = hashlib.sha256()
        for row in await store.db.fetchall(f"SELECT * FROM {table} ORDER BY {_TABLES[table]}"):
            h.update(repr(tuple(row)).encode())
        out[table] = h.hexdigest()[:16]
    return out


@dataclass(frozen=True)
class NodeState:
    """What one node holds, as far as the checkers are concerned."""

    digest: Mapping[str, str]
    #: Deployments not terminal: ``{id: (origin, started_at, timeout_ms, status)}``.
    running: Mapping[str, tuple[str, int, int, str]]
    parked: int
    active: Mapping[str, str]
    desired: Mapping[str, tuple[str, str]]
    #: Projects whose ``node_components`` row of this node says it did not converge.
    unconverged: Mapping[str, str]
    dropped: frozenset[str]
    staged: frozenset[str]
    statuses: Mapping[str, str]
    quarantine: int

    def quiet(self, removed: Iterable[str]) -> bool:
        gone = set(removed)
        return not self.parked and all(r[0] in gone for r in self.running.values())


async def read_state(node: SimNode, *, with_digest: bool = True) -> NodeState:
    store = node.store
    running = {
        d.deployment_id: (d.origin_node, d.started_at, d.timeout_ms, str(d.status))
        for d in await store.deployments(terminal=False)
    }
    parked = await store.db.fetchone("SELECT COUNT(*) AS n FROM changelog WHERE state = 1")
    active = {p: r["deployment_id"] for p, r in (await store.active_releases()).items()}
    desired = {p: (v[0], v[2]) for p, v in (await store.desired_releases()).items()}
    unconverged = {
        r["project"]: str(r["reason"])
        for r in await store.components()
        if r["node"] == node.name and not r["converged"]
    }
    drops = await store.db.fetchall("SELECT DISTINCT deployment_id FROM payload_drops")
    statuses = {d.deployment_id: str(d.status) for d in await store.deployments()}
    quarantine = await store.db.fetchone("SELECT COUNT(*) AS n FROM quarantine")
    return NodeState(
        digest=await digest(store) if with_digest else {},
        running=running,
        parked=int(parked["n"]) if parked else 0,
        active=active,
        desired=desired,
        unconverged=unconverged,
        dropped=frozenset(r["deployment_id"] for r in drops),
        staged=frozenset((await store.staged_releases()).keys()),
        statuses=statuses,
        quarantine=int(quarantine["n"]) if quarantine else 0,
    )


def same_state(states: Mapping[str, NodeState]) -> list[str]:
    """Every node holds identical replicated tables."""
    out = []
    names = sorted(states)
    for table in sorted(_TABLES):
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(states[n].digest[table], []).append(n)
        if len(groups) > 1:
            parts = " vs ".join(",".join(g) for g in groups.values())
            out.append(f"state: table {table} differs between nodes ({parts})")
    return out


def same_active(states: Mapping[str, NodeState]) -> list[str]:
    """Every node's desired release is the same, and it runs it (a drop: runs nothing),
    except where the desired payload was deleted before that node staged it, which
    the node must then say (``converged`` false)."""
    out = []
    desired = {n: dict(s.desired) for n, s in states.items()}
    if len({repr(sorted(d.items())) for d in desired.values()}) > 1:
        out.append(f"active: nodes disagree on the desired releases: {desired}")
    for n, s in sorted(states.items()):
        for project, (deployment_id, kind) in sorted(s.desired.items()):
            running = s.active.get(project)
            want = None if kind == "drop" else deployment_id
            if running == want:
                continue
            if deployment_id in s.dropped and project in s.unconverged:
                continue  # its payload is gone everywhere: documented, and reported
            out.append(
                f"active: {n} runs {running} of {project}, desired is {deployment_id} ({kind})"
                + (f"; it says: {s.unconverged[project]}" if project in s.unconverged else "")
            )
    return out


def terminal_final(observed: Mapping[tuple[str, str], Sequence[tuple[str, int]]]) -> list[str]:
    """Once a node committed a terminal status for a deployment, that row never
    changed again there (nor did any node record a different terminal status)."""
    out = []
    final: dict[str, set[str]] = {}
    for (node, deployment_id), seen in sorted(observed.items()):
        done: tuple[str, int] | None = None
        for status, version in seen:
            if done is not None and (status, version) != done:
                out.append(
                    f"terminal: {deployment_id} on {node} went {done[0]}@{done[1]} -> "
                    f"{status}@{version}"
                )
                break
            if DeploymentStatus(status) in TERMINAL:
                done = (status, version)
                final.setdefault(deployment_id, set()).add(status)
    for deployment_id, statuses in sorted(final.items()):
        if len(statuses) > 1:
            out.append(f"terminal: {deployment_id} ended {sorted(statuses)} on different nodes")
    return out


def no_stuck_rows(
    states: Mapping[str, NodeState], removed: Iterable[str], now_ms: Mapping[str, int]
) -> list[str]:
    """No deployment is still running past its deadline (a removed origin's rows are
    the documented exception: nobody else may finish them)."""
    gone = set(removed)
    out = []
    for n, s in sorted(states.items()):
        for deployment_id, (origin, started, timeout_ms, status) in sorted(s.running.items()):
            if origin in gone:
                continue
            late_s = (now_ms[n] - started - timeout_ms) / 1000
            out.append(f"stuck: {deployment_id} is {status} on {n}, {late_s:.0f} s past deadline")
    return out


def acked_everywhere(
    states: Mapping[str, NodeState], acked: Mapping[str, str], failed: Mapping[str, str]
) -> list[str]:
    """A success a client was told of is a success on every node; a failure a client was
    told of never becomes a success."""
    out = []
    for deployment_id, what in sorted(acked.items()):
        for n, s in sorted(states.items()):
            got = s.statuses.get(deployment_id)
            if got != "success":
                out.append(f"acked: {what} {deployment_id} acknowledged success, {n} has {got}")
    for deployment_id, what in sorted(failed.items()):
        for n, s in sorted(states.items()):
            if s.statuses.get(deployment_id) == "success":
                out.append(f"acked: {what} {deployment_id} answered {failed[deployment_id]}, "
                           f"{n} has success")  # fmt: skip
    return out


def blobs_intact(nodes: Iterable[SimNode]) -> list[str]:
    """Every stored blob hashes to its name."""
    out = []
    for node in nodes:
        for h in node.blobs.hashes():
            got = hash_file(node.blobs.path(h))
            if got != h:
                out.append(f"blob: {node.name} holds {h[:12]} whose bytes hash to {got[:12]}")
    return out


def no_refusals(
    nodes: Iterable[SimNode], states: Mapping[str, NodeState], excused: Iterable[str] = ()
) -> list[str]:
    """No honest node refused or quarantined another's change. Nodes in ``excused``
    received mangled frames: their refusals are checked one by one, from the log (each
    must come from a peer whose frames to it were mangled)."""
    out = []
    skip = set(excused)
    for node in nodes:
        if node.name in skip:
            continue
        quarantined, refused = node.refusals()
        q = states[node.name].quarantine if node.name in states else 0
        if quarantined or refused or q:
            out.append(f"refusal: {node.name} quarantined {max(quarantined, q)}, refused {refused}")
    return out


def summarize(anomalies: Sequence[str], limit: int = 12) -> list[str]:
    """The first ``limit`` anomalies (and how many more)."""
    head = list(anomalies[:limit])
    if len(anomalies) > limit:
        head.append(f"... and {len(anomalies) - limit} more")
    return head


def as_dict(s: NodeState) -> dict[str, Any]:
    return {"running": dict(s.running), "active": dict(s.active), "desired": dict(s.desired)}
