"""Backup of a running node in a 3-node cluster, wipe, restore, rejoin (SPEC 11).

n2 is backed up with ``cairn node backup`` while the cluster works; then it originates a
deploy and writes a user *after* the backup (entries of its old change log beyond the
backup's position, held by its peers), and n3 deploys too. n2 is stopped, its data
directory wiped and restored with ``cairn node restore``, and started again: it gets a
new change log, every record and user comes back (also what it wrote after the backup),
it runs each project's active release, and a deploy through it succeeds on every node.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cluster_harness import Cluster, ClusterNode
from helpers import component
from procs import wait_for

pytestmark = pytest.mark.cluster


def _cairn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=120
    )


def _records(node: ClusterNode) -> dict[str, tuple[str, str | None]]:
    body = node.ok("list_deployments", limit=1000)
    return {d["deployment_id"]: (d["status"], d["payload_hash"]) for d in body["deployments"]}


def _users(node: ClusterNode) -> set[str]:
    return {u["username"] for u in node.ok("list_users")}


def _add_user(node: ClusterNode, name: str) -> None:
    fields = {"username": name, "password": f"{name}-password-1", "role": "super_user"}
    code, body = node.op("add_user", fields=fields)  # ``password`` would sign in
    assert code == 200, body


def _deploy_ok(c: Cluster, node: ClusterNode, project: str, payload: bytes) -> str:
    code, body = c.deploy(node, project, payload)
    assert code == 200, body
    assert {r["node"]: r["status"] for r in body["peer_results"]} == {
        "n1": "active", "n2": "active", "n3": "active",
    }  # fmt: skip
    return str(body["deployment_id"])


@pytest.mark.timeout(300)
def test_backup_wipe_restore_rejoin_loses_nothing(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = make_cluster(3).start()
    n1, n2, n3 = c["n1"], c["n2"], c["n3"]
    _deploy_ok(c, n1, "app1", component(install="printf one > built.txt", v="1"))
    _deploy_ok(c, n2, "app2", component(v="2a"))
    _add_user(n2, "early")
    old_log = n2.status()["log_id"]

    backup = tmp_path / "n2-backup.tar.gz"
    done = _cairn("node", "backup", "--config", str(n2.config_path), str(backup), "--json")
    assert done.returncode == 0, done.stderr
    assert backup.is_file()

    # After the backup: n2 originates a deploy and writes a user (its old log moves on,
    # its peers hold those entries), n3 deploys too.
    late_n2 = _deploy_ok(c, n2, "app2", component(v="2b"))
    late_n3 = _deploy_ok(c, n3, "app1", component(install="printf two > built.txt", v="3"))
    _add_user(n2, "late")
    wait_for(lambda: "late" in _users(n1) and late_n3 in _records(n1), timeout_s=60,
             what="n1 to hold what n2 and n3 wrote")  # fmt: skip
    records, users = _records(n1), _users(n1)
    assert late_n2 in records and {"early", "late"} <= users

    # Lose n2's disk, restore it from the backup, start it again.
    assert n2.stop() == 0
    shutil.rmtree(n2.data_dir)
    done = _cairn("node", "restore", "--config", str(n2.config_path), str(backup))
    assert done.returncode == 0, done.stderr + done.stdout
    again = _cairn("node", "restore", "--config", str(n2.config_path), str(backup))
    assert again.returncode == 1 and "not empty" in again.stderr
    n2.start(wait=False)
    n2.wait_healthy(60)
    c.wait_connected(timeout_s=60)

    # Every record and user is back, also what n2 itself wrote after the backup.
    def same_records() -> bool:
        return _records(n2) == records and _users(n2) >= users

    wait_for(same_records, timeout_s=120, interval_s=0.5, what="n2 to hold every record again")
    assert _records(n2)[late_n2] == ("success", records[late_n2][1])
    for deployment_id in (late_n2, late_n3):  # with their whole event logs
        copies = [n.deployment(deployment_id) for n in (n1, n2)]
        assert copies[0] is not None and copies[1] is not None
        assert copies[1]["event_log"] == copies[0]["event_log"] != []
    assert n2.status()["log_id"] != old_log  # a new change log after the restore
    wait_for(
        lambda: any(p["name"] == "n2" and p["log_id"] and p["log_id"] != old_log
                    for p in n1.status()["peers"]),
        timeout_s=60, what="n1 to see n2's new log",
    )  # fmt: skip

    # n2 runs the active release of each project (staged again if it was newer).
    def converged() -> bool:
        return (
            n2.active_release("app1") == late_n3
            and n2.active_release("app2") == late_n2
            and n2.current_files("app1") == n1.current_files("app1")
            and n2.current_files("app2") == n1.current_files("app2")
        )

    wait_for(converged, timeout_s=120, interval_s=0.5, what="n2 to run the active releases")
    assert n2.current_files("app1")["built.txt"] == b"two"

    # The restored node originates deploys again, and every node takes them.
    fresh = _deploy_ok(c, n2, "app3", component(v="after"))
    for node in (n1, n3):
        d = c.wait_deployment(node, fresh)
        assert d["status"] == "success" and d["origin_node"] == "n2"
    assert {n.active_release("app3") for n in c} == {fresh}
    # Nobody treats a record of n2's as anything but what it was.
    for node in (n1, n3):
        assert {k: v for k, v in _records(node).items() if k != fresh} == records
    quarantined = [p.get("quarantined", 0) for n in c for p in n.status()["peers"]]
    assert sum(quarantined) == 0, quarantined
