"""Named fault points: the seam the fault suite uses to crash a node, or fail a step.

Code that does an interruptible step calls ``faults.hit("blob.before_rename")``. In
production the :data:`NO_FAULTS` object does nothing. Tests (and the fault harness,
through the environment of a real node process) choose what happens at a point:

- ``kill``: SIGKILL this process (what a real crash at that point leaves behind);
- ``oserror``: raise ``OSError(ENOSPC)`` (a full disk);
- ``error``: raise ``RuntimeError`` (a bug nobody expected);
- ``missing``: raise ``FileNotFoundError`` (a file removed under the step).

``CAIRN_CRASHPOINT`` names points to ``kill`` at (a comma-separated list, as before);
``CAIRN_FAULTS`` names ``point=kind`` pairs (``deploy.extract=oserror,...``). A point
fires every time it is hit, unless ``kind`` ends in ``:once``.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Mapping
from typing import Protocol

__all__ = ["KINDS", "NO_FAULTS", "CrashPoints", "EnvCrashPoints", "FaultPlan", "Faults"]

KINDS = ("kill", "oserror", "error", "missing")


class Faults(Protocol):
    def hit(self, name: str) -> None:
        """Called when execution reaches the named point (may raise, or kill)."""


class _NoFaults:
    def hit(self, name: str) -> None:
        return None


NO_FAULTS: Faults = _NoFaults()


class FaultPlan:
    """What happens at each named point: ``{point: kind}`` (``kind[:once]``).

    Raises:
        ValueError: an unknown kind.
    """

    def __init__(self, plan: Mapping[str, str]) -> None:
        self.plan: dict[str, tuple[str, bool]] = {}
        for point, spec in plan.items():
            kind, _, once = spec.partition(":")
            if kind not in KINDS or once not in ("", "once"):
                raise ValueError(f"fault {point}={spec}: kind must be one of {', '.join(KINDS)}")
            self.plan[point] = (kind, once == "once")
        self.fired: list[str] = []

    def hit(self, name: str) -> None:
        entry = self.plan.get(name)
        if entry is None:
            return
        kind, once = entry
        if once:
            del self.plan[name]
        self.fired.append(name)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "oserror":
            raise OSError(errno.ENOSPC, f"No space left on device (fault {name})")
        if kind == "missing":
            raise FileNotFoundError(errno.ENOENT, f"No such file or directory (fault {name})")
        raise RuntimeError(f"injected fault at {name}")


class CrashPoints(FaultPlan):
    """Kill this process with SIGKILL when one of ``names`` is hit."""

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__({name: "kill" for name in names})
        self.names = names


class EnvCrashPoints(FaultPlan):
    """Fault points from the environment: ``CAIRN_CRASHPOINT`` and ``CAIRN_FAULTS``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = environ if environ is not None else os.environ
        plan = {n.strip(): "kill" for n in env.get("CAIRN_CRASHPOINT", "").split(",") if n.strip()}
        for pair in env.get("CAIRN_FAULTS", "").split(","):
            if pair.strip():
                point, _, kind = pair.strip().partition("=")
                plan[point] = kind or "error"
        super().__init__(plan)
