"""Run one seeded history on a :class:`~faultlab.lab.FaultLab` and check it.

``run_history(seed, root)`` lays out and starts a cluster, plays the schedule the seed
picks (client operations from worker threads, a fault per round landing in the middle of
them), heals everything, waits until the cluster is quiet (or a deadline passes), takes
a snapshot of every member and runs every checker. It stops the cluster whatever
happens, and returns a :class:`Result` whose ``report()`` holds the schedule, the
history and the anomalies: enough to replay and to debug a failing seed.
"""

from __future__ import annotations

import base64
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import component
from procs import wait_for

from faultlab.checkers import Snapshot, check_all, converged, snapshot
from faultlab.history import FaultEvent, History, Monitor, Op
from faultlab.lab import FaultLab
from faultlab.schedule import Fault, OpSpec, Round, Schedule, make_schedule
from node.cli.local.layout import node_names

__all__ = ["Result", "RunSettings", "run_history"]

_USERS = ("ann", "bob", "cyd")


@dataclass(frozen=True)
class RunSettings:
    """The size and pace of a history."""

    nodes: int = 3
    spares: int = 1
    rounds: int = 8
    max_ops: int = 3
    #: A deploy's own deadline (its ``deployment_timeout``), kept short so a deploy a
    #: fault holds up ends within the round.
    deploy_timeout_ms: int = 10_000
    #: How long the healed cluster may take to become quiet before it is judged anyway.
    settle_s: float = 180.0
    #: Trimming runs often (the seed picks how small the change log is).
    maintain_s: float = 2.0
    #: Blobs cross in many small chunks, so faults land in the middle of transfers.
    chunk_bytes: int = 16 * 1024


@dataclass
class Result:
    seed: int
    schedule: Schedule
    history: History
    anomalies: dict[str, list[str]] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    duration_s: float = 0.0
    settled: bool = False
    logs: str = ""

    @property
    def ops(self) -> int:
        return len(self.history.ops)

    @property
    def answered(self) -> int:
        return sum(1 for op in self.history.ops if op.status is not None)

    @property
    def acknowledged(self) -> int:
        return sum(1 for op in self.history.ops if op.acknowledged)

    @property
    def anomaly_count(self) -> int:
        return sum(len(v) for v in self.anomalies.values())

    def report(self) -> str:
        lines = [self.schedule.describe(), self.history.render()]
        lines.append(f"settled: {self.settled}; took {self.duration_s:.0f}s")
        for name, found in self.anomalies.items():
            lines.append(f"ANOMALY {name}:")
            lines += [f"  - {a}" for a in found[:40]]
            if len(found) > 40:
                lines.append(f"  ... and {len(found) - 40} more")
        return "\n".join(lines)


class _Player:
    """Plays a schedule's rounds on a lab, recording into a history."""

    def __init__(
        self, lab: FaultLab, schedule: Schedule, history: History, settings: RunSettings
    ) -> None:
        self.lab = lab
        self.schedule = schedule
        self.history = history
        self.settings = settings
        self.rng = random.Random(schedule.seed ^ 0x5EED)
        self.payloads: list[bytes] = []
        self.deploys: list[tuple[str, str]] = []  # (deployment id, project) from answers
        self.faults: Counter[str] = Counter()
        self.open_faults: list[tuple[Fault, FaultEvent]] = []
        self.timers: list[threading.Timer] = []
        self._lock = threading.Lock()

    # -- operations ---------------------------------------------------------------------

    def _deploy_fields(self, spec: OpSpec) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "project": spec.project,
            "deployment_timeout": self.settings.deploy_timeout_ms,
            "ignore_replication_errors": spec.ignore_replication_errors,
        }
        if spec.restart != "immediate":
            fields["restart"] = spec.restart
        return fields

    def _payload(self, spec: OpSpec, index: int) -> bytes:
        if spec.kind == "deploy_same_bytes" and self.payloads:
            return self.payloads[spec.pick % len(self.payloads)]
        check = "test -f index.html && echo checked"
        if spec.kind == "deploy_failing_check":
            victim = self.lab.members[spec.pick % len(self.lab.members)]
            check = f'test "$CAIRN_NODE" != "{victim}" && echo checked'
        files = {"data.txt": "x" * (spec.pick % 4096)}
        if spec.pick % 4 == 0:  # some payloads take many chunks to cross
            noise = random.Random(spec.pick).randbytes(100_000 + spec.pick % 400_000)
            files["noise.hex"] = noise.hex()
        payload = component(
            install='echo "installing on $CAIRN_NODE"', check=check,
            v=f"{self.schedule.seed}-{index}", **files,
        )  # fmt: skip
        with self._lock:
            self.payloads.append(payload)
        return payload

    def _earlier(self, spec: OpSpec, *, same_project: bool) -> str | None:
        with self._lock:
            known = [d for d, p in self.deploys if p == spec.project or not same_project]
        return known[spec.pick % len(known)] if known else None

    def run_op(self, spec: OpSpec, index: int) -> Op | None:
        node = self.lab[spec.node]
        if not node.is_running():
            self.history.note(f"op {spec.kind} skipped: {spec.node} is down")
            return None
        timeout_s = self.settings.deploy_timeout_ms / 1000 * 4 + 60
        h = self.history
        kind = spec.kind
        if kind == "rollback":
            source = self._earlier(spec, same_project=True)
            if source is None:
                kind = "deploy"
            else:
                op = h.call(
                    node,
                    kind,
                    "deploy_component",
                    timeout_s=timeout_s,
                    rollback_from=source,
                    **self._deploy_fields(spec),
                )
                return self._learn(op, spec)
        if kind in ("deploy", "deploy_same_bytes", "deploy_failing_check"):
            payload = base64.b64encode(self._payload(spec, index)).decode()
            op = h.call(
                node,
                kind,
                "deploy_component",
                timeout_s=timeout_s,
                payload=payload,
                **self._deploy_fields(spec),
            )
            return self._learn(op, spec)
        if kind == "delete_payload":
            target = self._earlier(spec, same_project=False)
            if target is None:
                return None
            return h.call(
                node, kind, "delete_deployment_payload", timeout_s=60, deployment_id=target
            )
        if kind == "prune":
            fields = {"project": spec.project} if spec.pick % 2 else {}
            return h.call(node, kind, "prune_deployment_payloads", timeout_s=60, **fields)
        if kind == "drop_component":
            op = h.call(node, kind, "drop_component", timeout_s=timeout_s, project=spec.project)
            return self._learn(op, spec)
        user = _USERS[spec.pick % len(_USERS)]
        if kind == "add_user":
            return h.call(
                node,
                kind,
                "add_user",
                timeout_s=60,
                username=user,
                password=f"pw-{user}-{index}-long",
                role="super_user",
            )
        if kind == "alter_user":
            return h.call(
                node,
                kind,
                "alter_user",
                timeout_s=60,
                username=user,
                password=f"pw-{user}-{index}-new",
                active=bool(spec.pick % 3),
            )
        raise AssertionError(f"unknown op kind {kind}")

    def _learn(self, op: Op, spec: OpSpec) -> Op:
        if op.deployment_id is not None:
            with self._lock:
                self.deploys.append((op.deployment_id, spec.project))
        return op

    # -- faults -------------------------------------------------------------------------

    def _process_fault_allowed(self, node: str) -> bool:
        """At most one member down or paused at a time, and only a running one is hit."""
        lab = self.lab
        return node in lab.members and lab[node].is_running() and not lab.down and not lab.paused

    def inject(self, fault: Fault) -> None:
        lab, hub = self.lab, self.lab.hub
        kind, a = fault.kind, fault.node
        if kind == "none" or a is None:
            return
        if kind in ("kill", "pause", "armed") and not self._process_fault_allowed(a):
            self.history.note(f"fault {fault.describe()} skipped (a node is already down)")
            return
        event = self.history.fault(kind, fault.describe())
        self.faults[kind] += 1
        if kind in ("cut", "stall", "one_way"):
            assert fault.peer is not None
            link = hub.link(a, fault.peer)
            if kind == "cut":
                hub.cut(link)
            elif kind == "stall":
                hub.stall(link)
            else:
                assert fault.direction is not None
                hub.one_way(link, fault.direction)
        elif kind == "delay":
            for link in hub.links_of(a):
                hub.delay(link, fault.delay_s)
        elif kind == "reset":
            for link in hub.links_of(a):
                hub.reset(link)
            event.healed = event.at
            return
        elif kind == "isolate":
            for link in hub.links_of(a):
                hub.cut(link)
        elif kind == "kill":
            lab.kill(a)
        elif kind == "pause":
            # A stopped process resumes after its hold whatever the round does, so an
            # operation sent to it is answered late rather than never.
            lab.pause(a)
            timer = threading.Timer(fault.hold_s, self._resume, (a, event))
            timer.daemon = True
            timer.start()
            self.timers.append(timer)
            return
        elif kind == "armed":
            assert fault.armed is not None
            lab.restart(a, faults=fault.armed, wait=True)
            event.healed = self.history.now()
            return
        self.open_faults.append((fault, event))

    def crash_all(self) -> None:
        """SIGKILL every member at once (healing starts them all again)."""
        event = self.history.fault("crash_all", ", ".join(self.lab.members))
        self.faults["crash_all"] += 1
        for timer in self.timers:
            timer.join()
        for name in self.lab.members:
            self.lab.kill(name)
        self.open_faults.append((Fault("crash_all"), event))

    def _resume(self, name: str, event: FaultEvent) -> None:
        self.lab.resume(name)
        event.healed = self.history.now()

    def heal(self) -> None:
        """Heal every open fault: links plain again, paused nodes resumed, killed ones
        restarted."""
        self.lab.hub.heal_all()
        for timer in self.timers:
            timer.join()  # a pause ends on its own
        self.timers.clear()
        for name in self.lab.down:
            self.lab.restart(name, wait=True)
        now = self.history.now()
        for _, event in self.open_faults:
            event.healed = now
        self.open_faults.clear()

    # -- rounds -------------------------------------------------------------------------

    def membership(self, r: Round) -> None:
        lab, h = self.lab, self.history
        spare = self.schedule.spares[0] if self.schedule.spares else None
        if r.membership is None or spare is None:
            return
        others = [
            m for m in lab.members if m != spare and lab[m].is_running() and m not in lab.paused
        ]
        if not others:
            return
        via = lab[others[self.rng.randrange(len(others))]]
        if r.membership == "join" and spare not in lab.members:
            op = h.call(
                via, "add_node", "add_node", timeout_s=60, name=spare, url=lab.join_url(spare)
            )
            if op.acknowledged:
                lab.admit(spare)
        elif r.membership == "leave" and spare in lab.members:
            op = h.call(via, "remove_node", "remove_node", timeout_s=60, name=spare)
            if op.acknowledged:
                lab.expel(spare)

    def play_round(self, r: Round, number: int) -> None:
        self.membership(r)
        ops = [o for o in r.ops if o.node in self.lab.members]
        start = threading.Event()
        with ThreadPoolExecutor(max_workers=max(1, len(ops))) as pool:
            futures = [pool.submit(self.run_op, o, number * 10 + i) for i, o in enumerate(ops)]
            start.wait(r.fault_after_s)  # the fault lands in the middle of the operations
            self.inject(r.fault)
            for f in futures:
                f.result()
        if r.heal:
            self.heal()


def run_history(
    seed: int, root: Path, settings: RunSettings | None = None, *, keep_logs: bool = False
) -> Result:
    """Play the schedule ``seed`` picks on a new cluster under ``root``, heal, check."""
    settings = settings or RunSettings()
    started = time.monotonic()
    names = node_names(settings.nodes + settings.spares)
    schedule = make_schedule(
        seed, names[: settings.nodes], rounds=settings.rounds,
        spares=names[settings.nodes :], max_ops=settings.max_ops,
    )  # fmt: skip
    lab = FaultLab(
        root, settings.nodes, spares=settings.spares,
        replication={"maintain_s": settings.maintain_s, "chunk_bytes": settings.chunk_bytes,
                     "chunk_credit": 4, "log_max_entries": schedule.log_max_entries},
        extra_toml="[retention]\nkeep_successful = 1\nfailed_grace_s = 0\nkeep_releases = 1\n",
    )  # fmt: skip
    history = History(seed)
    result = Result(seed, schedule, history)
    monitor = Monitor(lambda: lab.responsive, history)
    try:
        lab.start()
        history.started = time.monotonic()
        monitor.start()
        player = _Player(lab, schedule, history, settings)
        for number, r in enumerate(schedule.rounds):
            player.play_round(r, number)
        if schedule.final_crash:
            player.crash_all()
        player.heal()
        history.note("healed")
        lab.wait_connected(timeout_s=120)
        snaps = _settle(lab, history, monitor, settings.settle_s)
        result.settled = converged(snaps, history)
        monitor.stop()
        result.faults = player.faults
        result.anomalies = check_all(snaps, history, monitor)
        if result.anomalies or keep_logs:
            result.logs = lab.logs()
    except BaseException:
        result.logs = lab.logs()
        raise
    finally:
        monitor.stop()
        lab.stop()
        result.duration_s = time.monotonic() - started
    return result


def _settle(lab: FaultLab, history: History, monitor: Monitor, deadline_s: float) -> list[Snapshot]:
    """Snapshots of every member once the cluster is quiet, or at the deadline."""
    last: list[list[Snapshot]] = []

    def quiet() -> bool:
        # (Not fed to the monitor: a snapshot is read over a while, so its statuses may
        # be older than what the monitor has seen since.)
        snaps = [snapshot(n) for n in lab.running]
        last[:] = [snaps]
        return converged(snaps, history)

    try:
        wait_for(quiet, timeout_s=deadline_s, interval_s=1.0, what="the cluster to settle")
    except TimeoutError:
        history.note(f"not settled after {deadline_s:.0f}s")
    else:
        history.note("settled")
    return last[0]
