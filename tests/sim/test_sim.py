"""A bounded, seeded subset of the simulator in the normal suite.

Short histories of a 5-node cluster (a few operations and faults each, every checker
after healing), one seed replayed twice (same seed, same history), and the traffic of
one deploy on 3 nodes (each blob and each entry crosses to each node once). The soak
runs the long version: ``python -m tests.sim --minutes N``.
"""

from __future__ import annotations

import pytest

from .certs import Certs
from .history import run_history
from .scale import measure
from .schedule import generate

#: Seeds of the short histories; each is replayable with
#: ``python -m tests.sim --seed S --span 40 --ops 6 --faults 5``.
CI_SEEDS = (101, 102, 103)
_SHAPE = {"span_s": 40.0, "ops": 6, "faults": 5}


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_a_short_history_keeps_every_guarantee(seed: int, certs: Certs) -> None:
    r = run_history(seed, certs=certs, schedule=generate(seed, **_SHAPE))
    replay = f"python -m tests.sim --seed {seed} --span 40 --ops 6 --faults 5 -v"
    assert r.ok, "\n".join([*r.anomalies, f"replay: {replay}"])
    assert r.events == 11


def test_the_same_seed_makes_the_same_history(certs: Certs) -> None:
    schedule = generate(104, **_SHAPE)
    a = run_history(104, certs=certs, schedule=schedule)
    b = run_history(104, certs=certs, schedule=schedule)
    assert a.trace == b.trace
    assert any(" state " in line for line in a.trace)  # the final digests are in it


def test_each_blob_and_each_entry_crosses_to_each_node_once(certs: Certs) -> None:
    (row,) = measure(3, certs, deploys=1)
    assert row["answer"] == "ok:success"
    assert row["payload"] * 2 <= row["chunk_bytes"] < row["payload"] * 2 + 1024
    assert row["deliveries"] == row["unique_deliveries"] > 0
