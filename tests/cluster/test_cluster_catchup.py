"""Catch-up that costs what the current state costs, on real node processes (real TLS)
(issue 14, "What it must show"):

- a node away while its peers trimmed their change logs past its position catches up
  (from compacted rows: the entries it missed are gone everywhere);
- a node joining a 3-node cluster after a few dozen deploys converges, holds every
  record, stages exactly one release per project, writes nothing about the deploys it
  skipped, gets the cluster's admin (its own bootstrap password changes nobody's) and,
  cut off from its busiest sender mid-way through its catch-up, resumes and ends with
  every row.

The change log is trimmed by age within seconds here (``log_max_age_s``, ``maintain_s``)
and senders send small batches, so a catch-up takes many round trips.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cluster_harness import ADMIN_USER, Cluster, ClusterNode, node_desired, node_records
from helpers import component
from lifecycle_util import db_rows
from procs import wait_for

pytestmark = pytest.mark.cluster

REPLICATION = {"log_max_age_s": 2.0, "maintain_s": 0.5, "batch_changes": 16}
PROJECTS = [f"many-{i}" for i in range(5)]
DEPLOYS_PER_PROJECT = 6


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """n1, n2, n3 running; n4 laid out (certificate, config listing n1..n3) but not a
    member yet: the others' configs do not name it."""
    c = Cluster(tmp_path_factory.mktemp("catchup"), 4, replication=REPLICATION)
    for n in c.nodes[:3]:
        text = n.config_path.read_text()
        n.config_path.write_text(re.sub(r'\[\[peers\]\]\nname = "n4"\nurl = "[^"]*"\n', "", text))
        assert '"n4"' not in n.config_path.read_text()
    n4 = c["n4"].config_path.read_text()
    # One batch in flight at a time: n4's catch-up is many round trips.
    c["n4"].config_path.write_text(
        n4.replace("[replication]\n", "[replication]\ncredit_batches = 1\n")
    )
    failed_before = request.session.testsfailed
    try:
        for n in c.nodes[:3]:
            n.start(wait=False)
        for n in c.nodes[:3]:
            n.wait_healthy(90)
        c.wait_connected(timeout_s=90)
        yield c
    finally:
        c.stop()
        if request.session.testsfailed != failed_before:
            print(c.logs())


def _changelog(node: ClusterNode) -> dict[str, Any]:
    return dict(node.status()["changelog"])


@pytest.mark.timeout(300)
def test_a_node_away_while_its_peers_trimmed_past_it_catches_up(cluster: Cluster) -> None:
    c = cluster
    n1, n2, n3 = c["n1"], c["n2"], c["n3"]
    n3.stop()
    c.wait_peer_state(n1, "n3", "disconnected")
    c.wait_peer_state(n2, "n3", "disconnected")
    head_at_stop = n1.status()["head_seq"]
    ids = []
    for i, origin in enumerate((n1, n2, n1, n2)):
        code, body = c.deploy(origin, "away", component(v=f"away-{i}"),
                              ignore_replication_errors=True)  # fmt: skip
        assert code == 200, body
        ids.append(body["deployment_id"])
    n2.ok("add_user", fields={"username": "while-away", "password": "while-away-pw-1",
                              "role": "super_user"})  # fmt: skip
    written = n1.status()["head_seq"] - head_at_stop

    # Every entry n1 wrote since n3 left is older than log_max_age_s soon: n1's log then
    # holds fewer entries than it wrote since, so what n3 needed next is gone.
    def trimmed_past() -> bool:
        log = _changelog(n1)
        return (
            log["trimmed_by_age"] > 0 and log["entries"] is not None and (log["entries"] < written)
        )

    wait_for(trimmed_past, timeout_s=60, interval_s=0.2, what="n1 to trim past n3's position")
    wait_for(lambda: _changelog(n2)["trimmed_by_age"] > 0, timeout_s=60,
             what="n2 to trim by age")  # fmt: skip

    n3.start()
    c.wait_connected(among=[n1, n2, n3], timeout_s=60)
    # Compared afresh each time: n3's own late results are still reaching n1.
    wait_for(
        lambda: node_records(n3) == node_records(n1), timeout_s=60, what="n3 to hold every record"
    )
    assert "while-away" in {u["username"] for u in n3.ok("list_users")}
    assert node_desired(n3)["away"] == ids[-1]
    wait_for(lambda: n3.active_release("away") == ids[-1], timeout_s=60,
             what="n3 to run the newest release")  # fmt: skip
    assert n3.current_files("away") == n1.current_files("away")
    # It went straight to the newest: no release of the ones it missed was staged.
    releases = n3.data_dir / "components" / "away" / "releases"
    assert sorted(p.name for p in releases.iterdir()) == [ids[-1]]
    newest = c.wait_deployment(n1, ids[-1], lambda d: any(
        r["node"] == "n3" and r["status"] == "active" for r in d["peer_results"]))  # fmt: skip
    assert next(r for r in newest["peer_results"] if r["node"] == "n3")["late"] is True


def _many_deploys(c: Cluster, seed: int) -> None:
    """A few dozen deploys: one thread per project, each through random nodes."""
    errors: list[Any] = []

    def run(project: str, rng: random.Random) -> None:
        for i in range(DEPLOYS_PER_PROJECT):
            origin = rng.choice(c.nodes[:3])
            code, body = c.deploy(origin, project, component(v=f"{project}-{i}"))
            if code != 200:
                errors.append((project, i, code, body))

    threads = [
        threading.Thread(target=run, args=(p, random.Random(seed + i)), daemon=True)
        for i, p in enumerate(PROJECTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors


def _held(node: ClusterNode) -> int:
    """Deployment rows in a node's database (read directly: it answers 401 until the
    cluster's users have reached it)."""
    assert node.is_running(), node.log()[-2000:]
    if not (node.data_dir / "cairn.db").exists():
        return 0
    try:
        return int(db_rows(node.data_dir, "SELECT COUNT(*) AS n FROM deployments")[0]["n"])
    except Exception:  # created or migrating right now
        return 0


@pytest.mark.timeout(600)
def test_a_node_joining_after_many_deploys_converges_in_one_step(cluster: Cluster) -> None:
    c = cluster
    n1, n4 = c["n1"], c["n4"]
    _many_deploys(c, seed=1400)
    c.wait_connected(among=c.nodes[:3], timeout_s=60)
    # Compared afresh each time: late results may still be reaching n1 itself.
    want = wait_for(
        lambda: (w := node_records(n1)) == node_records(c.nodes[1]) == node_records(c.nodes[2])
        and w, timeout_s=60, what="n1..n3 to agree")  # fmt: skip
    desired = node_desired(n1)
    assert len(want) >= len(PROJECTS) * DEPLOYS_PER_PROJECT

    n1.ok("add_node", name="n4", url=f"wss://127.0.0.1:{n4.layout.peer_port}")
    n4.env["CAIRN_ADMIN_PASSWORD"] = "n4-own-password-1"
    try:
        n4.start(wait=False)
        # Cut it off from n1 (its relay, and the writer of a third of the rows) in the
        # middle of its catch-up: stop n1 for longer than dead_after_s, then resume it.
        total = len(want)
        at_cut = wait_for(lambda: (h := _held(n4)) > 0 and h, timeout_s=120, interval_s=0.02,
                          what="n4 to start catching up")  # fmt: skip
        assert at_cut < total, f"n4 caught up ({at_cut} rows) before it could be cut off"
        assert n1.proc is not None
        os.kill(n1.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: _dropped(n4, "n1"), timeout_s=30, interval_s=0.1,
                     what="n4 to drop n1")  # fmt: skip
        finally:
            os.kill(n1.proc.pid, signal.SIGCONT)
        n4.wait_healthy(timeout_s=120)
    finally:
        del n4.env["CAIRN_ADMIN_PASSWORD"]
    c.wait_connected(timeout_s=60)
    wait_for(lambda: node_records(n4) == node_records(n1) and node_desired(n4) == desired,
             timeout_s=120, what="n4 to hold every record")  # fmt: skip
    assert next(p for p in n4.status()["peers"] if p["name"] == "n1")["disconnects"] >= 1

    for project, deployment_id in desired.items():
        wait_for(lambda p=project, d=deployment_id: n4.active_release(p) == d, timeout_s=60,
                 what=f"n4 to run {deployment_id}")  # fmt: skip
        assert n4.current_files(project) == n1.current_files(project)
        # Exactly one release staged per project: the one it runs.
        releases = n4.data_dir / "components" / project / "releases"
        assert [p.name for p in releases.iterdir()] == [deployment_id], project
    extracted = re.findall(r'"deployment_id": "([0-9a-f-]{36})", "files"', n4.log())
    assert sorted(extracted) == sorted(d for d in desired.values() if d), extracted

    # It reports (late) on the deploys it runs, and on nothing it skipped.
    def reported() -> dict[str, dict[str, Any]] | None:
        records = node_records(n1)
        ok = all(
            any(r["node"] == "n4" and r["status"] == "active" for r in records[d]["peer_results"])
            for d in desired.values()
            if d
        )
        return records if ok else None

    records = wait_for(reported, timeout_s=60, what="n4's results to reach n1")
    for deployment_id, record in records.items():
        nodes = {r["node"] for r in record["peer_results"]}
        assert ("n4" in nodes) == (deployment_id in desired.values()), (deployment_id, nodes)

    # The cluster's admin, and its password, everywhere; n4's own bootstrap password
    # nowhere.
    for n in c:
        assert n.op("list_users")[0] == 200, n.name
        assert n.op("list_users", password="n4-own-password-1")[0] == 401, n.name
    assert ADMIN_USER in {u["username"] for u in n4.ok("list_users")}


def _dropped(node: ClusterNode, peer: str) -> bool:
    """Whether ``node`` logged losing its channel from ``peer`` (read from its log: its
    API answers 401 until the cluster's users have reached it)."""
    pattern = rf'"peer": "{peer}"[^\n]*"event": "peer_disconnected"'
    return re.search(pattern, node.log()) is not None
