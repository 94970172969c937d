"""Named crash points: the seam the fault suite uses to kill a node mid-step.

Code that does an interruptible step calls ``faults.hit("blob.before_rename")``. In
production the :data:`NO_FAULTS` object does nothing. :class:`EnvCrashPoints` reads
``CAIRN_CRASHPOINT`` (a comma-separated list of names) and SIGKILLs its own process when
one of them is hit, so a test can prove what a real crash at that point leaves behind.
"""

from __future__ import annotations

import os
import signal
from typing import Protocol

__all__ = ["NO_FAULTS", "CrashPoints", "EnvCrashPoints", "Faults"]


class Faults(Protocol):
    def hit(self, name: str) -> None:
        """Called when execution reaches the named point."""


class _NoFaults:
    def hit(self, name: str) -> None:
        return None


NO_FAULTS: Faults = _NoFaults()


class CrashPoints:
    """Kill this process with SIGKILL when one of ``names`` is hit."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def hit(self, name: str) -> None:
        if name in self.names:
            os.kill(os.getpid(), signal.SIGKILL)


class EnvCrashPoints(CrashPoints):
    """Crash points named by the ``CAIRN_CRASHPOINT`` environment variable."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        raw = (environ if environ is not None else dict(os.environ)).get("CAIRN_CRASHPOINT", "")
        super().__init__(frozenset(n.strip() for n in raw.split(",") if n.strip()))
