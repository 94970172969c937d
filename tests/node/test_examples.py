"""The bundled example in its three versions, run for real through the supervisor."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from procs import free_port
from supervision import supervisor

from node.deploy import component_config
from node.deploy.component_config import load_component_config
from node.deploy.hooks import OutputTail, run_hook
from node.deploy.supervisor import Outcome, Supervisor

EXAMPLES = Path(component_config.__file__).resolve().parents[1] / "examples"
VERSIONS = ("hello", "hello-v2", "hello-broken")


def test_every_version_ships_the_same_server() -> None:
    server = (EXAMPLES / "hello" / "server.py").read_bytes()
    for name in VERSIONS:
        assert (EXAMPLES / name / "server.py").read_bytes() == server, name
        run = load_component_config(EXAMPLES / name).run
        assert run is not None and run.ready_url == "http://127.0.0.1:${HELLO_PORT:-8080}/health"


async def _stage(tmp_path: Path, name: str) -> tuple[str, Path]:
    """Copy an example into a release directory and run its install and check hooks."""
    deployment_id = str(uuid.uuid4())
    release = tmp_path / "releases" / deployment_id
    shutil.copytree(EXAMPLES / name, release)
    config = load_component_config(release)

    async def ignore(stream: str, line: str) -> None:
        return None

    for hook in (config.install, config.check):
        assert hook is not None
        result = await run_hook(
            hook, name="install", cwd=release, env={}, on_line=ignore, tail=OutputTail()
        )
        assert result.exit_code == 0, name
    return deployment_id, release


async def _switch(sup: Supervisor, tmp_path: Path, name: str) -> tuple[str, Path, Outcome, str]:
    deployment_id, release = await _stage(tmp_path, name)
    spec = load_component_config(release).run
    result = await sup.switch("hello", deployment_id, release, spec, restart=True)
    return deployment_id, release, result.outcome, result.message + repr(result.output)


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return str(r.read().decode())


@pytest.mark.timeout(120)
async def test_the_demo_story_v1_v2_then_a_broken_v3_and_back(tmp_path: Path) -> None:
    port = free_port()
    sup = supervisor(tmp_path, env=(f"HELLO_PORT={port}",))
    try:
        v1, _, outcome, why = await _switch(sup, tmp_path, "hello")
        assert outcome == Outcome.READY, why
        version = json.loads(await _in_thread(_get, port, "/version"))
        assert version == {"version": "1", "node": "n1", "deployment_id": v1}
        page = await _in_thread(_get, port, "/")
        assert "Hello, version 1" in page and v1 in page

        v2, r2, outcome, why = await _switch(sup, tmp_path, "hello-v2")
        assert outcome == Outcome.READY, why
        assert "Hello again, version 2" in await _in_thread(_get, port, "/")

        _, _, outcome, why = await _switch(sup, tmp_path, "hello-broken")
        assert outcome == Outcome.EXITED, why
        assert "hello: cannot read settings.toml: No such file or directory" in why

        # The caller rolls back by switching to v2 again.
        back = await sup.switch("hello", v2, r2, load_component_config(r2).run, restart=True)
        assert back.outcome == Outcome.READY
        assert json.loads(await _in_thread(_get, port, "/version"))["version"] == "2"
    finally:
        await sup.close()
    tail = await sup.logs("hello", 1000)
    assert tail is not None
    assert any(x.line.startswith("hello v2 on node n1: http://127.0.0.1:") for x in tail.lines)
    assert tail.lines[-2].line == "hello: stopped"  # SIGTERM ended it cleanly


async def _in_thread(fn: Callable[..., str], *args: object) -> str:
    return await asyncio.to_thread(fn, *args)
