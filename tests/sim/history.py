"""One simulated history: a cluster, a seeded schedule, healing, settling, checking.

:func:`run_history` builds ``nodes`` nodes in a temp directory on a
:class:`~.vloop.VirtualLoop`, waits until they are connected, plays the schedule
(operations as client requests to live nodes, faults on the network, the clocks, the
disks and the processes), then heals everything (cuts, slow links, skews and armed
faults off, every crashed node restarted), lets the cluster settle (until every node
holds the same state and nothing is running, stable over two looks, or
``settle_max_s`` of virtual time) and runs the checkers (:mod:`.checks`).

Same seed (and same kept events), same history: the trace (every event, client answer,
status committed, crash and restart, with its virtual time) hashes to the same value.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from node.config import RetentionConfig
from storage.db import INLINE
from storage.records import Deployment

from . import checks
from .certs import Certs
from .net import SimNetwork, url_of
from .node import SimCrashed, SimNode
from .ops import USER, Outcome, answer_of, run_op
from .schedule import OP_KINDS, Event, generate
from .vloop import NODE, Deadlock, VirtualLoop

__all__ = ["HistoryResult", "run_history", "sim_root"]

#: Error events that mean code hit an exception nobody expected.
_INTERNAL = frozenset({
    "deploy_crashed", "reconcile_job_crashed", "convergence_crashed", "peer_session_failed",
    "subscriber_failed", "task_failed", "deploy_request_crashed", "reconcile_result_failed",
    "replication_maintenance_failed", "membership_refresh_failed",
})  # fmt: skip
_REFUSALS = frozenset({"change_quarantined", "change_refused", "peer_cert_refused"})
#: What a fault point raises: an error caused by one of these was injected.
_INJECTED = ("(fault ", "injected fault at ")


def sim_root() -> Path:
    """Where histories keep their files: tmpfs when there is one (fsync is free there)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@dataclass
class HistoryResult:
    """What one history did, and what the checkers found."""

    seed: int
    nodes: int
    kept: tuple[int, ...] | None
    events: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    acknowledged: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    anomalies: list[str] = field(default_factory=list)
    trace_hash: str = ""
    trace: list[str] = field(default_factory=list)
    virtual_s: float = 0.0
    settle_s: float = 0.0
    real_s: float = 0.0
    restarts: int = 0
    internal_errors: Counter[str] = field(default_factory=Counter)
    net: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.anomalies


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded ids for the history (deployment ids, log ids, temp names), no cyclic
    garbage collection while it runs, and no machine-wide ``os.sync`` (an in-process
    crash loses no page cache; the real one would also stall the machine): process-wide,
    restored on the way out.

    The collector runs when allocation counts say so, counts that carry over from
    whatever the process did before; what it frees can schedule callbacks (an async
    generator's ``aclose``, a task's destruction), so a collection in the middle of a
    history would make it depend on the histories run before it in the same process.
    """
    rng = random.Random(f"ids:{seed}")
    saved = (uuid.uuid4, secrets.token_hex, os.sync)
    gc.collect()
    gc.disable()

    def token_hex(nbytes: int | None = None) -> str:
        n = 32 if nbytes is None else nbytes
        return rng.getrandbits(8 * n).to_bytes(n, "big").hex()

    uuid.uuid4 = lambda: uuid.UUID(int=rng.getrandbits(128), version=4)  # type: ignore[assignment]
    secrets.token_hex = token_hex  # type: ignore[assignment]
    os.sync = lambda: None
    try:
        yield
    finally:
        uuid.uuid4, secrets.token_hex, os.sync = saved  # type: ignore[assignment]
        gc.enable()
        gc.collect()


class _Logs:
    """A structlog processor: keeps the events that matter to the checkers (with the
    node that logged them) and drops every line (rendering would cost more than the
    simulation)."""

    def __init__(self, history: History) -> None:
        self.h = history

    def __call__(self, _logger: Any, method: str, event: Any) -> Any:
        name = event.get("event")
        if name in _INTERNAL or name in _REFUSALS or method in ("error", "exception", "critical"):
            self.h.logged(NODE.get(), str(name), event)
        raise structlog.DropEvent


@contextmanager
def _captured_logs(history: History) -> Iterator[None]:
    old = structlog.get_config()
    structlog.configure(processors=[_Logs(history)], cache_logger_on_first_use=False)
    try:
        yield
    finally:
        structlog.configure(**old)


class History:
    """The world of one history (see the module docstring)."""

    def __init__(
        self,
        seed: int,
        *,
        nodes: int,
        root: Path,
        certs: Certs,
        schedule: Sequence[Event],
        settle_max_s: float,
        kept: tuple[int, ...] | None,
        track_entries: bool = False,
    ) -> None:
        self.seed = seed
        self.n = nodes
        self.root = root
        self.certs = certs
        self.schedule = list(schedule)
        self.settle_max_s = settle_max_s
        self.retention = RetentionConfig(keep_successful=2, failed_grace_s=20.0, keep_releases=2)
        self.loop = VirtualLoop()
        self.loop.set_exception_handler(self._loop_error)
        self.net = SimNetwork(self.loop, random.Random(f"net:{seed}"))
        self.net.stats.track_entries = track_entries
        self.net.on_event = self.net_event
        self.nodes: dict[str, SimNode] = {}
        self.result = HistoryResult(seed, nodes, kept)
        self.trace = self.result.trace
        self.observed: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.acked: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self._control_tasks: set[asyncio.Task[Any]] = set()
        self._ops: dict[int, asyncio.Task[Any]] = {}
        self._restart_after: dict[str, float] = {}
        self._reaping: dict[str, asyncio.Task[Any]] = {}
        self._spare = iter(f"n{i}" for i in range(nodes + 1, nodes + 100))
        self._healed = False

    # -- World --------------------------------------------------------------------------

    def note(self, node: str, what: str) -> None:
        self.trace.append(f"{self.loop.time():.4f} {node} {what}")

    def observe(self, node: str, d: Deployment) -> None:
        seen = self.observed.setdefault((node, d.deployment_id), [])
        if not seen or seen[-1][0] != str(d.status):
            self.note(node, f"{d.deployment_id[:8]} {d.status}")
        seen.append((str(d.status), d.version))

    def fault_fired(self, node: str, point: str, kind: str) -> None:
        self.result.faults[f"disk:{kind}"] += 1
        self.note(node, f"fault {point}={kind}")

    def net_event(self, node: str, what: str) -> None:
        self.result.faults[what] += 1
        self.note(node, what)

    def crashed(self, node: SimNode, reason: str) -> None:
        self.note(node.name, f"crashed ({reason})")
        if reason.startswith("fault"):
            after = self._restart_after.pop(node.name, 1.0)
            self.loop.call_at(self.loop.time() + after, self._fire_restart, node)
        self._reaping[node.name] = self._control(node.reap())

    def _living(self, owner: tuple[str, int]) -> bool:
        node = self.nodes[owner[0]]
        return node.alive and node.generation == owner[1]

    def logged(self, owner: tuple[str, int] | None, name: str, event: dict[str, Any]) -> None:
        if owner is not None and not self._living(owner):
            return  # a dead node's tasks unwinding: not the living cluster's behaviour
        node = owner[0] if owner else None
        exc = sys.exc_info()[1]
        if isinstance(exc, SimCrashed | asyncio.CancelledError):
            return
        where = node or "sim"
        if name in _REFUSALS:
            if node is not None and (event.get("peer"), node) in self.net.mangled_links:
                # A frame from that peer was dropped or reordered on the way (which TLS
                # would never let through): refusing what it cannot check is the right
                # answer, as long as nothing wrong is stored (the other checkers).
                self.result.internal_errors[f"{name} (after mangling)"] += 1
                return
            self.result.anomalies.append(f"log: {where} {name}: {event.get('reason')}")
            return
        injected = _injected(exc) or _injected_text(str(event.get("error", "")))
        self.result.internal_errors[f"{name}{' (injected)' if injected else ''}"] += 1
        if not injected:
            self.result.anomalies.append(
                f"log: {where} {name}: {event.get('error') or repr(exc)} "
                f"(task {event.get('task')}, deployment {event.get('deployment_id')})"
            )

    def _loop_error(self, _loop: Any, context: dict[str, Any]) -> None:
        """What asyncio would print (a task's exception nobody retrieved, say): a bug in
        a live node; noise from a dead node's tasks unwinding."""
        owner = self.loop.owner(context.get("future") or context.get("task"))
        if owner is not None and not self._living(owner):
            return
        exc = context.get("exception")
        if isinstance(exc, SimCrashed):
            return
        who = owner[0] if owner else "sim"
        self.result.anomalies.append(f"loop: {who}: {context.get('message')} {exc!r}")

    # -- tasks ----------------------------------------------------------------------------

    def _control(self, coro: Any) -> asyncio.Task[Any]:
        """A task of the simulator itself (no node's: a crash never cancels it)."""
        ctx = self.loop_context.copy()
        task = self.loop.create_task(coro, context=ctx)
        self._control_tasks.add(task)
        task.add_done_callback(self._control_done)
        return task

    def _control_done(self, task: asyncio.Task[Any]) -> None:
        self._control_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.result.anomalies.append(f"simulator: {type(exc).__name__}: {exc}")

    def members(self) -> list[SimNode]:
        """Nodes that are members (not removed), by name."""
        return [n for _, n in sorted(self.nodes.items()) if not n.removed]

    def live(self) -> list[SimNode]:
        return [n for n in self.members() if n.alive]

    @staticmethod
    def _choose(nodes: Sequence[SimNode], pick: float) -> SimNode | None:
        return nodes[min(int(pick * len(nodes)), len(nodes) - 1)] if nodes else None

    # -- the history ----------------------------------------------------------------------

    async def main(self) -> None:
        import contextvars

        INLINE.set(True)
        self.loop_context = contextvars.copy_context()
        names = [f"n{i}" for i in range(1, self.n + 1)]
        for name in names:
            self.nodes[name] = SimNode(self, name, names)
        for name in names:
            await self._start(self.nodes[name])
        await self._until(self._all_connected, 120.0, "the cluster connected at start")
        t0 = self.loop.time()
        end = t0
        for e in self.schedule:
            self.loop.call_at(t0 + e.at, self._fire, e)
            end = max(end, t0 + e.at + _duration(e))
        self.result.events = len(self.schedule)
        await asyncio.sleep(max(0.0, end - self.loop.time()) + 1.0)
        await self._heal()
        settle_start = self.loop.time()
        states = await self._settle()
        self.result.settle_s = self.loop.time() - settle_start
        self._check(states)

    async def _until(self, cond: Any, timeout_s: float, what: str) -> bool:
        deadline = self.loop.time() + timeout_s
        while not cond():
            if self.loop.time() > deadline:
                self.result.anomalies.append(f"liveness: not {what} within {timeout_s:.0f} s")
                return False
            await asyncio.sleep(0.25)
        return True

    def _all_connected(self) -> bool:
        live = self.live()
        names = {n.name for n in live}
        return all(names - {n.name} <= n.service.connected() for n in live)

    async def _start(self, node: SimNode) -> None:
        if node.name in self._reaping:
            await asyncio.wait([self._reaping.pop(node.name)])
        node.begin_life()
        task = node.spawn(node.start(), name=f"start-{node.name}")
        await asyncio.wait([task])
        if task.cancelled() or isinstance(task.exception(), SimCrashed):
            return  # it crashed while starting (a fault point): its restart is scheduled
        if (exc := task.exception()) is not None:
            self.result.anomalies.append(f"start: {node.name} failed to start: {exc!r}")

    def _fire(self, e: Event) -> None:
        self._control(self._event(e))

    def _fire_restart(self, node: SimNode) -> None:
        self._control(self._restart(node))

    async def _restart(self, node: SimNode) -> None:
        if node.alive or node.removed:
            return
        self.result.restarts += 1
        await self._start(node)

    async def _event(self, e: Event) -> None:
        self.note("sim", e.describe())
        rng = random.Random(f"event:{self.seed}:{e.index}")
        if e.is_op:
            self.result.ops[e.kind] += 1
            await self._op(e, rng)
        else:
            if e.kind != "disk":  # counted when (if) the armed fault fires
                self.result.faults[e.kind] += 1
            await self._fault(e, rng)

    # -- operations -----------------------------------------------------------------------

    async def _op(self, e: Event, rng: random.Random) -> None:
        if e.kind == "add_node":
            await self._add_node(e, rng)
            return
        if e.kind == "remove_node":
            await self._remove_node(e)
            return
        node = self._choose(self.live(), e.args["node"])
        if node is None:
            self._answer(e, "sim", Outcome("error:unreachable"))
            return
        created: list[str] = []
        task = node.spawn(run_op(node, e.kind, e.args, rng, created.append), name=f"op-{e.index}")
        self._ops[e.index] = task
        await asyncio.wait([task])
        if task.cancelled():
            outcome = Outcome("lost", created[0] if created else None)
        elif (exc := task.exception()) is not None:
            outcome = Outcome(answer_of(exc), created[0] if created else None)
            if isinstance(exc, SimCrashed):
                outcome = Outcome("lost", outcome.deployment_id)
            self._answer(e, node.name, outcome, exc)
            return
        else:
            outcome = task.result()
        self._answer(e, node.name, outcome)

    def _answer(
        self, e: Event, node: str, outcome: Outcome, exc: BaseException | None = None
    ) -> None:
        self.result.answers[outcome.answer.split("=")[0]] += 1
        if outcome.answer.startswith("crash:"):  # a 500: the operation hit a bug
            self.result.anomalies.append(f"op: #{e.index} {e.kind} on {node} raised {exc!r}")
        d = outcome.deployment_id
        self.note(node, f"answer #{e.index} {e.kind}: {outcome.answer} {d[:8] if d else ''}")
        if outcome.acknowledged_success and d is not None:
            self.result.acknowledged += 1
            self.acked[d] = f"#{e.index} {e.kind}"
        elif outcome.answer.startswith("error:") and d is not None and e.kind in OP_KINDS:
            if e.kind in ("deploy", "rollback", "drop"):
                self.failed[d] = outcome.answer
        elif outcome.answer.startswith("ok:") and e.kind not in ("deploy", "rollback", "drop"):
            self.result.acknowledged += 1

    async def _add_node(self, e: Event, rng: random.Random) -> None:
        via = self._choose(self.live(), e.args["node"])
        if via is None or len(self.nodes) >= self.n + 3:
            self._answer(e, "sim", Outcome("error:skipped"))
            return
        name = next(self._spare)
        node = SimNode(self, name, [m.name for m in self.members()])
        self.nodes[name] = node
        if e.args["start_first"]:
            await self._start(node)
        task = via.spawn(via.accounts.put_member(name, url_of(name), by=USER), name="add-node")
        await asyncio.wait([task])
        exc = None if task.cancelled() else task.exception()
        answer = "lost" if task.cancelled() or isinstance(exc, SimCrashed) else "ok:added"
        self._answer(e, via.name, Outcome(answer if exc is None else answer_of(exc)), exc)
        if not e.args["start_first"]:
            await self._start(node)

    async def _remove_node(self, e: Event) -> None:
        members = self.members()
        target = self._choose(members, e.args["target"])
        via = self._choose([n for n in self.live() if n is not target], e.args["node"])
        if target is None or via is None or len(members) <= 3:
            self._answer(e, "sim", Outcome("error:skipped"))
            return

        async def remove() -> None:  # remove_node, as node/operations/cluster.py does it
            accounts = via.accounts
            await accounts.delete_member(target.name, by=USER)
            if target.name in via.config_peers:
                member = await accounts.get_member(target.name)
                if member is None or not member.deleted:
                    await accounts.put_member(target.name, url_of(target.name), by=USER)
                    await accounts.delete_member(target.name, by=USER)

        task = via.spawn(remove(), name="remove-node")
        await asyncio.wait([task])
        exc = None if task.cancelled() else task.exception()
        if task.cancelled() or isinstance(exc, SimCrashed):
            self._answer(e, via.name, Outcome("lost"))
            return
        if exc is not None:
            self._answer(e, via.name, Outcome(answer_of(exc)), exc)
            return
        self._answer(e, via.name, Outcome("ok:removed"))
        target.removed = True  # the operator decommissions it
        target.crash_now("decommissioned")

    # -- faults ---------------------------------------------------------------------------

    async def _fault(self, e: Event, rng: random.Random) -> None:
        a = e.args
        live = self.live()
        node = self._choose(live, a["node"])
        if node is None:
            return
        others = [n for n in self.members() if n is not node]
        peer = self._choose(others, a.get("peer", 0.0))
        if e.kind == "crash":
            if a["tear"]:
                self._tear(node, rng)
            node.crash_now("crash")
            self.loop.call_at(self.loop.time() + a["down_s"], self._fire_restart, node)
        elif e.kind == "partition":
            members = [m.name for m in self.members()]
            if len(members) < 2:
                return
            k = 1 + int(a["size"] * (len(members) - 1))
            side = set(rng.sample(members, min(k, len(members) - 1)))
            pairs = [(x, y) for x in sorted(side) for y in members if y not in side]
            if not a["oneway"]:
                pairs += [(y, x) for x, y in pairs]
            self.note("sim", f"cut {sorted(side)} {'one way' if a['oneway'] else ''}")
            for x, y in pairs:
                self.net.cut(x, y)
            await asyncio.sleep(a["dur_s"])
            if not self._healed:
                for x, y in pairs:
                    self.net.uncut(x, y)
        elif e.kind == "reset" and peer is not None:
            self.net.reset(node.name, peer.name)
        elif e.kind == "slow" and peer is not None:
            self.net.slow(node.name, peer.name, a["extra_s"])
            self.net.slow(peer.name, node.name, a["extra_s"])
            await asyncio.sleep(a["dur_s"])
            if not self._healed:
                self.net.slow(node.name, peer.name, 0)
                self.net.slow(peer.name, node.name, 0)
        elif e.kind == "mangle" and peer is not None:
            self.net.mangle(node.name, peer.name, a["p"])
            await asyncio.sleep(a["dur_s"])
            if not self._healed:
                self.net.mangle(node.name, peer.name, 0)
        elif e.kind == "skew":
            node.skew_ms = a["skew_ms"]
        elif e.kind == "disk":
            node.faults.arm(a["point"], a["fault"])
            if a["fault"] == "kill":
                self._restart_after[node.name] = a["down_s"]

    def _tear(self, node: SimNode, rng: random.Random) -> None:
        """A power loss tears what was not fsynced: partial fetches lose their tail or
        end in zeros (they are fsynced only when complete)."""
        partial = node.dir / "blobs" / "partial"
        for path in sorted(partial.glob("*")) if partial.is_dir() else []:
            size = path.stat().st_size
            if size == 0:
                continue
            cut = rng.randrange(size)
            with open(path, "r+b") as f:
                if rng.random() < 0.5:
                    f.truncate(cut)
                else:
                    f.seek(cut)
                    f.write(b"\0" * (size - cut))
            self.result.faults["torn_write"] += 1
            self.note(node.name, f"tore {path.name[:12]} at {cut}/{size}")

    # -- healing, settling, checking ------------------------------------------------------

    async def _heal(self) -> None:
        self._healed = True
        self.note("sim", "heal")
        self.net.heal()
        for node in self.nodes.values():
            node.skew_ms = 0
            node.faults.plan.clear()
        for node in self.members():
            if not node.alive:
                await self._start(node)

    async def _settle(self) -> dict[str, checks.NodeState]:
        deadline = self.loop.time() + self.settle_max_s
        last: dict[str, Any] | None = None
        states: dict[str, checks.NodeState] = {}
        removed = [n.name for n in self.nodes.values() if n.removed]
        while self.loop.time() < deadline:
            await asyncio.sleep(3.0)
            for node in self.members():
                if not node.alive:
                    await self._start(node)
            if any(not t.done() for t in self._ops.values()):
                continue
            states = {n.name: await checks.read_state(n, with_digest=False) for n in self.live()}
            if not all(s.quiet(removed) for s in states.values()) or checks.same_active(states):
                last = None
                continue
            states = {n.name: await checks.read_state(n) for n in self.live()}
            digests = {repr(sorted(s.digest.items())) for s in states.values()}
            view = {n: (s.digest, s.active, s.running) for n, s in states.items()}
            if len(digests) == 1 and view == last:
                return states
            last = view if len(digests) == 1 else None
        states = {n.name: await checks.read_state(n) for n in self.live()}
        self.result.anomalies.append(
            f"liveness: the cluster did not settle within {self.settle_max_s:.0f} s after healing"
        )
        return states

    def _check(self, states: dict[str, checks.NodeState]) -> None:
        removed = [n.name for n in self.nodes.values() if n.removed]
        now = {n.name: n.wall_ms() for n in self.live()}
        members = [n for n in self.members() if n.name in states]
        found = (
            checks.same_state(states)
            + checks.same_active(states)
            + checks.terminal_final(self.observed)
            + checks.no_stuck_rows(states, removed, now)
            + checks.acked_everywhere(states, self.acked, self.failed)
            + checks.blobs_intact(members)
            + checks.no_refusals(
                list(self.nodes.values()),
                states,
                excused={dst for _src, dst in self.net.mangled_links},
            )
        )
        self.result.anomalies.extend(found)
        for name, state in sorted(states.items()):
            self.note(
                name, "state " + " ".join(f"{t}={d}" for t, d in sorted(state.digest.items()))
            )

    def stop_everything(self) -> None:
        """Every node dies now (the end of the history, or of a deadlocked one)."""
        for node in self.nodes.values():
            node.crash_now("end of history")
        self.loop.reset_spins()

    async def teardown(self) -> None:
        for task in list(self._reaping.values()):
            await asyncio.wait([task])
        for task in self.loop.all_owned():
            if task is not asyncio.current_task():
                task.cancel()
        rest = [t for t in self.loop.all_owned() if t is not asyncio.current_task()]
        if rest:
            await asyncio.wait(rest, timeout=60)


def _duration(e: Event) -> float:
    return float(e.args.get("dur_s", 0.0)) + float(e.args.get("down_s", 0.0))


def _injected(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if _injected_text(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _injected_text(text: str) -> bool:
    return any(marker in text for marker in _INJECTED)


def run_history(
    seed: int,
    *,
    nodes: int = 5,
    certs: Certs,
    keep: Sequence[int] | None = None,
    schedule: Sequence[Event] | None = None,
    settle_max_s: float = 600.0,
    track_entries: bool = False,
) -> HistoryResult:
    """Run history ``seed`` (only the events in ``keep``, if given) and check it."""
    events = list(schedule) if schedule is not None else generate(seed)
    kept = tuple(keep) if keep is not None else None
    if kept is not None:
        events = [e for e in events if e.index in set(kept)]
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix=f"cairn-sim-{seed}-", dir=sim_root()))
    h = History(
        seed, nodes=nodes, root=root, certs=certs, schedule=events, settle_max_s=settle_max_s,
        kept=kept, track_entries=track_entries,
    )  # fmt: skip
    try:
        with deterministic(seed), _captured_logs(h):
            asyncio.set_event_loop(h.loop)
            try:
                try:
                    h.loop.run_until_complete(h.main())
                except Deadlock as e:  # raised by the loop itself, out of run_until_complete
                    h.result.anomalies.append(f"simulator: {e}")
                finally:
                    h.stop_everything()
                    h.loop.run_until_complete(h.teardown())
            finally:
                asyncio.set_event_loop(None)
                with suppress(Exception):
                    h.loop.run_until_complete(h.loop.shutdown_asyncgens())
                h.loop.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    r = h.result
    r.virtual_s = h.loop.time()
    r.real_s = time.perf_counter() - started
    r.net = h.net.stats.snapshot()
    r.trace_hash = hashlib.sha256("\n".join(r.trace).encode()).hexdigest()[:16]
    return r
