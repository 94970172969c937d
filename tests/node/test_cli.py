"""The ``cairn`` client commands, run as real subprocesses against a real node process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import pty
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import ADMIN_PASSWORD, ADMIN_USER, NodeProcess, free_port
from relay import Relay

from node.cli.render import ProgressBar, format_size, render_event

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


#: Started with the node: one misspelt config variable, one unknown, one left to tests.
NODE_ENV = {"CAIRN_ADMIN_PROT": "9999", "CAIRN_NO_SUCH_THING": "1", "CAIRN_TEST_ANYTHING": "1"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    n = NodeProcess("n1", tmp_path_factory.mktemp("cli-node"), env=dict(NODE_ENV)).start()
    yield n
    n.stop()


def cli_env(node: NodeProcess, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    env.update(CAIRN_TARGET=node.url, CAIRN_USER=ADMIN_USER, CAIRN_PASSWORD=ADMIN_PASSWORD)
    env.update(extra)
    return env


def cairn(node: NodeProcess, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        capture_output=True, text=True, env=cli_env(node, **env), timeout=60,
    )  # fmt: skip


def app_dir(root: Path, install: str = "echo installing web") -> Path:
    """A component directory with things that must not be packed."""
    d = root / "web"
    (d / "app").mkdir(parents=True)
    (d / "app" / "index.html").write_text("<p>hello</p>\n")
    (d / "component.toml").write_text(
        f"[install]\ncommand = {json.dumps(install)}\ntimeout_s = 30\n"
    )
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / "secrets").mkdir()
    (d / "secrets" / "key").write_text("do not ship\n")
    (d / "debug.log").write_text("noise\n")
    (d / ".cairnignore").write_text("# not for the node\n*.log\nsecrets/\n")
    return d


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- deploy -------------------------------------------------------------------------------


def test_deploy_a_directory(node: NodeProcess, tmp_path: Path) -> None:
    src = app_dir(tmp_path)
    r = cairn(node, "deploy", str(src), "--project", "web")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    uploads = [line for line in lines if line.startswith("Uploaded")]
    assert len(uploads) == 1 and re.fullmatch(r"Uploaded \d+(\.\d)? (B|KiB|MiB)", uploads[0])
    ids = [
        m.group(1)
        for line in lines
        if (m := re.fullmatch(rf"Deployment ({UUID}) \(project web\)", line))
    ]
    assert len(ids) == 1
    did = ids[0]
    assert "install   installing web" in lines
    assert "phase     install: done" in lines
    assert "peer      n1 active (activate)" in lines
    assert "finished  success" in lines
    assert lines[-1] == f"Successfully deployed: web (1/1 nodes active, deployment {did})"

    # show --json, then the payload round trip.
    r = cairn(node, "deployments", "show", did, "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["status"] == "success" and record["user"] == ADMIN_USER
    out = tmp_path / "payload.tar.gz"
    r = cairn(node, "deployments", "payload", did, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == record["payload_hash"]
    assert record["payload_hash"] in r.stderr
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert {"component.toml", "app/index.html", ".cairnignore"} <= names
    assert not any(n.startswith((".git", "secrets")) or n.endswith(".log") for n in names), names


def test_failed_deploy_exits_1_with_the_code(node: NodeProcess, tmp_path: Path) -> None:
    src = app_dir(tmp_path, install="echo about to fail; exit 3")
    r = cairn(node, "deploy", str(src), "--project", "broken")
    assert r.returncode == 1, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert re.fullmatch(
        rf"cairn: deploy failed: .+ \[install_failed\] "
        rf"\(phase install; failed nodes: n1; deployment {UUID}\)",
        line,
    ), line
    lines = r.stdout.splitlines()
    assert "install   about to fail" in lines
    assert any(re.fullmatch(r"error     .+ \[install_failed\] in phase install", x) for x in lines)
    assert lines[-1] == "finished  failed"


def test_deploy_json_prints_only_the_result(node: NodeProcess, tmp_path: Path) -> None:
    src = app_dir(tmp_path)
    tgz = tmp_path / "web.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src / "app", arcname="app")
    r = cairn(node, "deploy", str(tgz), "--project", "jsonweb", "--json", "--restart", "rolling")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["message"] == "Successfully deployed: jsonweb"
    assert [p["node"] for p in result["peer_results"]] == ["n1"]
    assert "Uploaded" in r.stderr and result["deployment_id"] in r.stderr  # human lines
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball at all")
    r = cairn(node, "deploy", str(bad), "--project", "jsonweb", "--json")
    assert r.returncode == 1
    body = json.loads(r.stdout)
    assert body["code"] == "bad_payload" and body["deployment_id"]


async def test_deployment_id_comes_first_and_one_upload_line(
    node: NodeProcess, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    src = app_dir(tmp_path, install=f"echo waiting; while [ ! -e {gate} ]; do sleep 0.01; done")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", "deploy", str(src), "--project", "gated",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(node),
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        while "install   waiting" not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, f"cairn ended early: {seen}"
            seen.append(line.decode().rstrip("\n"))
        # The deploy is still running (held at the gate) and the id is already out.
        assert any(re.fullmatch(rf"Deployment {UUID} \(project gated\)", x) for x in seen)
    finally:
        gate.touch()
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    lines = seen + out.decode().splitlines()
    assert sum(line.startswith("Uploaded") for line in lines) == 1
    assert lines[-1].startswith("Successfully deployed: gated")


async def _cut_mid_stream(
    node: NodeProcess, relay: Relay, gate: Path, *args: str
) -> tuple[int, list[str], str]:
    """Run ``cairn *args`` through ``relay`` until the hook waits at ``gate``, cut the
    connection, open the gate; return the exit code, every stdout line and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env(node, CAIRN_TARGET=relay.url),
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    while "install   waiting" not in seen:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line, f"cairn {args[0]} ended early: {seen}"
        seen.append(line.decode().rstrip("\n"))
    relay.cut()
    await asyncio.to_thread(gate.touch)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, seen + out.decode().splitlines(), err.decode()


async def test_deploy_survives_a_dropped_connection(node: NodeProcess, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    install = (
        "i=0; while [ $i -lt 30 ]; do echo line $i; i=$((i+1)); done; echo waiting; "
        f"while [ ! -e {gate} ]; do sleep 0.01; done; "
        "while [ $i -lt 90 ]; do echo line $i; i=$((i+1)); done"
    )
    src = app_dir(tmp_path, install=install)
    async with Relay(node.host, node.admin_port) as relay:
        # The deploy's own stream breaks off; the CLI follows by id instead.
        code, lines, err = await _cut_mid_stream(
            node, relay, gate, "deploy", str(src), "--project", "dropped"
        )
    assert code == 0, err
    printed = [int(x.split()[-1]) for x in lines if re.fullmatch(r"install   line \d+", x)]
    assert printed == list(range(90))
    assert lines[-1].startswith("Successfully deployed: dropped (1/1 nodes active")


def test_tty_upload_shows_a_bar_that_reaches_100(node: NodeProcess, tmp_path: Path) -> None:
    src = app_dir(tmp_path)
    (src / "app" / "data.bin").write_bytes(os.urandom(3 << 20))  # several chunks
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "deploy", str(src), "--project", "ttyweb"],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=cli_env(node),
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.stderr is not None
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(30) == 0, err
    text = b"".join(chunks).decode()
    bars = re.findall(r"Uploading \[[# ]{30}\] +(\d+)%  (\S+ \S+) / (\S+ \S+)", text)
    assert bars, text
    percent, done, total = bars[-1]
    assert percent == "100" and done == total  # the same unit for both
    assert [int(p) for p, _, _ in bars] == sorted(int(p) for p, _, _ in bars)
    assert "Uploaded" not in text  # the bar replaces the plain line
    assert re.search(rf"Deployment {UUID} \(project ttyweb\)", text)


# -- the progress bar, with a fake terminal --------------------------------------------


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_counts_bytes_and_ends_at_100() -> None:
    now = [0.0]
    out = FakeTty()
    bar = ProgressBar(1000, out, width=10, min_interval_s=0.1, clock=lambda: now[0])
    bar.update(10)
    assert out.getvalue().endswith("Uploading [          ]   1%  10 B / 1000 B")
    bar.update(500)  # throttled: no redraw within 0.1 s
    assert "50%" not in out.getvalue()
    now[0] = 0.2
    bar.update(999)
    assert out.getvalue().endswith("[######### ]  99%  999 B / 1000 B")  # never rounds up
    bar.println("Deployment 1234 (project web)")
    assert out.getvalue().endswith(
        "\r\x1b[KDeployment 1234 (project web)\n\r\x1b[KUploading [######### ]  99%  999 B / 1000 B"
    )
    bar.update(1000)  # the last byte: drawn at once, whatever the throttle
    assert out.getvalue().endswith("[##########] 100%  1000 B / 1000 B\n")
    assert bar.finished and bar.percent == 100
    bar.println("phase     receive: done")
    assert out.getvalue().endswith("100%  1000 B / 1000 B\nphase     receive: done\n")


def test_event_lines_and_sizes() -> None:
    assert format_size(205) == "205 B" and format_size(1536) == "1.5 KiB"
    assert format_size(3 << 20) == "3.0 MiB"
    assert render_event("install", {"stream": "stderr", "line": "oops"}) == "install   ! oops"
    assert (
        render_event("peer", {"node": "n2", "status": "failed", "phase": "install",
                              "error": {"message": "exit 3", "code": "install_failed"}})
        == "peer      n2 failed (install): exit 3 [install_failed]"
    )  # fmt: skip
    assert render_event("warning", {"message": "going on without n3"}) == (
        "warning   going on without n3"
    )
    assert render_event("done", {"result": {}}) is None


# -- list, show, tail, rollback ------------------------------------------------------------


def test_list_show_tail_and_rollback(node: NodeProcess, tmp_path: Path) -> None:
    src = app_dir(tmp_path)
    first = json.loads(cairn(node, "deploy", str(src), "-p", "listed", "--json").stdout)
    (src / "app" / "index.html").write_text("<p>v2</p>\n")
    second = json.loads(cairn(node, "deploy", str(src), "-p", "listed", "--json").stdout)

    r = cairn(node, "deployments", "list", "--project", "listed", "--json")
    assert r.returncode == 0, r.stderr
    page = json.loads(r.stdout)
    assert [d["deployment_id"] for d in page["deployments"]] == [
        second["deployment_id"], first["deployment_id"],
    ]  # fmt: skip
    r = cairn(node, "deployments", "list", "-p", "listed", "--status", "success", "--since", "1h",
              "--limit", "1", "--deployed-by", ADMIN_USER)  # fmt: skip
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split() == ["DEPLOYMENT", "PROJECT", "STATUS", "USER", "STARTED", "TOOK", "NODES"]
    assert row.startswith(second["deployment_id"]) and " success " in row and row.endswith("1/1")
    assert "--cursor" in r.stderr  # one more page
    r = cairn(node, "deployments", "list", "-p", "listed", "--deployed-by", "nobody")
    assert r.stdout.strip() == "No deployments."

    r = cairn(node, "deployments", "show", first["deployment_id"])
    assert r.returncode == 0, r.stderr
    assert re.search(r"^status:\s+success$", r.stdout, re.M)
    assert re.search(r"^\s+1\s+Deployment ", r.stdout, re.M)

    r = cairn(node, "deployments", "tail", first["deployment_id"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2:] == [
        "finished  success",
        f"Successfully deployed: listed (1/1 nodes active, deployment {first['deployment_id']})",
    ]

    r = cairn(node, "deployments", "rollback", first["deployment_id"], "--json")
    assert r.returncode == 0, r.stderr
    rolled = json.loads(r.stdout)
    record = json.loads(
        cairn(node, "deployments", "show", rolled["deployment_id"], "--json").stdout
    )
    assert record["rollback_of"] == first["deployment_id"]
    original = json.loads(
        cairn(node, "deployments", "show", first["deployment_id"], "--json").stdout
    )
    assert record["payload_hash"] == original["payload_hash"]


def test_tail_of_a_failed_deploy_exits_1(node: NodeProcess) -> None:
    status, body = node.op(
        "deploy_component", project="tailfail",
        payload=base64.b64encode(b"garbage").decode(),
    )  # fmt: skip
    assert status == 422
    r = cairn(node, "deployments", "tail", body["deployment_id"])
    assert r.returncode == 1
    assert "[bad_payload]" in one_line(r.stderr)


async def test_tail_resumes_after_a_dropped_connection(node: NodeProcess, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    install = (
        "i=0; while [ $i -lt 50 ]; do echo line $i; i=$((i+1)); done; echo waiting; "
        f"while [ ! -e {gate} ]; do sleep 0.01; done; "
        "while [ $i -lt 150 ]; do echo line $i; i=$((i+1)); done"
    )
    src = app_dir(tmp_path, install=install)
    with (tmp_path / "p.tar.gz").open("wb") as f:
        from node.deploy.pack import pack_directory

        pack_directory(src, f)
    payload = base64.b64encode((tmp_path / "p.tar.gz").read_bytes()).decode()
    start = asyncio.create_task(
        asyncio.to_thread(node.op, "deploy_component", project="tailed", payload=payload)
    )

    async def deployment_id() -> str | None:
        _, page = await asyncio.to_thread(node.op, "list_deployments", project="tailed")
        return page["deployments"][0]["deployment_id"] if page["deployments"] else None

    deadline = time.monotonic() + 20
    while (did := await deployment_id()) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    async with Relay(node.host, node.admin_port) as relay:
        # The connection drops while the deploy is held at its gate.
        code, lines, err = await _cut_mid_stream(node, relay, gate, "deployments", "tail", did)
        assert relay.connections >= 2  # it came back
    assert code == 0, err
    printed = [int(x.split()[-1]) for x in lines if re.fullmatch(r"install   line \d+", x)]
    assert printed == list(range(150))  # every line once, in order, across the drop
    assert lines[-1].startswith("Successfully deployed: tailed")
    status, _ = await start
    assert status == 200


# -- users ---------------------------------------------------------------------------------


def test_users_and_roles(node: NodeProcess) -> None:
    r = cairn(node, "roles", "add", "deployer", "--allow", "deploy_component,get_deployment")
    assert r.returncode == 0, r.stderr
    r = cairn(node, "users", "add", "bob", "--role", "deployer", "--new-password", "bob-password-1")
    assert r.returncode == 0, r.stderr
    r = cairn(node, "users", "list")
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows["bob"] == ["bob", "deployer", "no", "yes"]
    r = cairn(node, "roles", "list", "--json")
    assert {"role": "deployer", "permission": {"super_user": False, "operations": [
        "deploy_component", "get_deployment"]}} in json.loads(r.stdout)  # fmt: skip
    # bob may not list: one line naming what to ask for, exit 1. --user signs in everywhere
    # (the old --auth-user still works, hidden).
    for flag in ("--user", "--auth-user"):
        r = cairn(node, "deployments", "list", flag, "bob", "--password", "bob-password-1")
        assert r.returncode == 1
        assert one_line(r.stderr).endswith(
            "[forbidden]: ask an administrator for a role that allows 'list_deployments'"
        )
    r = cairn(node, "users", "alter", "bob", "--inactive")
    assert r.returncode == 0, r.stderr
    r = cairn(node, "users", "drop", "bob")
    assert r.returncode == 0 and "bob" in r.stdout
    r = cairn(node, "roles", "drop", "deployer")
    assert r.returncode == 0, r.stderr


# -- refused and unreachable ---------------------------------------------------------------


def test_wrong_password_is_one_line_exit_2(node: NodeProcess, tmp_path: Path) -> None:
    r = cairn(node, "deployments", "list", CAIRN_PASSWORD="wrong-password")
    assert r.returncode == 2 and r.stdout == ""
    assert "wrong username or password" in one_line(r.stderr)
    r = cairn(node, "deploy", str(app_dir(tmp_path)), "--password", "wrong-password")
    assert r.returncode == 2 and r.stdout == ""  # not even an "Uploaded" line
    assert "[unauthorized]" in one_line(r.stderr)


def test_unreachable_target_is_one_line_exit_2(node: NodeProcess, tmp_path: Path) -> None:
    target = f"http://127.0.0.1:{free_port()}"
    r = cairn(node, "deployments", "list", "--target", target)
    assert r.returncode == 2
    assert one_line(r.stderr) == (
        f"cairn: cannot reach {target}: connection refused; is the node running, and is "
        "--target (CAIRN_TARGET) right?"
    )
    r = cairn(node, "deployments", "list", "--target", target, "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["code"] == "unreachable"
    r = cairn(node, "deploy", str(app_dir(tmp_path)), CAIRN_TARGET=target)
    assert r.returncode == 2 and "cannot reach" in one_line(r.stderr)


def test_usage_errors_exit_2(node: NodeProcess, tmp_path: Path) -> None:
    cases: list[tuple[list[str], dict[str, Any]]] = [
        (["deploy", str(tmp_path / "missing")], {}),
        (["deploy", str(tmp_path / "f.tar.gz")], {}),  # a file needs --project
        (["deploy", str(app_dir(tmp_path)), "--project", "bad name"], {}),
        (["deployments", "list", "--target", "ftp://x"], {}),
        (["deployments", "list", "--since", "yesterday-ish"], {}),
    ]
    (tmp_path / "f.tar.gz").write_bytes(b"x")
    for args, env in cases:
        r = cairn(node, *args, **env)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
    # Something that cannot be the start of an id is refused before asking (the API
    # itself answers 404 for any string that names no deployment).
    r = cairn(node, "deployments", "show", "not-a-uuid")
    assert r.returncode == 2 and "is not a deployment id" in r.stderr, r.stderr


# -- every operation has a command; names, errors, --json -----------------------------------


def test_every_command_has_json() -> None:
    import click

    from node.cli.root import cli

    def leaves(group: click.Group, path: str) -> Iterator[tuple[str, click.Command]]:
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from leaves(cmd, f"{path} {name}")
            else:
                yield f"{path} {name}", cmd

    missing = [
        path
        for path, cmd in leaves(cli, "cairn")
        if not any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option))
    ]
    assert missing == []


def test_operation_names_match_the_server() -> None:
    """The client's list of operations is the server registry's (plus the one in flight)."""
    from node.app import registry
    from node.cli.api.operations import OPERATIONS

    server = set(registry().names())
    # get_component_logs is being added to the server by another change; drop it from
    # this set once it is registered there.
    assert server == OPERATIONS


def test_a_misspelt_role_operation_is_refused_before_sending(node: NodeProcess) -> None:
    r = cairn(node, "roles", "add", "typo", "--allow", "get_deployment,deploy_componet")
    assert r.returncode == 2, r.stderr
    assert "'deploy_componet' is not an operation (did you mean 'deploy_component'?)" in r.stderr
    assert "Traceback" not in r.stderr
    roles = json.loads(cairn(node, "roles", "list", "--json").stdout)
    assert "typo" not in {role["role"] for role in roles}  # nothing reached the node
    r = cairn(node, "roles", "operations", "--json")
    assert r.returncode == 0 and "deploy_component" in json.loads(r.stdout)


def test_the_node_reports_unknown_cairn_variables_at_start(node: NodeProcess) -> None:
    [line] = [x for x in node.log().splitlines() if "unknown_env_variables" in x]
    assert "CAIRN_ADMIN_PROT (did you mean CAIRN_ADMIN_PORT, [admin] port?)" in line
    assert "CAIRN_NO_SUCH_THING" in line
    assert "CAIRN_TEST_ANYTHING" not in line and "CAIRN_ADMIN_PASSWORD" not in line


def test_local_errors_are_plain_words(node: NodeProcess, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    did = json.loads(cairn(node, "deploy", str(app_dir(tmp_path)), "-p", "words", "--json").stdout)[
        "deployment_id"
    ]
    r = cairn(node, "deployments", "payload", did[:8], "-o", str(not_a_dir / "out.tar.gz"))
    assert r.returncode == 2
    assert one_line(r.stderr) == (
        f"cairn: cannot write {not_a_dir / 'out.tar.gz'}: a part of the path is not a directory"
    )
    r = cairn(node, "cert", "init-ca", "--dir", str(not_a_dir / "ca"))
    assert r.returncode == 2 and "Errno" not in one_line(r.stderr)
    assert "a part of the path is not a directory" in r.stderr
    # An https target on a plain http port: a TLS failure, said so, with what to check.
    r = cairn(node, "deployments", "list", "--target", node.url.replace("http:", "https:"))
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert line.startswith(f"cairn: cannot reach {node.url.replace('http:', 'https:')}: ")
    assert "https port" in line and "urlopen" not in line and "Errno" not in line


def test_the_previous_deploy_is_chosen_and_explained() -> None:
    from node.cli.common import CommandError
    from node.cli.rollback import _choose

    def row(did: str, h: str, **more: Any) -> dict[str, Any]:
        return {"deployment_id": did, "project": "web", "kind": "deploy", "payload_hash": h,
                "payload_blob_present": True, "started_at": 0, **more}  # fmt: skip

    picked = _choose([row("c", "h3"), row("b", "h3"), row("x", "h2", payload_blob_present=False),
                      row("a", "h1"), row("z", "h0")])  # fmt: skip
    assert picked is not None and picked.target["deployment_id"] == "a"
    assert [(d["deployment_id"], why) for d, why in picked.skipped] == [
        ("b", "same payload as the current deploy"),
        ("x", "its payload is no longer on this node (deleted or pruned)"),
    ]
    assert picked.explain()[0].startswith("Rolling back web to deployment a ")
    none_left = _choose([row("c", "h3")])
    assert none_left is not None and none_left.target == {}
    assert _choose([]) is None
    with pytest.raises(CommandError, match="was dropped by deployment d"):
        _choose([row("d", None, kind="drop"), row("c", "h3")])


# -- components logs against a fake server and a real node -----------------------------


async def test_components_logs_against_a_fake_server(aiohttp_server: Any) -> None:
    from aiohttp import web

    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if body.get("project") == "missing":
            return web.json_response(
                {"error": "project missing is not deployed", "code": "not_found"}, status=404
            )
        return web.json_response({
            "project": body["project"], "node": "n7", "truncated": True,
            "lines": [{"t": 1_700_000_000_000, "stream": "stdout", "line": "listening on :8080"},
                      {"t": 1_700_000_001_000, "stream": "stderr", "line": "slow request"}],
        })  # fmt: skip

    app = web.Application()
    app.router.add_post("/", handle)
    server = await aiohttp_server(app)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    env.update(CAIRN_TARGET=str(server.make_url("")), CAIRN_USER="u", CAIRN_PASSWORD="p")

    async def run_cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node", "components", "logs", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await run_cli("web", "--lines", "5")
    assert code == 0, err
    assert seen[-1] == {"operation": "get_component_logs", "project": "web", "lines": 5}
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("  listening on :8080") and lines[1].endswith("  ! slow request")
    assert one_line(err) == "cairn: older lines of web on node n7 were not kept"
    code, out, _ = await run_cli("web", "--json")
    assert code == 0 and json.loads(out)["node"] == "n7"
    assert seen[-1]["lines"] == 100  # the default
    code, out, err = await run_cli("missing", "--json")
    assert code == 1 and json.loads(out)["code"] == "not_found"
    assert one_line(err) == "cairn: project missing is not deployed [not_found]"
    code, _, err = await run_cli("bad name")
    assert code == 2 and "not a valid component name" in err


def test_components_logs_on_a_real_node(node: NodeProcess, tmp_path: Path) -> None:
    status, body = node.op("get_component_logs", project="web", lines=1)
    if status == 400 and body.get("code") == "unknown_operation":
        pytest.skip("this node has no get_component_logs operation yet")
    d = app_dir(tmp_path)
    with (d / "component.toml").open("a") as f:
        f.write('[run]\ncommand = "echo up on $CAIRN_NODE; exec sleep 600"\n')
    r = cairn(node, "deploy", str(d), "--project", "logged")
    assert r.returncode == 0, r.stderr
    r = cairn(node, "components", "logs", "logged", "--lines", "3", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["project"] == "logged" and answer["node"] == "n1"
    assert isinstance(answer["lines"], list) and len(answer["lines"]) <= 3
    assert any(x["line"] == "up on n1" for x in answer["lines"]), answer
