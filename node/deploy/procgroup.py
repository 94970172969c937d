"""Process groups: signalling, stopping with a grace period, and crash-safe records.

A supervised process runs in its own session, so it leads a process group holding
everything it forks (unless a child leaves the group on purpose). Stopping it means
SIGTERM to the whole group, then SIGKILL to whatever is left after the grace period.

:class:`GroupRecords` keeps one file per running group on disk. A node that is
SIGKILLed cannot stop its processes; the next node process finds the records and stops
the groups the previous one left (``Supervisor.recover``). A record holds the leader's
start time, so a pid the kernel has since given to an unrelated process is left alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GroupRecords", "Leftover", "group_alive", "signal_group", "start_time", "stop_group"]

_POLL_S = 0.05
#: After SIGKILL: how long to wait for the kernel to tear the group down.
_KILL_WAIT_S = 5.0


def start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), or None if gone."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if no such group (or not ours)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _live_members(pgid: int) -> bool:
    """True if a process of group ``pgid`` exists and is not a zombie (a scan of /proc)."""
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


async def group_alive(pgid: int) -> bool:
    """True while group ``pgid`` has a member that is not a zombie.

    ``killpg(pgid, 0)`` also succeeds while only unreaped zombies are left (whether they
    are reaped depends on who their parent is), so a group that answers it is checked
    in /proc, in a thread.
    """
    if not signal_group(pgid, 0):
        return False
    return await asyncio.to_thread(_live_members, pgid)


async def stop_group(pgid: int, grace_s: float) -> bool:
    """Stop a whole process group: SIGTERM, then SIGKILL after ``grace_s``.

    Returns once no live member is left (or, after SIGKILL, after a few more seconds in
    which the kernel should have torn it down).

    Returns:
        True if SIGKILL was needed.
    """
    if not signal_group(pgid, signal.SIGTERM):
        return False
    # Nothing signals when the last member of a group exits, so poll.
    deadline = time.monotonic() + grace_s
    while await group_alive(pgid):
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(_POLL_S)
    else:
        return False
    signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + _KILL_WAIT_S
    while await group_alive(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 (no exit signal)
        await asyncio.sleep(_POLL_S)
    return True


@dataclass(frozen=True, slots=True)
class Leftover:
    """A recorded group still alive: its id and the project that ran it."""

    pgid: int
    project: str


class GroupRecords:
    """Files naming every process group the supervisor started, under ``directory``.

    ``add`` and ``discard`` are synchronous on purpose: the supervisor records a group
    right after it is spawned with no ``await`` in between, so no cancellation can fall
    between the two. Each is one small file operation.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, pgid: int, project: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / str(pgid)).write_text(f"{start_time(pgid) or ''} {project}\n")

    def discard(self, pgid: int) -> None:
        (self.directory / str(pgid)).unlink(missing_ok=True)

    def recorded(self) -> list[int]:
        """Every group id with a record, sorted."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def leftovers(self, keep: set[int]) -> list[Leftover]:
        """Recorded groups not in ``keep`` that are still alive; other records are dropped.

        Args:
            keep: groups this node process runs itself (their records stay).

        Returns:
            The groups to stop (their records stay until :meth:`discard`).
        """
        found: list[Leftover] = []
        for pgid in self.recorded():
            if pgid in keep:
                continue
            path = self.directory / str(pgid)
            try:
                recorded, _, project = path.read_text().strip().partition(" ")
            except FileNotFoundError:
                continue
            now = start_time(pgid)
            # A live leader with another start time is a reused pid: the kernel reuses a
            # pid only once no group of that id is left, so none of ours is. A leader
            # that is gone may have left members behind in its group.
            if (now is None or now == recorded) and signal_group(pgid, 0):
                found.append(Leftover(pgid, project))
            else:
                path.unlink(missing_ok=True)
        return found
