"""Replicated table layouts and the row codecs between SQL, dicts and dataclasses.

A replicated row travels in the change log as a plain dict (msgpack-friendly: lists and
dicts, no JSON strings); in SQL the list/dict columns are JSON text and booleans are
integers. This module is the one place that knows both shapes.
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
    "MEMBERS",
    "NODE_RESULTS",
    "PAYLOAD_DROPS",
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


@dataclass(frozen=True, slots=True)
class TableSpec:
    """How one replicated table is keyed and which columns need conversion."""

    name: str
    key_cols: tuple[str, ...]
    cols: tuple[str, ...]
    json_cols: frozenset[str] = frozenset()
    bool_cols: frozenset[str] = frozenset()
    #: Columns that may not be null, and the Python type every column's value must have.
    required: frozenset[str] = frozenset()
    types: tuple[tuple[str, type], ...] = ()

    def problem(self, row: dict[str, Any]) -> str | None:
        """Why ``row`` (as it travels between nodes) is not a valid row, or None."""
        expected = dict(self.types)
        for col in self.cols:
            value = row.get(col)
            if value is None:
                if col in self.required or col in self.key_cols:
                    return f"{col} is missing"
                continue
            kind = expected.get(col)
            if kind is None:
                continue
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                return f"{col} must be an integer"
            if kind is int and not -(1 << 63) <= value < 1 << 63:
                return f"{col} is out of range"
            if kind is bool and not isinstance(value, bool | int):
                return f"{col} must be a boolean"
            if kind in (str, dict) and not isinstance(value, kind):
                return f"{col} must be a {kind.__name__}"
            if kind is list and (
                not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value)
            ):
                return f"{col} must be a list of names"
        return None

    def key(self, row: dict[str, Any]) -> str:
        """The change-log key of a row (key columns joined with ``/``)."""
        return "/".join(str(row[c]) for c in self.key_cols)

    def to_sql(self, row: dict[str, Any]) -> tuple[object, ...]:
        out: list[object] = []
        for c in self.cols:
            v = row.get(c)
            if c in self.json_cols:
                v = None if v is None else json.dumps(v, separators=(",", ":"))
            elif c in self.bool_cols:
                v = int(bool(v))
            out.append(v)
        return tuple(out)

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
        cols = ", ".join(self.cols)
        marks = ", ".join("?" for _ in self.cols)
        keys = ", ".join(self.key_cols)
        sets = ", ".join(f"{c}=excluded.{c}" for c in self.cols if c not in self.key_cols)
        return (
            f"INSERT INTO {self.name} ({cols}) VALUES ({marks}) "
            f"ON CONFLICT ({keys}) DO UPDATE SET {sets}"
        )

    def insert_sql(self) -> str:
        cols = ", ".join(self.cols)
        marks = ", ".join("?" for _ in self.cols)
        return f"INSERT INTO {self.name} ({cols}) VALUES ({marks})"

    def select_sql(self) -> str:
        where = " AND ".join(f"{c}=?" for c in self.key_cols)
        return f"SELECT {', '.join(self.cols)} FROM {self.name} WHERE {where}"


DEPLOYMENTS = TableSpec(
    name="deployments",
    key_cols=("deployment_id",),
    cols=(
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
        "deadline_at",
        "started_at",
        "completed_at",
        "user",
        "rollback_of",
        "error",
        "pinned",
        "version",
        "origin",
    ),
    json_cols=frozenset({"expected_nodes", "activate_nodes", "error"}),
    bool_cols=frozenset({"replicated", "ignore_replication_errors", "pinned"}),
    required=frozenset(
        {
            "project",
            "kind",
            "status",
            "expected_nodes",
            "activate_nodes",
            "origin_node",
            "timeout_ms",
            "started_at",
        }
    ),
    types=(
        ("deployment_id", str),
        ("project", str),
        ("kind", str),
        ("package_identifier", str),
        ("payload_hash", str),
        ("payload_size", int),
        ("status", str),
        ("phase", str),
        ("expected_nodes", list),
        ("activate_nodes", list),
        ("origin_node", str),
        ("restart_mode", str),
        ("replicated", bool),
        ("ignore_replication_errors", bool),
        ("timeout_ms", int),
        ("deadline_at", int),
        ("started_at", int),
        ("completed_at", int),
        ("user", str),
        ("rollback_of", str),
        ("error", dict),
        ("pinned", bool),
    ),
)

NODE_RESULTS = TableSpec(
    name="node_results",
    key_cols=("deployment_id", "node"),
    cols=(
        "deployment_id",
        "node",
        "status",
        "phase",
        "error",
        "started_at",
        "completed_at",
        "late",
        "install_output",
        "version",
        "origin",
    ),
    json_cols=frozenset({"error", "install_output"}),
    bool_cols=frozenset({"late"}),
    required=frozenset({"status"}),
    types=(
        ("deployment_id", str),
        ("node", str),
        ("status", str),
        ("phase", str),
        ("error", dict),
        ("started_at", int),
        ("completed_at", int),
        ("late", bool),
        ("install_output", dict),
    ),
)

PAYLOAD_DROPS = TableSpec(
    name="payload_drops",
    key_cols=("deployment_id",),
    cols=("deployment_id", "dropped_by", "dropped_at", "version", "origin"),
    required=frozenset({"dropped_by", "dropped_at"}),
    types=(("deployment_id", str), ("dropped_by", str), ("dropped_at", int)),
)

USERS = TableSpec(
    name="users",
    key_cols=("username",),
    cols=("username", "password_hash", "role", "active", "deleted", "version", "origin"),
    bool_cols=frozenset({"active", "deleted"}),
    required=frozenset({"password_hash", "role"}),
    types=(
        ("username", str),
        ("password_hash", str),
        ("role", str),
        ("active", bool),
        ("deleted", bool),
    ),
)

ROLES = TableSpec(
    name="roles",
    key_cols=("role",),
    cols=("role", "permission", "deleted", "version", "origin"),
    json_cols=frozenset({"permission"}),
    bool_cols=frozenset({"deleted"}),
    required=frozenset({"permission"}),
    types=(("role", str), ("permission", dict), ("deleted", bool)),
)

MEMBERS = TableSpec(
    name="members",
    key_cols=("name",),
    cols=("name", "url", "deleted", "version", "origin"),
    bool_cols=frozenset({"deleted"}),
    required=frozenset({"url"}),
    types=(("name", str), ("url", str), ("deleted", bool)),
)

#: Tables a peer may write through replication ("deployment_events" is handled apart).
REPLICATED: dict[str, TableSpec] = {
    t.name: t for t in (DEPLOYMENTS, NODE_RESULTS, PAYLOAD_DROPS, USERS, ROLES, MEMBERS)
}


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
        deadline_at=d["deadline_at"],
        started_at=int(d["started_at"]),
        completed_at=d["completed_at"],
        user=d["user"],
        rollback_of=d["rollback_of"],
        error=d["error"],
        pinned=bool(d.get("pinned", False)),
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
