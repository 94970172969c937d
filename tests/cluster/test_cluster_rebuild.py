"""Replication that survives what operators do to nodes, on three real node processes
(real TLS) (issue 8, "What it must show"):

- a hook printing 100 MB of invalid UTF-8 on a peer: the deploy ends, and the next one
  replicates normally everywhere;
- a node's data dir wiped and the node started again (with a different bootstrap
  password): it gets back every row, blob and active release, the cluster's admin
  password works everywhere (its own bootstrap password nowhere), a deploy through it
  reaches every node, and its peers report that its log changed.

One cluster serves the module, in test order.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator

import pytest
from cluster_harness import ADMIN_USER, Cluster, node_desired, node_records, sha256
from helpers import component
from procs import wait_for

pytestmark = pytest.mark.cluster

#: The install hook floods its output only where the node's data dir holds this file.
FLOOD = "flood-output"
#: 1526 lines of 64 KiB of bytes that are not UTF-8 (0xff, 0xfe, a lone lead byte...),
#: one 8 MiB line without a newline, then a final word: 108 MB in all.
FLOOD_HOOK = (
    f'if test -e "$CAIRN_RELEASE_DIR/../../../../{FLOOD}"; then python3 -c "'
    "import sys; w = sys.stdout.buffer; line = bytes([0xff, 0xfe, 0xc3, 0x28]) * 16384 + b'\\n'; "
    "[w.write(line) for _ in range(1526)]; w.write(bytes([0x80]) * (8 << 20)); w.flush()"
    '"; fi; echo flood done'
)


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("rebuild"), 3)
    failed_before = request.session.testsfailed
    try:
        c.start(timeout_s=90)
        yield c
    finally:
        c.stop()
        if request.session.testsfailed != failed_before:
            print(c.logs())


@pytest.mark.timeout(300)
def test_a_peer_hook_printing_100_mb_of_invalid_utf8_does_not_stop_replication(
    cluster: Cluster,
) -> None:
    c = cluster
    n1, n2 = c["n1"], c["n2"]
    marker = n2.data_dir / FLOOD
    marker.write_text("flood the install output here\n")
    try:
        code, body = c.deploy(n1, "flood", component(install=FLOOD_HOOK, v="1"))
    finally:
        marker.unlink()
    assert code in (200, 422, 503, 504), body  # it ends, either way
    flooded = body["deployment_id"]
    for n in c:
        c.wait_deployment(n, flooded)
    results = {r["node"]: r for r in n1.ok("get_deployment", deployment_id=flooded)["peer_results"]}
    tail = results["n2"]["install_output"]
    assert tail is not None, results["n2"]
    # What is kept of it is bounded, whatever the hook printed.
    assert tail["truncated"] is True and len(tail["lines"]) <= 200, tail["dropped_lines"]
    assert tail["dropped_lines"] >= 1000
    assert sum(len(x["line"].encode()) for x in tail["lines"]) <= 64 * 1024

    code, after = c.deploy(n2, "flood", component(install="echo quiet", v="2"))
    assert code == 200, after
    assert {r["node"]: r["status"] for r in after["peer_results"]} == dict.fromkeys(
        ("n1", "n2", "n3"), "active"
    )
    for n in c:
        record = c.wait_deployment(n, after["deployment_id"])
        assert record["status"] == "success"
        assert n.active_release("flood") == after["deployment_id"]
    assert {p["name"]: p["state"] for p in n2.status()["peers"]} == {
        "n1": "connected",
        "n3": "connected",
    }


@pytest.mark.timeout(300)
def test_a_node_rebuilt_from_an_empty_data_dir_gets_everything_back(cluster: Cluster) -> None:
    c = cluster
    n1, n2, n3 = c["n1"], c["n2"], c["n3"]
    # State worth getting back: two projects (one with history), a user, a dropped payload.
    first = c.deploy(n3, "keep", component(v="keep-1"))[1]["deployment_id"]
    for origin, version in ((n1, "keep-2"), (n3, "keep-3")):
        code, body = c.deploy(origin, "keep", component(v=version))
        assert code == 200, body
    code, other = c.deploy(n2, "other", component(v="other-1", **{"pad.txt": "o" * 50_000}))
    assert code == 200, other
    n1.ok("delete_deployment_payload", deployment_id=first)
    n2.ok("add_user", fields={"username": "alice", "password": "alice-password-1",
                              "role": "super_user"})  # fmt: skip
    wait_for(lambda: all(node_records(n) == node_records(n1) for n in c), timeout_s=30,
             what="every node to hold the same records")  # fmt: skip
    old_log = n3.status()["log_id"]

    n3.stop()
    shutil.rmtree(n3.data_dir)
    n3.data_dir.mkdir()
    n3.env["CAIRN_ADMIN_PASSWORD"] = "a-different-password-1"
    try:
        n3.start(wait=False)
        # Healthy means it answers the cluster's admin password (it waits for the
        # cluster's users rather than creating its own).
        n3.wait_healthy(timeout_s=90)
    finally:
        del n3.env["CAIRN_ADMIN_PASSWORD"]
    c.wait_connected(timeout_s=60)
    new_log = n3.status()["log_id"]
    assert new_log != old_log

    # (Compared afresh each time: n3's own late results are still reaching n1.)
    want = wait_for(lambda: (w := node_records(n1)) == node_records(n3) and w, timeout_s=90,
                    what="n3 to hold every record")  # fmt: skip
    desired = node_desired(n1)
    assert node_desired(n3) == desired and desired["keep"] is not None
    for project, deployment_id in desired.items():
        wait_for(lambda p=project, d=deployment_id: n3.active_release(p) == d, timeout_s=60,
                 what=f"n3 to run {deployment_id} of {project}")  # fmt: skip
        assert n3.current_files(project) == n1.current_files(project)
    for deployment_id, record in want.items():
        present = n1.ok("get_deployment", deployment_id=deployment_id)["payload_blob_present"]
        if present:  # every payload the cluster still keeps is on n3 again
            h = record["payload_hash"]
            wait_for(lambda h=h: len(n3.blob_files(h)) == 1, timeout_s=60,
                     what=f"n3 to hold the blob of {deployment_id}")  # fmt: skip
    assert n3.blob_files(want[first]["payload_hash"]) == []  # a dropped one stays dropped

    # One admin password, the cluster's, everywhere; n3's own bootstrap password nowhere.
    for n in c:
        assert n.op("list_users")[0] == 200
        assert n.op("list_users", password="a-different-password-1")[0] == 401
        assert n.op("list_users", user="alice", password="alice-password-1")[0] == 200
    users = {u["username"] for u in n3.ok("list_users")}
    assert {ADMIN_USER, "alice"} <= users

    # Its peers saw its log change.
    for peer in (n1, n2):
        entry = next(p for p in peer.status()["peers"] if p["name"] == "n3")
        assert entry["log_id"] == new_log and entry["log_changed_at"] is not None, entry

    # A deploy through it reaches every node; a rollback through it to a release it
    # never staged itself fetches the bytes from its peers.
    code, body = c.deploy(n3, "keep", component(v="keep-4"))
    assert code == 200, body
    assert {r["status"] for r in body["peer_results"]} == {"active"}
    older = next(i for i, r in want.items() if r["project"] == "keep" and i not in (first,
                 desired["keep"]))  # fmt: skip
    code, rolled = n3.op("deploy_component", project="keep", rollback_from=older)
    assert code == 200, rolled
    for n in c:
        record = c.wait_deployment(n, rolled["deployment_id"])
        assert record["status"] == "success", record
        assert n.active_release("keep") == rolled["deployment_id"]


@pytest.mark.timeout(300)
def test_a_rollback_through_a_node_that_skipped_the_release_fetches_it(cluster: Cluster) -> None:
    c = cluster
    n1, n2, n3 = c["n1"], c["n2"], c["n3"]
    code, base = c.deploy(n1, "skipped", component(v="skipped-1"))
    assert code == 200, base
    assert n3.proc is not None
    os.kill(n3.proc.pid, signal.SIGSTOP)  # cut off, not restarted
    try:
        c.wait_peer_state(n1, "n3", "disconnected")
        c.wait_peer_state(n2, "n3", "disconnected")
        payload = component(v="skipped-2")
        code, mid = c.deploy(n1, "skipped", payload, ignore_replication_errors=True)
        assert code == 200, mid
        code, last = c.deploy(n2, "skipped", component(v="skipped-3"),
                              ignore_replication_errors=True)  # fmt: skip
        assert code == 200, last
    finally:
        os.kill(n3.proc.pid, signal.SIGCONT)
    c.wait_connected(timeout_s=60)
    wait_for(lambda: n3.active_release("skipped") == last["deployment_id"], timeout_s=60,
             what="n3 to converge to the newest release")  # fmt: skip
    # It went straight to the newest: the release it skipped was never staged there (its
    # payload may be: a node back from away fetches the payloads the cluster keeps, and
    # the rollback below fetches it itself if that has not happened yet).
    releases = n3.data_dir / "components" / "skipped" / "releases"
    assert mid["deployment_id"] not in [p.name for p in releases.iterdir()]

    code, rolled = n3.op("deploy_component", project="skipped", rollback_from=mid["deployment_id"])
    assert code == 200, rolled
    assert rolled["message"] == "Successfully deployed: skipped"
    for n in c:
        assert n.active_release("skipped") == rolled["deployment_id"], n.name
        [blob] = n.blob_files(sha256(payload))
        assert blob.read_bytes() == payload
