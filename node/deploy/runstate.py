"""What the supervisor answers: switch outcomes and process states (plain values).

:class:`ReadyResult` is what activation gets back from ``Supervisor.switch``;
:class:`ProcessState` is what ``get_components`` shows per project and node.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from node.deploy.runlog import LogLine
from node.deploy.runproc import exit_description

__all__ = ["ExitInfo", "Outcome", "ProcessState", "ReadyResult"]


class Outcome(StrEnum):
    """How a :meth:`Supervisor.switch` ended."""

    READY = "ready"  # the release's process runs and passed its readiness check
    NO_PROCESS = "no_process"  # the release has no [run]; any old process was stopped
    UNCHANGED = "unchanged"  # restart=False, or this release already runs and is ready
    EXITED = "exited"  # the new process exited before it was ready (it is not restarted)
    NOT_READY = "not_ready"  # not ready within ready_timeout_s (it was stopped)
    START_FAILED = "start_failed"  # it could not be started at all


@dataclass(frozen=True, slots=True)
class ReadyResult:
    """The answer of :meth:`Supervisor.switch` (and, per project, :meth:`Supervisor.recover`).

    Attributes:
        outcome: what happened.
        message: one line for an operator: why it is not ready, or what was done.
        pid: the process's pid when one runs.
        exit_code: for ``EXITED``, the exit status (negative: killed by that signal).
        output: for failures, the process's last output lines (oldest first).
    """

    outcome: Outcome
    message: str
    pid: int | None = None
    exit_code: int | None = None
    output: tuple[LogLine, ...] = ()

    @property
    def ok(self) -> bool:
        """True unless the new release's process failed: then the caller rolls back."""
        return self.outcome in (Outcome.READY, Outcome.NO_PROCESS, Outcome.UNCHANGED)

    @property
    def code(self) -> str | None:
        """The error code of a rolled-back deploy when not ``ok`` (``not_ready``: the
        process exited, was not ready in time, or could not start), else None."""
        return None if self.ok else "not_ready"

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": str(self.outcome),
            "message": self.message,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "output": [x.as_dict() for x in self.output],
        }


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a process last ended on its own: exit code (negative: by that signal), when."""

    code: int | None
    at: int  # epoch ms

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "description": exit_description(self.code), "at": self.at}


@dataclass(frozen=True, slots=True)
class ProcessState:
    """A project's process, as ``get_components`` shows it.

    Attributes:
        deployment_id: the release the process runs (or last ran).
        pending_deployment_id: a release switched to with ``restart=False``: the next
            start (after an exit, or a node restart) runs it. None if none is pending.
        running: a process is running now.
        pid: its pid (also its process group id).
        ready: it passed its readiness check since it started.
        restarts: restarts after the process exited on its own, since the last switch.
        started_at: when the running process started (epoch ms).
        last_exit: the last time a process exited on its own.
    """

    project: str
    deployment_id: str | None = None
    pending_deployment_id: str | None = None
    running: bool = False
    pid: int | None = None
    ready: bool = False
    restarts: int = 0
    started_at: int | None = None
    last_exit: ExitInfo | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "deployment_id": self.deployment_id,
            "pending_deployment_id": self.pending_deployment_id,
            "running": self.running,
            "pid": self.pid,
            "ready": self.ready,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "last_exit": self.last_exit.as_dict() if self.last_exit else None,
        }
