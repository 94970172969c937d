"""Faults on real node processes: nodes stopped, SIGKILLed mid-transfer or mid-deploy,
and a stage failure on one node. Each test starts its own cluster and stops it after.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tarfile
import threading
import urllib.error
from collections.abc import Callable
from typing import Any

import pytest
from cluster_harness import Cluster, ClusterNode, sha256
from helpers import component
from procs import wait_for

pytestmark = pytest.mark.cluster

#: The check hook fails only where the node's data dir holds this marker file. Releases
#: live in ``<data>/components/<project>/releases/<id>``, four levels below it.
MARKER = "fail-check"
CHECK = f'test ! -e "$CAIRN_RELEASE_DIR/../../../../{MARKER}" && echo check passed'


def _agreed(
    c: Cluster, deployment_id: str, nodes: list[ClusterNode] | None = None
) -> dict[str, Any]:
    """Wait until every node holds the same terminal status and results; return one copy."""

    def same() -> dict[str, Any] | None:
        copies = [n.deployment(deployment_id) for n in (nodes or c.running)]
        if any(d is None or d["status"] not in ("success", "failed") for d in copies):
            return None
        keys = ("status", "payload_hash", "peer_results", "error")
        views = [{k: d[k] for k in keys} for d in copies if d is not None]
        return copies[0] if all(v == views[0] for v in views) else None

    return dict(wait_for(same, timeout_s=45, interval_s=0.1, what="every node to agree"))


def _results(d: dict[str, Any]) -> dict[str, str]:
    return {r["node"]: r["status"] for r in d["peer_results"]}


def test_a_peer_stopped_before_a_deploy_converges_when_it_returns(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3).start()
    n1, n3 = c["n1"], c["n3"]
    n3.stop()
    wait_for(lambda: n1.peer_states().get("n3") != "connected", timeout_s=15,
             what="n1 to notice n3 is gone")  # fmt: skip
    first = c.deploy(n1, "conv", component(check=CHECK, v="1"), ignore_replication_errors=True)
    assert first[0] == 200, first
    second = c.deploy(n1, "conv", component(check=CHECK, v="2"), ignore_replication_errors=True)
    assert second[0] == 200, second
    latest = second[1]["deployment_id"]
    assert _results(second[1])["n3"] != "active"

    n3.start()
    c.wait_connected()
    d = c.wait_deployment(n1, latest, lambda d: _results(d).get("n3") == "active",
                          what="n3's result to reach the origin")  # fmt: skip
    entry = next(r for r in d["peer_results"] if r["node"] == "n3")
    assert entry["late"] is True and entry["error"] is None
    wait_for(lambda: n3.active_release("conv") == latest, timeout_s=30, what="n3 to activate")
    assert n3.current_files("conv") == n1.current_files("conv")
    _agreed(c, latest)
    # It jumped to the cluster's current release: the first deploy never became active there.
    earlier = _agreed(c, first[1]["deployment_id"])
    assert _results(earlier).get("n3") != "active"


def _big_component(size: int) -> bytes:
    """A tar.gz that does not compress: ``size`` random bytes in one file."""
    data = os.urandom(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("app/blob.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=1)


def _sent_to(node: ClusterNode, peer: str) -> int:
    """Blob bytes ``node`` has sent ``peer`` (its cluster_status counter)."""
    for p in node.status()["peers"]:
        if p["name"] == peer:
            return int(p["blob_bytes_sent"])
    raise AssertionError(f"{node.name} does not list {peer}")


@pytest.mark.timeout(180)
def test_a_peer_killed_mid_blob_transfer_resumes_from_its_offset(
    make_cluster: Callable[..., Cluster],
) -> None:
    chunk = 16 * 1024
    c = make_cluster(2, replication={"chunk_bytes": chunk, "chunk_credit": 1}).start()
    n1, n2 = c["n1"], c["n2"]
    payload = _big_component(24 << 20)
    size, digest = len(payload), sha256(payload)
    partial = n2.data_dir / "blobs" / "partial" / digest
    answer: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: answer.update(r=c.deploy(n1, "big", payload, deployment_timeout=150_000)),
        daemon=True,
    )
    thread.start()
    wait_for(lambda: partial.exists() and partial.stat().st_size > size // 4, timeout_s=60,
             interval_s=0.01, what="n2 to fetch a quarter of the blob")  # fmt: skip
    n2.kill()
    offset = partial.stat().st_size
    assert 0 < offset < size
    wait_for(lambda: n1.peer_states().get("n2") != "connected", timeout_s=15,
             what="n1 to notice n2 is gone")  # fmt: skip
    sent_before = _sent_to(n1, "n2")
    assert sent_before >= offset

    n2.start()
    thread.join(150)
    assert not thread.is_alive()
    code, body = answer["r"]
    assert code == 200, body
    assert _results(body) == {"n1": "active", "n2": "active"}
    second = _sent_to(n1, "n2") - sent_before
    # The second transfer started where the first left off: far less than the whole blob.
    assert second <= size - offset + chunk, (size, offset, second)
    assert second < size
    [stored] = n2.blob_files(digest)
    assert stored.read_bytes() == payload and not partial.exists()
    assert n2.current_files("big") == n1.current_files("big")


def test_the_origin_killed_after_replication_started_leaves_the_cluster_consistent(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3).start()
    n1, n2, n3 = c["n1"], c["n2"], c["n3"]
    code, v1 = c.deploy(n2, "crash", component(v="1"))
    assert code == 200, v1
    _agreed(c, v1["deployment_id"])
    n1.stop()
    n1.start(crashpoint="deploy.before_activate")  # dies once every node has staged
    c.wait_connected()
    with contextlib.suppress(urllib.error.URLError, ConnectionError):  # the origin dies
        c.deploy(n1, "crash", component(v="2"))
    assert n1.wait_exit(30) != 0
    listed = n2.ok("list_deployments", project="crash")["deployments"]
    v2 = next(d["deployment_id"] for d in listed if d["deployment_id"] != v1["deployment_id"])
    staged = c.wait_deployment(n2, v2, lambda d: set(_results(d).values()) == {"staged"},
                               what="every node to have staged v2")  # fmt: skip
    assert staged["status"] not in ("success", "failed")
    assert {n.active_release("crash") for n in (n2, n3)} == {v1["deployment_id"]}

    n1.start()
    final = _agreed(c, v2)
    want = v2 if final["status"] == "success" else v1["deployment_id"]
    wait_for(lambda: {n.active_release("crash") for n in c} == {want}, timeout_s=15,
             interval_s=0.1, what=f"every node to run {want}")  # fmt: skip
    if final["status"] == "failed":
        assert final["error"]["code"] == "interrupted"
    trees = [n.current_files("crash") for n in c]
    assert trees[0] == trees[1] == trees[2]


def test_a_stage_failure_on_one_node_keeps_the_previous_release_everywhere(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(3).start()
    n1, n3 = c["n1"], c["n3"]
    code, v1 = c.deploy(n1, "stage", component(check=CHECK, v="1"))
    assert code == 200, v1
    _agreed(c, v1["deployment_id"])
    (n3.data_dir / MARKER).write_text("fail the check here\n")
    code, body = c.deploy(n1, "stage", component(check=CHECK, v="2"))
    assert code in (422, 503), body
    assert body["failed_nodes"] == ["n3"]
    assert body["code"] in ("check_failed", "replication_failed")
    final = _agreed(c, body["deployment_id"])
    assert final["status"] == "failed"
    assert _results(final)["n3"] == "failed"
    failed = next(r for r in final["peer_results"] if r["node"] == "n3")
    assert failed["error"] and "check" in str(failed["error"]).lower()
    assert {n.active_release("stage") for n in c} == {v1["deployment_id"]}
    trees = [n.current_files("stage") for n in c]
    assert trees[0] == trees[1] == trees[2]
