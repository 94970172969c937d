"""The seeded schedule of one history: rounds of client operations with a fault each.

Pure: the seed alone decides every choice made before the run (which operations, on
which nodes, which faults, when they land, when they heal). Choices that depend on
answers (which earlier deploy a rollback or a payload delete names) are made at run time
from ``pick``, a number drawn here, so a seed replays the same way as far as the
cluster's answers allow.

A round: its operations are sent at once (one thread each); ``fault_after_s`` later the
fault lands, in the middle of them; once every operation has an answer (or has given up),
the round heals what it broke, or leaves it broken for the next round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FAULT_KINDS", "OP_KINDS", "Fault", "OpSpec", "Round", "Schedule", "make_schedule"]

#: Faults a round may inject, with their weights.
FAULT_KINDS: dict[str, int] = {
    "none": 2,
    "cut": 3,  # one directed link rejects
    "stall": 2,  # one directed link blackholes both ways
    "one_way": 2,  # one direction of a link blackholes
    "delay": 2,  # every link of a node slow
    "reset": 2,  # every open connection of a node reset
    "isolate": 2,  # every link from and to a node cut
    "kill": 3,  # SIGKILL a node (restarted at heal)
    "pause": 2,  # SIGSTOP a node (SIGCONT at heal)
    "armed": 1,  # restart a node with a deploy-step fault armed once
}

#: Client operations, with their weights.
OP_KINDS: dict[str, int] = {
    "deploy": 10,
    "deploy_same_bytes": 1,
    "deploy_failing_check": 1,
    "rollback": 3,
    "delete_payload": 2,
    "prune": 2,
    "add_user": 1,
    "alter_user": 1,
    "drop_component": 1,
}

PROJECTS = ("alpha", "beta", "gamma")
RESTART_MODES = ("immediate", "immediate", "rolling", False)
#: Deploy-step faults a restarted node may carry (``point=kind:once``).
ARMED_POINTS = (
    "deploy.extract",
    "hook.install.start",
    "hook.check.start",
    "deploy.before_switch",
    "extract.before_publish",
    "components.before_switch",
    "blob.before_rename",
)
ARMED_KINDS = ("oserror", "error", "missing")


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    node: str | None = None  # the node a process fault hits, or a link fault centres on
    peer: str | None = None  # the other end of a one-link fault
    direction: str | None = None  # one_way: "up" or "down"
    delay_s: float = 0.0
    armed: str | None = None  # armed: the CAIRN_FAULTS spec
    hold_s: float = 0.0  # pause: how long the process stays stopped

    def describe(self) -> str:
        if self.kind in ("cut", "stall"):
            return f"{self.kind} {self.node}->{self.peer}"
        if self.kind == "one_way":
            return f"one_way {self.node}->{self.peer} {self.direction}"
        if self.kind == "delay":
            return f"delay {self.node} {self.delay_s:.2f}s"
        if self.kind == "armed":
            return f"armed {self.node} {self.armed}"
        if self.kind == "pause":
            return f"pause {self.node} {self.hold_s:.1f}s"
        return f"{self.kind} {self.node}" if self.node else self.kind


@dataclass(frozen=True, slots=True)
class OpSpec:
    kind: str
    node: str
    project: str
    pick: int  # chooses an earlier deploy (rollback, delete) or a user, at run time
    restart: Any = "immediate"
    ignore_replication_errors: bool = False


@dataclass(frozen=True, slots=True)
class Round:
    ops: tuple[OpSpec, ...]
    fault: Fault
    fault_after_s: float
    heal: bool
    membership: str | None = None  # "join" or "leave" a spare before the operations


@dataclass(frozen=True, slots=True)
class Schedule:
    seed: int
    rounds: tuple[Round, ...]
    nodes: tuple[str, ...]
    spares: tuple[str, ...] = field(default=())
    #: The change log's size bound: small ones make trimming (and compacted catch-up) happen.
    log_max_entries: int = 1_000_000
    #: SIGKILL every node at the end, before healing (a whole-cluster restart).
    final_crash: bool = False

    def describe(self) -> str:
        lines = [
            f"seed {self.seed}: {len(self.rounds)} rounds on {', '.join(self.nodes)}; "
            f"log_max_entries {self.log_max_entries}; final crash {self.final_crash}"
        ]
        for i, r in enumerate(self.rounds):
            ops = ", ".join(f"{o.kind}@{o.node}:{o.project}" for o in r.ops)
            member = f"{r.membership} spare; " if r.membership else ""
            heal = "heal" if r.heal else "keep"
            lines.append(
                f"  {i}: {member}{r.fault.describe()} after {r.fault_after_s:.1f}s; {ops}; {heal}"
            )
        return "\n".join(lines)


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _fault(rng: random.Random, nodes: list[str]) -> Fault:
    kind = _weighted(rng, FAULT_KINDS)
    a, b = rng.sample(nodes, 2)
    if kind in ("cut", "stall"):
        return Fault(kind, a, b)
    if kind == "one_way":
        return Fault(kind, a, b, direction=rng.choice(("up", "down")))
    if kind == "delay":
        return Fault(kind, a, delay_s=round(rng.uniform(0.05, 0.6), 2))
    if kind == "armed":
        spec = f"{rng.choice(ARMED_POINTS)}={rng.choice(ARMED_KINDS)}:once"
        return Fault(kind, a, armed=spec)
    if kind == "pause":
        return Fault(kind, a, hold_s=round(rng.uniform(1.0, 8.0), 1))
    if kind == "none":
        return Fault("none")
    return Fault(kind, a)


def make_schedule(
    seed: int,
    nodes: list[str],
    *,
    rounds: int,
    spares: list[str] | None = None,
    max_ops: int = 3,
) -> Schedule:
    """The schedule ``seed`` picks for a cluster of ``nodes`` (and ``spares`` that may join).

    A spare joins in the first third of the history and, with even odds, leaves again in
    the last third; operations go to the nodes that are members at that round.
    """
    rng = random.Random(seed)
    spares = list(spares or [])
    join_at = leave_at = -1
    if spares and rounds >= 3:
        join_at = rng.randrange(0, max(1, rounds // 3))
        if rng.random() < 0.5:
            leave_at = rng.randrange(max(join_at + 1, 2 * rounds // 3), rounds)
    members = list(nodes)
    out: list[Round] = []
    for i in range(rounds):
        membership = None
        if i == join_at:
            membership = "join"
            members = [*members, spares[0]]
        elif i == leave_at:
            membership = "leave"
            members = [m for m in members if m != spares[0]]
        # Faults hit the initial nodes only (a spare joining is fault enough).
        fault = _fault(rng, list(nodes))
        # A third of the rounds race their operations on one project from several nodes.
        same = rng.choice(PROJECTS) if rng.random() < 0.35 else None
        ops = tuple(
            OpSpec(
                kind=_weighted(rng, OP_KINDS),
                node=rng.choice(members),
                project=same or rng.choice(PROJECTS),
                pick=rng.randrange(1 << 30),
                restart=rng.choice(RESTART_MODES),
                ignore_replication_errors=rng.random() < 0.25,
            )
            for _ in range(rng.randint(1, max_ops))
        )
        out.append(
            Round(ops, fault, round(rng.uniform(0.0, 2.0), 2), rng.random() < 0.75, membership)
        )
    return Schedule(
        seed, tuple(out), tuple(nodes), tuple(spares),
        log_max_entries=rng.choice((60, 200, 1_000_000)), final_crash=rng.random() < 0.3,
    )  # fmt: skip
