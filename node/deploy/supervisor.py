"""The supervisor: one long-running ``[run]`` process per project, for its active release.

Activation calls :meth:`Supervisor.switch` after it switched ``current``; convergence,
rollback and node start (:meth:`Supervisor.recover`) call it the same way, and a drop
calls :meth:`Supervisor.stop`. Per project, calls are serialised by a lock.

A process runs in its own session (a process group of its own) in its release
directory, with only ``CAIRN_NODE``, ``CAIRN_PROJECT``, ``CAIRN_DEPLOYMENT_ID``,
``CAIRN_RELEASE_DIR``, the node's ``PATH``, ``HOME`` and ``LANG``, and the node's
``[components] env`` in its environment. Its output goes to a rotated per-project log
(:mod:`node.deploy.runlog`). Stopping it stops the whole group: SIGTERM, then SIGKILL
after the grace period.

When a process that was started exits on its own, it is restarted after a delay that
starts at ``restart_min_s`` and doubles per exit up to ``restart_max_s``; a process that
stayed up ``restart_reset_s`` starts the count again. A process that fails its readiness
check during :meth:`switch` is stopped and reported instead, so the caller can roll back.

Every group started is recorded on disk (:class:`GroupRecords`), so after a node crash
:meth:`recover` stops what the previous node process left before it starts anything.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from node.config import ComponentsConfig
from node.deploy.component_config import RunSpec
from node.deploy.procgroup import GroupRecords, stop_group
from node.deploy.readiness import Probe, wait_ready
from node.deploy.runlog import LogLine, LogTail, RunLog
from node.deploy.runproc import RunningProcess, exit_description, now_ms, spawn
from node.deploy.runstate import ExitInfo, Outcome, ProcessState, ReadyResult

__all__ = ["ExitInfo", "Outcome", "ProcessState", "ReadyResult", "Supervisor"]

log = structlog.get_logger(__name__)

_INHERITED_ENV = ("PATH", "HOME", "LANG")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True, slots=True)
class _Release:
    deployment_id: str
    release_dir: Path
    spec: RunSpec | None


@dataclass
class _Unit:
    """One project's supervision state; every change happens under ``lock``."""

    project: str
    runlog: RunLog
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    release: _Release | None = None  # what the next start runs
    ran: _Release | None = None  # what the process runs, or last ran
    proc: RunningProcess | None = None
    watcher: asyncio.Task[None] | None = None  # waits for an exit, restarts with backoff
    ready: bool = False
    restarts: int = 0
    failures: int = 0  # consecutive exits of short-lived processes (the backoff exponent)
    last_exit: ExitInfo | None = None


class Supervisor:
    """Runs and supervises each project's ``[run]`` process on this node.

    Args:
        node: this node's name (``CAIRN_NODE``).
        run_dir: the node's ``<data_dir>/run``; logs go to ``components/<project>/``,
            process group records to ``supervised/``.
        settings: the node's ``[components]`` config.
    """

    def __init__(self, *, node: str, run_dir: Path, settings: ComponentsConfig) -> None:
        self.node = node
        self.settings = settings
        self._logs_dir = run_dir / "components"
        self._records = GroupRecords(run_dir / "supervised")
        self._own: set[int] = set()  # recorded groups this supervisor runs (processes, probes)
        self._units: dict[str, _Unit] = {}
        self._closed = False

    # -- the API ---------------------------------------------------------------------

    async def switch(
        self,
        project: str,
        deployment_id: str,
        release_dir: Path,
        spec: RunSpec | None,
        *,
        restart: bool,
    ) -> ReadyResult:
        """Make ``project``'s process run ``deployment_id`` from ``release_dir``.

        With ``restart``: the old process group is stopped first (SIGTERM, SIGKILL after
        its grace period), then the new one is started and its readiness awaited. Without
        ``restart`` the running process is left alone (files only); the release becomes
        the one its next start runs. A release already running and ready is not
        restarted (``UNCHANGED``), so convergence after :meth:`recover` starts nothing
        twice.

        Args:
            project: component name.
            deployment_id: the release being activated.
            release_dir: its directory (``components/<project>/releases/<id>``).
            spec: its ``[run]`` table; None if it has none (any process is stopped).
            restart: False for ``restart: false`` deploys.

        Returns:
            ``ok`` when the release runs ready (or has no process, or nothing was
            restarted). Otherwise the new process has been stopped and the result says
            why (``EXITED`` with its status and last output lines, ``NOT_READY``,
            ``START_FAILED``): call ``switch`` again with the previous release to roll
            back.

        Raises:
            RuntimeError: the supervisor is closed.
        """
        unit = self._unit(project)
        release = _Release(deployment_id, release_dir, spec)
        async with unit.lock:
            self._check_open()
            if not restart:
                unit.release = release
                return ReadyResult(Outcome.UNCHANGED, "not restarted (restart: false)")
            proc = unit.proc
            if proc is not None and proc.running and unit.ready and unit.ran == release:
                return ReadyResult(Outcome.UNCHANGED, "already running and ready", pid=proc.pid)
            await self._halt(unit)
            unit.release, unit.restarts, unit.failures = release, 0, 0
            return await self._start(unit, keep_on_failure=False)

    async def stop(self, project: str) -> bool:
        """Stop ``project``'s process (a drop) and forget its release; the log stays.

        Returns:
            True if a process was running.
        """
        unit = self._units.get(project)
        if unit is None:
            return False
        async with unit.lock:
            was_running = unit.proc is not None and unit.proc.running
            await self._halt(unit)
            unit.release = None
            return was_running

    async def recover(
        self, active: Mapping[str, tuple[str, Path, RunSpec | None]]
    ) -> dict[str, ReadyResult]:
        """At node start: stop what a previous node process left, start the active releases.

        Every recorded process group that this supervisor does not run itself is stopped
        (SIGTERM, then SIGKILL after the grace period); then each project of ``active``
        with a ``[run]`` that is not running yet is started once. Unlike :meth:`switch`,
        a process that is not ready is kept and restarted with backoff: it is the active
        release and there is nothing to roll back to. Safe to call more than once.

        Args:
            active: per project, the active ``(deployment_id, release_dir, spec)``.

        Returns:
            For each project it started, how the start went (a project whose process
            already runs is left alone and not listed).
        """
        self._check_open()
        leftovers = await asyncio.to_thread(self._records.leftovers, set(self._own))
        if leftovers:
            grace = self.settings.stop_grace_s
            await asyncio.gather(*(stop_group(x.pgid, grace) for x in leftovers))
            for x in leftovers:
                self._records.discard(x.pgid)
            log.warning(
                "leftover_components_stopped",
                process_groups=[x.pgid for x in leftovers],
                projects=sorted({x.project for x in leftovers}),
            )
        results: dict[str, ReadyResult] = {}

        async def start(project: str, release: _Release) -> None:
            unit = self._unit(project)
            async with unit.lock:
                self._check_open()
                if unit.proc is None or not unit.proc.running:
                    await self._halt(unit)
                    unit.release = release
                    results[project] = await self._start(unit, keep_on_failure=True)

        await asyncio.gather(
            *(
                start(project, _Release(*entry))
                for project, entry in active.items()
                if entry[2] is not None
            )
        )
        return results

    async def close(self) -> None:
        """Node shutdown: stop every process cleanly (whole groups) and log a summary."""
        self._closed = True
        units = list(self._units.values())
        running = [u.project for u in units if u.proc is not None and u.proc.running]

        async def halt(unit: _Unit) -> bool:
            async with unit.lock:
                return await self._halt(unit)

        killed = await asyncio.gather(*(halt(u) for u in units))
        log.info(
            "supervisor_closed",
            stopped=len(running),
            killed=sum(killed),
            projects=sorted(running),
        )

    def state(self, project: str) -> ProcessState:
        """``project``'s process state (all defaults for a project never started here)."""
        unit = self._units.get(project)
        if unit is None:
            return ProcessState(project)
        proc = unit.proc if unit.proc is not None and unit.proc.running else None
        ran, release = unit.ran, unit.release
        pending = None
        if release is not None and release.spec is not None and release != ran:
            pending = release.deployment_id
        return ProcessState(
            project=project,
            deployment_id=ran.deployment_id if ran is not None else None,
            pending_deployment_id=pending,
            running=proc is not None,
            pid=proc.pid if proc is not None else None,
            ready=proc is not None and unit.ready,
            restarts=unit.restarts,
            started_at=proc.started_at if proc is not None else None,
            last_exit=unit.last_exit,
        )

    def states(self) -> dict[str, ProcessState]:
        """Every project this supervisor has seen, by name."""
        return {name: self.state(name) for name in sorted(self._units)}

    async def logs(self, project: str, lines: int) -> LogTail | None:
        """The newest ``lines`` lines of ``project``'s log, or None if it has none."""
        runlog = self._runlog(project)
        if not await asyncio.to_thread(runlog.exists):
            return None
        return await asyncio.to_thread(runlog.tail, lines)

    # -- inside ----------------------------------------------------------------------

    def _record(self, pgid: int, project: str) -> None:
        self._records.add(pgid, project)
        self._own.add(pgid)

    def _forget(self, pgid: int) -> None:
        self._own.discard(pgid)
        self._records.discard(pgid)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the supervisor is closed")

    def _runlog(self, project: str) -> RunLog:
        s = self.settings
        return RunLog(self._logs_dir / project, max_bytes=s.log_max_bytes, backups=s.log_backups)

    def _unit(self, project: str) -> _Unit:
        unit = self._units.get(project)
        if unit is None:
            unit = self._units[project] = _Unit(project, self._runlog(project))
        return unit

    def _env(self, project: str, release: _Release) -> dict[str, str]:
        env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
        env.setdefault("PATH", _DEFAULT_PATH)
        env.update(self.settings.environment)
        env.update(
            CAIRN_NODE=self.node,
            CAIRN_PROJECT=project,
            CAIRN_DEPLOYMENT_ID=release.deployment_id,
            CAIRN_RELEASE_DIR=str(release.release_dir),
        )
        return env

    def _grace(self, release: _Release | None) -> float:
        if release is not None and release.spec is not None and release.spec.stop_grace_s:
            return release.spec.stop_grace_s
        return self.settings.stop_grace_s

    async def _halt(self, unit: _Unit) -> bool:
        """Cancel the watcher and stop the process group (lock held). True if SIGKILLed."""
        if unit.watcher is not None:
            unit.watcher.cancel()
            await asyncio.wait({unit.watcher})
            unit.watcher = None
        proc, unit.proc, unit.ready = unit.proc, None, False
        if proc is None:
            return False
        was_running = proc.running
        if was_running:
            await proc.note(f"stopping pid {proc.pid} (SIGTERM)")
        killed = await proc.stop(self._grace(unit.ran))
        self._forget(proc.pgid)
        if was_running:
            how = "killed with SIGKILL after the grace period" if killed else "stopped"
            await proc.note(f"pid {proc.pid} {how}")
            log.info("component_stopped", project=unit.project, pid=proc.pid, killed=killed)
        return killed

    async def _spawn(self, unit: _Unit, release: _Release) -> RunningProcess:
        """Start ``release``'s process and record its group (lock held).

        Raises:
            OSError: it could not be started.
        """
        assert release.spec is not None
        proc = await spawn(
            release.spec.argv,
            cwd=release.release_dir,
            env=self._env(unit.project, release),
            runlog=unit.runlog,
            deployment_id=release.deployment_id,
        )
        # No await between the spawn and the record: a crash record never misses a group.
        self._record(proc.pgid, unit.project)
        unit.proc, unit.ran, unit.ready = proc, release, False
        log.info(
            "component_started",
            project=unit.project,
            deployment_id=release.deployment_id,
            pid=proc.pid,
        )
        await proc.note(f"started pid {proc.pid} for release {release.deployment_id}")
        return proc

    async def _start(self, unit: _Unit, *, keep_on_failure: bool) -> ReadyResult:
        """Start ``unit.release`` and wait for readiness (lock held).

        ``keep_on_failure`` (recovery): a process that fails is left to the watcher,
        which restarts it with backoff; otherwise it is stopped and reported.
        """
        release = unit.release
        if release is None or release.spec is None:
            return ReadyResult(Outcome.NO_PROCESS, "the release has no [run] command")
        try:
            proc = await self._spawn(unit, release)
        except OSError as e:
            message = f"could not start {release.spec.argv[0]!r}: {e.strerror or e}"
            await _note(unit.runlog, message)
            log.warning("component_start_failed", project=unit.project, error=message)
            if keep_on_failure:
                unit.failures += 1
                unit.watcher = self._watch(unit, None)
            else:
                unit.release = None
            return ReadyResult(Outcome.START_FAILED, message)
        try:
            check = await wait_ready(release.spec, self._probe(unit, release), proc.exited)
        except BaseException:
            await self._halt(unit)
            raise
        if check.ready:
            unit.ready = True
            unit.watcher = self._watch(unit, proc)
            return ReadyResult(Outcome.READY, "ready", pid=proc.pid)
        if check.exited:
            await proc.drain()
            code = proc.returncode
            unit.last_exit = ExitInfo(code, now_ms())
            message = (
                f"exited after {proc.up_s():.1f} s with {exit_description(code)}"
                " before it was ready"
            )
            result = ReadyResult(Outcome.EXITED, message, proc.pid, code, proc.lines())
        else:
            result = ReadyResult(Outcome.NOT_READY, check.reason, proc.pid, None, proc.lines())
        log.warning(
            "component_not_ready", project=unit.project, pid=proc.pid, reason=result.message
        )
        await proc.note(f"not ready: {result.message}")
        if keep_on_failure:
            unit.watcher = self._watch(unit, proc)
        else:
            await self._halt(unit)
            unit.release = None
        return result

    def _probe(self, unit: _Unit, release: _Release) -> Probe:
        s = self.settings
        return Probe(
            cwd=release.release_dir,
            env=self._env(unit.project, release),
            settle_s=s.settle_s,
            interval_s=s.ready_interval_s,
            try_timeout_s=s.ready_try_timeout_s,
            on_group=lambda pgid: self._record(pgid, unit.project),
            on_group_end=self._forget,
        )

    def _watch(self, unit: _Unit, proc: RunningProcess | None) -> asyncio.Task[None]:
        task = asyncio.create_task(self._supervise(unit, proc), name=f"supervise-{unit.project}")
        task.add_done_callback(_log_failure)
        return task

    async def _supervise(self, unit: _Unit, proc: RunningProcess | None) -> None:
        """Restart ``unit``'s process with backoff whenever it exits on its own.

        Owned by the unit: :meth:`_halt` cancels and awaits it (under the lock), and it
        takes the lock itself only to act, so a switch never races a restart.
        """
        s = self.settings
        while True:
            if proc is not None:
                # Not ``await proc.exited``: cancelling this task would cancel the future.
                await asyncio.wait({proc.exited})
                async with unit.lock:
                    await self._exited(unit, proc)
            delay = min(s.restart_max_s, s.restart_min_s * 2 ** max(unit.failures - 1, 0))
            await _note(unit.runlog, f"restarting in {delay:g} s")
            log.info("component_restart_scheduled", project=unit.project, delay_s=delay)
            await asyncio.sleep(delay)
            async with unit.lock:
                release = unit.release
                if release is None or release.spec is None:
                    unit.watcher = None
                    return
                unit.restarts += 1
                try:
                    proc = await self._spawn(unit, release)
                except OSError as e:
                    await _note(unit.runlog, f"could not start: {e.strerror or e}")
                    unit.failures += 1
                    proc = None
                    continue
                probe = self._probe(unit, release)
            check = await wait_ready(release.spec, probe, proc.exited)
            unit.ready = check.ready
            if not check.ready and not check.exited:
                await proc.note(f"not ready: {check.reason}")

    async def _exited(self, unit: _Unit, proc: RunningProcess) -> None:
        """Record an exit on its own and clean up what the group left (lock held)."""
        up_s = proc.up_s()
        unit.ready = False
        unit.last_exit = ExitInfo(proc.returncode, now_ms())
        unit.failures = 1 if up_s >= self.settings.restart_reset_s else unit.failures + 1
        await proc.drain()
        await proc.note(f"pid {proc.pid} exited with {exit_description(proc.returncode)}")
        log.warning(
            "component_exited",
            project=unit.project,
            pid=proc.pid,
            exit=exit_description(proc.returncode),
            up_s=round(up_s, 3),
        )
        await proc.stop(self._grace(unit.ran))  # members the leader left behind
        self._forget(proc.pgid)
        unit.proc = None


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("supervisor_task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)


async def _note(runlog: RunLog, text: str) -> None:
    """A ``cairn`` line in a log with no process attached (start failures, restarts)."""
    try:
        await asyncio.to_thread(runlog.write, [LogLine(now_ms(), "cairn", text)])
    except OSError as e:
        log.warning("component_log_failed", path=str(runlog.path), error=str(e))
