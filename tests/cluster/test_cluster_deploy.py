"""Cluster deploys across three real node processes with real mutual TLS.

Also ``cairn demo --exit-after-deploy`` and ``cairn cluster up`` as real foreground
programs: they start their own nodes, and the tests stop them whatever happens.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cluster_harness import Cluster, sha256, tree_bytes
from helpers import component
from procs import wait_for

from node.cli.local.layout import plan_cluster
from node.cli.local.processes import ClusterError, LocalCluster, ports_in_use
from node.cli.root import cli

pytestmark = pytest.mark.cluster

SAME = ("payload_hash", "payload_size", "status", "peer_results", "expected_nodes", "origin_node")


def _same_everywhere(c: Cluster, deployment_id: str) -> dict[str, Any]:
    """Wait until every node holds the same terminal record; return it."""

    def agreed() -> dict[str, Any] | None:
        copies = [n.deployment(deployment_id) for n in c.running]
        if any(d is None or d["status"] not in ("success", "failed") for d in copies):
            return None
        views = [{k: d[k] for k in SAME} for d in copies if d is not None]
        return views[0] if all(v == views[0] for v in views) else None

    return dict(wait_for(agreed, timeout_s=30, interval_s=0.1, what="the same record everywhere"))


def test_a_three_node_deploy_leaves_the_same_record_bytes_and_one_blob(
    shared_cluster: Cluster,
) -> None:
    c = shared_cluster
    data = random.Random(7).randbytes(300_000)
    payload = component(
        install="echo building; printf built > built.txt",
        check="test -s built.txt && echo checked",
        **{"data.bin": data.hex()},
    )
    code, body = c.deploy(c["n2"], "app3", payload)  # any node can be the origin
    assert code == 200, body
    assert body["message"] == "Successfully deployed: app3"
    assert [(r["node"], r["status"]) for r in body["peer_results"]] == [
        ("n1", "active"),
        ("n2", "active"),
        ("n3", "active"),
    ]
    record = _same_everywhere(c, body["deployment_id"])
    assert record["status"] == "success" and record["origin_node"] == "n2"
    assert record["payload_hash"] == sha256(payload)
    assert record["expected_nodes"] == ["n1", "n2", "n3"]

    trees = {n.name: n.current_files("app3") for n in c}
    assert trees["n1"]["built.txt"] == b"built"
    assert trees["n1"]["data.bin"] == data.hex().encode()
    assert trees["n1"] == trees["n2"] == trees["n3"]
    assert {n.active_release("app3") for n in c} == {body["deployment_id"]}
    for n in c:
        files = n.blob_files(record["payload_hash"])
        assert len(files) == 1, f"{n.name} holds {files}"
        assert files[0].parent.parent.name == "sha256"
        assert files[0].read_bytes() == payload
        copy = n.deployment(body["deployment_id"])
        assert copy is not None and copy["payload_blob_present"] is True


def test_a_blob_a_node_already_has_is_never_sent_again(shared_cluster: Cluster) -> None:
    """Deploying the same bytes again (another project, another origin) moves no blob."""
    c = shared_cluster
    payload = component(v="dedupe", **{"pad.txt": "x" * 50_000})
    code, body = c.deploy(c["n1"], "dedupe-a", payload)
    assert code == 200, body
    _same_everywhere(c, body["deployment_id"])
    received = {n.name: n.status()["blob_bytes_received"] for n in c}
    code, again = c.deploy(c["n3"], "dedupe-b", payload)
    assert code == 200, again
    record = _same_everywhere(c, again["deployment_id"])
    assert record["payload_hash"] == sha256(payload)
    assert {n.name: n.status()["blob_bytes_received"] for n in c} == received
    for n in c:
        assert len(n.blob_files(sha256(payload))) == 1


def test_progress_streams_from_a_node_that_is_not_the_origin(shared_cluster: Cluster) -> None:
    """SSE ``get_deployment`` on n3 replays the events the origin n1 wrote, with peers."""
    import base64
    import urllib.request

    from node.cli.local.live_deploy import read_sse

    c = shared_cluster
    code, body = c.deploy(c["n1"], "sse", component())
    assert code == 200, body
    _same_everywhere(c, body["deployment_id"])
    req = urllib.request.Request(
        c["n3"].url + "/",
        data=json.dumps(
            {"operation": "get_deployment", "deployment_id": body["deployment_id"]}
        ).encode(),
        headers={
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "Authorization": "Basic " + base64.b64encode(b"admin:admin-password-1").decode(),
        },
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        events = list(read_sse(resp))
    names = [e for e, _ in events]
    assert names[0] == "deployment" and names[-1] == "done"
    assert "finished" in names
    peers = {(d["node"], d["status"]) for e, d in events if e == "peer"}
    assert {("n1", "active"), ("n2", "active"), ("n3", "active")} <= peers


# -- cairn demo / cairn cluster up as programs ----------------------------------------


def _free_base(tmp_path: Path, count: int) -> int:
    """A base port whose admin and peer ranges are free, below Linux's ephemeral ports."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 32500)
        if not ports_in_use(plan_cluster(tmp_path, count, base_port=base)):
            return base
    raise AssertionError("no free port range found")


class _Program:
    """A ``cairn`` foreground program whose output goes to a file; always stopped."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}.txt"
        with self.out.open("wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_output(self, needle: str, timeout_s: float = 60.0) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and needle not in self.text():
                raise AssertionError(f"exited {self.proc.returncode}:\n{self.text()}")
            return needle in self.text()

        wait_for(seen, timeout_s=timeout_s, interval_s=0.1, what=repr(needle))

    def finish(self, timeout_s: float) -> int:
        """Wait for the program to exit by itself; its output is in any failure."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            logs = "".join(
                f"\n===== {log} =====\n{log.read_text(errors='replace')[-4000:]}"
                for log in sorted(self.out.parent.rglob("node.log"))
            )
            raise AssertionError(
                f"still running after {timeout_s} s:\n{self.text()}{logs}"
            ) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def program(tmp_path: Path) -> Iterator[Any]:
    started: list[_Program] = []

    def start(*args: str, env: dict[str, str] | None = None) -> _Program:
        p = _Program(tmp_path, *args, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.mark.timeout(300)
def test_demo_tells_the_v1_v2_rolling_v3_rolled_back_story(tmp_path: Path, program: Any) -> None:
    root = tmp_path / "demo"
    base = _free_base(tmp_path, 3)
    demo = program("demo", "--dir", str(root), "--base-port", str(base), "--exit-after-deploy")
    assert demo.finish(270) == 0, demo.text()
    out = demo.text()
    assert "cluster ready: 3 nodes, all connected" in out
    assert f"n1  http://127.0.0.1:{base}" in out
    v1, v2, v3 = out.split("\n== ")[1:4]
    for part in (v1, v2):
        for name in ("n2", "n3"):
            for status in ("staged", "active"):
                assert re.search(rf"^peer\s+{name} {status}\b", part, re.M), (name, status)
        assert re.search(r"^finished\s+success$", part, re.M)
        assert "Successfully deployed: hello (3/3 nodes active" in part
    assert v2.startswith("v2 with a rolling restart")
    assert re.search(r"^finished\s+rolled_back$", v3, re.M)
    assert "rolled back as expected" in v3
    for i, name in enumerate(("n1", "n2", "n3")):
        assert f"{name}  http://127.0.0.1:{base + 200 + i}/  (serving 2)" in out
    assert "n1 stopped; n2 stopped; n3 stopped" in out
    releases = set()
    for name in ("n1", "n2", "n3"):
        current = root / name / "data" / "components" / "hello" / "current"
        releases.add(current.resolve().name)
        files = tree_bytes(current)
        assert b"Hello again, version" in files["build/index.html"]
    assert len(releases) == 1  # every node back on v2
    password = (root / "admin-password").read_text().strip()
    assert f"admin password: {password}" in out


@pytest.mark.timeout(150)
def test_cluster_up_serves_until_signalled_and_reuses_its_directory(
    tmp_path: Path, program: Any
) -> None:
    root = tmp_path / "c"
    base = _free_base(tmp_path, 2)
    env = {"CAIRN_ADMIN_PASSWORD": "pw-from-env-123"}
    up = program("cluster", "up", "--nodes", "2", "--dir", str(root), "--base-port", str(base),
                 env=env)  # fmt: skip
    up.wait_output("Ctrl-C stops every node.")
    assert "admin password: the value of CAIRN_ADMIN_PASSWORD" in up.text()
    assert not (root / "admin-password").exists()
    result = CliRunner().invoke(
        cli, ["cluster", "status", "--dir", str(root), "--password", "pw-from-env-123"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("connected") == 2
    up.proc.send_signal(signal.SIGINT)
    assert up.finish(30) == 0, up.text()
    assert "SIGINT: stopping 2 nodes" in up.text() and "n1 stopped; n2 stopped" in up.text()

    again = program("cluster", "up", "--nodes", "2", "--dir", str(root), "--base-port",
                    str(base), env=env)  # fmt: skip
    again.wait_output("Ctrl-C stops every node.")
    assert "0 file(s) created, 5 reused" in again.text()
    again.proc.send_signal(signal.SIGTERM)
    assert again.finish(30) == 0, again.text()
    assert "n1 stopped; n2 stopped" in again.text()


def test_waiting_for_connections_names_the_node_that_did_not_connect(tmp_path: Path) -> None:
    """n3 runs alone (no peer channel): n1 and n2 never see it connected."""
    layout = plan_cluster(tmp_path, 3, base_port=_free_base(tmp_path, 3))
    from node.cli.local.layout import materialize

    materialize(layout)
    n3 = layout.node("n3")
    n3.config_path.write_text(
        f'[node]\nname = "n3"\ndata_dir = "data"\n[admin]\nport = {n3.admin_port}\n'
    )
    nodes = LocalCluster(layout, password="pw-123456")
    try:
        nodes.start()
        with pytest.raises(ClusterError) as err:
            nodes.wait_ready(timeout_s=30)
        assert str(err.value).startswith("node n1 did not connect to its peers within 30 s (n3: ")
        assert str(layout.node("n1").log_path) in str(err.value)
    finally:
        ends = nodes.stop()
    assert [e.returncode for e in ends] == [0, 0, 0]


def test_a_node_that_cannot_start_is_named_with_its_own_error(tmp_path: Path) -> None:
    from node.cli.local.layout import materialize

    layout = plan_cluster(tmp_path, 2, base_port=_free_base(tmp_path, 2))
    materialize(layout)
    n2 = layout.node("n2").config_path
    n2.write_text('log_level = "loud"\n' + n2.read_text())
    nodes = LocalCluster(layout, password="pw-123456")
    try:
        nodes.start()
        with pytest.raises(ClusterError) as err:
            nodes.wait_ready(timeout_s=20)
    finally:
        nodes.stop()
    assert err.value.exit_code == 2
    assert str(err.value) == (
        "node n2 exited with code 2 while starting: log_level 'loud' is not one of debug, "
        f"info, warning, error (log: {layout.node('n2').log_path})"
    )


def test_metrics_report_each_peer_connected(make_cluster: Any) -> None:
    import urllib.request

    c = make_cluster(3).start()
    with urllib.request.urlopen(f"{c['n1'].url}/metrics", timeout=10) as r:
        text = r.read().decode()
    for peer in ("n2", "n3"):
        assert f'cairn_peer_connected{{peer="{peer}"}} 1.0' in text
        assert f'cairn_peer_lag_changes{{peer="{peer}"}}' in text
    c["n3"].stop()
    c.wait_peer_state(c["n1"], "n3", "disconnected")
    with urllib.request.urlopen(f"{c['n1'].url}/metrics", timeout=10) as r:
        assert 'cairn_peer_connected{peer="n3"} 0.0' in r.read().decode()
