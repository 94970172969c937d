"""component.toml parsing, the bounded output tail, and the hook runner (real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node.deploy.component_config import ComponentConfig, HookSpec, RunSpec, load_component_config
from node.deploy.hooks import OutputTail, _LineSplitter, run_hook
from node.errors import DeployFailed


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an unreaped corpse is gone for us)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def _until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    async def __call__(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))

    def of(self, stream: str) -> list[str]:
        return [line for s, line in self.lines if s == stream]


async def _run(
    command: str | tuple[str, ...],
    cwd: Path,
    timeout_s: float = 30.0,
    env: dict[str, str] | None = None,
) -> tuple[int | None, bool, Recorder, OutputTail]:
    rec, tail = Recorder(), OutputTail()
    result = await run_hook(
        HookSpec(command, timeout_s), name="install", cwd=cwd, env=env or {}, on_line=rec, tail=tail
    )
    return result.exit_code, result.timed_out, rec, tail


# --- component.toml ---------------------------------------------------------------------


def _config(tmp_path: Path, text: str) -> ComponentConfig:
    (tmp_path / "component.toml").write_text(text)
    return load_component_config(tmp_path)


def test_no_component_toml_means_no_hooks(tmp_path: Path) -> None:
    assert load_component_config(tmp_path) == ComponentConfig()


def test_full_config_is_parsed_with_defaults(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        """
        [install]
        command = ["npm", "ci"]
        [check]
        command = "test -f ok"
        timeout_s = 5
        [run]
        command = ["node", "server.js"]
        ready_command = "curl -sf localhost:3000/health"
        ready_timeout_s = 12.5
        """,
    )
    assert cfg.install == HookSpec(("npm", "ci"), 300.0)
    assert cfg.check == HookSpec("test -f ok", 5.0)
    assert cfg.check.argv == ("sh", "-c", "test -f ok")
    assert cfg.run == RunSpec(
        ("node", "server.js"), ready_command="curl -sf localhost:3000/health", ready_timeout_s=12.5
    )


def test_check_timeout_defaults_to_60(tmp_path: Path) -> None:
    assert _config(tmp_path, '[check]\ncommand = "true"\n').check == HookSpec("true", 60.0)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[install\ncommand = 'x'", None),
        ("[install]\ncommand = 3\n", "install.command"),
        ("[install]\ncommand = []\n", "install.command"),
        ("[install]\ncommand = ['ok', 2]\n", "install.command"),
        ("[install]\ncommand = '   '\n", "install.command"),
        ("[install]\ntimeout_s = 5\n", "install.command"),
        ("[install]\ncommand = 'x'\ntimeout_s = true\n", "install.timeout_s"),
        ("[install]\ncommand = 'x'\ntimeout_s = -1\n", "install.timeout_s"),
        ("[install]\ncommand = 'x'\ntimeout_s = '5'\n", "install.timeout_s"),
        ("[install]\ncommand = 'x'\ntimeout_s = inf\n", "install.timeout_s"),
        ("[install]\ncommand = 'x'\ncomand = 'y'\n", "install.comand"),
        ("[instal]\ncommand = 'x'\n", "instal"),
        ("install = 'npm ci'\n", "install"),
        ("[run]\ncommand = 'x'\nready_timeout_s = 0\n", "run.ready_timeout_s"),
        ("[run]\ncommand = 'x'\nready_command = {a = 1}\n", "run.ready_command"),
    ],
)
def test_malformed_config_is_bad_payload(tmp_path: Path, text: str, key: str | None) -> None:
    with pytest.raises(DeployFailed) as info:
        _config(tmp_path, text)
    err = info.value
    assert (err.code, err.phase, err.status) == ("bad_payload", "install", 422)
    assert "component.toml" in err.message
    if key is not None:
        assert err.extra["key"] == key
        assert key in err.message


def test_config_that_is_not_utf8_is_bad_payload(tmp_path: Path) -> None:
    (tmp_path / "component.toml").write_bytes(b"[install]\ncommand = '\xff'\n")
    with pytest.raises(DeployFailed, match="UTF-8"):
        load_component_config(tmp_path)


# --- OutputTail and line splitting ------------------------------------------------------


def test_tail_keeps_the_newest_200_lines() -> None:
    tail = OutputTail()
    for i in range(1000):
        tail.append("stdout", str(i))
    out = tail.as_dict()
    assert [x["line"] for x in out["lines"]] == [str(i) for i in range(800, 1000)]
    assert out["truncated"] and out["dropped_lines"] == 800


def test_tail_keeps_at_most_16_kib() -> None:
    tail = OutputTail()
    for i in range(40):
        tail.append("stderr", f"{i:04d}" + "x" * 1020)  # 1 KiB each
    out = tail.as_dict()
    assert len(out["lines"]) == 16 and out["dropped_lines"] == 24
    assert out["lines"][-1] == {"stream": "stderr", "line": "0039" + "x" * 1020}


def test_tail_cuts_a_huge_line_and_small_tail_is_not_truncated() -> None:
    tail = OutputTail()
    tail.append("stdout", "ok")
    assert tail.as_dict() == {
        "lines": [{"stream": "stdout", "line": "ok"}],
        "truncated": False,
        "dropped_lines": 0,
    }
    tail.append("stdout", "é" * 20_000)
    out = tail.as_dict()
    assert len(out["lines"][-1]["line"].encode()) <= 16 * 1024
    assert out["truncated"]


def test_line_splitter_handles_chunk_boundaries_crlf_and_bad_utf8() -> None:
    s = _LineSplitter(limit=8)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\r\nde\nf") == ["abc", "de"]
    assert s.feed(b"\xff\n0123456789abc") == ["f\ufffd", "01234567"]
    assert s.feed(b"def\nlast") == []  # the rest of the cut line is dropped
    assert s.flush() == ["last"]


# --- run_hook ---------------------------------------------------------------------------


async def test_argv_command_streams_stdout(tmp_path: Path) -> None:
    code, timed_out, rec, _ = await _run(("printf", "%s\\n", "a b", "c"), tmp_path)
    assert (code, timed_out) == (0, False)
    assert rec.lines == [("stdout", "a b"), ("stdout", "c")]


async def test_shell_string_exit_code_and_both_streams(tmp_path: Path) -> None:
    code, _, rec, tail = await _run("echo out; echo err >&2; exit 3", tmp_path)
    assert code == 3
    assert rec.of("stdout") == ["out"] and rec.of("stderr") == ["err"]
    assert sorted(x["line"] for x in tail.as_dict()["lines"]) == ["err", "out"]


@pytest.fixture
def real_cwd(tmp_path: Path) -> str:
    """What ``pwd`` prints in ``tmp_path`` (symlinks resolved)."""
    return os.path.realpath(tmp_path)


async def test_env_is_minimal_plus_cairn_vars(
    tmp_path: Path, real_cwd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIRN_SECRET_TEST", "leak")
    env = {"CAIRN_PROJECT": "app", "CAIRN_DEPLOYMENT_ID": "d1", "CAIRN_RELEASE_DIR": str(tmp_path)}
    code, _, rec, _ = await _run(
        'echo "$CAIRN_PROJECT $CAIRN_DEPLOYMENT_ID $CAIRN_RELEASE_DIR"; pwd;'
        ' echo "${CAIRN_SECRET_TEST:-absent}"; test -n "$PATH"',
        tmp_path,
        env=env,
    )
    assert code == 0
    assert rec.of("stdout") == [f"app d1 {tmp_path}", real_cwd, "absent"]


async def test_missing_executable_is_127(tmp_path: Path) -> None:
    code, timed_out, rec, tail = await _run(("/nonexistent/bin/tool", "x"), tmp_path)
    assert (code, timed_out) == (127, False)
    assert len(rec.of("stderr")) == 1 and "cannot start" in rec.of("stderr")[0]
    assert tail.as_dict()["lines"][0]["stream"] == "stderr"


async def test_thousands_of_lines_arrive_in_order(tmp_path: Path) -> None:
    code, _, rec, tail = await _run("seq 1 5000", tmp_path)
    assert code == 0
    assert rec.of("stdout") == [str(i) for i in range(1, 5001)]
    out = tail.as_dict()
    assert [x["line"] for x in out["lines"]] == [str(i) for i in range(4801, 5001)]
    assert out["dropped_lines"] == 4800


async def test_output_left_in_the_pipe_is_read_whole_however_slowly_it_is_stored(
    tmp_path: Path,
) -> None:
    """The hook exits at once (its 3000 lines fit in the pipe) while each line waits for
    a slow store: every line still arrives, although that takes longer than the grace a
    silent pipe gets."""
    seen: list[str] = []

    async def slow(stream: str, line: str) -> None:
        if len(seen) % 100 == 0:
            await asyncio.sleep(0.1)  # 30 pauses: 3 s in all
        seen.append(line)

    result = await run_hook(
        HookSpec("seq 1 3000", 30), name="install", cwd=tmp_path, env={}, on_line=slow,
        tail=OutputTail(),
    )  # fmt: skip
    assert result.exit_code == 0
    assert seen == [str(i) for i in range(1, 3001)]


async def test_a_pipe_held_by_a_process_that_left_the_group_is_given_up(tmp_path: Path) -> None:
    pidfile = tmp_path / "escaped.pid"
    started = time.monotonic()
    code, _, rec, _ = await _run(
        f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 30' & echo done; exit 0", tmp_path
    )
    try:
        assert code == 0 and rec.of("stdout") == ["done"]
        assert time.monotonic() - started < 15  # not the 30 s the escaped sleep holds the pipe
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


async def test_long_line_is_cut_to_16_kib(tmp_path: Path) -> None:
    code, _, rec, _ = await _run("head -c 100000 /dev/zero | tr '\\0' a; echo; echo next", tmp_path)
    assert code == 0
    assert rec.of("stdout") == ["a" * 16 * 1024, "next"]


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    code, timed_out, _, _ = await _run(
        f"sleep 60 & echo $! > {pidfile}; wait", tmp_path, timeout_s=0.5
    )
    assert (code, timed_out) == (None, True)
    assert time.monotonic() - started < 10
    assert not _alive(int(pidfile.read_text()))


async def test_timeout_escalates_to_sigkill(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # SIG_IGN is inherited, so the child sleep ignores SIGTERM too.
    code, timed_out, _, _ = await _run(
        f"trap '' TERM; sleep 60 & echo $! > {pidfile}; wait", tmp_path, timeout_s=0.3
    )
    assert (code, timed_out) == (None, True)
    assert not _alive(int(pidfile.read_text()))


async def test_leftover_background_process_is_stopped_after_exit(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    code, timed_out, _, _ = await _run(f"sleep 60 & echo $! > {pidfile}; exit 0", tmp_path)
    assert (code, timed_out) == (0, False)
    assert time.monotonic() - started < 10
    assert not _alive(int(pidfile.read_text()))


async def test_cancellation_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    task = asyncio.create_task(_run(f"sleep 60 & echo $! > {pidfile}; wait", tmp_path))
    await _until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    pid = int(pidfile.read_text())
    assert _alive(pid)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert not _alive(pid)


async def test_on_line_failure_propagates_and_kills(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"

    async def boom(stream: str, line: str) -> None:
        raise RuntimeError("event store down")

    with pytest.raises(RuntimeError, match="event store down"):
        await run_hook(
            HookSpec(f"sleep 60 & echo $! > {pidfile}; echo hi; wait", 30),
            name="install",
            cwd=tmp_path,
            env={},
            on_line=boom,
            tail=OutputTail(),
        )
    assert not _alive(int(pidfile.read_text()))


async def test_killed_by_signal_reports_negative_code(tmp_path: Path) -> None:
    code, timed_out, _, _ = await _run("kill -9 $$", tmp_path)
    assert (code, timed_out) == (-9, False)
