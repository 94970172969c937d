"""Typed application state.

Keys set when the app is built hold the config, the operation registry and metrics. The
services that exist only once the app has started (database, deploys, cluster) live in
one :class:`Services` object, filled in by the cleanup contexts: aiohttp freezes the
app's own mapping at start-up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

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
    from storage.store import Store

__all__ = ["CONFIG", "METRICS", "SERVICES", "Services"]


@dataclass
class Services:
    """A started node's services (each set by the cleanup context that owns it)."""

    store: Store = field(init=False)
    accounts: Accounts = field(init=False)
    auth: Authenticator = field(init=False)
    tasks: TaskSet = field(init=False)
    ctx: DeployContext = field(init=False)
    origin: Origin = field(init=False)
    reconciler: Reconciler = field(init=False)
    supervisor: Supervisor = field(init=False)
    cluster_status: Callable[[], Awaitable[dict[str, Any]]] | None = None


CONFIG: web.AppKey[Config] = web.AppKey("config")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
SERVICES: web.AppKey[Services] = web.AppKey("services")
