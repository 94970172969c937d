"""The supervisor with real processes: start, readiness, failures, restarts, stops."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import wait_until
from procs import free_port
from structlog.testing import capture_logs
from supervision import PY, group_gone, live_groups, py, release, supervisor

from node.deploy.component_config import RunSpec
from node.deploy.supervisor import Outcome, Supervisor

# Prints its environment as JSON, then stays up.
ENV_AND_WAIT = "import json, os, time; print(json.dumps(dict(os.environ))); time.sleep(600)"
WAIT = "import time; time.sleep(600)"

# A tiny loopback HTTP server: /health answers 200 (or HEALTH_STATUS) once it listens,
# which it does after START_DELAY seconds.
HTTP_SERVER = """
import http.server, os, time
time.sleep(float(os.environ.get("START_DELAY", "0")))
status = int(os.environ.get("HEALTH_STATUS", "200"))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        print("served", self.path)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


@pytest.fixture
async def sup(tmp_path: Path) -> AsyncIterator[Supervisor]:
    s = supervisor(tmp_path)
    yield s
    await s.close()


async def _log_text(s: Supervisor, project: str = "web") -> list[str]:
    tail = await s.logs(project, 10_000)
    return [x.line for x in tail.lines] if tail else []


async def test_a_process_starts_in_its_release_with_only_the_cairn_environment(
    sup: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_OF_THE_NODE", "do-not-leak")
    dep, path = release(tmp_path)
    result = await sup.switch("web", dep, path, py(ENV_AND_WAIT), restart=True)
    assert result.outcome == Outcome.READY and result.ok, result
    state = sup.state("web")
    assert state.running and state.ready and state.pid == result.pid
    assert state.deployment_id == dep and state.restarts == 0 and state.started_at
    lines = await wait_until(lambda: _stdout_json(sup), what="the environment line")
    env = json.loads(lines)
    assert env["CAIRN_NODE"] == "n1" and env["CAIRN_PROJECT"] == "web"
    assert env["CAIRN_DEPLOYMENT_ID"] == dep and env["CAIRN_RELEASE_DIR"] == str(path)
    assert set(env) <= {"CAIRN_NODE", "CAIRN_PROJECT", "CAIRN_DEPLOYMENT_ID"} | {
        "CAIRN_RELEASE_DIR", "PATH", "HOME", "LANG", "LC_CTYPE",  # python may set LC_CTYPE
    }  # fmt: skip
    assert "SECRET_OF_THE_NODE" not in env
    assert os.readlink(f"/proc/{result.pid}/cwd") == str(path)


async def _stdout_json(sup: Supervisor) -> str | None:
    tail = await sup.logs("web", 100)
    assert tail is not None
    return next((x.line for x in tail.lines if x.stream == "stdout"), None)


async def test_ready_command_gates_readiness(sup: Supervisor, tmp_path: Path) -> None:
    dep, path = release(tmp_path)
    spec = py(
        "import pathlib, time; time.sleep(0.4); pathlib.Path('ready').touch(); time.sleep(600)",
        ready_command="test -f ready",
        ready_timeout_s=20,
    )
    result = await sup.switch("web", dep, path, spec, restart=True)
    assert result.outcome == Outcome.READY, result
    assert (path / "ready").exists()  # it was not ready before the file existed


async def test_ready_command_that_never_passes_is_not_ready_and_stopped(
    sup: Supervisor, tmp_path: Path
) -> None:
    dep, path = release(tmp_path)
    spec = py(WAIT, ready_command="echo still warming up; exit 1", ready_timeout_s=0.6)
    result = await sup.switch("web", dep, path, spec, restart=True)
    assert result.outcome == Outcome.NOT_READY and not result.ok
    assert "not ready within 0.6 s" in result.message
    assert "ready_command exited with 1: still warming up" in result.message
    assert result.pid is not None and group_gone(result.pid)
    state = sup.state("web")
    assert not state.running and state.pending_deployment_id is None
    assert not list((tmp_path / "run" / "supervised").iterdir())


async def test_ready_url_with_a_port_from_the_node_environment(tmp_path: Path) -> None:
    port = free_port()
    sup = supervisor(tmp_path, env=(f"PORT={port}", "START_DELAY=0.3"))
    try:
        dep, path = release(tmp_path)
        spec = py(HTTP_SERVER, ready_url="http://127.0.0.1:${PORT}/health", ready_timeout_s=20)
        result = await sup.switch("web", dep, path, spec, restart=True)
        assert result.outcome == Outcome.READY, result

        async def served() -> bool:
            return "served /health" in await _log_text(sup)

        await wait_until(served, what="the server's log line for the probe")
    finally:
        await sup.close()


async def test_ready_url_answering_500_is_not_ready(tmp_path: Path) -> None:
    port = free_port()
    sup = supervisor(tmp_path, env=(f"PORT={port}", "HEALTH_STATUS=503"))
    try:
        dep, path = release(tmp_path)
        spec = py(HTTP_SERVER, ready_url=f"http://localhost:{port}/health", ready_timeout_s=1)
        result = await sup.switch("web", dep, path, spec, restart=True)
        assert result.outcome == Outcome.NOT_READY
        assert result.message.startswith("not ready within 1 s")
        assert "answered 503" in result.message
    finally:
        await sup.close()


async def test_ready_url_naming_an_unset_variable_is_not_ready(
    sup: Supervisor, tmp_path: Path
) -> None:
    dep, path = release(tmp_path)
    spec = py(WAIT, ready_url="http://127.0.0.1:${NO_SUCH_PORT}/")
    result = await sup.switch("web", dep, path, spec, restart=True)
    assert result.outcome == Outcome.NOT_READY
    assert "${NO_SUCH_PORT}" in result.message and "not set" in result.message


async def test_a_process_that_exits_at_once_is_reported_not_restarted(
    sup: Supervisor, tmp_path: Path
) -> None:
    dep, path = release(tmp_path)
    spec = RunSpec("echo cannot open settings.toml >&2; exit 3")
    result = await sup.switch("web", dep, path, spec, restart=True)
    assert result.outcome == Outcome.EXITED and result.exit_code == 3
    assert "with status 3 before it was ready" in result.message
    assert [(x.stream, x.line) for x in result.output if x.stream == "stderr"] == [
        ("stderr", "cannot open settings.toml")
    ]
    state = sup.state("web")
    assert not state.running and state.restarts == 0
    assert state.last_exit is not None and state.last_exit.code == 3
    # Nothing restarts it: the log ends with the stop, not with a restart.
    assert not any("restarting" in line for line in await _log_text(sup))


async def test_a_command_that_cannot_start_is_start_failed(sup: Supervisor, tmp_path: Path) -> None:
    dep, path = release(tmp_path)
    result = await sup.switch("web", dep, path, RunSpec(("./no-such-program",)), restart=True)
    assert result.outcome == Outcome.START_FAILED
    assert "could not start './no-such-program'" in result.message
    assert "could not start" in (await _log_text(sup))[-1]


async def test_rollback_is_a_switch_back(sup: Supervisor, tmp_path: Path) -> None:
    v1, p1 = release(tmp_path)
    v2, p2 = release(tmp_path)
    first = await sup.switch("web", v1, p1, py(WAIT), restart=True)
    bad = await sup.switch("web", v2, p2, RunSpec("exit 1"), restart=True)
    assert first.pid is not None and group_gone(first.pid)  # stopped before v2 started
    assert bad.outcome == Outcome.EXITED
    back = await sup.switch("web", v1, p1, py(WAIT), restart=True)
    assert back.outcome == Outcome.READY
    assert sup.state("web").deployment_id == v1 and sup.state("web").running


async def test_switching_to_the_running_release_restarts_nothing(
    sup: Supervisor, tmp_path: Path
) -> None:
    dep, path = release(tmp_path)
    first = await sup.switch("web", dep, path, py(WAIT), restart=True)
    again = await sup.switch("web", dep, path, py(WAIT), restart=True)
    assert again.outcome == Outcome.UNCHANGED and again.pid == first.pid


async def test_restart_false_leaves_the_process_and_the_next_start_runs_the_new_release(
    sup: Supervisor, tmp_path: Path
) -> None:
    v1, p1 = release(tmp_path)
    v2, p2 = release(tmp_path)
    # Runs until a file named "stop-now" appears in its release, then exits with 1.
    spec = py(
        "import os, time\n"
        "while not os.path.exists('stop-now'): time.sleep(0.02)\n"
        "raise SystemExit(1)"
    )
    first = await sup.switch("web", v1, p1, spec, restart=True)
    kept = await sup.switch("web", v2, p2, spec, restart=False)
    assert kept.outcome == Outcome.UNCHANGED and kept.ok
    state = sup.state("web")
    assert state.pid == first.pid and state.deployment_id == v1
    assert state.pending_deployment_id == v2
    (p1 / "stop-now").write_text("")  # the v1 process exits on its own ...
    await wait_until(lambda: sup.state("web").deployment_id == v2 and sup.state("web").ready)
    state = sup.state("web")  # ... and its restart runs v2
    assert state.pid != first.pid and state.restarts == 1 and state.pending_deployment_id is None
    assert os.readlink(f"/proc/{state.pid}/cwd") == str(p2)


async def test_a_release_without_run_stops_the_old_process(sup: Supervisor, tmp_path: Path) -> None:
    v1, p1 = release(tmp_path)
    v2, p2 = release(tmp_path)
    first = await sup.switch("web", v1, p1, py(WAIT), restart=True)
    result = await sup.switch("web", v2, p2, None, restart=True)
    assert result.outcome == Outcome.NO_PROCESS and result.ok
    assert first.pid is not None and group_gone(first.pid)
    assert not sup.state("web").running


async def test_restart_with_backoff_after_exits(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, restart_min_s=0.05, restart_max_s=0.2)
    try:
        dep, path = release(tmp_path)
        # Up long enough to be ready (settle 0.3 s), then exits with 2.
        spec = py("import time; time.sleep(0.4); raise SystemExit(2)")
        result = await sup.switch("web", dep, path, spec, restart=True)
        assert result.outcome == Outcome.READY
        await wait_until(lambda: sup.state("web").restarts >= 4, timeout_s=30)
        lines = await _log_text(sup)
        delays = [line.removeprefix("restarting in ") for line in lines if "restarting" in line]
        assert delays[:4] == ["0.05 s", "0.1 s", "0.2 s", "0.2 s"]  # doubling, capped
        exits = [line for line in lines if "exited with status 2" in line]
        assert len(exits) >= 4
        state = sup.state("web")
        assert state.last_exit is not None and state.last_exit.code == 2
    finally:
        await sup.close()


async def test_backoff_resets_after_the_process_stayed_up(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, restart_min_s=0.05, restart_max_s=5, restart_reset_s=2.0)
    try:
        dep, path = release(tmp_path)
        # Starts 1-3 exit after 0.35 s; start 4 stays up 2.5 s (past the reset); then quick.
        spec = py(
            "import pathlib, time\n"
            "p = pathlib.Path('starts'); n = len(p.read_text()) + 1 if p.exists() else 1\n"
            "p.write_text('x' * n)\n"
            "time.sleep(2.5 if n == 4 else 0.35)\n"
            "raise SystemExit(1)"
        )
        assert (await sup.switch("web", dep, path, spec, restart=True)).ok
        await wait_until(lambda: sup.state("web").restarts >= 5, timeout_s=30)
        lines = await _log_text(sup)
        delays = [line.removeprefix("restarting in ") for line in lines if "restarting" in line]
        assert delays[:5] == ["0.05 s", "0.1 s", "0.2 s", "0.05 s", "0.1 s"]
    finally:
        await sup.close()


async def test_switch_and_stop_during_the_backoff_delay(tmp_path: Path) -> None:
    marker = f"CAIRN_RELEASE_DIR={tmp_path}"
    sup = supervisor(tmp_path, restart_min_s=5, restart_max_s=5)
    try:
        v1, p1 = release(tmp_path)
        v2, p2 = release(tmp_path)
        crashing = py("import time; time.sleep(0.4); raise SystemExit(4)")
        assert (await sup.switch("web", v1, p1, crashing, restart=True)).ok
        await wait_until(lambda: sup.state("web").last_exit is not None, what="the exit")
        assert not sup.state("web").running  # waiting 5 s to restart v1 ...
        result = await sup.switch("web", v2, p2, py(WAIT), restart=True)  # ... v2 comes first
        assert result.outcome == Outcome.READY and live_groups(marker) == {result.pid}
        state = sup.state("web")
        assert state.deployment_id == v2 and state.restarts == 0
        assert await sup.stop("web") and live_groups(marker) == set()
        assert not await sup.stop("web")  # nothing left to stop, nothing restarts
        assert not sup.state("web").running and not sup.state("web").pending_deployment_id
    finally:
        await sup.close()


# A process that forks a grandchild in its group, and both ignore SIGTERM.
STUBBORN_FAMILY = "trap '' TERM; sleep 600 & echo child $!; sleep 600"


async def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, stop_grace_s=0.3)
    dep, path = release(tmp_path)
    result = await sup.switch("web", dep, path, RunSpec(STUBBORN_FAMILY), restart=True)
    assert result.outcome == Outcome.READY and result.pid is not None
    pgid = result.pid
    child_line = await wait_until(lambda: _first(sup, "child "), what="the child's pid")
    child = int(child_line.split()[1])
    assert os.getpgid(child) == pgid
    with capture_logs() as logs:
        stopped = await sup.stop("web")
    assert stopped and group_gone(pgid)
    assert any(e["event"] == "component_stopped" and e["killed"] for e in logs), logs
    assert not sup.state("web").running
    assert "killed with SIGKILL" in (await _log_text(sup))[-1]
    await sup.close()


async def _first(sup: Supervisor, prefix: str) -> str | None:
    tail = await sup.logs("web", 100)
    return next((x.line for x in tail.lines if x.line.startswith(prefix)), None) if tail else None


async def test_close_stops_everything_and_logs_one_summary(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    pids = []
    for project in ("a", "b"):
        dep, path = release(tmp_path, project)
        pids.append(
            (
                await sup.switch(
                    project,
                    dep,
                    path,
                    RunSpec(f"exec {PY} -c 'import time; time.sleep(600)'"),
                    restart=True,
                )
            ).pid
        )
    with capture_logs() as logs:
        await sup.close()
    assert all(pid is not None and group_gone(pid) for pid in pids)
    summary = [e for e in logs if e["event"] == "supervisor_closed"]
    assert summary == [
        {
            "event": "supervisor_closed",
            "log_level": "info",
            "stopped": 2,
            "killed": 0,
            "projects": ["a", "b"],
        }
    ]
    dep, path = release(tmp_path)
    with pytest.raises(RuntimeError, match="closed"):
        await sup.switch("web", dep, path, py(WAIT), restart=True)


async def test_recover_after_a_crash_stops_the_leftover_and_starts_one_process(
    tmp_path: Path,
) -> None:
    marker = f"CAIRN_RELEASE_DIR={tmp_path}"
    dep, path = release(tmp_path)
    spec = RunSpec("sleep 600 & sleep 600")  # a group of two
    crashed = supervisor(tmp_path)
    old = await crashed.switch("web", dep, path, spec, restart=True)
    assert old.pid is not None and live_groups(marker) == {old.pid}
    # The node is SIGKILLed: `crashed` stops doing anything and is never closed. A new
    # node process recovers.
    await _crash(crashed)
    fresh = supervisor(tmp_path)
    try:
        results = await fresh.recover({"web": (dep, path, spec), "static": (dep, path, None)})
        assert list(results) == ["web"] and results["web"].outcome == Outcome.READY
        assert group_gone(old.pid)
        new_pid = fresh.state("web").pid
        assert new_pid is not None and new_pid != old.pid
        assert live_groups(marker) == {new_pid}
        # Calling it again (the node's deploy services start) starts nothing twice.
        assert await fresh.recover({"web": (dep, path, spec)}) == {}
        assert live_groups(marker) == {new_pid}
    finally:
        await fresh.close()
        _abandon(crashed)
    assert live_groups(marker) == set()


async def _crash(s: Supervisor) -> None:
    """Stop a supervisor in its tracks as a SIGKILL of the node would, in this test
    process: its tasks end, its processes keep running."""
    for unit in s._units.values():
        tasks = [unit.watcher] if unit.watcher is not None else []
        if unit.proc is not None:
            tasks += unit.proc._readers
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _abandon(s: Supervisor) -> None:
    """Close the pipes a crashed supervisor still holds (its processes are gone)."""
    for unit in s._units.values():
        if unit.proc is not None:
            unit.proc.transport.close()
