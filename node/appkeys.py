"""Typed application state: one ``web.AppKey`` per service.

Keys set when the app is built hold the config, the seams, the operation registry and
metrics; the services that exist only once the app has started (storage, accounts,
deploys, the cluster) are set by the cleanup context that owns them
(:mod:`node.app`). :class:`Services` is a read-only view over those keys for handlers
(``call.services.store``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from storage.faults import NO_FAULTS, Faults
from storage.hlc import HybridClock

if TYPE_CHECKING:
    from node.auth import Authenticator
    from node.config import Config
    from node.deploy.context import DeployContext
    from node.deploy.origin import Origin
    from node.deploy.reconciler import Reconciler
    from node.deploy.supervisor import Supervisor
    from node.metrics import Metrics
    from node.tasks import TaskSet
    from storage.accounts import Accounts
    from storage.blobs import BlobStore
    from storage.store import Store

__all__ = [
    "ACCOUNTS",
    "AUTH",
    "BLOBS",
    "CLUSTER_STATUS",
    "CONFIG",
    "DEPLOY",
    "DEPLOY_TASKS",
    "METRICS",
    "ORIGIN",
    "RECONCILER",
    "SEAMS",
    "STORE",
    "SUPERVISOR",
    "Seams",
    "Services",
]


@dataclass(frozen=True, slots=True)
class Seams:
    """What tests replace: the hybrid clock and the crash points."""

    clock: HybridClock | None = None
    faults: Faults = NO_FAULTS


StatusProvider = Callable[[], Awaitable[dict[str, Any]]]

CONFIG: web.AppKey[Config] = web.AppKey("config")
SEAMS: web.AppKey[Seams] = web.AppKey("seams", Seams)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
STORE: web.AppKey[Store] = web.AppKey("store")
BLOBS: web.AppKey[BlobStore] = web.AppKey("blobs")
ACCOUNTS: web.AppKey[Accounts] = web.AppKey("accounts")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
DEPLOY: web.AppKey[DeployContext] = web.AppKey("deploy")
DEPLOY_TASKS: web.AppKey[TaskSet] = web.AppKey("deploy_tasks")
ORIGIN: web.AppKey[Origin] = web.AppKey("origin")
RECONCILER: web.AppKey[Reconciler] = web.AppKey("reconciler")
CLUSTER_STATUS: web.AppKey[StatusProvider | None] = web.AppKey("cluster_status")
SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor")


class Services:
    """A read-only view of a started node's services (each owned by its cleanup context)."""

    __slots__ = ("_app",)

    def __init__(self, app: web.Application) -> None:
        self._app = app

    @property
    def store(self) -> Store:
        return self._app[STORE]

    @property
    def blobs(self) -> BlobStore:
        return self._app[BLOBS]

    @property
    def accounts(self) -> Accounts:
        return self._app[ACCOUNTS]

    @property
    def auth(self) -> Authenticator:
        return self._app[AUTH]

    @property
    def ctx(self) -> DeployContext:
        return self._app[DEPLOY]

    @property
    def tasks(self) -> TaskSet:
        return self._app[DEPLOY_TASKS]

    @property
    def origin(self) -> Origin:
        return self._app[ORIGIN]

    @property
    def reconciler(self) -> Reconciler:
        return self._app[RECONCILER]

    @property
    def supervisor(self) -> Supervisor:
        return self._app[SUPERVISOR]

    @property
    def cluster_status(self) -> StatusProvider | None:
        return self._app.get(CLUSTER_STATUS)
