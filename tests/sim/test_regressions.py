"""Every defect the simulator found, kept as the minimal replay that showed it.

Each case is ``(seed, kept events)``: ``python -m tests.sim --seed S --keep ...`` replays
it with its trace (``-v``). docs/reliability.md lists them with the fix.
"""

from __future__ import annotations

import pytest

from .certs import Certs
from .history import run_history

REGRESSIONS = [
    # A deploy's origin cut off past the deadline: every peer re-ran an empty
    # origin_lost job in a loop without a pause (a livelock in virtual time).
    pytest.param(28, (8, 9, 10), id="seed28-origin-lost-busy-loop"),
    # A partition, a deploy, and the removal of a node whose results only one peer
    # received: the relay was always the first peer by name, so they never spread.
    pytest.param(30, (1, 2, 4), id="seed30-relay-never-rotates"),
    # A node killed before its switch, then two deploys of one project at once: a peer
    # reported the first superseded, and the origin wrote the peer's error message as
    # the row's superseded_by (not an id): the row was refused, the deploy stuck.
    pytest.param(425, (5, 6, 7), id="seed425-superseded-by-a-message"),
]


@pytest.mark.parametrize(("seed", "keep"), REGRESSIONS)
def test_regression(seed: int, keep: tuple[int, ...], certs: Certs) -> None:
    r = run_history(seed, certs=certs, keep=keep)
    assert r.ok, "\n".join(r.anomalies)
