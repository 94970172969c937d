"""One supervised process: spawned in its own process group, output pumped to its log.

:func:`spawn` starts the command in the release directory with stdin from /dev/null and
both output pipes read line by line: each line is stamped, kept in a small in-memory
tail (for "exited at once" reports) and appended to the project's :class:`RunLog` in a
thread. Reading stops while a write is pending, so a process that writes faster than
the disk takes it is slowed down rather than buffered in memory. A log that cannot be
written (disk full) does not stop the process: its lines are dropped and one warning is
logged.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from node.deploy.hooks import _LineSplitter
from node.deploy.procgroup import stop_group
from node.deploy.runlog import LogLine, RunLog

__all__ = ["RunningProcess", "exit_description", "now_ms", "spawn"]

log = structlog.get_logger(__name__)

_READ_CHUNK = 64 * 1024
_TAIL_LINES = 20
_DRAIN_S = 2.0  # after the process is gone, for pipes a stray child may hold


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def exit_description(returncode: int | None) -> str:
    """``status 3`` or ``signal SIGKILL`` (asyncio reports a signal as a negative code)."""
    if returncode is None:
        return "unknown status"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"status {returncode}"


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Signals the process's own exit; ``Process.wait()`` would also wait for the pipes,
    which a background child can hold open."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_READ_CHUNK, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()
        self.exited_mono: float | None = None

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited_mono = time.monotonic()
            self.exited.set_result(None)


class RunningProcess:
    """A spawned process and the tasks reading its output (owned here, joined by
    :meth:`stop` or :meth:`reap`)."""

    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        protocol: _Protocol,
        runlog: RunLog,
        deployment_id: str,
    ) -> None:
        self.transport = transport
        self._protocol = protocol
        self.pgid = self.pid = transport.get_pid()
        self.exited = protocol.exited
        self.deployment_id = deployment_id
        self.started = time.monotonic()
        self.started_at = now_ms()
        self.tail: deque[LogLine] = deque(maxlen=_TAIL_LINES)
        self._log = runlog
        self._log_failed = False
        self._readers = [
            asyncio.create_task(self._pump("stdout", protocol.stdout), name=f"pump-{self.pid}-out"),
            asyncio.create_task(self._pump("stderr", protocol.stderr), name=f"pump-{self.pid}-err"),
        ]

    @property
    def returncode(self) -> int | None:
        return self.transport.get_returncode()

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def up_s(self) -> float:
        """Seconds from the start to the exit (or to now, while it runs)."""
        end = self._protocol.exited_mono
        return (end if end is not None else time.monotonic()) - self.started

    async def note(self, text: str) -> None:
        """Add a ``cairn`` line (a start, an exit, a restart) to the log."""
        await self._write([LogLine(now_ms(), "cairn", text)])

    async def _write(self, entries: list[LogLine]) -> None:
        self.tail.extend(entries)
        try:
            await asyncio.to_thread(self._log.write, entries)
        except OSError as e:
            if not self._log_failed:
                self._log_failed = True
                log.warning("component_log_failed", path=str(self._log.path), error=str(e))

    async def _pump(self, stream: str, reader: asyncio.StreamReader | None) -> None:
        assert reader is not None
        lines = _LineSplitter()
        while chunk := await reader.read(_READ_CHUNK):
            t = now_ms()
            await self._write([LogLine(t, stream, line) for line in lines.feed(chunk)])
        t = now_ms()
        await self._write([LogLine(t, stream, line) for line in lines.flush()])

    async def drain(self) -> None:
        """Wait (briefly) for the output readers to reach the end of the pipes."""
        await _join(self._readers, _DRAIN_S)

    async def stop(self, grace_s: float) -> bool:
        """Stop the whole process group (SIGTERM, SIGKILL after ``grace_s``) and join the
        readers. Also right for a leader that already exited: members may be left.

        Returns:
            True if SIGKILL was needed.
        """
        try:
            killed = await stop_group(self.pgid, grace_s)
            # The leader is our child: its exit is seen once the child watcher reaps it.
            await asyncio.wait({self.exited}, timeout=_DRAIN_S)
            await self.drain()
        finally:
            self.transport.close()
        return killed

    def lines(self) -> tuple[LogLine, ...]:
        return tuple(self.tail)


async def spawn(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    runlog: RunLog,
    deployment_id: str,
) -> RunningProcess:
    """Start ``argv`` in its own session (so its own process group) in ``cwd``.

    Raises:
        OSError: it could not be started (no such program, not executable, bad cwd).
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _Protocol(loop),
        *argv,
        cwd=cwd,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    return RunningProcess(transport, protocol, runlog, deployment_id)


async def _join(tasks: Sequence[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``tasks`` (pipes held open by a process that left
    the group would block forever), then cancel what is left."""
    pending = [t for t in tasks if not t.done()]
    if pending:
        _, pending_set = await asyncio.wait(pending, timeout=timeout_s)
        for task in pending_set:
            task.cancel()
        if pending_set:
            await asyncio.wait(pending_set)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("component_pump_failed", error=repr(task.exception()))
