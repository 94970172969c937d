"""``cairn cert``, the local cluster layout, and ``cairn cluster up/status`` without peers.

These need no replication: certificates, configs and ports are checked as files and
values, and the node that refuses a certificate for another name is a real process.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from procs import ADMIN_PASSWORD, NodeProcess, free_port

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


def test_cluster_up_with_a_port_in_use_says_so_and_exits_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        layout = plan_cluster(tmp_path, 2, base_port=port)
        assert ports_in_use(layout) == [f"127.0.0.1:{port} (n1 admin port) is in use"]
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
