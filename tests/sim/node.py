"""One simulated cairn node: the real storage, replication and deploy machinery.

The parts are composed here as ``node/app.py`` composes them (storage → cluster →
deploys), not through ``create_app``: the simulator needs three seams the app does not
take. The change feed must fan out in subscription order (:class:`OrderedFeed`; the
production feed keeps subscriptions in a set, which iterates by memory address, so wake
order would differ between runs); the replication service needs the simulated clock,
the seeded backoff randomness and the in-memory transport; and a crash must close the
database at an exact instant and leave nothing behind (the app holds a lock file and
runs cleanup code a SIGKILL would not). Everything else is the production code: the
same functions ``create_app`` calls (``sweep_storage``, ``align_releases``,
``Store.resign``, ``Origin.recover``), ``node.cluster.ReplicationHooks`` for the
reconnect kick and the catch-up wait, ``settings_from`` for the replication defaults.

A crash (:meth:`SimNode.crash_now`) is what SIGKILL leaves: the database connections are
closed without committing at that instant, the node's connections die, and every task
of the node is then cancelled (its cleanup code can no longer commit anything). A restart
reopens the same files.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import sqlite3
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

from node.cluster import ReplicationHooks, settings_from
from node.config import Limits, ReplicationConfig, RetentionConfig
from node.deploy.components import Components
from node.deploy.context import DeployContext, NoRunner
from node.deploy.hooks import HookGroups
from node.deploy.origin import Origin
from node.deploy.reconciler import Reconciler
from node.startup import align_releases, sweep_storage
from node.tasks import TaskSet
from replication.errors import CertificateError
from replication.membership import PeerAddress
from replication.service import ReplicationService
from replication.signing import Keyring
from storage.accounts import Accounts
from storage.blobs import BlobStore
from storage.changelog import ChangeFeed, Subscription
from storage.faults import FaultPlan
from storage.hlc import HybridClock
from storage.records import Deployment, Notice
from storage.store import Store
from storage.tables import DEPLOYMENTS
from storage.trim import TrimPolicy

from .certs import EPOCH_MS, Certs
from .net import SimNetwork, url_of
from .vloop import NODE, VirtualLoop

__all__ = ["OrderedFeed", "SimClock", "SimCrashed", "SimFaults", "SimNode", "World"]


class World(Protocol):
    """What a node needs from the simulation around it."""

    loop: VirtualLoop
    net: SimNetwork
    certs: Certs
    root: Path
    seed: int
    retention: RetentionConfig

    def observe(self, node: str, d: Deployment) -> None: ...

    def note(self, node: str, what: str) -> None: ...

    def crashed(self, node: SimNode, reason: str) -> None: ...

    def fault_fired(self, node: str, point: str, kind: str) -> None: ...


class SimCrashed(BaseException):
    """Raised at a fault point set to ``kill``: the node died there."""


class OrderedFeed(ChangeFeed):
    """The change feed, fanning out in subscription order (deterministic), and telling
    the simulator about every deployment row a transaction committed."""

    def __init__(self, on_rows: Callable[[Deployment], None]) -> None:
        super().__init__()
        self._ordered: dict[Subscription, None] = {}
        self._on_rows = on_rows

    @property
    def subscriber_count(self) -> int:
        return len(self._ordered)

    @contextmanager
    def subscribe(
        self, predicate: Callable[[Notice], bool] | None = None, *, maxsize: int = 100_000
    ) -> Iterator[Subscription]:
        sub = Subscription(predicate or (lambda _n: True), maxsize)
        self._ordered[sub] = None
        try:
            yield sub
        finally:
            self._ordered.pop(sub, None)

    def publish(self, notices: list[Notice]) -> None:
        for notice in notices:
            if notice.tbl == DEPLOYMENTS.name:
                for row in notice.rows:
                    if isinstance(row, Deployment):
                        self._on_rows(row)
        for notice in notices:
            for sub in list(self._ordered):
                sub._push(notice)


class SimFaults(FaultPlan):
    """The node's fault points: ``oserror``, ``missing`` and ``error`` as in production;
    ``kill`` crashes the simulated node there (instead of SIGKILLing the process)."""

    def __init__(self, node: SimNode) -> None:
        super().__init__({})
        self.node = node

    def arm(self, point: str, kind: str) -> None:
        """Fire ``kind`` the next time ``point`` is hit (once)."""
        self.plan[point] = (kind, True)

    def hit(self, name: str) -> None:
        entry = self.plan.get(name)
        if entry is None or not self.node.alive:
            return
        self.node.world.fault_fired(self.node.name, name, entry[0])
        if entry[0] == "kill":
            del self.plan[name]
            self.fired.append(name)
            self.node.crash_now(f"fault {name}")
            raise SimCrashed(name)
        super().hit(name)


class SimClock:
    """The replication ``Clock`` seam on virtual time, with the node's wall-clock skew."""

    def __init__(self, node: SimNode) -> None:
        self._node = node

    def monotonic(self) -> float:
        return self._node.world.loop.time()

    def wall_ms(self) -> int:
        return self._node.wall_ms()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class SimNode:
    """A node's files (kept across restarts) and, while it runs, its services."""

    def __init__(self, world: World, name: str, config_peers: list[str]) -> None:
        self.world = world
        self.name = name
        self.dir = world.root / name
        self.config_peers = list(config_peers)
        self.signer = world.certs.signer(name)
        self.skew_ms = 0
        self.alive = False
        self.removed = False
        self.generation = 0
        self.faults = SimFaults(self)
        self.context = contextvars.copy_context()
        self.store: Store
        self.blobs: BlobStore
        self.components: Components
        self.service: ReplicationService
        self.ctx: DeployContext
        self.origin: Origin
        self.deploy_tasks: TaskSet
        self.reconciler: Reconciler
        #: Counters of the replication service's sessions, kept across restarts.
        self.quarantined = 0
        self.refused = 0

    def wall_ms(self) -> int:
        return EPOCH_MS + int(self.world.loop.time() * 1000) + self.skew_ms

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this node (a crash cancels it)."""
        return self.world.loop.create_task(coro, name=name, context=self.context.copy())

    @property
    def accounts(self) -> Accounts:
        return Accounts(self.store)

    # -- life -----------------------------------------------------------------------

    def begin_life(self) -> None:
        """A new life: tasks from now on belong to it (call before starting)."""
        self.generation += 1
        self.context = contextvars.copy_context()
        self.context.run(NODE.set, (self.name, self.generation))

    async def start(self) -> None:
        """Open the node's files and start everything (run as a task of this node, after
        :meth:`begin_life`)."""
        world, name = self.world, self.name
        self.faults = SimFaults(self)
        clock = HybridClock(wall=self.wall_ms)
        feed = OrderedFeed(lambda d: world.observe(name, d))
        self.alive = True
        store = await Store.open(
            self.dir / "cairn.db", node=name, clock=clock, feed=feed, signer=self.signer
        )
        self.store = store
        await store.resign()
        self.blobs = blobs = BlobStore(self.dir / "blobs", faults=self.faults)
        self.components = components = Components(self.dir / "components", faults=self.faults)
        hook_groups = HookGroups(self.dir / "run" / "hooks")
        await sweep_storage(store, blobs, components, hook_groups, self.dir / "tmp")
        await align_releases(store, components)
        keyring = Keyring(world.certs.ca_pem)
        for _key_id, der in await store.certs():
            with suppress(CertificateError):  # another CA's: those entries cannot be relayed
                keyring.add(der)
        own = keyring.add(self.signer.cert_der)
        await store.put_cert(own.key_id, own.node, own.der, own.not_before_ms, own.not_after_ms)
        r = ReplicationConfig()
        self.service = service = ReplicationService(
            node=name, store=store, blobs=blobs, cluster_id=world.certs.cluster_id,
            peers=[PeerAddress(p, url_of(p)) for p in self.config_peers if p != name],
            transport=world.net.transport(name), settings=settings_from(r),
            clock=SimClock(self), rng=random.Random(f"{world.seed}:{name}:{self.generation}"),
            keyring=keyring, own_cert=self.signer.cert_der,
            trim_policy=TrimPolicy(
                max_age_s=r.log_max_age_s, max_entries=r.log_max_entries,
                audit_max_entries=r.audit_max_entries,
            ),
            maintain_s=r.maintain_s,
        )  # fmt: skip
        await service.start()
        hooks = ReplicationHooks(service, self.signer)
        self.ctx = ctx = DeployContext(
            node=name, store=store, blobs=blobs, components=components, limits=Limits(),
            cluster=service, fetcher=service, faults=self.faults, hook_groups=hook_groups,
            runner=NoRunner(), retention=world.retention,
        )  # fmt: skip
        self.deploy_tasks = TaskSet("deploys")
        self.origin = Origin(ctx, self.deploy_tasks)
        await self.origin.recover()
        self.reconciler = Reconciler(ctx, wait_ready=hooks.wait_caught_up)
        hooks.on_ready(self.reconciler)
        self.background = TaskSet("reconciler")
        self.background.spawn(self.reconciler.run(), name="reconciler")
        world.note(name, "started")

    def crash_now(self, reason: str) -> None:
        """The node dies at this instant: nothing it has not committed survives, and it
        sends nothing more. Its tasks are cancelled by the simulator right after."""
        if not self.alive:
            return
        self.alive = False
        self._count_refusals()
        self.world.net.crash(self.name)
        store = getattr(self, "store", None)
        if store is not None:
            _abandon(store)
        # From its next step on, every task of the node unwinds (CancelledError) instead
        # of going on: nothing of it runs normally after this instant.
        for task in self.world.loop.tasks_of(self.name):
            task.cancel()
        self.world.crashed(self, reason)

    async def reap(self) -> None:
        """Cancel every task of this (dead) node, oldest first, until none is left."""
        loop = self.world.loop
        me = asyncio.current_task()
        for _ in range(50):
            tasks = [t for t in loop.tasks_of(self.name) if t is not me]
            if not tasks:
                return
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=60)
        raise RuntimeError(f"tasks of {self.name} survive its crash: {loop.tasks_of(self.name)}")

    def _count_refusals(self) -> None:
        service = getattr(self, "service", None)
        if service is None:
            return
        for stats in service._received.values():
            self.quarantined += stats.quarantined
            self.refused += stats.refused
            stats.quarantined = stats.refused = 0

    def refusals(self) -> tuple[int, int]:
        """Entries this node quarantined and refused, over all its lives."""
        self._count_refusals()
        return self.quarantined, self.refused


def _abandon(store: Store) -> None:
    """Close a store's connections now, without committing (what a killed process
    leaves). Reaches into the database's connections: the simulator runs them inline, so
    no call is in flight at this instant."""
    db = store.db
    writer = db._writer
    conn: sqlite3.Connection | None = writer._connection
    if conn is not None:
        if conn.in_transaction:
            conn.rollback()
        conn.close()
        writer._connection = None
        writer._running = False
    for reader in db._readers._conns:
        reader.close()
