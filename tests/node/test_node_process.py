"""A real ``cairn node run`` process: serving, refusing to start, stopping, env overrides.

Start failures are run to completion with stderr captured on its own: the contract is
one line naming the problem and a non-zero exit, with nothing touched on disk.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import component
from procs import ADMIN_PASSWORD, ADMIN_USER, NodeProcess, free_port, wait_for

from replication.tls import init_ca, issue_node_cert

REPO = Path(__file__).resolve().parents[2]


def _run_to_exit(config: Path, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    """Run ``cairn node run`` until it exits; return (code, stderr lines, stdout)."""
    full_env = {**os.environ, "CAIRN_ADMIN_PASSWORD": ADMIN_PASSWORD, **(env or {})}
    full_env.pop("CAIRN_CRASHPOINT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "node", "node", "run", "--config", str(config)],
        capture_output=True,
        env=full_env,
        timeout=60,
    )
    return proc.returncode, proc.stderr.decode().splitlines(), proc.stdout.decode()


def _node_config(root: Path, body: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cairn.toml"
    path.write_text(body)
    return path


def _solo(root: Path, port: int, extra: str = "") -> str:
    return (
        f'[node]\nname = "n1"\ndata_dir = "{root / "data"}"\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {port}\n' + extra
    )


def _tls(root: Path, node: str, cert_for: str | None = None) -> str:
    """[peer]/[tls] sections with a CA and a certificate issued for ``cert_for``."""
    init_ca(root / "ca")
    files = issue_node_cert(root / "ca", root / "certs", cert_for or node, ["127.0.0.1"])
    return (
        f'[peer]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'[tls]\nca = "{root / "ca" / "ca.pem"}"\ncert = "{files.cert}"\nkey = "{files.key}"\n'
    )


def _deploy_json(node: NodeProcess, project: str, payload: bytes, **fields: Any) -> Any:
    return node.op(
        "deploy_component",
        project=project,
        payload=base64.b64encode(payload).decode(),
        **fields,
    )


def _post(node: NodeProcess, body: dict[str, Any], *, password: str = ADMIN_PASSWORD) -> int:
    """A JSON operation whose fields may be named like procs.op's own parameters."""
    req = urllib.request.Request(node.url + "/", data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    token = base64.b64encode(f"{ADMIN_USER}:{password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _multipart(node: NodeProcess, project: str, payload: bytes) -> tuple[int, Any]:
    boundary = "cairntest"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="operation"\r\n\r\n'
            f"deploy_component\r\n--{boundary}\r\n"
            f'Content-Disposition: form-data; name="project"\r\n\r\n{project}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="payload"; filename="p.tgz"\r\n'
            "Content-Type: application/gzip\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(node.url + "/", data=body, method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def node(tmp_path: Path) -> Any:
    n = NodeProcess("n1", tmp_path)
    yield n
    n.kill()


# -- serving and stopping ---------------------------------------------------------------------


def test_node_serves_deploys_and_stops_cleanly_on_sigterm(node: NodeProcess) -> None:
    node.start()
    with urllib.request.urlopen(node.url + "/health", timeout=5) as r:
        assert json.loads(r.read()) == {"status": "ok", "node": "n1"}
    payload = component(install="echo built")
    status, body = _multipart(node, "web", payload)
    assert status == 200, body
    first = body["deployment_id"]
    status, body = _deploy_json(node, "web", component(v="2"))
    assert status == 200, body
    status, rec = node.op("get_deployment", deployment_id=first)
    assert rec["status"] == "success" and rec["payload_size"] == len(payload)
    assert (node.data_dir / "components" / "web" / "current").is_symlink()
    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as r:
        assert b'cairn_deployments{status="success"} 2.0' in r.read()

    assert node.stop() == 0
    lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    events = [e["event"] for e in lines]
    assert events[-1] == "node_stopped" and "node_stopping" in events
    assert not [e for e in lines if e.get("level") == "error"], lines

    # What it recorded survives a restart.
    node.start()
    status, listing = node.op("list_deployments", project="web")
    assert status == 200 and listing["total"] == 2
    node.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    assert node.wait_exit() == 0


def test_logs_are_json_and_never_hold_credentials(node: NodeProcess) -> None:
    node.start()
    secret = "SECRET-in-" + os.urandom(4).hex()
    payload = base64.b64encode(component()).decode()
    deploy = {"operation": "deploy_component", "project": "web", "payload": payload}
    creds = {"password": secret, "apiToken": secret, "authorization": secret}
    assert _post(node, {**deploy, **creds}) == 200
    user = {"username": "bob", "password": secret + "-pw", "role": "super_user"}
    assert _post(node, {"operation": "add_user", **user}) == 200
    assert _post(node, {"operation": "list_users"}, password=secret + "-wrong") == 401
    assert _post(node, {"operation": "no_such_op", **creds}) == 400
    assert _post(node, {**deploy, "payload": "aGVsbG8=", **creds}) == 422
    assert node.stop() == 0
    log = node.log()
    assert secret not in log and ADMIN_PASSWORD not in log
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            assert entry["event"].replace("_", "").isalnum(), entry  # constant snake_case


def test_env_overrides_config(tmp_path: Path) -> None:
    node = NodeProcess("n1", tmp_path)
    node.write_config()  # the file says admin_port; the environment wins
    env_port = free_port()
    node.env = {
        "CAIRN_ADMIN_PORT": str(env_port),
        "CAIRN_NODE_NAME": "renamed",
        "CAIRN_LIMITS_MAX_BODY_BYTES": "2048",
    }
    file_port = node.admin_port
    node.admin_port = env_port
    try:
        node.start()
        with urllib.request.urlopen(node.url + "/health", timeout=5) as r:
            assert json.loads(r.read())["node"] == "renamed"
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", file_port), 1):
            pass
        status, body = _deploy_json(node, "web", os.urandom(4096))
        assert status == 413 and "multipart" in body["error"]
        assert node.stop() == 0
    finally:
        node.kill()


# -- refusing to start ---------------------------------------------------------------------


def test_bad_config_stops_the_node_with_one_line(tmp_path: Path) -> None:
    cases = {
        "not toml": ("[node\nname = ", "not valid TOML"),
        "unknown key": (_solo(tmp_path / "d", free_port(), "[admin]\nportt = 1\n"), None),
        "bad name": ('[node]\nname = "bad name"\ndata_dir = "d"\n', "name"),
        "no node": ("[admin]\nport = 1\n", "[node]"),
        "bad type": ('[node]\nname = "n1"\ndata_dir = "d"\n[admin]\nport = "x"\n', "port"),
        "peers no tls": (
            '[node]\nname = "n1"\ndata_dir = "d"\n[[peers]]\nname = "n2"\nurl = "wss://h:1"\n',
            "[[peers]]",
        ),
    }
    for name, (body, needle) in cases.items():
        root = tmp_path / name.replace(" ", "_")
        config = _node_config(root, body)
        code, lines, _ = _run_to_exit(config)
        assert code != 0, name
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith("cairn: "), (name, lines)
        if needle:
            assert needle in lines[0], (name, lines)
        assert not (root / "data").exists() and not (root / "d").exists(), name
    code, lines, _ = _run_to_exit(tmp_path / "missing.toml")
    assert code != 0 and len(lines) == 1 and "missing.toml" in lines[0]


def test_missing_or_foreign_certificate_stops_the_node_with_one_line(tmp_path: Path) -> None:
    # A certificate file that does not exist.
    root = tmp_path / "missing"
    tls = _tls(root, "n1").replace(str(root / "certs" / "n1.pem"), str(root / "nope.pem"))
    code, lines, _ = _run_to_exit(_node_config(root, _solo(root, free_port(), tls)))
    assert code != 0 and len(lines) == 1, lines
    assert "nope.pem" in lines[0]
    # A certificate issued for another node.
    root = tmp_path / "foreign"
    config = _node_config(root, _solo(root, free_port(), _tls(root, "n1", cert_for="n2")))
    code, lines, _ = _run_to_exit(config)
    assert code != 0 and len(lines) == 1, lines
    assert "'n2'" in lines[0] and "'n1'" in lines[0]
    # A key that does not belong to the certificate.
    root = tmp_path / "mismatch"
    tls = _tls(root, "n1")
    other = issue_node_cert(root / "ca", root / "other", "n1", ["127.0.0.1"], force=True)
    tls = tls.replace(str(root / "certs" / "n1.key"), str(other.key))
    code, lines, _ = _run_to_exit(_node_config(root, _solo(root, free_port(), tls)))
    assert code != 0 and len(lines) == 1, lines
    assert not (root / "data").exists()


def test_port_in_use_stops_the_node_with_one_line_and_touches_nothing(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        root = tmp_path / "busy"
        code, lines, _ = _run_to_exit(_node_config(root, _solo(root, port)))
    assert code != 0
    assert lines == [f"cairn: admin port 127.0.0.1:{port} is already in use"]
    assert not (root / "data").exists()


def test_second_instance_on_a_running_node_leaves_it_alone(
    node: NodeProcess, tmp_path: Path
) -> None:
    """A second process on a running node's data dir refuses to start before it touches
    anything: it neither sweeps the first one's temp files, kills its hooks, nor fails
    its running deploy as interrupted."""
    node.start()
    flag = tmp_path / "second-instance-done"
    # The hook runs until the test says the second instance has come and gone.
    hook = f"for i in $(seq 400); do [ -f {flag} ] && exit 0; sleep 0.05; done; exit 1"
    payload = component(install=hook)

    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(answer=_deploy_json(node, "web", payload)), daemon=True
    )
    thread.start()

    def installing() -> bool:
        _, listing = node.op("list_deployments")
        return any(d["status"] == "installing" for d in listing["deployments"])

    wait_for(installing, timeout_s=20, what="the deploy to reach installing")
    code, lines, _ = _run_to_exit(node.config_path)
    assert code != 0 and len(lines) == 1 and "already in use" in lines[0], lines
    # Another port, the same data directory: refused by the directory's lock.
    other = node.config_path.with_name("other.toml")
    text = node.config_path.read_text()
    other.write_text(text.replace(f"port = {node.admin_port}", f"port = {free_port()}"))
    code, lines, _ = _run_to_exit(other)
    flag.touch()
    assert code != 0 and len(lines) == 1, lines
    assert f"data directory {node.data_dir} is in use" in lines[0], lines
    thread.join(30)
    status, body = result["answer"]
    assert status == 200, body
    _, rec = node.op("get_deployment", deployment_id=body["deployment_id"])
    assert rec["status"] == "success"


# -- a configured peer that cannot be reached -------------------------------------------------


def test_configured_peer_unreachable_is_503_at_once(tmp_path: Path) -> None:
    node = NodeProcess("n1", tmp_path)
    dead = free_port()
    node.extra_toml = (
        _tls(tmp_path, "n1") + f'[[peers]]\nname = "n2"\nurl = "wss://127.0.0.1:{dead}"\n'
    )
    try:
        node.start()
        started = time.monotonic()
        status, body = _deploy_json(node, "web", component())
        assert status == 503, body
        assert body["code"] == "replication_failed" and body["failed_nodes"] == ["n2"]
        assert time.monotonic() - started < 10  # at once, not after the deploy timeout
        _, rec = node.op("get_deployment", deployment_id=body["deployment_id"])
        assert rec["status"] == "failed" and rec["expected_nodes"] == ["n1", "n2"]
        assert node.stop() == 0
    finally:
        node.kill()


# -- flat memory under a streamed upload ----------------------------------------------------


def test_upload_memory_stays_flat(tmp_path: Path) -> None:
    """The bench, small: RSS growth from 16 to 128 MiB payloads is bounded, not 8x."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "upload_memory.py"), "--sizes", "16,128",
         "--max-growth-mib", "48", "--json", "--dir", str(tmp_path / "bench")],
        capture_output=True, timeout=110, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    summary = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert summary["ok"] is True
    # 112 MiB more payload; a proportional design would grow by about that much.
    assert summary["difference_mib"] < 48, summary
    for run in summary["runs"]:
        assert run["growth_mib"] < 64, run
