"""Cluster deploy modes on real node processes: rolling activation, node-local deploys,
removing a component everywhere, and dropping a payload everywhere."""

from __future__ import annotations

from typing import Any

import pytest
from cluster_harness import Cluster, sha256
from helpers import component
from procs import wait_for

pytestmark = pytest.mark.cluster


def test_rolling_activates_one_node_at_a_time(shared_cluster: Cluster) -> None:
    c = shared_cluster
    code, body = c.deploy(c["n2"], "roll", component(v="r1"), restart="rolling")
    assert code == 200, body
    record = c["n2"].ok("get_deployment", deployment_id=body["deployment_id"])
    assert record["restart_mode"] == "rolling"
    # The origin's log shows every node's progress; in a rolling deploy a node only starts
    # activating once the node before it is active, origin first.
    steps = [
        (e["data"]["node"], e["data"]["status"])
        for e in record["event_log"]
        if e["event"] == "peer" and e["data"]["status"] in ("activating", "active")
    ]
    order = [node for node, status in steps if status == "active"]
    assert order[0] == "n2" and sorted(order) == ["n1", "n2", "n3"]
    for i, node in enumerate(order[1:], start=1):
        started = steps.index((node, "activating")) if (node, "activating") in steps else None
        previous_active = steps.index((order[i - 1], "active"))
        if started is not None:
            assert started > previous_active, steps
    assert all(r["status"] == "active" for r in record["peer_results"])


def test_a_node_local_deploy_says_so_and_touches_no_other_node(shared_cluster: Cluster) -> None:
    c = shared_cluster
    code, base = c.deploy(c["n1"], "local", component(v="everywhere"))
    assert code == 200, base
    code, body = c.deploy(c["n1"], "local", component(v="only-n1"), replicated=False)
    assert code == 200, body
    assert [r["node"] for r in body["peer_results"]] == ["n1"]
    for n in c:  # the record replicates, and says it was for n1 only
        copy = c.wait_deployment(n, body["deployment_id"])
        assert copy["replicated"] is False and copy["expected_nodes"] == ["n1"]
    assert c["n1"].active_release("local") == body["deployment_id"]
    assert c["n2"].active_release("local") == base["deployment_id"]
    assert c["n3"].active_release("local") == base["deployment_id"]
    assert c["n2"].blob_files(sha256(component(v="only-n1"))) == []


def test_drop_component_removes_it_on_every_node(shared_cluster: Cluster) -> None:
    c = shared_cluster
    code, body = c.deploy(c["n3"], "gone", component(v="g"))
    assert code == 200, body
    c.wait_everywhere(body["deployment_id"])  # n1 must know the deploy it is asked to undo
    assert all(n.active_release("gone") == body["deployment_id"] for n in c)
    dropped = c["n1"].ok("drop_component", project="gone")
    assert dropped["message"] == "Successfully dropped: gone"
    wait_for(
        lambda: all(n.active_release("gone") is None for n in c),
        timeout_s=30,
        what="the component to be gone everywhere",
    )
    for n in c:
        comps = n.ok("get_components")["components"]
        assert "gone" not in [p["project"] for p in comps]


def test_dropping_a_payload_frees_it_on_every_node(shared_cluster: Cluster) -> None:
    c = shared_cluster
    first_payload = component(v="free-1", **{"pad.txt": "p" * 20_000})
    code, first = c.deploy(c["n1"], "free", first_payload)
    assert code == 200, first
    code, second = c.deploy(c["n1"], "free", component(v="free-2"))
    assert code == 200, second
    c.wait_everywhere(second["deployment_id"])  # so n2 knows `first` is no longer the active
    digest = sha256(first_payload)
    assert all(len(n.blob_files(digest)) == 1 for n in c)
    answer = c["n2"].ok("delete_deployment_payload", deployment_id=first["deployment_id"])
    assert answer["freed_bytes"] == len(first_payload)
    wait_for(
        lambda: all(n.blob_files(digest) == [] for n in c),
        timeout_s=30,
        what="every node to free the blob",
    )
    for n in c:
        copy = c.wait_deployment(
            n, first["deployment_id"], lambda d: d["payload_blob_present"] is False
        )
        assert copy["status"] == "success"  # the record stays, only the bytes go


def test_a_node_that_does_not_answer_in_time_fails_the_deploy_and_nothing_activates(
    make_cluster: Any,
) -> None:
    c = make_cluster(3).start()
    code, before = c.deploy(c["n1"], "slow", component(v="before"))
    assert code == 200, before
    c.wait_everywhere(before["deployment_id"])
    c["n3"].stop()
    c.wait_peer_state(c["n1"], "n3", "disconnected")
    code, body = c.deploy(c["n1"], "slow", component(v="after"), deployment_timeout=2000)
    assert code == 504, body
    assert body["code"] == "deployment_timeout" and body["failed_nodes"] == ["n3"]
    record = c.wait_deployment(c["n2"], body["deployment_id"])
    assert record["status"] == "failed" and record["error"]["code"] == "deployment_timeout"
    # n2 staged the release but never switched to it; neither did the origin.
    assert c["n1"].active_release("slow") == before["deployment_id"]
    assert c["n2"].active_release("slow") == before["deployment_id"]
