"""Shrinking a failing history to a minimal replay.

First the shortest failing prefix of the schedule, by bisection; then delta debugging
(ddmin) over the events of that prefix, removing chunks while the history still fails
the same way (an anomaly of the same checker). Every candidate is a full, deterministic
history, so the result is a replay: the seed plus the events kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .certs import Certs
from .history import HistoryResult, run_history
from .schedule import Event, generate

__all__ = ["kind_of", "minimize", "replay_command"]


def kind_of(anomaly: str) -> str:
    """The checker an anomaly comes from (the word before its first colon)."""
    return anomaly.split(":", 1)[0]


def replay_command(seed: int, kept: Sequence[int], nodes: int = 5) -> str:
    keep = ",".join(str(i) for i in kept) or "none"
    extra = f" --nodes {nodes}" if nodes != 5 else ""
    return f"python -m tests.sim --seed {seed} --keep {keep}{extra}"


def minimize(
    seed: int,
    certs: Certs,
    *,
    nodes: int = 5,
    failure: HistoryResult | None = None,
    budget: int = 60,
    log: Callable[[str], None] = lambda _s: None,
) -> tuple[list[int], HistoryResult]:
    """The smallest list of event indices of history ``seed`` found (within ``budget``
    runs) that still fails like ``failure``, and that run's result."""
    events: list[Event] = generate(seed)
    first = failure or run_history(seed, nodes=nodes, certs=certs)
    if first.ok:
        raise ValueError(f"history {seed} does not fail")
    wanted = {kind_of(a) for a in first.anomalies}
    runs = 0
    last_fail = first

    def fails(kept: list[int]) -> bool:
        nonlocal runs, last_fail
        runs += 1
        r = run_history(seed, nodes=nodes, certs=certs, keep=kept)
        bad = bool(wanted & {kind_of(a) for a in r.anomalies})
        log(f"  try {len(kept)} events: {'fails' if bad else 'passes'}")
        if bad:
            last_fail = r
        return bad

    # Shortest failing prefix: fails(hi) is known, fails(lo) is not.
    lo, hi = 0, len(events)
    if fails([]):
        return [], last_fail
    while hi - lo > 1 and runs < budget // 2:
        mid = (lo + hi) // 2
        if fails([e.index for e in events[:mid]]):
            hi = mid
        else:
            lo = mid
    kept = [e.index for e in events[:hi]]
    best = last_fail if runs else first
    # ddmin over the prefix.
    n = 2
    while len(kept) >= 2 and runs < budget:
        chunk = max(1, len(kept) // n)
        reduced = False
        for start in range(0, len(kept), chunk):
            candidate = kept[:start] + kept[start + chunk :]
            if candidate and fails(candidate):
                kept, best = candidate, last_fail
                n = max(n - 1, 2)
                reduced = True
                break
            if runs >= budget:
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(kept), n * 2)
    return kept, best
