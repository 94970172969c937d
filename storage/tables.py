"""Replicated table layouts and the row codecs between SQL, dicts and dataclasses.

A replicated row travels inside a change entry as a plain dict of its data columns
(msgpack-friendly: lists and dicts, no JSON strings); the entry itself carries the
row's ``version`` and writer (stored as ``origin``). In SQL the list/dict columns are
JSON text and booleans are integers, and every row also keeps the *envelope* of the
entry that wrote its current version (:data:`ENVELOPE`). This module is the one place
that knows these shapes; what values a row may hold is :mod:`storage.rowrules`.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from storage.records import (
    Deployment,
    DeploymentStatus,
    Member,
    NodeResult,
    NodeStatus,
    Role,
    User,
)

__all__ = [
    "DEPLOYMENTS",
    "ENVELOPE",
    "EVENT_BATCHES",
    "MEMBERS",
    "NODE_COMPONENTS",
    "NODE_RESULTS",
    "PAYLOAD_DROPS",
    "PINS",
    "REPLICATED",
    "ROLES",
    "USERS",
    "TableSpec",
    "deployment_from",
    "member_from",
    "result_from",
    "role_from",
    "user_from",
]

#: Columns every replicated row keeps about the entry that wrote its current version.
ENVELOPE = ("log_id", "oseq", "entry", "sig", "key_id")


@dataclass(frozen=True, slots=True)
class TableSpec:
    """How one replicated table is keyed and which columns need conversion.

    ``data_cols`` are the columns an entry's ``data`` carries (exactly these keys);
    ``version`` and ``origin`` come from the entry itself.
    """

    name: str
    key_cols: tuple[str, ...]
    data_cols: tuple[str, ...]
    json_cols: frozenset[str] = frozenset()
    bool_cols: frozenset[str] = frozenset()

    @property
    def cols(self) -> tuple[str, ...]:
        """The row's columns as a dict carries them (data plus version and origin)."""
        return (*self.data_cols, "version", "origin")

    @property
    def sql_cols(self) -> tuple[str, ...]:
        return (*self.cols, *ENVELOPE)

    def key(self, row: dict[str, Any]) -> str:
        """The entry key of a row (key columns joined with ``/``)."""
        return "/".join(str(row[c]) for c in self.key_cols)

    def data(self, row: dict[str, Any]) -> dict[str, Any]:
        """The ``data`` an entry carries for ``row``."""
        return {c: row.get(c) for c in self.data_cols}

    def to_sql(self, row: dict[str, Any], envelope: tuple[object, ...]) -> tuple[object, ...]:
        out: list[object] = []
        for c in self.cols:
            v = row.get(c)
            if c in self.json_cols:
                v = None if v is None else json.dumps(v, separators=(",", ":"))
            elif c in self.bool_cols:
                v = int(bool(v))
            out.append(v)
        return (*out, *envelope)

    def from_sql(self, row: sqlite3.Row) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in self.cols:
            v = row[c]
            if c in self.json_cols:
                v = None if v is None else json.loads(v)
            elif c in self.bool_cols:
                v = bool(v)
            out[c] = v
        return out

    def upsert_sql(self) -> str:
        cols = ", ".join(self.sql_cols)
        marks = ", ".join("?" for _ in self.sql_cols)
        keys = ", ".join(self.key_cols)
        sets = ", ".join(f"{c}=excluded.{c}" for c in self.sql_cols if c not in self.key_cols)
        return (
            f"INSERT INTO {self.name} ({cols}) VALUES ({marks}) "
            f"ON CONFLICT ({keys}) DO UPDATE SET {sets}"
        )

    def insert_sql(self) -> str:
        cols = ", ".join(self.sql_cols)
        marks = ", ".join("?" for _ in self.sql_cols)
        return f"INSERT INTO {self.name} ({cols}) VALUES ({marks})"

    def select_sql(self) -> str:
        where = " AND ".join(f"{c}=?" for c in self.key_cols)
        return f"SELECT {', '.join(self.cols)} FROM {self.name} WHERE {where}"


DEPLOYMENTS = TableSpec(
    name="deployments",
    key_cols=("deployment_id",),
    data_cols=(
        "deployment_id",
        "project",
        "kind",
        "package_identifier",
        "payload_hash",
        "payload_size",
        "status",
        "phase",
        "expected_nodes",
        "activate_nodes",
        "origin_node",
        "restart_mode",
        "replicated",
        "ignore_replication_errors",
        "timeout_ms",
        "started_at",
        "completed_at",
        "user",
        "rollback_of",
        "superseded_by",
        "error",
        "created_version",
    ),
    json_cols=frozenset({"expected_nodes", "activate_nodes", "error"}),
    bool_cols=frozenset({"replicated", "ignore_replication_errors"}),
)

NODE_RESULTS = TableSpec(
    name="node_results",
    key_cols=("deployment_id", "node"),
    data_cols=(
        "deployment_id",
        "node",
        "status",
        "phase",
        "error",
        "started_at",
        "completed_at",
        "late",
        "install_output",
    ),
    json_cols=frozenset({"error", "install_output"}),
    bool_cols=frozenset({"late"}),
)

PINS = TableSpec(
    name="pins",
    key_cols=("deployment_id", "node"),
    data_cols=("deployment_id", "node", "pinned"),
    bool_cols=frozenset({"pinned"}),
)

PAYLOAD_DROPS = TableSpec(
    name="payload_drops",
    key_cols=("deployment_id", "node"),
    data_cols=("deployment_id", "node", "dropped_at"),
)

#: A batch of deployment events; the events travel in the entry's data (``events``)
#: and are stored in ``deployment_events``; this table keeps the signed batch.
EVENT_BATCHES = TableSpec(
    name="event_batches",
    key_cols=("deployment_id", "first_seq"),
    data_cols=("deployment_id", "first_seq", "last_seq"),
)

#: What a node runs, per project (written by that node).
NODE_COMPONENTS = TableSpec(
    name="node_components",
    key_cols=("node", "project"),
    data_cols=(
        "node",
        "project",
        "deployment_id",
        "payload_hash",
        "activated_at",
        "converged",
        "reason",
        "process",
    ),
    json_cols=frozenset({"process"}),
    bool_cols=frozenset({"converged"}),
)

USERS = TableSpec(
    name="users",
    key_cols=("username",),
    data_cols=("username", "password_hash", "role", "active", "deleted"),
    bool_cols=frozenset({"active", "deleted"}),
)

ROLES = TableSpec(
    name="roles",
    key_cols=("role",),
    data_cols=("role", "permission", "deleted"),
    json_cols=frozenset({"permission"}),
    bool_cols=frozenset({"deleted"}),
)

MEMBERS = TableSpec(
    name="members",
    key_cols=("name",),
    data_cols=("name", "url", "deleted"),
    bool_cols=frozenset({"deleted"}),
)

#: Every table a change entry may write, by name.
REPLICATED: dict[str, TableSpec] = {
    t.name: t
    for t in (
        DEPLOYMENTS, NODE_RESULTS, PINS, PAYLOAD_DROPS, EVENT_BATCHES, NODE_COMPONENTS, USERS,
        ROLES, MEMBERS,
    )
}  # fmt: skip


def deployment_from(d: dict[str, Any]) -> Deployment:
    return Deployment(
        deployment_id=d["deployment_id"],
        project=d["project"],
        kind=d["kind"],
        package_identifier=d["package_identifier"],
        payload_hash=d["payload_hash"],
        payload_size=d["payload_size"],
        status=DeploymentStatus(d["status"]),
        phase=d["phase"],
        expected_nodes=tuple(d["expected_nodes"] or ()),
        activate_nodes=tuple(d["activate_nodes"] or ()),
        origin_node=d["origin_node"],
        restart_mode=d["restart_mode"],
        replicated=bool(d["replicated"]),
        ignore_replication_errors=bool(d["ignore_replication_errors"]),
        timeout_ms=int(d["timeout_ms"]),
        started_at=int(d["started_at"]),
        completed_at=d["completed_at"],
        user=d["user"],
        rollback_of=d["rollback_of"],
        superseded_by=d.get("superseded_by"),
        error=d["error"],
        created_version=int(d.get("created_version") or d["version"]),
        version=int(d["version"]),
        origin=d["origin"],
    )


def result_from(d: dict[str, Any]) -> NodeResult:
    return NodeResult(
        deployment_id=d["deployment_id"],
        node=d["node"],
        status=NodeStatus(d["status"]),
        phase=d["phase"],
        error=d["error"],
        started_at=d["started_at"],
        completed_at=d["completed_at"],
        late=bool(d["late"]),
        install_output=d["install_output"],
        version=int(d["version"]),
        origin=d["origin"],
    )


def user_from(d: dict[str, Any]) -> User:
    return User(
        username=d["username"],
        password_hash=d["password_hash"],
        role=d["role"],
        active=bool(d["active"]),
        deleted=bool(d["deleted"]),
        version=int(d["version"]),
        origin=d["origin"],
    )


def role_from(d: dict[str, Any]) -> Role:
    return Role(
        role=d["role"],
        permission=dict(d["permission"] or {}),
        deleted=bool(d["deleted"]),
        version=int(d["version"]),
        origin=d["origin"],
    )


def member_from(d: dict[str, Any]) -> Member:
    return Member(
        name=d["name"],
        url=d["url"],
        deleted=bool(d["deleted"]),
        version=int(d["version"]),
        origin=d["origin"],
    )
