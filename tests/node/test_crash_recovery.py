"""SIGKILL a real node mid-deploy, restart it, and check what it left behind.

Each case: a node with an active release (v1) is killed while deploying v2 — by a
crash point (``CAIRN_CRASHPOINT``: the node SIGKILLs itself when it reaches that step)
or by the test's own SIGKILL at a moment it observed (an upload half sent, a hook
running). After a restart:

* no row is left non-terminal; an unfinished deploy is ``failed`` with code
  ``interrupted`` (or, once it had reached ``activating``, resumed to ``success``);
* no temp file stays: ``blobs/tmp`` is empty, no ``.tmp-*`` under ``components``, and
  no blob is left that no row refers to;
* every ``success`` row's blob exists and hashes to its ``payload_hash``;
* where the deploy did not finish, v1 is still ``current`` and its files are unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import component
from procs import ADMIN_PASSWORD, ADMIN_USER, NodeProcess, wait_for

NON_TERMINAL = {"pending", "extracting", "installing", "loading", "staging", "replicating",
                "activating", "restarting"}  # fmt: skip
V2 = component(install="echo installing v2", check="test -f index.html", v="2")


def _deploy(node: NodeProcess, payload: bytes, project: str = "web") -> tuple[int, Any]:
    return node.op("deploy_component", project=project, payload=base64.b64encode(payload).decode())


def _tree(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else "")
    return out


class Scene:
    """A node with v1 active, ready to be crashed while deploying v2."""

    def __init__(self, tmp_path: Path) -> None:
        self.node = NodeProcess("n1", tmp_path)
        self.node.start()
        status, body = _deploy(self.node, component(v="1"))
        assert status == 200, body
        self.v1 = body["deployment_id"]
        self.components = self.node.data_dir / "components"
        self.v1_files = _tree(self.components / "web" / "releases" / self.v1)
        assert self.v1_files

    def current(self) -> str:
        return os.readlink(self.components / "web" / "current").split("/")[-1]

    def deploy_until_killed(self, payload: bytes = V2) -> None:
        """Deploy; the node must die of SIGKILL before it answers."""
        answer: dict[str, Any] = {}

        def run() -> None:
            try:
                answer["result"] = _deploy(self.node, payload)
            except OSError as e:  # the connection dies with the node
                answer["error"] = e

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        code = self.node.wait_exit(timeout_s=60)
        thread.join(30)
        assert code == -signal.SIGKILL, (code, answer, self.node.log()[-3000:])
        assert "result" not in answer, answer

    def restart(self) -> list[dict[str, Any]]:
        """Start again; a deploy resumed at start finishes in the background, so this
        waits (bounded) until no row is left running, then returns every row."""
        self.node.start()
        rows: list[dict[str, Any]] = []

        def settled() -> bool:
            status, listing = self.node.op("list_deployments", limit=1000, include_event_log=True)
            assert status == 200
            rows[:] = listing["deployments"]
            return not [r for r in rows if r["status"] in NON_TERMINAL]

        with contextlib.suppress(TimeoutError):  # check() then names the running row
            wait_for(settled, timeout_s=60, interval_s=0.2)
        return rows

    def check(self, rows: list[dict[str, Any]], *, finished: bool) -> dict[str, Any]:
        """The invariants; returns the row of the interrupted deploy."""
        assert [r["status"] for r in rows if r["status"] in NON_TERMINAL] == []
        (v2,) = [r for r in rows if r["deployment_id"] != self.v1]
        data = self.node.data_dir
        blobs = data / "blobs"
        assert not [p for p in (blobs / "tmp").rglob("*")] if (blobs / "tmp").exists() else True
        assert not list(self.components.rglob(".tmp-*"))
        stored = {p.name: p for p in (blobs / "sha256").rglob("*") if p.is_file()}
        referenced = {r["payload_hash"] for r in rows if r["payload_hash"]}
        assert set(stored) <= referenced, "a blob no row refers to was left behind"
        for r in rows:
            if r["status"] == "success":
                blob = stored[r["payload_hash"]]
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == r["payload_hash"]
                assert r["payload_blob_present"] is True
        releases = self.components / "web" / "releases"
        if finished:
            assert v2["status"] == "success", v2
            assert self.current() == v2["deployment_id"]
            assert v2["event_log"][-1]["data"] == {"status": "success"}
        else:
            assert v2["status"] == "failed", v2
            assert v2["error"]["code"] == "interrupted", v2
            assert v2["completed_at"] is not None
            assert v2["event_log"][-1]["data"] == {"status": "failed"}
            assert self.current() == self.v1
            assert sorted(p.name for p in releases.iterdir()) == [self.v1]
        assert _tree(releases / self.v1) == self.v1_files
        # The node is usable again: a new deploy goes through.
        status, body = _deploy(self.node, component(v="3"))
        assert status == 200, body
        assert self.current() == body["deployment_id"]
        return v2


@pytest.fixture
def scene(tmp_path: Path) -> Any:
    s = Scene(tmp_path)
    yield s
    s.node.kill()


def _crash_at(scene: Scene, point: str) -> None:
    assert scene.node.stop() == 0
    scene.node.start(crashpoint=point)
    scene.deploy_until_killed()


@pytest.mark.parametrize(
    "point",
    [
        "blob.after_write",  # payload written and fsynced to a temp file, not renamed
        "blob.before_rename",
        "deploy.after_receive",  # the blob is stored; the row does not name it yet
        "deploy.before_stage",
        "extract.member",  # half-extracted into releases/.tmp-*
        "extract.before_publish",
        "hook.install.start",
        "hook.check.start",
    ],
)
def test_crash_before_the_switch_fails_interrupted(scene: Scene, point: str) -> None:
    _crash_at(scene, point)
    v2 = scene.check(scene.restart(), finished=False)
    assert v2["error"]["phase"]
    log = scene.node.log()
    assert '"deploy_interrupted"' in log


@pytest.mark.parametrize("point", ["deploy.before_activate", "components.before_switch"])
def test_crash_at_the_switch_resumes_to_success(scene: Scene, point: str) -> None:
    """Observed: a row that reached ``activating`` is resumed at start (the release is
    staged and its hooks passed), so the deploy ends ``success`` and v2 is current."""
    _crash_at(scene, point)
    v2 = scene.check(scene.restart(), finished=True)
    phases = [e["data"] for e in v2["event_log"] if e["event"] == "phase"]
    assert {"phase": "activate", "status": "done"} in phases
    assert '"deploy_resumed"' in scene.node.log()


def _slow_upload(scene: Scene) -> socket.socket:
    """Send a multipart deploy's head and part of its payload, and keep the socket."""
    boundary = "cairncrash"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="operation"\r\n\r\n'
        f"deploy_component\r\n--{boundary}\r\n"
        f'Content-Disposition: form-data; name="project"\r\n\r\nweb\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="payload"; filename="p.tgz"\r\n'
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
    sock = socket.create_connection(("127.0.0.1", scene.node.admin_port), timeout=10)
    sock.sendall(
        f"POST / HTTP/1.1\r\nHost: n1\r\nAuthorization: Basic {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(head) + (64 << 20)}\r\n\r\n".encode()
        + head
    )
    chunk = os.urandom(1 << 20)
    tmp = scene.node.data_dir / "blobs" / "tmp"
    deadline = time.monotonic() + 30
    # Keep sending until the node has ingest bytes on disk (it writes 4 MiB batches).
    while not _ingesting(tmp):
        assert time.monotonic() < deadline, "the upload never reached the blob store"
        sock.sendall(chunk)
    return sock


def _ingesting(tmp: Path) -> bool:
    return tmp.exists() and any(p.stat().st_size > 0 for p in tmp.glob("*"))


def test_sigkill_mid_upload(scene: Scene) -> None:
    sock = _slow_upload(scene)
    _, listing = scene.node.op("list_deployments", status="pending")
    assert listing["total"] == 1
    scene.node.kill()
    sock.close()
    rows = scene.restart()
    v2 = scene.check(rows, finished=False)
    assert v2["payload_hash"] is None and v2["error"]["phase"] == "receive"


def test_sigkill_while_a_hook_runs(scene: Scene, tmp_path: Path) -> None:
    pidfile = tmp_path / "hook.pid"
    hook = f"echo $$ > {pidfile}; echo started; exec sleep 60"
    payload = component(install=hook, v="2")
    thread = threading.Thread(target=lambda: _swallow(_deploy, scene.node, payload), daemon=True)
    thread.start()

    def installing() -> bool:
        _, listing = scene.node.op("list_deployments", status="installing")
        return bool(listing["total"]) and pidfile.exists() and pidfile.read_text().strip() != ""

    wait_for(installing, timeout_s=30, what="the install hook to run")
    hook_pid = int(pidfile.read_text())
    scene.node.kill()
    thread.join(30)
    try:
        assert _alive(hook_pid), "the hook died with the node: nothing to recover from"
        rows = scene.restart()
        # The restarted node killed the hook its previous incarnation left running.
        wait_for(lambda: not _alive(hook_pid), timeout_s=10, what="the leftover hook to die")
        assert '"leftover_hooks_killed"' in scene.node.log()
        v2 = scene.check(rows, finished=False)
        assert v2["error"]["phase"] == "install"
        lines = [e["data"]["line"] for e in v2["event_log"] if e["event"] == "install"]
        assert "started" in lines or lines == []  # output written before the kill may be lost
        assert not list((scene.node.data_dir / "run" / "hooks").glob("*"))
    finally:
        _kill_quietly(hook_pid)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _swallow(fn: Any, *args: Any) -> None:
    with contextlib.suppress(OSError):  # the connection dies with the node
        fn(*args)


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_repeated_crashes_leave_one_failed_row_each(scene: Scene) -> None:
    """Two crashes in a row, then a restart: both rows end interrupted, nothing leaks."""
    for point in ("extract.member", "blob.after_write"):
        if scene.node.proc is not None and scene.node.proc.poll() is None:
            assert scene.node.stop() == 0
        scene.node.start(crashpoint=point)
        scene.deploy_until_killed()
    rows = scene.restart()
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and {r["error"]["code"] for r in failed} == {"interrupted"}
    assert scene.current() == scene.v1
    assert json.dumps(rows)  # the records are whole
