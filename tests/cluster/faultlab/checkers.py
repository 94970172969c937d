"""What every node must agree on once the faults have healed, and the checks of it.

A :class:`Snapshot` is what one node shows: its replicated records through the API
(every deployment with its results and event log, users, members, what every node runs),
what it runs on disk (``components/<project>/current``), the bytes of its blob store, and
its replication counters. The checkers compare snapshots with each other and with the
recorded history; each returns anomalies as sentences (none: the guarantee held).

Values that are a node's own view and not replicated (whether the blob is on *this*
node, this node's peers' connection states) are left out of the comparisons.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster_harness import ClusterNode

from faultlab.history import TERMINAL, History, Monitor, list_all

__all__ = ["CHECKERS", "Snapshot", "check_all", "converged", "snapshot"]

#: Fields of a deployment view that are this node's own (not replicated).
_LOCAL_FIELDS = ("payload_blob_present",)
_DEPLOY_KINDS = (
    "deploy",
    "deploy_same_bytes",
    "deploy_failing_check",
    "rollback",
    "drop_component",
)


@dataclass
class Snapshot:
    node: str
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    users: list[Any] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: dict[str, str | None] = field(default_factory=dict)
    current_files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    newest_success: dict[str, str | None] = field(default_factory=dict)
    bad_blobs: list[str] = field(default_factory=list)
    orphan_blobs: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _view(d: dict[str, Any]) -> dict[str, Any]:
    view = {k: v for k, v in d.items() if k not in _LOCAL_FIELDS}
    view["peer_results"] = sorted(view.get("peer_results") or [], key=lambda r: r["node"])
    return view


def _newest_success(db: Path, node: str) -> dict[str, str | None]:
    """Per project, the deploy the one definition of "active" names, computed from the
    rows (newest ``success`` by creation version, ties by id), read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT project, deployment_id, kind FROM deployments WHERE status = 'success' "
            "AND (replicated = 1 OR origin_node = ?) ORDER BY created_version, deployment_id",
            (node,),
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, str | None] = {}
    for project, deployment_id, kind in rows:
        out[project] = None if kind == "drop" else deployment_id
    return out


def _orphans(db: Path, blobs: Path) -> list[str]:
    """Stored blobs and partial fetches that no deployment references any more without
    a payload drop (leaked bytes). A partial of a blob still referenced is kept on
    purpose: a later fetch resumes from it."""
    store, partial = blobs / "sha256", blobs / "partial"
    stored = sorted(p.name for p in store.rglob("*") if p.is_file()) if store.exists() else []
    partials = sorted(p.name for p in partial.iterdir()) if partial.exists() else []
    if not stored and not partials:
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        live = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT payload_hash FROM deployments d WHERE payload_hash IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM payload_drops p "
                "WHERE p.deployment_id = d.deployment_id)"
            )
        }
    finally:
        conn.close()
    return [f"blob {n[:12]}" for n in stored if n not in live] + [
        f"partial fetch {n[:12]}" for n in partials if n not in live
    ]


def blob_problems(blobs: Path) -> list[str]:
    bad = []
    store = blobs / "sha256"
    for path in sorted(store.rglob("*")) if store.exists() else []:
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != path.name:
            bad.append(f"{path.relative_to(blobs)} holds bytes hashing to {digest[:12]}")
    return bad


def _temp_files(data: Path) -> list[str]:
    """Leftovers of interrupted writes once nothing runs: temp release dirs and
    symlinks, temp blobs."""
    found = [str(p.relative_to(data)) for p in (data / "components").rglob(".tmp-*")]
    tmp = data / "blobs" / "tmp"
    if tmp.exists():
        found += [str(p.relative_to(data)) for p in tmp.iterdir()]
    return sorted(found)


def snapshot(node: ClusterNode, *, timeout_s: float = 30) -> Snapshot:
    """What ``node`` shows now (API, disk and database)."""
    s = Snapshot(node.name)
    try:
        for row in list_all(node, timeout_s=timeout_s):
            d = node.deployment(row["deployment_id"])
            if d is not None:
                s.deployments[d["deployment_id"]] = _view(d)
        s.users = sorted(node.ok("list_users"), key=lambda u: u["username"])
        status = node.status()
        s.members = sorted({node.name, *(p["name"] for p in status.get("peers", []))})
        for p in status.get("peers", []):
            for what in ("quarantined", "refused"):
                if p.get(what):
                    s.refusals.append(f"{node.name} {what} {p[what]} changes from {p['name']}")
        for c in node.ok("get_components")["components"]:
            c = dict(c)
            c["nodes"] = sorted(c["nodes"], key=lambda x: x["node"])
            s.components[c["project"]] = c
    except (AssertionError, OSError, ValueError) as e:
        s.errors.append(f"{node.name} did not answer: {type(e).__name__}: {e}")
    projects = {*s.components}
    comp_dir = node.data_dir / "components"
    if comp_dir.exists():
        projects |= {p.name for p in comp_dir.iterdir() if p.is_dir()}
    for project in sorted(projects):
        s.current[project] = node.active_release(project)
        s.current_files[project] = node.current_files(project)
    s.newest_success = _newest_success(node.data_dir / "cairn.db", node.name)
    s.bad_blobs = blob_problems(node.data_dir / "blobs")
    s.orphan_blobs = _orphans(node.data_dir / "cairn.db", node.data_dir / "blobs")
    s.temp_files = _temp_files(node.data_dir)
    return s


# -- checkers ---------------------------------------------------------------------------

Checker = Callable[[list[Snapshot], History, Monitor | None], list[str]]


def _differ(snaps: list[Snapshot], get: Callable[[Snapshot], Any], what: str) -> list[str]:
    first = snaps[0]
    out = []
    for s in snaps[1:]:
        if get(s) != get(first):
            out.append(f"{what} differ between {first.node} and {s.node}")
    return out


def same_records(snaps: list[Snapshot], history: History, monitor: Monitor | None) -> list[str]:
    """Every node holds the same deployments, results, events, users and members."""
    out: list[str] = []
    first = snaps[0]
    for s in snaps[1:]:
        mine, theirs = set(first.deployments), set(s.deployments)
        for dep in sorted(mine ^ theirs):
            where = first.node if dep in mine else s.node
            out.append(f"deployment {dep} is only on {where} (of {first.node}, {s.node})")
        for dep in sorted(mine & theirs):
            a, b = first.deployments[dep], s.deployments[dep]
            if a != b:
                keys = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
                out.append(
                    f"deployment {dep} differs between {first.node} and {s.node} in "
                    f"{', '.join(keys)}"
                )
    out += _differ(snaps, lambda s: s.users, "users")
    out += _differ(snaps, lambda s: s.members, "members")
    out += _differ(
        snaps,
        lambda s: {p: c["nodes"] for p, c in s.components.items()},
        "what each node reports it runs (node_components)",
    )
    return out


def _dropped(history: History) -> set[str]:
    """Deployments whose payload the history dropped (or may have: no answer)."""
    out: set[str] = set()
    for op in history.ops:
        if op.kind == "delete_payload" and (op.acknowledged or op.status is None):
            out.add(str(op.fields["deployment_id"]))
        if op.kind == "prune" and op.acknowledged and isinstance(op.answer, dict):
            out.update(str(d) for d in op.answer.get("dropped") or [])
    return out


def _stranded(s: Snapshot, project: str, want: str | None, dropped: set[str]) -> bool:
    """``s`` cannot converge to ``want`` because its payload was deleted before this node
    staged it, and says so (SPEC: deleting the active deploy's payload is allowed)."""
    if want is None or want not in dropped:
        return False
    mine = [n for n in s.components.get(project, {}).get("nodes", []) if n["node"] == s.node]
    return bool(mine) and not mine[0]["converged"] and "payload_gone" in (mine[0]["reason"] or "")


def same_release(snaps: list[Snapshot], history: History, monitor: Monitor | None) -> list[str]:
    """Every node runs the same release of each project: the one the rows name (newest
    success by creation version), in its records and on disk, with the same files. A node
    the history stranded (the payload deleted before it staged it) must say so."""
    out: list[str] = []
    dropped = _dropped(history)
    projects = {p for s in snaps for p in (*s.newest_success, *s.current, *s.components)}
    for project in sorted(projects):
        serving = []
        for s in snaps:
            want = s.newest_success.get(project)
            disk = s.current.get(project)
            api = s.components.get(project, {}).get("deployment_id")
            desired = s.components.get(project, {}).get("desired_deployment_id")
            if desired != want:
                out.append(f"{s.node} {project}: desired {desired}, newest success {want}")
            if disk != api:
                out.append(f"{s.node} {project}: active {api} but {disk} on disk")
            elif api != want and not _stranded(s, project, want, dropped):
                out.append(f"{s.node} {project}: newest success {want}, active {api}")
            if api == want:
                serving.append(s)
        out += _differ(
            snaps,
            lambda s, p=project: s.newest_success.get(p),
            f"{project}'s newest success",
        )
        if serving:
            out += _differ(
                serving,
                lambda s, p=project: s.current_files.get(p) or {},
                f"{project}'s files on disk",
            )
    return out


def all_terminal(snaps: list[Snapshot], history: History, monitor: Monitor | None) -> list[str]:
    """No deployment is left running, and every node that was asked has a result."""
    out = []
    for s in snaps:
        for dep, d in sorted(s.deployments.items()):
            if d["status"] not in TERMINAL:
                out.append(f"{s.node}: {dep} left {d['status']} (phase {d.get('phase')})")
    return out


def terminal_unchanged(
    snaps: list[Snapshot], history: History, monitor: Monitor | None
) -> list[str]:
    """A terminal status, once seen anywhere, is what every node ends with."""
    out = list(monitor.anomalies) if monitor is not None else []
    if monitor is not None:
        for s in snaps:
            for dep, d in s.deployments.items():
                seen = monitor.first_terminal.get(dep)
                if seen is not None and seen[1] != d["status"]:
                    out.append(f"{dep} was {seen[1]} on {seen[0]}, now {d['status']} on {s.node}")
    return out


def acknowledged(snaps: list[Snapshot], history: History, monitor: Monitor | None) -> list[str]:
    """Answers tell the truth: a deploy answered 200 is a success everywhere, one answered
    with an error is not, and nothing answered 500 but an injected bug."""
    out = []
    for op in history.ops:
        # An injected bug (an ``error`` fault armed on a node) is an internal_error, 500 once
        # its outcome is recorded (SPEC 4); any other 500 is a bug of cairn's.
        if op.status == 500 and "injected fault" not in str(op.answer):
            out.append(f"#{op.index} {op.kind}@{op.node} answered {op.status}: {op.answer}")
        if op.kind not in _DEPLOY_KINDS or op.status is None:
            continue
        dep = op.deployment_id
        if dep is None:
            if op.acknowledged:
                out.append(f"#{op.index} {op.kind} answered {op.status} without a deployment id")
            continue
        for s in snaps:
            d = s.deployments.get(dep)
            if d is None:
                out.append(f"#{op.index} {op.kind} {dep} (answered {op.status}) is not on {s.node}")
            elif op.acknowledged and d["status"] != "success":
                out.append(
                    f"#{op.index} {op.kind} {dep} answered {op.status} but is "
                    f"{d['status']} on {s.node}"
                )
            elif not op.acknowledged and d["status"] == "success":
                out.append(
                    f"#{op.index} {op.kind} {dep} answered {op.status} but is a success on {s.node}"
                )
    return out


def blobs_intact(snaps: list[Snapshot], history: History, monitor: Monitor | None) -> list[str]:
    return [f"{s.node}: {b}" for s in snaps for b in s.bad_blobs]


def no_orphan_blobs(snaps: list[Snapshot], history: History, monitor: Monitor | None) -> list[str]:
    """Every stored blob (and partial fetch) is the payload of a deployment whose payload
    was not dropped."""
    return [
        f"{s.node}: {b} is referenced by no live deployment" for s in snaps for b in s.orphan_blobs
    ]


def no_leftovers(snaps: list[Snapshot], history: History, monitor: Monitor | None) -> list[str]:
    """No temp release, temp symlink or temp blob is left once nothing runs."""
    return [f"{s.node}: {t} left behind" for s in snaps for t in s.temp_files]


def no_refusals(snaps: list[Snapshot], history: History, monitor: Monitor | None) -> list[str]:
    return [r for s in snaps for r in s.refusals]


def answered(snaps: list[Snapshot], history: History, monitor: Monitor | None) -> list[str]:
    return [e for s in snaps for e in s.errors]


CHECKERS: dict[str, Checker] = {
    "answered": answered,
    "same_records": same_records,
    "same_release": same_release,
    "all_terminal": all_terminal,
    "terminal_unchanged": terminal_unchanged,
    "acknowledged": acknowledged,
    "blobs_intact": blobs_intact,
    "no_orphan_blobs": no_orphan_blobs,
    "no_leftovers": no_leftovers,
    "no_refusals": no_refusals,
}


def check_all(
    snaps: list[Snapshot],
    history: History,
    monitor: Monitor | None,
    only: Iterable[str] | None = None,
) -> dict[str, list[str]]:
    """Run the checkers; returns the anomalies of each (only those with any)."""
    names = list(only) if only is not None else list(CHECKERS)
    out = {}
    for name in names:
        found = CHECKERS[name](snaps, history, monitor)
        if found:
            out[name] = found
    return out


def converged(snaps: list[Snapshot], history: History) -> bool:
    """Quiet enough to judge: every node answered, nothing runs, and the nodes agree."""
    return not check_all(
        snaps, history, None, only=("answered", "all_terminal", "same_records", "same_release")
    )
