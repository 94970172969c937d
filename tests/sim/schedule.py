"""The seeded schedule of a history: operations and faults at virtual times.

A schedule is generated from the seed alone, before anything runs, as a list of
independent :class:`Event` values: each carries everything it needs (durations, which
node by a fraction of the live members at the time it fires), and each later draws its
own randomness from ``(seed, index)``. So any prefix, or any subset, of a schedule is a
schedule too: that is what makes a failing history shrinkable to a minimal replay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .payloads import KINDS as PAYLOAD_KINDS

__all__ = ["FAULT_KINDS", "FAULT_POINTS", "OP_KINDS", "Event", "generate"]

#: Operations and their weights.
OP_KINDS: dict[str, float] = {
    "deploy": 30, "rollback": 6, "drop": 2, "delete_payload": 5, "prune": 3, "pin": 2,
    "user": 6, "add_node": 1.2, "remove_node": 1.0,
}  # fmt: skip
#: Faults and their weights.
FAULT_KINDS: dict[str, float] = {
    "crash": 8, "partition": 5, "reset": 4, "slow": 3, "mangle": 2, "skew": 4, "disk": 7,
}  # fmt: skip
#: Fault points a storage fault can be armed at (``storage.faults``), and the kinds.
FAULT_POINTS = (
    "deploy.after_receive", "deploy.before_stage", "deploy.extract", "deploy.before_activate",
    "deploy.before_switch", "components.before_switch", "extract.member",
    "extract.before_publish", "blob.after_write", "blob.before_rename",
    "blob.partial_before_rename",
)  # fmt: skip
DISK_KINDS = {"oserror": 5, "missing": 2, "kill": 3}
PROJECTS = ("alpha", "beta", "gamma")


@dataclass(frozen=True)
class Event:
    """One thing that happens at virtual time ``at`` (seconds after the cluster is up)."""

    index: int
    at: float
    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def is_op(self) -> bool:
        return self.kind in OP_KINDS

    def describe(self) -> str:
        args = " ".join(f"{k}={_short(v)}" for k, v in sorted(self.args.items()))
        return f"#{self.index} t={self.at:.2f} {self.kind} {args}".rstrip()


def _short(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def generate(
    seed: int, *, span_s: float | None = None, ops: int | None = None, faults: int | None = None
) -> list[Event]:
    """The schedule of history ``seed``: ``ops`` operations and ``faults`` faults spread
    over ``span_s`` virtual seconds (each drawn from the seed when not given)."""
    rng = random.Random(f"schedule:{seed}")
    span = span_s if span_s is not None else rng.uniform(20, 120)
    n_ops = ops if ops is not None else rng.randint(3, 12)
    n_faults = faults if faults is not None else rng.randint(0, 10)
    kinds = [_pick(rng, OP_KINDS) for _ in range(n_ops)]
    kinds += [_pick(rng, FAULT_KINDS) for _ in range(n_faults)]
    timed = sorted((rng.uniform(0, span), kind) for kind in kinds)
    return [Event(i, at, kind, _args(rng, kind)) for i, (at, kind) in enumerate(timed)]


def _args(rng: random.Random, kind: str) -> dict[str, Any]:
    a: dict[str, Any] = {"node": rng.random()}
    if kind == "deploy":
        a.update(
            project=rng.choice(PROJECTS), payload=_pick(rng, PAYLOAD_KINDS),
            restart=rng.choice(("immediate", "immediate", "rolling", None)),
            ignore=rng.random() < 0.2, timeout_s=rng.choice((10, 20, 30, 60)),
        )  # fmt: skip
    elif kind in ("rollback", "drop"):
        a.update(project=rng.choice(PROJECTS), pick=rng.random(), timeout_s=rng.choice((20, 60)))
    elif kind in ("delete_payload", "pin"):
        a.update(pick=rng.random(), pinned=rng.random() < 0.7)
    elif kind == "prune":
        a.update(project=rng.choice((*PROJECTS, None)))
    elif kind == "user":
        a.update(action=rng.choice(("put", "put", "delete", "role")), name=f"u{rng.randint(1, 4)}")
    elif kind == "add_node":
        a.update(start_first=rng.random() < 0.5)
    elif kind == "remove_node":
        a.update(target=rng.random())
    elif kind == "crash":
        a.update(down_s=rng.choice((0.5, 2.0, rng.uniform(1, 40))), tear=rng.random() < 0.3)
    elif kind == "partition":
        a.update(
            side=rng.random(), size=rng.random(), oneway=rng.random() < 0.3,
            dur_s=rng.uniform(2, 40),
        )  # fmt: skip
    elif kind == "reset":
        a.update(peer=rng.random())
    elif kind == "slow":
        a.update(peer=rng.random(), extra_s=rng.uniform(0.05, 1.5), dur_s=rng.uniform(2, 30))
    elif kind == "mangle":
        a.update(peer=rng.random(), p=rng.uniform(0.05, 0.4), dur_s=rng.uniform(1, 10))
    elif kind == "skew":
        big = rng.random() < 0.2
        a.update(skew_ms=int(rng.gauss(0, 90_000 if big else 15_000)))
    elif kind == "disk":
        a.update(point=rng.choice(FAULT_POINTS), fault=_pick(rng, DISK_KINDS),
                 down_s=rng.uniform(0.5, 20))  # fmt: skip
    return a
