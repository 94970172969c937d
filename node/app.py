"""``create_app``: one node, its services under typed keys, owned by cleanup contexts.

Start order (stop is the reverse), one cleanup context each: the data directory's lock
→ storage (database, blob store, releases, sweeps) → cluster (replication, when
configured) → accounts (the bootstrap user, once the cluster's users are known) →
deploys (the component runner, recovery of interrupted rows, the reconciler). Each sets
the ``web.AppKey`` of what it owns (:mod:`node.appkeys`) and closes it on the way out;
every background task belongs to a :class:`~node.tasks.TaskSet`. Seams (the clock,
crash points, the cluster implementation, the component runner) are arguments, so tests
pass fakes instead of patching.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from node.api import OPERATIONS, error_middleware, routes
from node.appkeys import (
    ACCOUNTS,
    AUTH,
    BLOBS,
    CLUSTER_STATUS,
    CONFIG,
    DEPLOY,
    DEPLOY_TASKS,
    METRICS,
    ORIGIN,
    RECONCILER,
    SEAMS,
    STORE,
    SUPERVISOR,
    Seams,
)
from node.auth import SUPER_USER_ROLE, Authenticator, hash_password
from node.backup import RESTORED_META, recover_after_restore
from node.config import Config
from node.deploy.component_config import RunSpec, load_component_config
from node.deploy.components import Components
from node.deploy.context import (
    BlobFetcher,
    ClusterView,
    ComponentRunner,
    DeployContext,
    SoloCluster,
)
from node.deploy.hooks import HookGroups
from node.deploy.origin import Origin
from node.deploy.pressure import DiskPressure
from node.deploy.reconciler import Reconciler
from node.deploy.supervisor import Supervisor
from node.errors import DeployFailed
from node.metrics import Metrics
from node.operations import cluster, components, deployments, payloads, session, users
from node.operations.registry import Registry
from node.startup import align_releases, sweep_storage
from node.tasks import TaskSet
from storage.accounts import Accounts
from storage.blobs import BlobStore
from storage.entries import UNSIGNED, Signer
from storage.faults import NO_FAULTS, Faults
from storage.hlc import HybridClock
from storage.records import Deployment
from storage.store import Store

__all__ = ["CLUSTER", "ClusterFactory", "ClusterHooks", "create_app"]

log = structlog.get_logger(__name__)


class ClusterHooks:
    """What a cluster implementation gives the node (replication provides one)."""

    view: ClusterView
    fetcher: BlobFetcher
    signer: Signer = UNSIGNED
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None

    def on_ready(self, reconciler: Reconciler) -> None:
        """Called once the deploy services exist (to kick the reconciler on reconnect)."""

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until this node holds what some peer holds (False on timeout)."""
        return True

    async def wait_caught_up(self) -> None:
        """Return once this node has caught up with the cluster (or it never will)."""

    def summary(self) -> dict[str, Any]:
        """Figures for the shutdown line (peers connected, transfers in flight)."""
        return {}


#: Builds the cluster once storage is open; an async generator used as a cleanup context.
ClusterFactory = Callable[[web.Application], AsyncIterator[ClusterHooks]]
#: Builds the component runner (the supervisor) for a node.
RunnerFactory = Callable[[web.Application], ComponentRunner]

CLUSTER: web.AppKey[ClusterHooks] = web.AppKey("cluster", ClusterHooks)
_CLUSTER_FACTORY: web.AppKey[ClusterFactory | None] = web.AppKey("cluster_factory")
_RUNNER_FACTORY: web.AppKey[RunnerFactory | None] = web.AppKey("runner_factory")
_SIGNER: web.AppKey[Signer] = web.AppKey("signer")
_PRESSURE: web.AppKey[DiskPressure] = web.AppKey("pressure")


def registry() -> Registry:
    r = Registry()
    for family in (
        deployments.registry, payloads.registry, users.registry, cluster.registry,
        components.registry, session.registry,
    ):  # fmt: skip
        r.merge(family)
    return r


def create_app(
    config: Config,
    *,
    clock: HybridClock | None = None,
    faults: Faults = NO_FAULTS,
    cluster_factory: ClusterFactory | None = None,
    runner_factory: RunnerFactory | None = None,
    signer: Signer = UNSIGNED,
) -> web.Application:
    """Build a node's admin application. Nothing starts until the app starts.

    Args:
        config: the node's configuration.
        clock: the hybrid clock (tests pass one over a fake wall clock).
        faults: crash points.
        cluster_factory: replication, for a clustered node.
        runner_factory: the component runner (default: none runs anything).
        signer: signs this node's change entries (its cluster certificate's key).
    """
    app = web.Application(
        middlewares=[error_middleware], client_max_size=config.limits.max_body_bytes
    )
    app[CONFIG] = config
    app[SEAMS] = Seams(clock=clock, faults=faults)
    app[OPERATIONS] = registry()
    app[METRICS] = Metrics()
    app[_CLUSTER_FACTORY] = cluster_factory
    app[_RUNNER_FACTORY] = runner_factory
    app[_SIGNER] = signer
    app[CLUSTER_STATUS] = None
    app.add_routes(routes())
    app.cleanup_ctx.append(_data_dir_lock)
    app.cleanup_ctx.append(_storage)
    if cluster_factory is not None:
        app.cleanup_ctx.append(_cluster)
    app.cleanup_ctx.append(_accounts)
    app.cleanup_ctx.append(_deploys)
    return app


# -- cleanup contexts, in start order -------------------------------------------------


async def _data_dir_lock(app: web.Application) -> AsyncIterator[None]:
    """Hold an exclusive lock on ``<data>/lock`` for the life of the node.

    Start-up sweeps temp files, kills leftover hooks and fails unfinished deploys as
    ``interrupted``: all wrong while another process is working in the same directory.

    Raises:
        RuntimeError: another process holds the lock.
    """
    data = app[CONFIG].node.data_dir
    data.mkdir(parents=True, exist_ok=True)
    fd = os.open(data / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"data directory {data} is in use by another node process") from None
    try:
        yield
    finally:
        os.close(fd)


async def _storage(app: web.Application) -> AsyncIterator[None]:
    config, seams = app[CONFIG], app[SEAMS]
    data = config.node.data_dir
    store = await Store.open(
        data / "cairn.db",
        node=config.node.name,
        clock=seams.clock,
        signer=app[_SIGNER],
        faults=seams.faults,
    )
    try:
        await store.resign()
        blobs = BlobStore(data / "blobs", faults=seams.faults)
        components = Components(data / "components", faults=seams.faults)
        hook_groups = HookGroups(data / "run" / "hooks")
        await sweep_storage(store, blobs, components, hook_groups, data / "tmp")
        await align_releases(store, components)
        app[STORE] = store
        app[BLOBS] = blobs
        app[ACCOUNTS] = Accounts(store)
        app[AUTH] = Authenticator(app[ACCOUNTS], config.auth)
        solo = SoloCluster(config.node.name)
        pressure = app[_PRESSURE] = DiskPressure(
            lambda: app[DEPLOY], config.storage, data_dir=data, drop=_drop_payload
        )
        blobs.guard = pressure.ingesting
        app[DEPLOY] = DeployContext(
            node=config.node.name, store=store, blobs=blobs, components=components,
            limits=config.limits, cluster=solo, fetcher=solo, faults=seams.faults,
            hook_groups=hook_groups, retention=config.retention, space=pressure,
        )  # fmt: skip
        yield
    finally:
        await store.close()


async def _cluster(app: web.Application) -> AsyncIterator[None]:
    factory = app[_CLUSTER_FACTORY]
    assert factory is not None
    async for hooks in factory(app):
        app[CLUSTER] = hooks
        app[CLUSTER_STATUS] = hooks.status
        app[DEPLOY] = replace(app[DEPLOY], cluster=hooks.view, fetcher=hooks.fetcher)
        yield


async def _accounts(app: web.Application) -> AsyncIterator[None]:
    """Bootstrap accounts. A node joining a cluster does it in the background once it has
    caught up (or given up waiting), so it serves meanwhile (answering 401 until the
    cluster's users have arrived)."""
    config, accounts = app[CONFIG], app[ACCOUNTS]
    joining = app.get(CLUSTER) is not None and bool(config.peers)
    tasks = TaskSet("accounts")
    if joining and not await accounts.user_known(config.auth.bootstrap_user):
        tasks.spawn(_bootstrap(app), name="bootstrap-accounts")
    else:
        await _bootstrap(app)
    try:
        yield
    finally:
        await tasks.close()


async def _deploys(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    factory = app[_RUNNER_FACTORY]
    supervisor = Supervisor(
        node=config.node.name, run_dir=config.node.data_dir / "run", settings=config.components
    )
    app[SUPERVISOR] = supervisor
    runner: ComponentRunner = factory(app) if factory is not None else supervisor
    app[DEPLOY] = ctx = replace(app[DEPLOY], runner=runner)
    # Processes a killed node left behind are stopped; each active release runs again.
    await supervisor.recover(await _active_runs(ctx))
    tasks = app[DEPLOY_TASKS] = TaskSet("deploys")
    origin = app[ORIGIN] = Origin(ctx, tasks)
    hooks = app.get(CLUSTER)
    background = TaskSet("reconciler")
    interrupted: list[str] = []
    if restored := await ctx.store.get_meta(RESTORED_META):
        # Restored from a backup: what it wrote since comes back from its peers first.
        background.spawn(_recover_restored(app, restored), name="recover-after-restore")
    else:
        interrupted = await origin.recover()
    reconciler = app[RECONCILER] = Reconciler(
        ctx, wait_ready=hooks.wait_caught_up if hooks is not None else _now
    )
    if hooks is not None:
        hooks.on_ready(reconciler)
    background.spawn(reconciler.run(), name="reconciler")
    background.spawn(app[METRICS].watch_outcomes(app[STORE]), name="deploy-outcomes")
    background.spawn(app[_PRESSURE].run(), name="disk-pressure")
    try:
        yield
    finally:
        running = len(tasks)
        await background.close()
        await tasks.close()
        await supervisor.close()
        log.info(
            "node_shutdown_summary",
            node=app[CONFIG].node.name,
            deploys_interrupted=running,
            interrupted_at_start=len(interrupted),
            **(hooks.summary() if hooks is not None else {}),
        )


async def _now() -> None:
    return None


async def _recover_restored(app: web.Application, restored: str) -> None:
    hooks, store = app.get(CLUSTER), app[STORE]
    wait_s = app[CONFIG].auth.bootstrap_wait_s

    async def caught_up() -> bool:
        assert hooks is not None
        return await hooks.caught_up(wait_s)

    async def done() -> None:
        await store.set_meta(RESTORED_META, "")

    await recover_after_restore(
        restored=restored, caught_up=caught_up if hooks is not None else None,
        recover=app[ORIGIN].recover, done=done,
    )  # fmt: skip


async def _drop_payload(ctx: DeployContext, d: Deployment) -> int:
    """Disk pressure drops a payload as ``delete_deployment_payload`` does (replicated)."""
    return await payloads.drop_payload(ctx, d, user=None)


async def _active_runs(ctx: DeployContext) -> dict[str, tuple[str, Path, RunSpec | None]]:
    """What each project runs here: its active release and that release's ``[run]``."""
    out: dict[str, tuple[str, Path, RunSpec | None]] = {}
    for project, row in (await ctx.store.active_releases()).items():
        release = ctx.components.release_dir(project, row["deployment_id"])
        try:
            spec = load_component_config(release).run
        except DeployFailed:
            spec = None
        out[project] = (row["deployment_id"], release, spec)
    return out


async def _bootstrap(app: web.Application) -> None:
    """Create the super_user role and the bootstrap user, unless the cluster has them.

    A node joining a cluster first waits until it has caught up with some peer, so it
    never overwrites a user (or a password) the cluster already has.
    """
    config, accounts = app[CONFIG], app[ACCOUNTS]
    hooks = app.get(CLUSTER)
    wait_s = config.auth.bootstrap_wait_s
    if hooks is not None and config.peers and not await hooks.caught_up(wait_s):
        log.warning("bootstrap_without_peers", waited_s=wait_s)
    if await accounts.get_role(SUPER_USER_ROLE) is None:
        await accounts.put_role(SUPER_USER_ROLE, {"super_user": True, "operations": []}, by=None)
    if await accounts.user_known(config.auth.bootstrap_user):
        return  # never overwrite (or bring back) a user the cluster has or had
    password = config.auth.bootstrap_password
    if not password:
        password = secrets.token_urlsafe(18)
        path: Path = config.node.data_dir / "admin-password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        log.warning("bootstrap_password_generated", user=config.auth.bootstrap_user, file=str(path))
    await accounts.put_user(
        config.auth.bootstrap_user,
        password_hash=hash_password(password),
        role=SUPER_USER_ROLE,
        by=None,
    )
    log.info("bootstrap_user_created", user=config.auth.bootstrap_user)
