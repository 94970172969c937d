"""Hybrid logical clock: versions for replicated rows.

A version packs wall-clock milliseconds and a logical counter into one integer,
``wall_ms << 16 | counter``, so versions compare as plain integers and still order
causally: every tick is greater than the last tick and than every version observed
from a peer. Ties between nodes are broken by the origin node name, outside this
module (rows carry ``(version, origin)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["HybridClock", "version_ms", "wall_ms"]

_LOGICAL_BITS = 16


def wall_ms() -> int:
    """The real wall clock in epoch milliseconds (the default clock seam)."""
    return time.time_ns() // 1_000_000


def version_ms(version: int) -> int:
    """The wall-clock milliseconds a version was minted at."""
    return version >> _LOGICAL_BITS


class HybridClock:
    """A hybrid logical clock over a pluggable wall clock.

    Args:
        wall: returns epoch milliseconds; tests pass a fake to move time by hand.
    """

    def __init__(self, wall: Callable[[], int] = wall_ms) -> None:
        self._wall = wall
        self._last = 0

    def now_ms(self) -> int:
        """Wall-clock milliseconds from the clock seam (for timestamps in rows)."""
        return self._wall()

    def tick(self) -> int:
        """Return a new version, greater than every version seen so far."""
        self._last = max(self._last + 1, self._wall() << _LOGICAL_BITS)
        return self._last

    def observe(self, version: int) -> None:
        """Account for a version seen elsewhere, so the next tick is greater."""
        if version > self._last:
            self._last = version
