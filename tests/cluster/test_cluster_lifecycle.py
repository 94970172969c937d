"""The deploy lifecycle on three real node processes with real TLS (issue 7, "What it
must show"): supervised ``[run]`` services (deploy, a rolling restart checked by polling
every node's service, automatic rollback, a node SIGKILLed under its running component),
and what a deploy reports (a peer's hook output and failure reported against that peer,
``CAIRN_NODE`` in hooks, Harper's qa701 payload shapes).

One cluster serves the module; each node gives the service its own port through
``[components] env = ["PORT=..."]``. The service tests run in order and build on the
release the one before left serving (each reads it back rather than assuming it).
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from cluster_harness import ADMIN_PASSWORD, ADMIN_USER, Cluster, ClusterNode, free_ports, sha256
from helpers import component
from lifecycle_util import (
    MARKER,
    Poller,
    group_exists,
    group_members,
    group_states,
    http_json,
    service_component,
)
from procs import wait_for

from node.cli.local.live_deploy import read_sse

pytestmark = pytest.mark.cluster

PROJECT = "svc"

#: The install hook fails only where the node's data dir holds this file (a release
#: lives in ``<data>/components/<project>/releases/<id>``, four levels below it).
FAIL_INSTALL = "fail-install"
INSTALL = (
    'echo "install on $CAIRN_NODE"; '
    f'if test -e "$CAIRN_RELEASE_DIR/../../../../{FAIL_INSTALL}"; then '
    'echo "cannot build on $CAIRN_NODE" >&2; exit 7; fi; echo built'
)
CHECK = 'echo "check on $CAIRN_NODE"'


class Services:
    """The module's cluster and the port each node's service listens on."""

    def __init__(self, cluster: Cluster, ports: dict[str, int]) -> None:
        self.c = cluster
        self.ports = ports

    def version(self, node: ClusterNode) -> dict[str, Any] | None:
        return http_json(f"http://127.0.0.1:{self.ports[node.name]}/version")

    def serving(self) -> dict[str, str | None]:
        """What each node's service answers now (deployment id, or None)."""
        out = {}
        for n in self.c:
            body = self.version(n)
            out[n.name] = body["deployment_id"] if body else None
        return out

    def wait_serving(self, deployment_id: str, timeout_s: float = 60.0) -> None:
        wait_for(lambda: set(self.serving().values()) == {deployment_id}, timeout_s=timeout_s,
                 interval_s=0.1, what=f"every node to serve {deployment_id}")  # fmt: skip

    def desired(self) -> str:
        """The project's active deploy (the one every node should serve)."""
        comps = self.c["n1"].ok("get_components")["components"]
        entry = next(p for p in comps if p["project"] == PROJECT)
        return str(entry["desired_deployment_id"])


@pytest.fixture(scope="module")
def svc(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    names = ["n1", "n2", "n3"]
    ports = dict(zip(names, free_ports(3), strict=True))
    node_toml = {
        name: f'[components]\nenv = ["PORT={port}"]\nstop_grace_s = 3\nrestart_min_s = 0.2\n'
        for name, port in ports.items()
    }
    c = Cluster(tmp_path_factory.mktemp("services"), 3, node_toml=node_toml)
    failed_before = request.session.testsfailed
    try:
        c.start(timeout_s=90)
        yield Services(c, ports)
    finally:
        c.stop()
        if request.session.testsfailed != failed_before:
            print(c.logs())


@pytest.fixture(scope="module")
def v1(svc: Services) -> str:
    """The first release, deployed with the default restart (everywhere at once)."""
    code, body = svc.c.deploy(svc.c["n1"], PROJECT, service_component("v1"))
    assert code == 200, body
    return str(body["deployment_id"])


def test_a_run_service_answers_on_every_node_with_the_new_release(svc: Services, v1: str) -> None:
    c = svc.c
    # Success means every node's new process passed its readiness check: no waiting here.
    for n in c:
        body = svc.version(n)
        assert body is not None, f"{n.name} does not serve"
        assert (body["deployment_id"], body["node"], body["version"]) == (v1, n.name, "v1")
        comp = next(p for p in n.ok("get_components")["components"] if p["project"] == PROJECT)
        assert comp["deployment_id"] == v1
        mine = next(x for x in comp["nodes"] if x["node"] == n.name)
        process = mine["process"]
        assert process["running"] is True and process["ready"] is True
        assert process["pid"] == body["pid"] and process["deployment_id"] == v1
    record = c["n2"].ok("get_deployment", deployment_id=v1)
    assert record["status"] == "success" and record["restart_mode"] in ("immediate", None)


def test_a_rolling_deploy_never_has_more_than_one_node_not_serving(svc: Services, v1: str) -> None:
    c = svc.c
    before = svc.desired()
    svc.wait_serving(before)
    with Poller(svc.ports) as poller:
        wait_for(lambda: all(poller.of(n) for n in svc.ports), timeout_s=10,
                 what="a first poll of every node")  # fmt: skip
        code, body = c.deploy(c["n2"], PROJECT, service_component("v2"), restart="rolling")
        assert code == 200, body
        v2 = body["deployment_id"]
        # Success: every node serves v2; one more poll of each proves the poller saw it.
        end = time.monotonic()
        wait_for(lambda: all(any(s.start > end for s in poller.of(n)) for n in svc.ports),
                 timeout_s=10, what="a poll of every node after the deploy")  # fmt: skip
    assert body["peer_results"] and {r["status"] for r in body["peer_results"]} == {"active"}
    both = poller.outages_overlapping()
    assert not both, f"two nodes not serving at once: {both[:3]}"
    for node in svc.ports:
        seen = [s.deployment_id for s in poller.of(node)]
        assert set(seen) <= {before, v2, None}, (node, set(seen))
        served = [x for x in seen if x is not None]
        # The poller watched the switch itself on every node: before first, then v2 only.
        assert served[0] == before and served[-1] == v2, (node, served[0], served[-1])
        first_new = served.index(v2)
        assert set(served[first_new:]) == {v2}, f"{node} went back to {before}"
    assert svc.serving() == {n: v2 for n in svc.ports}


def _rolled_back(svc: Services, payload: bytes, *, origin: str) -> tuple[str, dict[str, Any]]:
    """Deploy a release that cannot become ready; returns (previous id, terminal record)."""
    c = svc.c
    before = svc.desired()
    svc.wait_serving(before)
    code, body = c.deploy(c[origin], PROJECT, payload)
    assert code == 422, body
    assert body["code"] == "not_ready", body
    # The answer comes once every node the deploy reached is back: nobody serves it now.
    assert svc.serving() == {n: before for n in svc.ports}
    record = c[origin].ok("get_deployment", deployment_id=body["deployment_id"])
    assert record["status"] == "rolled_back", record
    on_it = [r["node"] for r in record["peer_results"] if r["status"] in ("active", "activating")]
    assert on_it == [], record["peer_results"]
    return before, record


def _previous_everywhere(svc: Services, before: str, failed: str) -> None:
    svc.wait_serving(before)
    c = svc.c
    for n in c:
        wait_for(lambda n=n: n.active_release(PROJECT) == before, timeout_s=30,
                 what=f"{n.name} to be back on {before}")  # fmt: skip
        copy = c.wait_deployment(n, failed)
        assert copy["status"] == "rolled_back"
    assert svc.desired() == before


def test_a_release_that_exits_at_once_on_one_node_is_rolled_back_everywhere(
    svc: Services, v1: str
) -> None:
    c = svc.c
    marker = c["n3"].data_dir / MARKER
    marker.write_text("this node's v3 exits at once\n")
    try:
        payload = service_component("v3", mode="exit-where-marked")
        before, record = _rolled_back(svc, payload, origin="n1")
    finally:
        marker.unlink()
    err = record["error"]
    assert err["code"] == "not_ready" and err["node"] == "n3", err
    assert "exited" in err["message"] and "status 3" in err["message"], err
    _previous_everywhere(svc, before, record["deployment_id"])
    # Each node says what it did: n3 failed; a node that had switched says it went back.
    results = {r["node"]: r for r in record["peer_results"]}
    assert results["n3"]["status"] == "failed"
    assert results["n3"]["error"]["code"] == "not_ready"
    assert {results[n]["status"] for n in ("n1", "n2")} <= {"rolled_back", "discarded", "staged"}


def test_a_release_that_never_becomes_ready_is_rolled_back_everywhere(
    svc: Services, v1: str
) -> None:
    payload = service_component("v4", mode="never-ready", ready_timeout_s=2)
    before, record = _rolled_back(svc, payload, origin="n2")
    err = record["error"]
    assert err["code"] == "not_ready" and err["node"] in svc.ports, err
    assert "ready" in err["message"], err
    _previous_everywhere(svc, before, record["deployment_id"])


def test_a_node_killed_under_its_component_restarts_it_once_with_no_orphan(
    svc: Services, v1: str
) -> None:
    c = svc.c
    n2 = c["n2"]
    running = svc.desired()
    svc.wait_serving(running)
    old = svc.version(n2)
    assert old is not None
    old_pid = int(old["pid"])
    old_pgid = os.getpgid(old_pid)
    assert old_pgid == old_pid  # the run process leads a group of its own
    killed_at_ms = int(time.time() * 1000)
    n2.kill()
    # The node is gone; its component is not (an orphan only the next start can stop).
    assert group_members(old_pgid) == [old_pid]
    n2.start()
    wait_for(lambda: (svc.version(n2) or {}).get("pid") not in (None, old_pid), timeout_s=60,
             what="n2's component to be restarted")  # fmt: skip
    c.wait_connected()
    new = svc.version(n2)
    assert new is not None and new["deployment_id"] == running
    # os.killpg(old group, 0) fails, or finds zombies only (where PID 1 does not reap).
    assert group_members(old_pgid) == [], "the old process group outlived the restart"
    if group_exists(old_pgid):
        assert group_states(old_pgid) <= {"Z"}, group_states(old_pgid)

    def process() -> dict[str, Any] | None:
        comps = n2.ok("get_components")["components"]
        entry = next(p for p in comps if p["project"] == PROJECT)
        mine = next((x for x in entry["nodes"] if x["node"] == "n2"), None)
        p = mine and mine["process"]
        return p if p and p.get("pid") == new["pid"] and p.get("ready") else None

    state = wait_for(process, timeout_s=30, what="n2 to report its new process")
    assert state["running"] is True and state["restarts"] == 0
    logs = n2.ok("get_component_logs", project=PROJECT, lines=10_000)["lines"]
    started = [x["line"] for x in logs if x["stream"] == "cairn" and x["t"] >= killed_at_ms
               and x["line"].startswith("started pid")]  # fmt: skip
    assert started == [f"started pid {new['pid']} for release {running}"], started


# -- what a deploy reports ---------------------------------------------------------------


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
    svc: Services,
) -> None:
    c = svc.c
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


def test_hooks_get_their_node_name_on_every_node(svc: Services) -> None:
    c = svc.c
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
    svc: Services,
) -> None:
    c = svc.c
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


@pytest.mark.parametrize("operation", ["get_deployment", "delete_deployment_payload"])
def test_an_unknown_deployment_id_is_a_404_naming_it(svc: Services, operation: str) -> None:
    code, body = svc.c["n1"].op(operation, deployment_id="qa701-never-existed")
    assert code == 404, body
    assert "qa701-never-existed" in body["error"], body
