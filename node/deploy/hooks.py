"""The install/check hook runner.

A hook runs in its own process group with a minimal environment. Its output is read line
by line from both pipes at once and handed to a callback (which records ``install``
events) and to a bounded :class:`OutputTail` (returned as ``install_output`` on
failure). On timeout or cancellation the whole group is killed, so a hook never leaves
processes behind; processes a hook left running after it exited are stopped too.
What to run is read from ``component.toml`` by :mod:`node.deploy.component_config`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from node.deploy.component_config import HookSpec

__all__ = [
    "MAX_LINE_BYTES",
    "HookGroups",
    "HookResult",
    "OutputTail",
    "TailDict",
    "TailLine",
    "run_hook",
]

OnLine = Callable[[str, str], Awaitable[None]]

MAX_LINE_BYTES = 16 * 1024
_INHERITED_ENV = ("PATH", "HOME", "LANG")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_READ_CHUNK = 64 * 1024
_KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL, and for pipes to drain
_POLL_S = 0.05
_DRAIN_MAX_S = 60.0  # longest a hook's remaining output is read after it exits


@dataclass(frozen=True, slots=True)
class HookResult:
    exit_code: int | None  # None when timed out; negative when killed by a signal
    timed_out: bool
    duration_s: float


class TailLine(TypedDict):
    stream: str
    line: str
    hook: NotRequired[str]


class TailDict(TypedDict):
    lines: list[TailLine]
    truncated: bool
    dropped_lines: int


class OutputTail:
    """The newest output lines: at most ``max_lines`` and ``max_bytes`` (UTF-8) together.

    A line longer than ``max_bytes`` is cut to it. ``dropped_lines`` counts lines pushed
    out; ``truncated`` is true if anything was dropped or cut.
    """

    def __init__(self, max_lines: int = 200, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._lines: deque[tuple[str, str, str | None, int]] = deque()
        self._bytes = 0
        self.dropped_lines = 0
        self._cut = False

    def append(self, stream: str, line: str, hook: str | None = None) -> None:
        """Keep one line (``hook`` labels which hook printed it)."""
        encoded = line.encode("utf-8", "replace")
        if len(encoded) > self.max_bytes:
            encoded = encoded[: self.max_bytes]
            line = encoded.decode("utf-8", "ignore")
            self._cut = True
        self._lines.append((stream, line, hook, len(encoded)))
        self._bytes += len(encoded)
        while len(self._lines) > self.max_lines or self._bytes > self.max_bytes:
            self._bytes -= self._lines.popleft()[3]
            self.dropped_lines += 1

    def extend(self, other: OutputTail, hook: str) -> None:
        """Take every line ``other`` kept (labelled ``hook``) and its drop count."""
        for stream, line, _, _ in other._lines:
            self.append(stream, line, hook)
        self.dropped_lines += other.dropped_lines
        self._cut = self._cut or other._cut

    def as_dict(self) -> TailDict:
        """The ``install_output`` shape: ``{lines: [{stream, line[, hook]}], truncated,
        dropped_lines}``."""
        lines: list[TailLine] = []
        for s, text, hook, _ in self._lines:
            entry: TailLine = {"stream": s, "line": text}
            if hook is not None:
                entry["hook"] = hook
            lines.append(entry)
        return {
            "lines": lines,
            "truncated": self._cut or self.dropped_lines > 0,
            "dropped_lines": self.dropped_lines,
        }


class _LineSplitter:
    """Bytes in, decoded lines out; a line longer than ``limit`` bytes is cut to it."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._skipping = False  # dropping the rest of a line that was already cut

    def _emit(self) -> str:
        text = bytes(self._buf[: self._limit]).decode("utf-8", "replace")
        self._buf.clear()
        return text.removesuffix("\r")

    def feed(self, data: bytes) -> list[str]:
        out: list[str] = []
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            else:
                self._buf += data[start:nl]
                out.append(self._emit())
            start = nl + 1
        if not self._skipping:
            self._buf += data[start:]
            if len(self._buf) >= self._limit:
                out.append(self._emit())
                self._skipping = True
        return out

    def flush(self) -> list[str]:
        return [self._emit()] if self._buf else []


class _Pump:
    def __init__(self, on_line: OnLine, tail: OutputTail) -> None:
        self.on_line = on_line
        self.tail = tail
        self.muted = False  # set once the hook is being torn down
        self.emitted = 0  # lines passed on so far (progress, for draining)

    async def read(self, stream: str, reader: asyncio.StreamReader | None) -> None:
        assert reader is not None
        lines = _LineSplitter()
        while chunk := await reader.read(_READ_CHUNK):
            for line in lines.feed(chunk):
                await self._emit(stream, line)
        for line in lines.flush():
            await self._emit(stream, line)

    async def _emit(self, stream: str, line: str) -> None:
        if not self.muted:
            self.tail.append(stream, line)
            await self.on_line(stream, line)
            self.emitted += 1

    async def drain(self, readers: Sequence[asyncio.Task[None]]) -> None:
        """Wait for the readers once the hook's group is gone: as long as they make
        progress (a hook that exited can leave a pipe full of lines, and each line waits
        for its event to be stored), at most :data:`_DRAIN_MAX_S` in all; a pipe held open
        by a process that escaped the group, silent for the grace period, is given up."""
        deadline = time.monotonic() + _DRAIN_MAX_S
        while time.monotonic() < deadline:
            before = self.emitted
            _, pending = await asyncio.wait(readers, timeout=_KILL_GRACE_S)
            if not pending or self.emitted == before:
                break
        await _join(readers, 0)


async def run_hook(
    spec: HookSpec,
    *,
    name: str,
    cwd: Path,
    env: Mapping[str, str],
    on_line: OnLine,
    tail: OutputTail,
    on_spawn: Callable[[int], None] | None = None,
) -> HookResult:
    """Run one hook to completion, streaming its output.

    Args:
        spec: the command and its timeout.
        name: the hook's name (``install``, ``check``), used in messages.
        cwd: the release directory.
        env: added to the inherited ``PATH``, ``HOME`` and ``LANG`` (the caller passes
            ``CAIRN_PROJECT``, ``CAIRN_DEPLOYMENT_ID`` and ``CAIRN_RELEASE_DIR``).
        on_line: awaited with ``(stream, line)`` for every output line, in order per
            stream; ``stream`` is ``"stdout"`` or ``"stderr"``.
        tail: receives every line too, for ``install_output``.
        on_spawn: called with the hook's process group id once it runs (the group is
            gone when this returns or raises).

    Returns:
        The exit code (127 if the command could not be found, 126 if it could not be
        executed, None if it timed out), whether it timed out, and how long it ran.

    Raises:
        asyncio.CancelledError: the caller was cancelled; the process group is killed
            before it propagates.
        Exception: whatever ``on_line`` raised; the process group is killed first.
    """
    argv = spec.argv
    if not argv:
        raise ValueError("empty hook command")
    full_env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
    full_env.setdefault("PATH", _DEFAULT_PATH)
    full_env.update(env)
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(loop),
            *argv,
            cwd=cwd,
            env=full_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so it can be killed whole
        )
    except OSError as e:
        line = f"{name}: cannot start {argv[0]!r}: {e.strerror or e}"
        tail.append("stderr", line)
        await on_line("stderr", line)
        code = 127 if isinstance(e, FileNotFoundError) else 126
        return HookResult(code, False, time.monotonic() - started)

    pgid = transport.get_pid()
    if on_spawn is not None:
        on_spawn(pgid)
    pump = _Pump(on_line, tail)
    readers = [
        asyncio.create_task(pump.read("stdout", protocol.stdout)),
        asyncio.create_task(pump.read("stderr", protocol.stderr)),
    ]
    try:
        timed_out = await _wait_exit(protocol.exited, readers, spec.timeout_s)
        await _stop_group(pgid)
        await _join([protocol.exited], _KILL_GRACE_S)
        await pump.drain(readers)
    except BaseException:
        pump.muted = True
        _signal_group(pgid, signal.SIGKILL)
        await _join([protocol.exited, *readers], _KILL_GRACE_S)
        raise
    finally:
        transport.close()  # releases pipes still held by a process that left the group
    for task in readers:
        if not task.cancelled():
            task.result()  # surfaces an on_line failure that happened while draining
    exit_code = None if timed_out else transport.get_returncode()
    return HookResult(exit_code, timed_out, time.monotonic() - started)


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Signals the hook's own exit, which ``Process.wait()`` does not: it also waits for
    the pipes to close, and a background child can hold them open."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_READ_CHUNK, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


async def _wait_exit(
    exited: asyncio.Future[None], readers: list[asyncio.Task[None]], timeout_s: float
) -> bool:
    """Wait for the hook's own exit; True if ``timeout_s`` passed first. A reader that
    fails (``on_line`` raised) ends the wait with its exception."""
    pending: set[asyncio.Future[Any]] = {exited, *readers}
    try:
        async with asyncio.timeout(timeout_s):
            while not exited.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not exited:
                        task.result()
    except TimeoutError:
        return True
    return False


class HookGroups:
    """Files naming the process group of every hook running, under ``directory``.

    The node kills a hook's group before it moves on, but a node that is SIGKILLed
    cannot: its hooks keep running. At the next start :meth:`kill_leftovers` kills the
    groups the previous incarnation recorded. A record holds the leader's start time, so
    a pid the kernel has since given to another process is left alone.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, pgid: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / str(pgid)).write_text(_start_time(pgid) or "")

    def discard(self, pgid: int) -> None:
        (self.directory / str(pgid)).unlink(missing_ok=True)

    def kill_leftovers(self) -> list[int]:
        """SIGKILL every recorded group still alive; forget all records. Call at start.

        Returns:
            The process group ids that were signalled.
        """
        killed: list[int] = []
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return killed
        for entry in entries:
            if entry.name.isdigit():
                pgid, recorded = int(entry.name), entry.read_text().strip()
                now = _start_time(pgid)
                # A live leader with another start time is a reused pid: the kernel
                # reuses a pid only once no group of that id is left, so none of ours is.
                if (now is None or now == recorded) and _signal_group(pgid, signal.SIGKILL):
                    killed.append(pgid)
            entry.unlink(missing_ok=True)
        return killed


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), or None."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def _stop_group(pgid: int) -> None:
    """SIGTERM whatever is left of the group, SIGKILL it after the grace period."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + _KILL_GRACE_S
    # Nothing signals when the last member of a group exits, so poll.
    while _signal_group(pgid, 0) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_POLL_S)
    _signal_group(pgid, signal.SIGKILL)


async def _join(tasks: Sequence[asyncio.Future[Any]], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``tasks`` (pipes held open by a process that escaped
    the group would block forever), then cancel what is left."""
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
