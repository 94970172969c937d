"""Typed values for everything the database stores.

Rows come back from :mod:`storage` as these frozen dataclasses; nothing outside
``storage`` sees a ``sqlite3.Row``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "TERMINAL",
    "Deployment",
    "DeploymentStatus",
    "Event",
    "LogInfo",
    "Member",
    "NodeResult",
    "NodeStatus",
    "Notice",
    "Page",
    "Role",
    "User",
    "status_rank",
]


class DeploymentStatus(StrEnum):
    """A deployment's status; the only direction is forward, terminal is final."""

    PENDING = "pending"
    EXTRACTING = "extracting"
    INSTALLING = "installing"
    LOADING = "loading"
    STAGING = "staging"
    REPLICATING = "replicating"
    ACTIVATING = "activating"
    RESTARTING = "restarting"
    SUCCESS = "success"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


TERMINAL = frozenset(
    {DeploymentStatus.SUCCESS, DeploymentStatus.FAILED, DeploymentStatus.ROLLED_BACK}
)

_RANK = {status: i for i, status in enumerate(DeploymentStatus)}


def status_rank(status: str) -> int:
    """Position of ``status`` in the forward order (all terminal states rank last)."""
    s = DeploymentStatus(status)
    return len(_RANK) if s in TERMINAL else _RANK[s]


class NodeStatus(StrEnum):
    """One node's progress on one deployment (its row in ``node_results``)."""

    PENDING = "pending"
    FETCHING = "fetching"
    EXTRACTING = "extracting"
    INSTALLING = "installing"
    LOADING = "loading"
    STAGED = "staged"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    DISCARDED = "discarded"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, slots=True)
class Deployment:
    """A row of ``hdb_deployment`` as stored (``peer_results`` and the event log live
    in their own tables)."""

    deployment_id: str
    project: str
    kind: str
    package_identifier: str | None
    payload_hash: str | None
    payload_size: int | None
    status: DeploymentStatus
    phase: str | None
    expected_nodes: tuple[str, ...]
    activate_nodes: tuple[str, ...]
    origin_node: str
    restart_mode: str | None
    replicated: bool
    ignore_replication_errors: bool
    timeout_ms: int
    started_at: int
    completed_at: int | None
    user: str | None
    rollback_of: str | None
    superseded_by: str | None
    error: dict[str, Any] | None
    #: The version the row was created at: deploys of a project are ordered by it.
    created_version: int
    version: int
    origin: str

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def order(self) -> tuple[int, str]:
        """Where this deploy stands among its project's (SPEC 5): by creation version,
        a tie (two origins minting the same version) broken by deployment id, as
        ``desired_releases`` does. Compare deploys with this, never the version alone."""
        return (self.created_version, self.deployment_id)


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a deployment's log: ``{seq, t, event, data}``."""

    deployment_id: str
    seq: int
    t: int
    event: str
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "t": self.t, "event": self.event, "data": self.data}


@dataclass(frozen=True, slots=True)
class NodeResult:
    """One node's result for one deployment."""

    deployment_id: str
    node: str
    status: NodeStatus
    phase: str | None
    error: dict[str, Any] | None
    started_at: int | None
    completed_at: int | None
    late: bool
    install_output: dict[str, Any] | None
    version: int
    origin: str


@dataclass(frozen=True, slots=True)
class User:
    username: str
    password_hash: str
    role: str
    active: bool
    deleted: bool
    version: int
    origin: str


@dataclass(frozen=True, slots=True)
class Role:
    role: str
    permission: dict[str, Any]
    deleted: bool
    version: int
    origin: str


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    url: str
    deleted: bool
    version: int
    origin: str


@dataclass(frozen=True, slots=True)
class LogInfo:
    """A change log this node holds entries of (the local ``logs`` table).

    ``head``: every entry up to it has been received here. ``held_from``: the local
    change log holds every entry from it up to ``head``; older ones were trimmed (or
    arrived compacted) and are served from the rows they wrote.
    """

    log_id: str
    writer: str
    head: int
    held_from: int
    bytes: int
    #: How far this node holds the log on evidence it can vouch for: entries from the
    #: writer itself, or every entry of a range. A relay's compacted range moves ``head``
    #: but not this: what the relay left out cannot be proven, so the writer, when
    #: reachable, is asked again from here.
    verified: int = 0


@dataclass(frozen=True, slots=True)
class Notice:
    """What the change feed tells subscribers after a commit.

    ``rows`` carries the written values (``Deployment``, ``NodeResult`` or the ``Event``
    objects inserted), so a live subscriber never has to re-read them.
    """

    tbl: str
    key: str
    rows: tuple[Any, ...] = field(default=())
    remote: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ``list_deployments``."""

    deployments: list[Deployment]
    total: int
    next_cursor: str | None
