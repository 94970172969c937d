"""What a replicated row may hold, who may write it, and how it may change.

The same three checks guard a node's own writes and every change applied from a peer:

- :func:`check_row`: every value obeys the record's rules (:mod:`storage.rules`, the
  validator the admin API uses): ids, project and node names, sha256 hashes, statuses,
  sizes, role permission shapes, scrypt parameters, bounded texts and lists.
- :func:`writer_problem`: the entry's writer is the row's single writer (a deployment
  and its events: the origin; a node's result, pin or payload drop: that node). Users,
  roles and members may be written by any member (last writer wins).
- :func:`transition_problem`: a deployment moves forward only, a finished one never
  changes again, and what was fixed when it started (project, origin, creation version,
  user, payload once recorded, ...) never changes at all.
"""

from __future__ import annotations

import re
from typing import Any, Final

from storage import rules
from storage.records import TERMINAL, DeploymentStatus, NodeStatus, status_rank
from storage.rules import RuleError
from storage.tables import (
    DEPLOYMENTS,
    EVENT_BATCHES,
    MEMBERS,
    NODE_COMPONENTS,
    NODE_RESULTS,
    PAYLOAD_DROPS,
    PINS,
    ROLES,
    USERS,
    TableSpec,
)

__all__ = [
    "EVENT_NAMES",
    "MAX_ERROR_MESSAGE",
    "check_event_batch",
    "check_row",
    "transition_problem",
    "writer_problem",
]

#: Events a deployment's log may hold (SPEC 5).
EVENT_NAMES: Final = frozenset(
    {"deployment", "phase", "install", "peer", "warning", "error", "payload_dropped",
     "truncated", "finished"}
)  # fmt: skip
MAX_ERROR_MESSAGE: Final = 4096
_MAX_MS: Final = 1 << 50  # epoch ms far beyond any real clock, and still an int64
_CODE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_PHASE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_URL_RE: Final = re.compile(r"wss://[A-Za-z0-9.\-\[\]:]{1,300}(/[A-Za-z0-9._~/-]{0,200})?")
_RESTART_MODES: Final = (None, "immediate", "rolling")
_KINDS: Final = ("deploy", "drop")
# Fixed once a deployment row exists.
_IMMUTABLE: Final = (
    "project", "kind", "origin_node", "started_at", "user", "replicated", "rollback_of",
    "created_version", "package_identifier", "timeout_ms", "ignore_replication_errors",
    "expected_nodes",
)  # fmt: skip
# Fixed once set (null before the payload is received).
_SET_ONCE: Final = ("payload_hash", "payload_size")


def _ms(value: object, field: str, *, nullable: bool) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < _MAX_MS:
        raise RuleError(field, f"'{field}' must be epoch milliseconds")


def _bool(value: object, field: str) -> None:
    if not isinstance(value, bool):
        raise RuleError(field, f"'{field}' must be true or false")


def _opt(value: object, field: str, check: Any) -> None:
    if value is not None:
        check(value, field)


def _error(value: object, field: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not set(value) <= {"message", "code", "phase", "node"}:
        raise RuleError(field, f"'{field}' must be {{message, code, phase[, node]}}")
    rules.check_text(value.get("message"), f"{field}.message", max_len=MAX_ERROR_MESSAGE,
                     allow_control=True)  # fmt: skip
    if not isinstance(value.get("code"), str) or not _CODE_RE.fullmatch(value["code"]):
        raise RuleError(field, f"'{field}.code' must be a machine code")
    _phase(value.get("phase"), f"{field}.phase")
    _opt(value.get("node"), f"{field}.node", rules.check_node_name)


def _phase(value: object, field: str) -> None:
    if value is not None and (not isinstance(value, str) or not _PHASE_RE.fullmatch(value)):
        raise RuleError(field, f"'{field}' must be a phase name")


def _install_output(value: object, field: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or set(value) != {"lines", "truncated", "dropped_lines"}:
        raise RuleError(field, f"'{field}' must be {{lines, truncated, dropped_lines}}")
    lines = value["lines"]
    if not isinstance(lines, list) or len(lines) > 200:
        raise RuleError(field, f"'{field}.lines' must be a list of at most 200 lines")
    for line in lines:
        if not isinstance(line, dict) or not {"stream", "line"} <= set(line) <= {
            "stream", "line", "hook"
        }:  # fmt: skip
            raise RuleError(field, f"'{field}.lines' entries must be {{stream, line[, hook]}}")
        if line["stream"] not in ("stdout", "stderr"):
            raise RuleError(field, f"'{field}' stream must be stdout or stderr")
        if line.get("hook", "install") not in ("install", "check"):
            raise RuleError(field, f"'{field}' hook must be install or check")
        rules.check_text(line["line"], f"{field}.line", max_len=16 * 1024, allow_control=True)
    _bool(value["truncated"], f"{field}.truncated")
    rules.check_size(value["dropped_lines"], f"{field}.dropped_lines")


def _check_deployment(r: dict[str, Any]) -> None:
    rules.check_deployment_id(r["deployment_id"])
    rules.check_project(r["project"])
    if r["kind"] not in _KINDS:
        raise RuleError("kind", "'kind' must be deploy or drop")
    _opt(r["package_identifier"], "package_identifier",
         lambda v, f: rules.check_text(v, f, max_len=4096))  # fmt: skip
    _opt(r["payload_hash"], "payload_hash", rules.check_sha256)
    _opt(r["payload_size"], "payload_size", rules.check_size)
    try:
        DeploymentStatus(r["status"])
    except (ValueError, TypeError):
        raise RuleError("status", "'status' is not a deployment status") from None
    _phase(r["phase"], "phase")
    expected = rules.check_node_names(r["expected_nodes"], "expected_nodes")
    if not expected:
        raise RuleError("expected_nodes", "'expected_nodes' must name at least one node")
    activate = rules.check_node_names(r["activate_nodes"], "activate_nodes")
    if not set(activate) <= set(expected):
        raise RuleError("activate_nodes", "'activate_nodes' must be expected nodes")
    rules.check_node_name(r["origin_node"], "origin_node")
    if r["restart_mode"] not in _RESTART_MODES:
        raise RuleError("restart_mode", "'restart_mode' must be immediate, rolling or null")
    _bool(r["replicated"], "replicated")
    _bool(r["ignore_replication_errors"], "ignore_replication_errors")
    rules.check_size(r["timeout_ms"], "timeout_ms", maximum=7 * 86_400_000)
    _ms(r["started_at"], "started_at", nullable=False)
    _ms(r["completed_at"], "completed_at", nullable=True)
    _opt(r["user"], "user", rules.check_username)
    _opt(r["rollback_of"], "rollback_of", rules.check_deployment_id)
    _opt(r["superseded_by"], "superseded_by", rules.check_deployment_id)
    _error(r["error"], "error")
    created = r["created_version"]
    if isinstance(created, bool) or not isinstance(created, int) or not 0 < created <= r["version"]:
        raise RuleError("created_version", "'created_version' must be a version up to the row's")


def _check_result(r: dict[str, Any]) -> None:
    rules.check_deployment_id(r["deployment_id"])
    rules.check_node_name(r["node"])
    try:
        NodeStatus(r["status"])
    except (ValueError, TypeError):
        raise RuleError("status", "'status' is not a node status") from None
    _phase(r["phase"], "phase")
    _error(r["error"], "error")
    _ms(r["started_at"], "started_at", nullable=True)
    _ms(r["completed_at"], "completed_at", nullable=True)
    _bool(r["late"], "late")
    _install_output(r["install_output"], "install_output")


def _check_pin(r: dict[str, Any]) -> None:
    rules.check_deployment_id(r["deployment_id"])
    rules.check_node_name(r["node"])
    _bool(r["pinned"], "pinned")


def _check_drop(r: dict[str, Any]) -> None:
    rules.check_deployment_id(r["deployment_id"])
    rules.check_node_name(r["node"])
    _ms(r["dropped_at"], "dropped_at", nullable=False)


def _check_batch(r: dict[str, Any]) -> None:
    rules.check_deployment_id(r["deployment_id"])
    for name in ("first_seq", "last_seq"):
        value = r[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise RuleError(name, f"'{name}' must be an integer")
        if not 1 <= value <= rules.MAX_EVENT_SEQ:
            raise RuleError(name, f"'{name}' must be from 1 to {rules.MAX_EVENT_SEQ}")
    if r["last_seq"] < r["first_seq"]:
        raise RuleError("last_seq", "'last_seq' is before 'first_seq'")


def _check_component(r: dict[str, Any]) -> None:
    rules.check_node_name(r["node"])
    rules.check_project(r["project"])
    _opt(r["deployment_id"], "deployment_id", rules.check_deployment_id)
    _opt(r["payload_hash"], "payload_hash", rules.check_sha256)
    _ms(r["activated_at"], "activated_at", nullable=True)
    _bool(r["converged"], "converged")
    _opt(r["reason"], "reason", lambda v, f: rules.check_text(v, f, max_len=1024))
    process = r["process"]
    if process is None:
        return
    allowed = {"running", "pid", "restarts", "ready", "last_exit", "deployment_id", "started_at"}
    if not isinstance(process, dict) or not set(process) <= allowed:
        raise RuleError("process", f"'process' may only hold {', '.join(sorted(allowed))}")
    for name in ("running", "ready"):
        if name in process:
            _bool(process[name], f"process.{name}")
    for name in ("pid", "restarts"):
        if process.get(name) is not None:
            rules.check_size(process[name], f"process.{name}", maximum=1 << 31)
    if process.get("last_exit") is not None:
        _opt(process["last_exit"], "process.last_exit",
             lambda v, f: rules.check_text(str(v), f, max_len=256))  # fmt: skip


def _check_user(r: dict[str, Any]) -> None:
    rules.check_username(r["username"])
    rules.check_password_hash(r["password_hash"])
    rules.check_role_name(r["role"])
    _bool(r["active"], "active")
    _bool(r["deleted"], "deleted")


def _check_role(r: dict[str, Any]) -> None:
    rules.check_role_name(r["role"])
    if rules.check_permission(r["permission"]) != r["permission"]:
        raise RuleError("permission", "'permission' is not in canonical form")
    _bool(r["deleted"], "deleted")


def _check_member(r: dict[str, Any]) -> None:
    rules.check_node_name(r["name"], "name")
    if not isinstance(r["url"], str) or _URL_RE.fullmatch(r["url"]) is None:
        raise RuleError("url", "'url' must be wss://host:port")
    _bool(r["deleted"], "deleted")


_CHECKS = {
    DEPLOYMENTS.name: _check_deployment,
    NODE_RESULTS.name: _check_result,
    PINS.name: _check_pin,
    PAYLOAD_DROPS.name: _check_drop,
    EVENT_BATCHES.name: _check_batch,
    NODE_COMPONENTS.name: _check_component,
    USERS.name: _check_user,
    ROLES.name: _check_role,
    MEMBERS.name: _check_member,
}

#: Tables whose rows have one writer, and the column that names it.
_WRITER_COL: Final = {
    DEPLOYMENTS.name: "origin_node",
    NODE_RESULTS.name: "node",
    PINS.name: "node",
    PAYLOAD_DROPS.name: "node",
    NODE_COMPONENTS.name: "node",
}


def check_row(spec: TableSpec, row: dict[str, Any]) -> None:
    """Raise :class:`RuleError` unless every value of ``row`` obeys the record's rules."""
    _CHECKS[spec.name](row)


def writer_problem(spec: TableSpec, row: dict[str, Any], writer: str) -> str | None:
    """Why ``writer`` may not write ``row`` (None when it may)."""
    col = _WRITER_COL.get(spec.name)
    if col is not None and row[col] != writer:
        return f"{spec.name} rows are written by their {col} ({row[col]}), not by {writer}"
    return None


def transition_problem(
    spec: TableSpec, stored: dict[str, Any] | None, new: dict[str, Any]
) -> str | None:
    """Why a deployment row may not change from ``stored`` to ``new`` (None if it may)."""
    if spec is not DEPLOYMENTS or stored is None:
        return None
    if DeploymentStatus(stored["status"]) in TERMINAL:
        return f"deployment {stored['deployment_id']} is {stored['status']}; it never changes"
    for col in _IMMUTABLE:
        if stored.get(col) != new.get(col):
            return f"deployment {stored['deployment_id']}: {col} cannot change"
    for col in _SET_ONCE:
        if stored.get(col) is not None and stored.get(col) != new.get(col):
            return f"deployment {stored['deployment_id']}: {col} cannot change once set"
    if status_rank(new["status"]) < status_rank(stored["status"]):
        return (
            f"deployment {stored['deployment_id']} cannot go from {stored['status']} "
            f"back to {new['status']}"
        )
    return None


def check_event_batch(data: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Split an event batch entry's data into its row and its events, checked.

    The data is the batch row's columns plus ``origin_node`` (the deployment's origin,
    who alone writes its events) and ``events``: ``[{seq, t, event, data}]`` with seqs
    exactly ``first_seq..last_seq``.

    Raises:
        RuleError: a field is missing, of the wrong shape, or out of range.
    """
    if not isinstance(data, dict) or set(data) != {*EVENT_BATCHES.data_cols, "origin_node",
                                                   "events"}:  # fmt: skip
        raise RuleError("events", "an event batch must carry exactly its row, origin and events")
    row = {c: data[c] for c in EVENT_BATCHES.data_cols}
    _check_batch(row)
    rules.check_node_name(data["origin_node"], "origin_node")
    events = data["events"]
    if not isinstance(events, list) or len(events) != row["last_seq"] - row["first_seq"] + 1:
        raise RuleError("events", "'events' must hold exactly the batch's seqs")
    for offset, e in enumerate(events):
        if not isinstance(e, dict) or set(e) != {"seq", "t", "event", "data"}:
            raise RuleError("events", "an event must be {seq, t, event, data}")
        if e["seq"] != row["first_seq"] + offset:
            raise RuleError("events", "event seqs must be consecutive from first_seq")
        _ms(e["t"], "events.t", nullable=False)
        if e["event"] not in EVENT_NAMES:
            raise RuleError("events", f"unknown event {str(e['event'])[:64]!r}")
        if not isinstance(e["data"], dict):
            raise RuleError("events", "event data must be an object")
    return row, events
