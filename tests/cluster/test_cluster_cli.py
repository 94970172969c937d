"""``cairn cert``, the local cluster layout, ``cairn cluster up/status`` without peers, and
every client command as a real subprocess against a real 3-node cluster.

The first part needs no replication: certificates, configs and ports are checked as files
and values, and the node that refuses a certificate for another name is a real process.
The second part shares one cluster (real mutual TLS between the nodes) for the module.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cluster_harness import Cluster, ClusterNode
from cryptography import x509
from procs import ADMIN_PASSWORD, ADMIN_USER, NodeProcess, free_port, wait_for

from node.cli.local.layout import (
    DEFAULT_BASE_PORT,
    admin_password,
    config_fits,
    materialize,
    plan_cluster,
    plan_cluster_ports,
    render_node_config,
)
from node.cli.local.processes import not_connected, ports_in_use
from node.cli.root import cli
from node.cli.status import format_age, format_bytes, render_status, status_targets
from node.config import load_config, parse_config
from replication.tls import check_node_credentials, init_ca, node_name_from_cert


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# -- cairn cert -----------------------------------------------------------------------


def test_init_ca_creates_a_private_key_and_reuses_it(tmp_path: Path) -> None:
    code, out, _ = run("cert", "init-ca", "--dir", str(tmp_path / "ca"))
    assert code == 0, out
    assert "created a CA" in out and "cluster id:" in out
    pem, key = tmp_path / "ca" / "ca.pem", tmp_path / "ca" / "ca.key"
    assert _mode(key) == 0o600
    ca = _cert(pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    before = (pem.read_bytes(), key.read_bytes())
    code, out, _ = run("cert", "init-ca", "--dir", str(tmp_path / "ca"))
    assert code == 0 and "reused the CA" in out
    assert (pem.read_bytes(), key.read_bytes()) == before


def test_issue_names_the_node_and_hosts_with_short_validity(tmp_path: Path) -> None:
    ca_dir, out_dir = tmp_path / "ca", tmp_path / "certs"
    init_ca(ca_dir)
    code, out, err = run(
        "cert", "issue", "--ca-dir", str(ca_dir), "--node", "n7",
        "--host", "127.0.0.7", "--host", "node7.example", "--out-dir", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    cert_path, key_path = out_dir / "n7.pem", out_dir / "n7.key"
    assert str(cert_path) in out and str(key_path) in out
    assert _mode(key_path) == 0o600
    cert = _cert(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.7") in san.get_values_for_type(x509.IPAddress)
    assert {"node7.example", "n7"} <= set(san.get_values_for_type(x509.DNSName))
    assert "urn:cairn:node:n7" in san.get_values_for_type(x509.UniformResourceIdentifier)
    assert node_name_from_cert(cert_path.read_bytes()) == "n7"
    validity = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=29) < validity <= timedelta(days=30)
    check_node_credentials(cert_path, key_path, ca_dir / "ca.pem", "n7")
    # The CA key stays where it was: nothing of the CA is written next to the node's files.
    assert sorted(p.name for p in out_dir.iterdir()) == ["n7.key", "n7.pem"]


def test_issue_reuses_a_good_certificate_unless_forced(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir)
    args = ("cert", "issue", "--ca-dir", str(ca_dir), "--node", "n1", "--host", "127.0.0.1",
            "--out-dir", str(tmp_path), "--days", "2")  # fmt: skip
    assert run(*args)[0] == 0
    first = (tmp_path / "n1.pem").read_bytes()
    validity = _cert(tmp_path / "n1.pem").not_valid_after_utc - datetime.now(UTC)
    assert validity <= timedelta(days=2)
    assert run(*args)[0] == 0
    assert (tmp_path / "n1.pem").read_bytes() == first
    assert run(*args, "--force")[0] == 0
    assert (tmp_path / "n1.pem").read_bytes() != first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--node", "-bad", "--host", "127.0.0.1"), "node name '-bad' is not valid"),
        (("--node", "n1", "--host", "a b"), "neither an IP address nor a DNS name"),
    ],
)
def test_issue_refuses_bad_input_in_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    init_ca(tmp_path / "ca")
    code, _, err = run("cert", "issue", "--ca-dir", str(tmp_path / "ca"), *args,
                       "--out-dir", str(tmp_path))  # fmt: skip
    assert code == 1
    assert message in err and err.startswith("cairn: ") and err.count("\n") == 1


def test_issue_without_a_ca_says_so(tmp_path: Path) -> None:
    code, _, err = run("cert", "issue", "--ca-dir", str(tmp_path / "nope"), "--node", "n1",
                       "--host", "127.0.0.1", "--out-dir", str(tmp_path))  # fmt: skip
    assert code == 1 and "does not exist" in err and "ca.pem" in err


@pytest.mark.cluster
def test_a_node_refuses_a_certificate_issued_for_another_name(tmp_path: Path) -> None:
    """A real node process with n2's certificate but node.name n1 exits naming both."""
    ca_dir = tmp_path / "ca"
    init_ca(ca_dir)
    run("cert", "issue", "--ca-dir", str(ca_dir), "--node", "n2", "--host", "127.0.0.1",
        "--out-dir", str(tmp_path / "certs"))  # fmt: skip
    node = NodeProcess(
        "n1",
        tmp_path,
        extra_toml=(
            f'[peer]\nhost = "127.0.0.1"\nport = {free_port()}\n'
            f'[tls]\nca = "{ca_dir / "ca.pem"}"\ncert = "{tmp_path / "certs" / "n2.pem"}"\n'
            f'key = "{tmp_path / "certs" / "n2.key"}"\n'
        ),
    )
    node.start(wait=False)
    assert node.wait_exit(30) == 2
    lines = [line for line in node.log().splitlines() if line.strip()]
    assert lines[-1] == (
        f"cairn: certificate {tmp_path / 'certs' / 'n2.pem'} is for node 'n2', "
        "but node.name is 'n1'"
    )


# -- the local cluster layout (pure) --------------------------------------------------


def test_plan_counts_ports_from_the_base(tmp_path: Path) -> None:
    layout = plan_cluster(tmp_path, 3)
    assert [n.name for n in layout.nodes] == ["n1", "n2", "n3"]
    assert [n.admin_port for n in layout.nodes] == [9925, 9926, 9927]
    assert [n.peer_port for n in layout.nodes] == [10025, 10026, 10027]
    assert layout.node("n2").admin_url == "http://127.0.0.1:9926"
    assert layout.node("n3").peer_url == "wss://127.0.0.1:10027"
    shifted = plan_cluster(tmp_path, 2, base_port=20000)
    assert [(n.admin_port, n.peer_port) for n in shifted.nodes] == [(20000, 20100), (20001, 20101)]
    assert layout.node("n1").config_path == tmp_path / "n1" / "cairn.toml"
    assert layout.node("n1").cert == tmp_path / "n1" / "certs" / "n1.pem"
    assert layout.ca_cert == tmp_path / "ca" / "ca.pem"
    assert [p.name for p in layout.peers_of("n2")] == ["n1", "n3"]


@pytest.mark.parametrize(
    ("count", "base", "message"),
    [(0, DEFAULT_BASE_PORT, "between 1 and 99"), (100, DEFAULT_BASE_PORT, "between 1 and 99"),
     (3, 80, "outside 1024-65535"), (3, 65500, "outside 1024-65535")],
)  # fmt: skip
def test_plan_refuses_impossible_clusters(
    tmp_path: Path, count: int, base: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_cluster(tmp_path, count, base_port=base)


def test_plan_refuses_repeated_ports(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must all differ"):
        plan_cluster_ports(tmp_path, [5000, 5001], [5001, 5002])


def test_rendered_config_is_valid_and_fits_the_layout(tmp_path: Path) -> None:
    import tomllib

    layout = plan_cluster(tmp_path, 3, base_port=30000)
    text = render_node_config(layout, "n2", extra_toml="[limits]\ndeployment_timeout_ms = 5000")
    config = parse_config(tomllib.loads(text), base=layout.node("n2").root, env={})
    assert config.node.name == "n2"
    assert config.node.data_dir == tmp_path / "n2" / "data"
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 30001)
    assert config.peer is not None and config.peer.port == 30101
    assert config.tls is not None and config.tls.ca == tmp_path / "n2" / ".." / "ca" / "ca.pem"
    assert [(p.name, p.url) for p in config.peers] == [
        ("n1", "wss://127.0.0.1:30100"),
        ("n3", "wss://127.0.0.1:30102"),
    ]
    assert config.limits.deployment_timeout_ms == 5000
    assert config_fits(config, layout, "n2")
    assert not config_fits(config, plan_cluster(tmp_path, 3, base_port=30010), "n2")
    assert not config_fits(config, plan_cluster(tmp_path, 4, base_port=30000), "n2")


# -- materialize, reuse, passwords ----------------------------------------------------


def test_materialize_creates_everything_then_reuses_it(tmp_path: Path) -> None:
    layout = plan_cluster(tmp_path / "c", 3, base_port=31000)
    done = materialize(layout)
    assert sum(a.startswith(("created", "issued", "wrote")) for a in done) == 7
    for n in layout.nodes:
        assert _mode(n.key) == 0o600
        config = load_config(n.config_path, env={})
        assert config.tls is not None
        check_node_credentials(config.tls.cert, config.tls.key, config.tls.ca, n.name)
        assert n.data_dir.is_dir()
    assert _mode(layout.ca_dir / "ca.key") == 0o600
    assert not any((n.root / "ca.key").exists() for n in layout.nodes)
    snapshot = {p: p.read_bytes() for p in layout.root.rglob("*") if p.is_file()}
    again = materialize(layout)
    assert all(a.startswith("reused") for a in again), again
    assert {p: p.read_bytes() for p in layout.root.rglob("*") if p.is_file()} == snapshot


def test_materialize_keeps_operator_edits_but_rewrites_a_changed_layout(tmp_path: Path) -> None:
    layout = plan_cluster(tmp_path, 2, base_port=32000)
    materialize(layout)
    n1 = layout.node("n1").config_path
    n1.write_text(n1.read_text() + "\n[limits]\ndeployment_timeout_ms = 7000\n")
    assert "reused config " + str(n1) in materialize(layout)
    assert "deployment_timeout_ms = 7000" in n1.read_text()
    bigger = plan_cluster(tmp_path, 3, base_port=32000)
    done = materialize(bigger)
    assert (
        f"rewrote config {n1}" in done and f"wrote config {bigger.node('n3').config_path}" in done
    )
    assert {p.name for p in load_config(n1, env={}).peers} == {"n2", "n3"}
    assert "reused certificate " + str(layout.node("n1").cert) in done


def test_admin_password_from_env_or_generated_once(tmp_path: Path) -> None:
    layout = plan_cluster(tmp_path, 1)
    assert admin_password(layout, {"CAIRN_ADMIN_PASSWORD": "s3cret"}) == (
        "s3cret",
        "CAIRN_ADMIN_PASSWORD",
    )
    assert not layout.password_file.exists()
    password, source = admin_password(layout, {})
    assert source == str(layout.password_file) and len(password) >= 20
    assert _mode(layout.password_file) == 0o600
    assert admin_password(layout, {}) == (password, source)


# -- cairn cluster up / status without peers ------------------------------------------


def _busy_base_port(tmp_path: Path) -> socket.socket:
    """A listening socket whose port, as a base port, is the only busy port of a 2-node
    layout (other processes on this machine may hold the others: try again then)."""
    for _ in range(20):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if port + 101 <= 65535:
            layout = plan_cluster(tmp_path, 2, base_port=port)
            if ports_in_use(layout) == [f"127.0.0.1:{port} (n1 admin port) is in use"]:
                return busy
        busy.close()
    raise AssertionError("no port whose layout is otherwise free")


def test_cluster_up_with_a_port_in_use_says_so_and_exits_2(tmp_path: Path) -> None:
    with _busy_base_port(tmp_path) as busy:
        port = busy.getsockname()[1]
        code, _, err = run("cluster", "up", "--nodes", "2", "--dir", str(tmp_path),
                             "--base-port", str(port))  # fmt: skip
    assert code == 2
    assert err == (
        f"cairn: port 127.0.0.1:{port} (n1 admin port) is in use; "
        "stop what uses it or pick another --base-port\n"
    )
    assert not (tmp_path / "n1").exists()  # nothing was created or started


def test_cluster_up_refuses_a_bad_node_count(tmp_path: Path) -> None:
    code, _, err = run("cluster", "up", "--nodes", "0", "--dir", str(tmp_path))
    assert code == 2 and "--nodes" in err


def test_status_table_and_helpers() -> None:
    now = 1_700_000_000_000
    status = {
        "node": "n1",
        "cluster_id": "0123456789abcdef",
        "peers": [
            {"name": "n2", "url": "wss://127.0.0.1:10026", "state": "connected",
             "last_seen": now - 400, "lag_changes": 0, "lag_bytes": 0, "transfers": [],
             "last_error": None},
            {"name": "n3", "url": "wss://127.0.0.1:10027", "state": "disconnected",
             "last_seen": None, "lag_changes": 12, "lag_bytes": 3 << 20, "transfers": 1,
             "last_error": "connection refused"},
        ],
    }  # fmt: skip
    text = render_status("http://127.0.0.1:9925", status, now_ms=now)
    lines = text.splitlines()
    assert lines[0] == "n1 at http://127.0.0.1:9925  (cluster 0123456789abcdef)"
    assert lines[1].split() == [
        "PEER",
        "STATE",
        "LAST",
        "SEEN",
        "LAG",
        "TRANSFERS",
        "LAST",
        "ERROR",
    ]
    assert lines[2].split() == [
        "n2",
        "connected",
        "0.4s",
        "ago",
        "0",
        "changes,",
        "0",
        "B",
        "0",
        "-",
    ]
    assert lines[3].split()[:3] == ["n3", "disconnected", "never"]
    assert "12 changes, 3.0 MiB" in lines[3] and lines[3].endswith("connection refused")
    assert format_bytes(1536) == "1.5 KiB" and format_age(now - 90_000, now) == "2m ago"
    assert "no peers" in render_status("u", {"node": "n1", "peers": []}, now_ms=now)
    counted = {**status, "blob_bytes_sent": 2048, "blob_bytes_received": 0}
    assert render_status("u", counted, now_ms=now).splitlines()[1] == (
        "  blobs sent 2.0 KiB, received 0 B"
    )


def test_not_connected_names_each_missing_peer() -> None:
    status = {
        "peers": [
            {"name": "n2", "state": "connected"},
            {"name": "n3", "state": "connecting", "last_error": "refused"},
        ]
    }
    assert not_connected(status, {"n2"}) == {}
    assert not_connected(status, {"n2", "n3", "n4"}) == {
        "n3": "connecting, last error: refused",
        "n4": "not listed in cluster_status",
    }


def test_status_targets_prefer_options_then_dir_then_env(tmp_path: Path) -> None:
    layout = plan_cluster(tmp_path, 2, base_port=33000)
    materialize(layout)
    layout.password_file.write_text("pw\n")
    assert status_targets(("http://x:1",), None, {}) == (["http://x:1"], None)
    assert status_targets((), tmp_path, {"CAIRN_TARGET": "http://y:2"}) == (
        ["http://127.0.0.1:33000", "http://127.0.0.1:33001"],
        "pw",
    )
    assert status_targets((), None, {"CAIRN_TARGET": "http://y:2"}) == (["http://y:2"], None)
    assert status_targets((), None, {}) == (["http://127.0.0.1:9925"], None)
    with pytest.raises(ValueError, match="holds no node configs"):
        status_targets((), tmp_path / "n1", {})


@pytest.mark.cluster
def test_cluster_status_against_a_real_single_node(tmp_path: Path) -> None:
    node = NodeProcess("solo", tmp_path).start()
    try:
        env = {"CAIRN_USER": "admin", "CAIRN_PASSWORD": ADMIN_PASSWORD}
        code, out, err = run("cluster", "status", "--target", node.url, env=env)
        assert code == 0, err
        assert out.startswith(f"solo at {node.url}") and "no peers" in out
        code, out, _ = run("cluster", "status", "--target", node.url, "--json", env=env)
        assert code == 0 and json.loads(out)["node"] == "solo"
        code, _, err = run("cluster", "status", "--target", node.url, "-u", "admin",
                           "--password", "wrong")  # fmt: skip
        assert code == 2 and "[unauthorized]: check --user/--password" in err
        closed = f"http://127.0.0.1:{free_port()}"
        code, _, err = run("cluster", "status", "--target", closed, env=env)
        assert code == 1 and f"cannot reach {closed}: connection refused" in err
        code, out, err = run("cluster", "status", "--target", node.url, "--target", closed,
                             "--json", env=env)  # fmt: skip
        assert code == 1 and [a["node"] for a in json.loads(out)] == ["solo"]
    finally:
        node.stop()


# -- every client command, as a subprocess, against a real 3-node cluster ---------------
#
# One cluster for the module (``shared_cluster``); the tests below only add to it (their
# own projects, users and a node they remove again), so they leave it usable.


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    env.update({"CAIRN_USER": ADMIN_USER, "CAIRN_PASSWORD": ADMIN_PASSWORD, **extra})
    return env


def cairn(node: ClusterNode | str, *args: str, **env: str) -> Ran:
    """``cairn ARGS --target NODE`` as a real subprocess."""
    target = node if isinstance(node, str) else node.url
    r = subprocess.run(
        [sys.executable, "-m", "node", *args, "--target", target],
        capture_output=True, text=True, env=cli_env(**env), timeout=120,
    )  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr
    return Ran(r.returncode, r.stdout, r.stderr)


def _component(root: Path, name: str, text: str) -> Path:
    d = root / name
    (d / "app").mkdir(parents=True, exist_ok=True)
    (d / "app" / "index.html").write_text(text)
    return d


@dataclass(frozen=True)
class Deployed:
    """What the module's deploys made: project ``web`` twice, then ``purge`` once."""

    cluster: Cluster
    web_v1: str
    web_v2: str
    purge: str


@pytest.fixture(scope="module")
def deployed(shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    root = tmp_path_factory.mktemp("components")
    n1 = shared_cluster["n1"]
    ids = []
    for project, text in (("web", "v1"), ("web", "v2"), ("purge", "p1")):
        r = cairn(n1, "deploy", str(_component(root, f"{project}-{text}", text)),
                  "--project", project, "--json")  # fmt: skip
        assert r.code == 0, r.err
        ids.append(r.json["deployment_id"])
    for did in ids:
        shared_cluster.wait_everywhere(did, lambda d: d["status"] == "success")
    return Deployed(shared_cluster, *ids)


@pytest.mark.cluster
def test_components_shows_what_runs_where(deployed: Deployed) -> None:
    c = deployed.cluster
    r = cairn(c["n2"], "components", "--json")
    assert r.code == 0, r.err
    answer = r.json
    assert answer["node"] == "n2"
    [web] = [x for x in answer["components"] if x["project"] == "web"]
    assert web["deployment_id"] == deployed.web_v2
    assert {n["node"]: n["deployment_id"] for n in web["nodes"]} == {
        "n1": deployed.web_v2, "n2": deployed.web_v2, "n3": deployed.web_v2,
    }  # fmt: skip
    r = cairn(c["n3"], "components", "web")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == "As seen by node n3:"
    assert lines[1].split() == ["PROJECT", "NODE", "DEPLOYMENT", "SHA256", "ACTIVATED", "NOTE"]
    assert [x.split()[:3] for x in lines[2:]] == [
        ["web", n, deployed.web_v2] for n in ("n1", "n2", "n3")
    ]
    r = cairn(c["n1"], "components", "nothing-here", "--json")
    assert r.code == 1 and r.json["code"] == "not_found"
    assert r.err.startswith("cairn: nothing-here is not deployed (as seen by node n1)")
    r = cairn(c["n1"], "components", "bad name")
    assert r.code == 2


@pytest.mark.cluster
def test_components_logs_shows_a_running_component(deployed: Deployed, tmp_path: Path) -> None:
    n1 = deployed.cluster["n1"]
    d = _component(tmp_path, "chatty", "c1")
    (d / "component.toml").write_text(
        '[run]\ncommand = "echo started $CAIRN_NODE; exec sleep 600"\n'
    )
    r = cairn(n1, "deploy", str(d), "--project", "chatty", "--json")
    assert r.code == 0, r.err
    r = cairn(n1, "components", "logs", "chatty", "--lines", "5", "--json")
    assert r.code == 0, r.err
    assert r.json["project"] == "chatty" and r.json["node"] == "n1"
    assert any(line["line"] == "started n1" for line in r.json["lines"])
    assert len(r.json["lines"]) <= 5
    r = cairn(n1, "components", "logs", "web", "--json")  # web runs no process
    assert r.code == 1 and r.json["code"] == "not_found"


@pytest.mark.cluster
def test_ids_by_unique_prefix_from_any_node(deployed: Deployed, tmp_path: Path) -> None:
    c = deployed.cluster
    prefix = deployed.web_v1[:8]
    r = cairn(c["n3"], "deployments", "show", prefix, "--json")
    assert r.code == 0, r.err
    assert r.json["deployment_id"] == deployed.web_v1 and r.json["origin_node"] == "n1"
    r = cairn(c["n2"], "deployments", "tail", prefix.upper())
    assert r.code == 0, r.err
    assert r.out.splitlines()[-1].startswith("Successfully deployed: web")
    out = tmp_path / "v1.tar.gz"
    r = cairn(c["n2"], "deployments", "payload", prefix, "-o", str(out), "--json")
    assert r.code == 0, r.err
    assert r.json["deployment_id"] == deployed.web_v1 and out.stat().st_size == r.json["size"]
    r = cairn(c["n1"], "deployments", "list", "--project", "web", "--deployed-by", ADMIN_USER,
              "--json")  # fmt: skip
    assert r.code == 0 and deployed.web_v1 in {d["deployment_id"] for d in r.json["deployments"]}
    # A prefix nothing starts with is exit 1; one that is not hex is a usage error.
    ids = _all_ids(c["n1"])
    unused = next(p for p in (ch * 6 for ch in "0123456789abcdef")
                  if not any(d.startswith(p) for d in ids))  # fmt: skip
    r = cairn(c["n1"], "deployments", "show", unused, "--json")
    assert r.code == 1 and r.json["code"] == "not_found"
    r = cairn(c["n1"], "deployments", "show", "not-an-id")
    assert r.code == 2 and "is not a deployment id or the start of one" in r.err


def _all_ids(node: ClusterNode) -> list[str]:
    page = node.ok("list_deployments", limit=1000)
    return [d["deployment_id"] for d in page["deployments"]]


@pytest.mark.cluster
def test_an_ambiguous_prefix_lists_the_candidates_and_exits_2(deployed: Deployed) -> None:
    c = deployed.cluster
    n1 = c["n1"]

    def shared_first_char() -> str | None:
        firsts = [d[0] for d in _all_ids(n1)]
        return next((ch for ch in firsts if firsts.count(ch) > 1), None)

    # Failed deploys are cheap rows: add some until two ids share a first character.
    while (ch := shared_first_char()) is None:
        code, body = n1.op("deploy_component", project="noise",
                           payload=base64.b64encode(b"not a tarball").decode())  # fmt: skip
        assert code == 422, body
    matching = sorted(d for d in _all_ids(n1) if d.startswith(ch))
    r = cairn(n1, "deployments", "show", ch, "--json")
    assert r.code == 2
    assert r.json["code"] == "ambiguous_id"
    assert sorted(r.json["candidates"]) == matching[:10]
    lines = r.err.splitlines()
    assert lines[0].startswith(f"cairn: the id prefix '{ch}' is ambiguous: it matches ")
    assert {line.split()[0] for line in lines[1:]} == set(matching[:10])
    r = cairn(n1, "deployments", "pin", ch)
    assert r.code == 2 and r.out == ""


@pytest.mark.cluster
def test_pin_and_unpin_replicate(deployed: Deployed) -> None:
    c = deployed.cluster
    r = cairn(c["n1"], "deployments", "pin", deployed.web_v1[:10], "--json")
    assert r.code == 0, r.err
    assert r.json == {"deployment_id": deployed.web_v1, "pinned": True}
    c.wait_deployment(c["n3"], deployed.web_v1, lambda d: d["pinned"] is True)
    r = cairn(c["n3"], "deployments", "show", deployed.web_v1[:10])
    assert "pinned:      yes (retention keeps its payload)" in r.out.splitlines()
    r = cairn(c["n2"], "deployments", "unpin", deployed.web_v1[:10])
    assert r.code == 0 and r.out.startswith(f"Unpinned deployment {deployed.web_v1}")
    c.wait_deployment(c["n1"], deployed.web_v1, lambda d: d["pinned"] is False)


@pytest.mark.cluster
def test_rollback_to_the_previous_deploy_says_what_it_picked(deployed: Deployed) -> None:
    c = deployed.cluster
    r = cairn(c["n2"], "deployments", "rollback", "--previous", "--project", "web", "--json")
    assert r.code == 0, r.err
    result = r.json
    assert result["message"] == "Successfully deployed: web"
    assert (
        f"Rolling back web to deployment {deployed.web_v1} (deployed " in r.err
        and f"the successful deploy before the current one, {deployed.web_v2}" in r.err
    )
    record = c.wait_everywhere(result["deployment_id"], lambda d: d["status"] == "success")
    assert {d["rollback_of"] for d in record.values()} == {deployed.web_v1}
    # Again: the deploy before the rollback is v2, which differs from it: back to v2.
    r = cairn(c["n1"], "deployments", "rollback", "--previous", "-p", "web")
    assert r.code == 0, r.err
    assert r.out.startswith(f"Rolling back web to deployment {deployed.web_v2} ")
    assert r.out.splitlines()[1].startswith("Deployment ")  # nothing was skipped
    # By id prefix, and the usage errors.
    r = cairn(c["n3"], "deployments", "rollback", deployed.web_v1[:9], "--json")
    assert r.code == 0, r.err
    r = cairn(c["n1"], "deployments", "rollback", "--previous")
    assert r.code == 2 and "--previous needs --project" in r.err
    r = cairn(c["n1"], "deployments", "rollback", "--previous", "-p", "never-deployed", "--json")
    assert r.code == 1 and r.json["code"] == "not_found"


@pytest.mark.cluster
def test_delete_payload_and_prune(deployed: Deployed) -> None:
    c = deployed.cluster
    r = cairn(c["n1"], "deployments", "prune", "--dry-run", "--json")
    assert r.code == 0 and "freed_bytes" in r.json and isinstance(r.json["dropped"], list)
    # The active deploy of purge: refused (409, exit 1) or allowed with a warning that the
    # CLI passes on, depending on the node's policy; either way in words.
    r = cairn(c["n2"], "deployments", "delete-payload", deployed.purge[:8], "--json")
    if r.code == 0:
        assert "warning" in r.json and "warning: " in r.err
    else:
        assert r.code == 1 and r.json["status"] == 409 and "[conflict]" in r.err
    # Drop the component, then its payload goes like any other's.
    r = cairn(c["n1"], "components", "drop", "purge", "--json")
    assert r.code == 0, r.err
    assert r.json["message"] == "Successfully dropped: purge"
    r = cairn(c["n1"], "deployments", "delete-payload", deployed.purge[:8], "--json")
    assert r.code == 0, r.err
    assert r.json["deployment_id"] == deployed.purge and r.json["freed_bytes"] >= 0
    c.wait_deployment(c["n3"], deployed.purge, lambda d: not d["payload_blob_present"])
    r = cairn(c["n3"], "components", "purge")
    assert r.code == 1


@pytest.mark.cluster
def test_nodes_list_add_remove_and_the_audit_log(shared_cluster: Cluster) -> None:
    c = shared_cluster
    n1 = c["n1"]
    r = cairn(n1, "nodes", "list", "--json")
    assert r.code == 0, r.err
    assert [(n["name"], n["state"]) for n in r.json["nodes"]] == [
        ("n1", "self"), ("n2", "connected"), ("n3", "connected"),
    ]  # fmt: skip
    url = f"wss://127.0.0.1:{free_port()}"
    try:
        r = cairn(n1, "nodes", "add", "n9", url, "--json")
        assert r.code == 0, r.err
        assert r.json["name"] == "n9" and r.json["url"] == url
        wait_for(lambda: "n9" in c["n3"].peer_states(), timeout_s=20, what="n3 to know n9")
        r = cairn(c["n2"], "nodes", "list")
        assert any(line.split()[:2] == ["n9", url] for line in r.out.splitlines())
    finally:
        r = cairn(c["n2"], "nodes", "remove", "n9")
    assert r.code == 0 and r.out.strip() == "node n9 removed"
    wait_for(lambda: "n9" not in n1.peer_states(), timeout_s=20, what="n1 to forget n9")
    r = cairn(n1, "nodes", "remove", "n9", "--json")
    assert r.code == 1 and r.json["code"] == "not_found"
    r = cairn(n1, "nodes", "add", "n9", "http://127.0.0.1:1")
    assert r.code == 2 and "wss://HOST:PEER_PORT" in r.err

    r = cairn(c["n3"], "audit", "--table", "members", "--key", "n9", "--json")
    assert r.code == 0, r.err
    entries = r.json["entries"]
    ops = [e["operation"] for e in entries]  # newest first
    assert ops[0] == "delete" and set(ops) == {"delete", "upsert"}
    assert {e["user"] for e in entries} == {ADMIN_USER} and {e["key"] for e in entries} == {"n9"}
    assert {e["node"] for e in entries} <= {"n1", "n2"}
    r = cairn(n1, "audit", "--since", "1h", "--limit", "5")
    assert r.code == 0, r.err
    assert r.out.splitlines()[0].split() == ["TIME", "TABLE", "KEY", "OPERATION", "USER", "NODE"]
    assert len(r.out.splitlines()) == 6


@pytest.mark.cluster
def test_cluster_status_of_every_node(shared_cluster: Cluster) -> None:
    c = shared_cluster
    args = [a for n in c for a in ("--target", n.url)]
    r = subprocess.run([sys.executable, "-m", "node", "cluster", "status", *args, "--json"],
                       capture_output=True, text=True, env=cli_env(), timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    answers = json.loads(r.stdout)
    assert [a["node"] for a in answers] == ["n1", "n2", "n3"]
    for a in answers:
        assert {p["name"]: p["state"] for p in a["peers"]} == {
            n.name: "connected" for n in c if n.name != a["node"]
        }
    r = subprocess.run([sys.executable, "-m", "node", "cluster", "status", *args],
                       capture_output=True, text=True, env=cli_env(), timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout.count(" connected ") == 6


@pytest.mark.cluster
def test_roles_users_and_what_a_limited_user_sees(deployed: Deployed) -> None:
    c = deployed.cluster
    n1, n2 = c["n1"], c["n2"]
    r = cairn(n1, "roles", "add", "reader", "--allow", "get_deployment,get_componets")
    assert r.code == 2 and "did you mean 'get_components'?" in r.err
    r = cairn(n1, "roles", "add", "reader", "--allow", "get_deployment,get_components", "--json")
    assert r.code == 0, r.err
    r = cairn(n1, "users", "add", "carol", "--role", "reader", "--new-password", "carol-pw-123",
              "--json")  # fmt: skip
    assert r.code == 0, r.err
    wait_for(lambda: any(u["username"] == "carol" for u in n2.ok("list_users")), timeout_s=20,
             what="carol to reach n2")  # fmt: skip
    as_carol = {"CAIRN_USER": "carol", "CAIRN_PASSWORD": "carol-pw-123"}
    r = cairn(n2, "deployments", "show", deployed.web_v2, "--json", **as_carol)
    assert r.code == 0 and r.json["deployment_id"] == deployed.web_v2
    r = cairn(n2, "deployments", "show", deployed.web_v2[:8], **as_carol)
    assert r.code == 1
    assert "your role does not allow list_deployments; give the full deployment id" in r.err
    r = cairn(n2, "nodes", "list", **as_carol)
    assert r.code == 1
    assert r.err.endswith("ask an administrator for a role that allows 'cluster_status'\n")
    r = cairn(n2, "components", "--json", **as_carol)
    assert r.code == 0 and r.json["node"] == "n2"
    r = cairn(n2, "deployments", "list", CAIRN_PASSWORD="wrong-password")
    assert r.code == 2 and "check --user/--password" in r.err
    r = cairn(f"http://127.0.0.1:{free_port()}", "components", "--json")
    assert r.code == 2 and r.json["code"] == "unreachable"
    assert cairn(n1, "users", "drop", "carol").code == 0
    assert cairn(n1, "roles", "drop", "reader", "--json").code == 0


@pytest.mark.cluster
def test_cluster_up_json_prints_one_line_once_ready(tmp_path: Path) -> None:
    """``cluster up --json``: progress on stderr, one JSON line on stdout when ready."""
    base = next(
        p for p in (free_port() for _ in range(50))
        if p + 100 <= 65535 and not ports_in_use(plan_cluster(tmp_path, 1, base_port=p))
    )  # fmt: skip
    err_file = tmp_path / "stderr.txt"
    with err_file.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node", "cluster", "up", "--nodes", "1",
             "--dir", str(tmp_path / "c"), "--base-port", str(base), "--json"],
            stdout=subprocess.PIPE, stderr=err, env=cli_env(),
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the cluster is ready (or it exits)
        doc = json.loads(line)
        assert doc["nodes"] == [{
            "name": "n1", "admin_url": f"http://127.0.0.1:{base}",
            "peer_url": f"wss://127.0.0.1:{base + 100}",
            "log": str(tmp_path / "c" / "n1" / "node.log"),
        }]  # fmt: skip
        assert doc["admin_user"] == "admin" and "password" not in json.dumps(doc["nodes"])
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and rest == b""  # nothing but that one line on stdout
    assert "cluster ready: 1 nodes" in err_file.read_text()
