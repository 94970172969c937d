"""Every durable step of the deploy, replication, catch-up and prune paths, crashed.

Each case arms one named fault point (``storage/faults.py``) on one node of a 3-node
cluster of real processes (``CAIRN_FAULTS=point=kind:once``), makes the cluster reach it,
and checks what the node and the cluster recover to:

- ``kill`` (SIGKILL at the point, then a plain restart): no row left running, every node
  on the same release (records, ``get_components`` and ``current`` on disk), identical
  records, blobs intact, nothing temporary or partial left behind, no orphan blob;
- ``oserror`` / ``error`` / ``missing`` at each deploy step (issue 7 item 1): the deploy
  ends terminal with its error and a ``finished`` event, the previous release stays
  active everywhere, the node's own result is terminal, and the answer is never a 500
  (but for an injected bug, ``error``, on the origin: ``internal_error``, 500 with the
  deployment id, once the outcome is recorded).

The cases run one after another on one cluster (module scope). ``CAIRN_FAULTS_FULL=1``
runs every case; otherwise the bounded CI subset (``ci``) runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import Cluster
from faultlab.crash import BYSTANDER, ORIGIN, PEER, PROJECT, Case, CrashRig
from procs import wait_for

pytestmark = pytest.mark.cluster

FULL = os.environ.get("CAIRN_FAULTS_FULL") == "1"

#: Deploy steps in path order, on the origin (n1) and on a peer (n2).
ORIGIN_DEPLOY_STEPS = (
    "blob.after_write",
    "blob.before_rename",
    "deploy.after_receive",
    "deploy.before_stage",
    "deploy.extract",
    "extract.member",
    "extract.before_publish",
    "hook.install.start",
    "hook.check.start",
    "deploy.after_staged",
    "deploy.before_activate",
    "deploy.before_switch",
    "components.before_switch",
    "deploy.after_switch",
    "deploy.after_active",
    "deploy.before_success",
)
PEER_DEPLOY_STEPS = (
    "blob.partial_before_rename",
    "deploy.extract",
    "extract.member",
    "extract.before_publish",
    "hook.install.start",
    "hook.check.start",
    "reconcile.after_staged",
    "deploy.before_switch",
    "components.before_switch",
    "deploy.after_switch",
    "reconcile.after_active",
)

KILL_CASES = [
    Case("deploy.after_create", "origin"),
    *(Case(p, "origin") for p in ORIGIN_DEPLOY_STEPS),
    Case("releases.after_discard", "origin"),
    Case("apply.before_commit", "origin"),
    Case("apply.after_commit", "origin"),
    Case("payload.after_drop_row", "origin", "delete"),
    *(Case(p, "peer") for p in PEER_DEPLOY_STEPS),
    Case("apply.before_commit", "peer"),
    Case("apply.after_commit", "peer"),
    Case("reconcile.before_discarded", "peer", "failed_deploy"),
    Case("converge.after_active", "peer", "converge"),
    Case("releases.after_discard", "peer", "converge"),
    Case("trim.before_commit", "peer", "maintain"),
]
ERROR_CASES = [
    *(
        Case(p, "origin", kind=k)
        for k in ("oserror", "error", "missing")
        for p in ORIGIN_DEPLOY_STEPS
    ),
    *(Case(p, "peer", kind=k) for k in ("oserror", "error", "missing") for p in PEER_DEPLOY_STEPS),
]

#: The bounded subset CI runs (about two minutes): a crash before and after the switch on
#: the origin, a resumed activation, a crash mid-stage and mid-apply on a peer, and two of
#: the defects found (the rest are also covered in process: tests/node/test_fault_outcomes.py).
CI = {
    "origin-deploy.after_switch",
    "origin-deploy.before_success",
    "peer-hook.install.start",
    "peer-apply.after_commit",
    "peer-deploy.after_switch-oserror",
    "origin-deploy.after_receive-oserror",
}


def _selected(cases: list[Case]) -> list[object]:
    return [
        pytest.param(
            c,
            id=c.id,
            marks=()
            if FULL or c.id in CI
            else pytest.mark.skip(reason="set CAIRN_FAULTS_FULL=1 to run every crash point"),
        )
        for c in cases
    ]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashRig]:
    c = Cluster(
        Path(tmp_path_factory.mktemp("crash")),
        3,
        replication={"maintain_s": 2.0},
        extra_toml="[retention]\nkeep_successful = 1\nfailed_grace_s = 0\nkeep_releases = 1\n",
    )
    try:
        c.start(timeout_s=90)
        r = CrashRig(c)
        first = r.deploy()
        assert first.status == 200, first.answer
        yield r
    finally:
        if os.environ.get("CAIRN_FAULTS_LOGS"):
            print(c.logs())
        c.stop()


def _previous(rig: CrashRig) -> str:
    """The release every node runs before the case (they must agree)."""
    rig.begin()
    rig.ensure_up()
    wait_for(
        lambda: len(rig.active()) == 1 and None not in rig.active(),
        timeout_s=120,
        interval_s=0.5,
        what="every node to run the same release",
    )
    (active,) = rig.active()
    assert active is not None
    return active


def _allow_internal_error(found: dict[str, list[str]]) -> None:
    """An injected bug on the origin answers 500 ``internal_error`` (checked above): not an
    anomaly of this case."""
    kept = [a for a in found.get("acknowledged", []) if "'internal_error'" not in a]
    if kept:
        found["acknowledged"] = kept
    else:
        found.pop("acknowledged", None)


def _report(rig: CrashRig, case: Case, found: dict[str, list[str]]) -> str:
    lines = [f"{case.id}: anomalies after recovery", rig.history.render()]
    for name, items in found.items():
        lines += [f"{name}:", *(f"  - {i}" for i in items)]
    return "\n".join(lines) + "\n" + rig.c.logs()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", _selected(KILL_CASES))
def test_a_crash_at_each_point_recovers(rig: CrashRig, case: Case) -> None:
    _previous(rig)
    victim = rig.node(case.victim)
    spec = f"{case.point}=kill:once"
    if case.trigger == "converge":
        # The victim is away during a deploy, then returns armed and converges.
        victim.stop()
        op = rig.deploy(ignore_replication_errors=True)
        assert op.status == 200, op.answer
        rig.arm(case.victim, spec)
        job = None
    elif case.trigger == "delete":
        old = rig.deploy(via=PEER)
        assert old.status == 200, old.answer
        newer = rig.deploy(via=PEER)
        assert newer.status == 200, newer.answer
        rig.arm(case.victim, spec)
        job = rig.in_thread(
            lambda: rig.history.call(
                victim,
                "delete_payload",
                "delete_deployment_payload",
                timeout_s=60,
                deployment_id=old.deployment_id,
            )
        )
    elif case.trigger == "maintain":
        rig.arm(case.victim, spec)  # the next maintenance pass reaches it
        job = None
    else:
        rig.arm(case.victim, spec)
        fail_on = BYSTANDER if case.trigger == "failed_deploy" else None
        job = rig.in_thread(lambda: rig.deploy(fail_on=fail_on))
    code = victim.wait_exit(120)
    assert code == -9, f"{case.victim} exited with {code}, not SIGKILL at {case.point}"
    rig.revive(case.victim)
    if job is not None:
        job[0].join(300)
        assert not job[0].is_alive()
    found = rig.anomalies()
    assert not found, _report(rig, case, found)
    if case.trigger == "delete":
        for n in rig.c:
            d = n.deployment(str(old.deployment_id))
            assert d is not None and d["payload_blob_present"] is False, (n.name, d)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", _selected(ERROR_CASES))
def test_an_error_at_each_deploy_step_is_an_outcome(rig: CrashRig, case: Case) -> None:
    previous = _previous(rig)
    victim = rig.node(case.victim)
    rig.arm(case.victim, f"{case.point}={case.kind}:once")
    assert victim.is_running(), f"{case.point} was reached while starting"
    logged = len(victim.log())
    op = rig.deploy()
    assert op.status is not None, op.line()
    # A bug (``error``) is an ``internal_error``, answered 500 once its outcome is recorded
    # (SPEC 4); a full disk or a vanished file is the node's storage failing, never a 500.
    if case.kind == "error" and case.role == "origin":
        assert op.status != 500 or op.answer["code"] == "internal_error", op.line()
    else:
        assert op.status != 500, op.line()
    found = rig.anomalies()
    if case.kind == "error" and case.role == "origin":
        _allow_internal_error(found)
    assert not found, _report(rig, case, found)
    dep = op.deployment_id
    assert dep is not None, op.line()
    d = rig.node(ORIGIN).deployment(dep)
    assert d is not None
    # The fault fired: its message names the point (in an error or the node's log).
    seen = f"{d}{victim.log()[logged:]}"
    assert f"fault {case.point}" in seen or f"fault at {case.point}" in seen, (
        f"{case.point} never fired"
    )
    events = [e["event"] for e in d["event_log"]]
    assert events[-1] == "finished", events
    if op.status == 200:
        # The step's error was absorbed (a retry, a step after the outcome was decided):
        # then the new release is what every node runs.
        assert d["status"] == "success"
        assert rig.active() == {dep}
        return
    assert d["status"] in ("failed", "rolled_back"), d["status"]
    assert d["error"], d
    mine = {r["node"]: r for r in d["peer_results"]}.get(case.victim)
    assert mine is None or mine["status"] in ("failed", "discarded", "rolled_back"), mine
    assert rig.active() == {previous}, (rig.active(), previous)
    running = {
        c["deployment_id"]
        for n in rig.c
        for c in n.ok("get_components")["components"]
        if c["project"] == PROJECT
    }
    assert running == {previous}, running
