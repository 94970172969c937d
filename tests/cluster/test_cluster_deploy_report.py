"""What an operator is told about a cluster deploy, on three real node processes (real
TLS): a peer's hook output and failure reported against that peer, ``CAIRN_NODE`` in
hooks, and Harper's qa701 payload shapes (issue 7, items 5 and 6).
"""

from __future__ import annotations

import base64
import json
import urllib.request
from typing import Any

import pytest
from cluster_harness import ADMIN_PASSWORD, ADMIN_USER, Cluster, ClusterNode, sha256
from helpers import component
from procs import wait_for

from node.cli.local.live_deploy import read_sse

pytestmark = pytest.mark.cluster

#: The install hook fails only where the node's data dir holds this file (a release
#: lives in ``<data>/components/<project>/releases/<id>``, four levels below it).
FAIL_INSTALL = "fail-install"
INSTALL = (
    'echo "install on $CAIRN_NODE"; '
    f'if test -e "$CAIRN_RELEASE_DIR/../../../../{FAIL_INSTALL}"; then '
    'echo "cannot build on $CAIRN_NODE" >&2; exit 7; fi; echo built'
)
CHECK = 'echo "check on $CAIRN_NODE"'


def _deploy_streamed(node: ClusterNode, project: str, payload: bytes) -> list[tuple[str, Any]]:
    """``deploy_component`` with ``Accept: text/event-stream``: every event, in order."""
    body = {"operation": "deploy_component", "project": project,
            "payload": base64.b64encode(payload).decode()}  # fmt: skip
    token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
    req = urllib.request.Request(
        node.url + "/",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream",
                 "Authorization": f"Basic {token}"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as resp:
        return list(read_sse(resp))


def test_a_peer_failing_its_install_hook_is_named_with_its_output(
    shared_cluster: Cluster,
) -> None:
    c = shared_cluster
    n1, n3 = c["n1"], c["n3"]
    marker = n3.data_dir / FAIL_INSTALL
    marker.write_text("the install hook fails on this node\n")
    try:
        events = _deploy_streamed(n1, "hooks", component(install=INSTALL, check=CHECK, v="1"))
    finally:
        marker.unlink()
    name, end = events[-1]
    assert name == "error", events[-3:]
    assert end["code"] == "install_failed" and end["failed_nodes"] == ["n3"], end
    assert "n3" in end["error"], end
    deployment_id = end["deployment_id"]

    # The live stream: the origin's own hook lines, then the peer's, labelled with it.
    installs = [d for e, d in events if e == "install"]
    assert {"stream": "stdout", "line": "install on n1"} in installs
    assert {"stream": "stdout", "line": "check on n1"} in installs
    from_n3 = [d for d in installs if d.get("node") == "n3"]
    assert {"node": "n3", "hook": "install", "stream": "stderr",
            "line": "cannot build on n3"} in from_n3, installs  # fmt: skip
    assert {"node": "n3", "hook": "install", "stream": "stdout",
            "line": "install on n3"} in from_n3  # fmt: skip
    assert not [d for d in installs if d.get("node") not in (None, "n2", "n3")]
    peers = {(d["node"], d["status"]) for e, d in events if e == "peer"}
    assert ("n3", "failed") in peers and ("n1", "failed") not in peers, peers

    # The record, on any node: the failure is n3's; the origin threw its part away.
    for n in c:
        record = c.wait_deployment(n, deployment_id)
        assert record["status"] == "failed"
        assert record["error"]["code"] == "install_failed"
        assert record["error"]["node"] == "n3", record["error"]
        results = {r["node"]: r for r in record["peer_results"]}
        assert results["n1"]["status"] == "discarded", results["n1"]
        assert results["n1"]["error"] is None
        assert results["n3"]["status"] == "failed"
        assert results["n3"]["error"]["code"] == "install_failed"
        output = results["n3"]["install_output"]
        assert {"hook": "install", "stream": "stderr", "line": "cannot build on n3"} in output[
            "lines"
        ], output
        assert {"hook": "install", "stream": "stdout", "line": "install on n3"} in output["lines"]
        assert not any(x["line"] == "check on n3" for x in output["lines"])  # never ran


def test_hooks_get_their_node_name_on_every_node(shared_cluster: Cluster) -> None:
    c = shared_cluster
    code, body = c.deploy(c["n2"], "hooks-env", component(install=INSTALL, check=CHECK, v="2"))
    assert code == 200, body
    record = c["n2"].ok("get_deployment", deployment_id=body["deployment_id"])
    lines = [e["data"]["line"] for e in record["event_log"] if e["event"] == "install"]
    assert "install on n2" in lines and "check on n2" in lines
    for r in record["peer_results"]:
        if r["node"] == "n2":
            continue
        seen = {(x["hook"], x["line"]) for x in (r["install_output"] or {"lines": []})["lines"]}
        assert ("install", f"install on {r['node']}") in seen, r
        assert ("check", f"check on {r['node']}") in seen, r


def test_deleting_the_running_deploys_payload_frees_it_and_the_release_keeps_serving(
    shared_cluster: Cluster,
) -> None:
    c = shared_cluster
    payload = component(v="qa701", **{"pad.txt": "q" * 30_000})
    code, body = c.deploy(c["n1"], "qa701", payload)
    assert code == 200, body
    running = body["deployment_id"]
    c.wait_everywhere(running)
    files = {n.name: n.current_files("qa701") for n in c}
    code, answer = c["n2"].op("delete_deployment_payload", deployment_id=running)
    assert code == 200, answer
    assert answer["deployment_id"] == running
    assert answer["freed_bytes"] == len(payload)
    assert running in answer["warning"] and "converge" in answer["warning"]
    for n in c:
        wait_for(lambda n=n: n.blob_files(sha256(payload)) == [], timeout_s=30,
                 what=f"{n.name} to free the payload")  # fmt: skip
        copy = c.wait_deployment(n, running, lambda d: d["payload_blob_present"] is False)
        assert copy["status"] == "success"
        assert n.active_release("qa701") == running
        assert n.current_files("qa701") == files[n.name]
        comp = next(p for p in n.ok("get_components")["components"] if p["project"] == "qa701")
        assert comp["deployment_id"] == running and comp["desired_deployment_id"] == running
    again = c["n3"].ok("delete_deployment_payload", deployment_id=running)
    assert again["freed_bytes"] == 0  # idempotent
    code, gone = c["n1"].op("get_deployment_payload", deployment_id=running)
    assert code == 410 and gone["code"] == "payload_gone", gone


@pytest.mark.xfail(
    strict=True,
    reason="the node still validates deployment_id as a UUID and answers 400; another "
    "engineer makes any string a lookup (SPEC 4: 404 naming it)",
)
@pytest.mark.parametrize("operation", ["get_deployment", "delete_deployment_payload"])
def test_an_unknown_deployment_id_is_a_404_naming_it(
    shared_cluster: Cluster, operation: str
) -> None:
    code, body = shared_cluster["n1"].op(operation, deployment_id="qa701-never-existed")
    assert code == 404, body
    assert "qa701-never-existed" in body["error"], body
