"""Readiness of a freshly started process: ``ready_command``, ``ready_url`` or settling.

:func:`wait_ready` probes until the process is ready, it exits, or ``ready_timeout_s``
passes; every probe races the process's exit, so a process that dies is reported at
once rather than after the timeout.

- ``ready_command``: run in the release directory with the process's environment, in its
  own process group; ready when it exits 0. A try may use the whole remaining time.
- ``ready_url``: ``GET`` on loopback; ready on a 2xx answer. Each try is bounded by the
  node's ``ready_try_timeout_s``. ``${NAME}`` / ``${NAME:-default}`` in the port are
  expanded from the process's environment (how each node gets its own port).
- neither: ready when the process is still running after ``settle_s``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from node.deploy.component_config import HookSpec, RunSpec
from node.deploy.hooks import OutputTail, run_hook

__all__ = ["Probe", "ReadyCheck", "expand_ready_url", "wait_ready"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([0-9]{1,5}))?\}")


def expand_ready_url(url: str, env: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in a ``ready_url`` with values from ``env``.

    Raises:
        ValueError: a name is unset and has no default, or its value is not a port.
    """

    def value(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        got = env.get(name) or default
        if got is None:
            raise ValueError(f"ready_url uses ${{{name}}}, which is not set on this node")
        if not got.isdigit() or not 1 <= int(got) <= 65535:
            raise ValueError(f"ready_url port ${{{name}}} = {got!r} is not a port number")
        return got

    return _VAR.sub(value, url)


@dataclass(frozen=True, slots=True)
class ReadyCheck:
    """How :func:`wait_ready` ended."""

    ready: bool
    exited: bool  # the process exited before it was ready
    reason: str  # why not ready (empty when ready)


@dataclass(frozen=True, slots=True)
class Probe:
    """What a probe needs besides the spec: where, with what, and the node's timings."""

    cwd: Path
    env: Mapping[str, str]
    settle_s: float
    interval_s: float
    try_timeout_s: float
    #: Called with a ready_command's process group once it runs, and with it again (as
    #: ``on_group_end``) once it is gone; the supervisor records it for crash safety.
    on_group: Callable[[int], None] | None = None
    on_group_end: Callable[[int], None] | None = None


async def wait_ready(spec: RunSpec, probe: Probe, exited: asyncio.Future[None]) -> ReadyCheck:
    """Wait until the process is ready, has exited, or ``spec.ready_timeout_s`` passed.

    Args:
        spec: the ``[run]`` table.
        probe: working directory, environment and timings.
        exited: resolved when the process exits.

    Returns:
        Ready, or not ready with ``exited`` and a one-line reason.
    """
    if spec.ready_command is None and spec.ready_url is None:
        if await _exit_within(exited, probe.settle_s):
            return ReadyCheck(False, True, "exited")
        return ReadyCheck(True, False, "")
    url: str | None = None
    if spec.ready_url is not None:
        try:
            url = expand_ready_url(spec.ready_url, probe.env)
        except ValueError as e:
            return ReadyCheck(False, False, str(e))
    deadline = time.monotonic() + spec.ready_timeout_s
    last = "no probe finished"
    session = None
    if url is not None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False
        )
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ReadyCheck(
                    False, False, f"not ready within {spec.ready_timeout_s:g} s ({last})"
                )
            if session is not None and url is not None:
                attempt = _get(session, url, min(remaining, probe.try_timeout_s))
            else:
                assert spec.ready_command is not None
                attempt = _command(spec.ready_command, probe, remaining)
            task = asyncio.ensure_future(attempt)
            racers: set[asyncio.Future[Any]] = {task, exited}
            try:
                await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.wait({task})
            if exited.done():
                return ReadyCheck(False, True, "exited")
            ok, last = task.result()
            if ok:
                return ReadyCheck(True, False, "")
            pause = min(probe.interval_s, deadline - time.monotonic())
            if pause > 0 and await _exit_within(exited, pause):
                return ReadyCheck(False, True, "exited")
    finally:
        if session is not None:
            await session.close()


async def _exit_within(exited: asyncio.Future[None], seconds: float) -> bool:
    """True if ``exited`` resolves within ``seconds`` (the future is not cancelled)."""
    done, _ = await asyncio.wait({exited}, timeout=seconds)
    return bool(done)


async def _get(session: aiohttp.ClientSession, url: str, timeout_s: float) -> tuple[bool, str]:
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
        ) as resp:
            if 200 <= resp.status < 300:
                return True, ""
            return False, f"GET {url} answered {resp.status}"
    except TimeoutError:
        return False, f"GET {url} did not answer within {timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as e:
        return False, f"GET {url} failed: {_describe(e)}"


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        return e.os_error.strerror or str(e.os_error)
    return str(e) or type(e).__name__


async def _command(
    command: str | tuple[str, ...], probe: Probe, timeout_s: float
) -> tuple[bool, str]:
    tail = OutputTail(max_lines=3, max_bytes=1024)
    pgid: list[int] = []

    async def discard(stream: str, line: str) -> None:
        return None

    def spawned(group: int) -> None:
        pgid.append(group)
        if probe.on_group is not None:
            probe.on_group(group)

    try:
        result = await run_hook(
            HookSpec(command, timeout_s),
            name="ready_command",
            cwd=probe.cwd,
            env=probe.env,
            on_line=discard,
            tail=tail,
            on_spawn=spawned,
        )
    finally:
        if pgid and probe.on_group_end is not None:
            probe.on_group_end(pgid[0])
    if result.exit_code == 0:
        return True, ""
    said = "; ".join(x["line"] for x in tail.as_dict()["lines"])
    status = "timed out" if result.timed_out else f"exited with {result.exit_code}"
    return False, f"ready_command {status}" + (f": {said}" if said else "")
