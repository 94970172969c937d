"""``create_app``: one node, its services under typed keys, owned by cleanup contexts.

Start order (stop is the reverse): the data directory's lock → storage (database, blob
store, releases, sweeps) → accounts (bootstrap user) → cluster (replication, when
configured) → deploys (recovery of interrupted rows, the reconciler). Seams — the clock,
crash points, the cluster implementation — are arguments, so tests pass fakes instead of
patching.
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
from node.appkeys import CONFIG, METRICS, SERVICES, Services
from node.auth import SUPER_USER_ROLE, Authenticator, hash_password
from node.config import Config
from node.deploy.components import Components
from node.deploy.context import BlobFetcher, ClusterView, DeployContext, SoloCluster
from node.deploy.hooks import HookGroups
from node.deploy.origin import Origin
from node.deploy.reconciler import Reconciler
from node.metrics import Metrics
from node.operations import cluster, deployments, payloads, users
from node.operations.registry import Registry
from node.tasks import TaskSet
from storage.accounts import Accounts
from storage.blobs import BlobStore
from storage.faults import NO_FAULTS, Faults
from storage.hlc import HybridClock
from storage.store import Store

__all__ = ["ClusterFactory", "ClusterHooks", "create_app"]

log = structlog.get_logger(__name__)


class ClusterHooks:
    """What a cluster implementation gives the node (replication provides one)."""

    view: ClusterView
    fetcher: BlobFetcher
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None

    def on_ready(self, reconciler: Reconciler) -> None:
        """Called once the deploy services exist (to kick the reconciler on reconnect)."""


#: Builds the cluster once storage is open; an async generator used as a cleanup context.
ClusterFactory = Callable[[Config, Services], AsyncIterator[ClusterHooks]]


def registry() -> Registry:
    r = Registry()
    for family in (deployments.registry, payloads.registry, users.registry, cluster.registry):
        r.merge(family)
    return r


async def _bootstrap(accounts: Accounts, config: Config) -> None:
    """On first start, create the super_user role and the bootstrap user."""
    if await accounts.get_role(SUPER_USER_ROLE) is None:
        await accounts.put_role(SUPER_USER_ROLE, {"super_user": True, "operations": []}, by=None)
    if await accounts.list_users():
        return
    password = config.auth.bootstrap_password
    if not password:
        password = secrets.token_urlsafe(18)
        path = config.node.data_dir / "admin-password"
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


def _lock_data_dir(data: Path) -> int:
    """Hold an exclusive lock on ``<data>/lock`` for the life of the node.

    Start-up sweeps temp files, kills leftover hooks and fails unfinished deploys as
    ``interrupted``: all wrong while another process is working in the same directory.

    Raises:
        RuntimeError: another process holds the lock.
    """
    fd = os.open(data / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"data directory {data} is in use by another node process") from None
    return fd


def _sweep_tmp(tmp: Path) -> list[Path]:
    """Remove packing temp files a crash left in the node's ``tmp`` directory."""
    removed = []
    if tmp.is_dir():
        for entry in tmp.iterdir():
            if entry.is_file() or entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def create_app(
    config: Config,
    *,
    clock: HybridClock | None = None,
    faults: Faults = NO_FAULTS,
    cluster_factory: ClusterFactory | None = None,
) -> web.Application:
    """Build a node's admin application. Nothing starts until the app starts."""
    app = web.Application(
        middlewares=[error_middleware], client_max_size=config.limits.max_body_bytes
    )
    app[CONFIG] = config
    app[OPERATIONS] = registry()
    app[METRICS] = Metrics()
    services = app[SERVICES] = Services()
    app.add_routes(routes())
    cluster_hooks: list[ClusterHooks] = []

    async def lock_ctx(app: web.Application) -> AsyncIterator[None]:
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_data_dir(config.node.data_dir)
        try:
            yield
        finally:
            os.close(lock)

    async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
        data = config.node.data_dir
        store = await Store.open(data / "cairn.db", node=config.node.name, clock=clock)
        blobs = BlobStore(data / "blobs", faults=faults)
        components = Components(data / "components", faults=faults)
        hook_groups = HookGroups(data / "run" / "hooks")
        if killed := hook_groups.kill_leftovers():
            log.warning("leftover_hooks_killed", process_groups=killed)
        swept = blobs.sweep() + components.sweep() + _sweep_tmp(data / "tmp")
        if swept:
            log.info("temp_files_swept", count=len(swept))
        # A crash between storing a blob and recording its hash in the row leaves a
        # blob nothing refers to; nothing else would ever free it.
        orphans = [h for h in blobs.hashes() if await store.live_references(h) == 0]
        freed = sum([await blobs.delete(h) for h in orphans])
        if orphans:
            log.info("orphan_blobs_swept", count=len(orphans), freed_bytes=freed)
        services.store = store
        services.accounts = Accounts(store)
        services.auth = Authenticator(services.accounts, config.auth)
        await _bootstrap(services.accounts, config)
        services.tasks = TaskSet("node")
        solo = SoloCluster(config.node.name)
        services.ctx = DeployContext(
            node=config.node.name,
            store=store,
            blobs=blobs,
            components=components,
            limits=config.limits,
            cluster=solo,
            fetcher=solo,
            faults=faults,
            hook_groups=hook_groups,
        )
        try:
            yield
        finally:
            await services.tasks.close()
            await store.close()

    async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
        assert cluster_factory is not None
        async for hooks in cluster_factory(config, services):
            cluster_hooks.append(hooks)
            services.cluster_status = hooks.status
            services.ctx = replace(services.ctx, cluster=hooks.view, fetcher=hooks.fetcher)
            yield

    async def deploy_ctx(app: web.Application) -> AsyncIterator[None]:
        ctx = services.ctx
        services.origin = Origin(ctx, services.tasks)
        await services.origin.recover()
        services.reconciler = Reconciler(ctx)
        for hooks in cluster_hooks:
            hooks.on_ready(services.reconciler)
        task = services.tasks.spawn(services.reconciler.run(), name="reconciler")
        try:
            yield
        finally:
            task.cancel()
            await services.tasks.close()

    app.cleanup_ctx.append(lock_ctx)
    app.cleanup_ctx.append(storage_ctx)
    if cluster_factory is not None:
        app.cleanup_ctx.append(cluster_ctx)
    app.cleanup_ctx.append(deploy_ctx)
    return app
