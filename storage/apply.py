"""Applying a peer's changes: idempotent, order-independent, one transaction per batch.

A change is written only if its ``(version, origin)`` is newer than the stored row's, so
redelivered, duplicated and reordered batches converge on the same state. A deployment
whose stored status is terminal never takes another status. Every change that is applied
is appended to this node's own change log with the writer's version and origin, so it
travels on to nodes that have not seen it (transitive propagation). The peer's cursor is
committed in the same transaction as the changes it covers.

Only the tables in :data:`storage.tables.REPLICATED` and the event log can be written
this way; anything else, or a malformed row, rejects the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from storage import events as ev
from storage.changelog import Tx
from storage.errors import StorageError
from storage.records import TERMINAL, Change, DeploymentStatus, Event, Notice
from storage.store import Store
from storage.tables import (
    DEPLOYMENTS,
    MEMBERS,
    NODE_RESULTS,
    REPLICATED,
    ROLES,
    USERS,
    TableSpec,
    deployment_from,
    member_from,
    result_from,
    role_from,
    user_from,
)

__all__ = ["MAX_CLOCK_AHEAD_MS", "InvalidChange", "apply_changes"]

#: A peer's version may be at most this far ahead of our wall clock (clock skew
#: allowance); a version further ahead would drag this node's clock with it.
MAX_CLOCK_AHEAD_MS = 24 * 3600 * 1000

_BUILDERS = {
    DEPLOYMENTS.name: deployment_from,
    NODE_RESULTS.name: result_from,
    USERS.name: user_from,
    ROLES.name: role_from,
    MEMBERS.name: member_from,
}


class InvalidChange(StorageError):
    """A peer sent a change this node will not apply; the batch is rejected whole."""


async def apply_changes(store: Store, peer: str, changes: Sequence[Change], cursor: int) -> int:
    """Apply a batch from ``peer`` and move its cursor to ``cursor``, atomically.

    Returns:
        How many changes were new to this node.

    Raises:
        InvalidChange: a change names an unknown table or carries a malformed row.
    """
    applied = 0
    limit = (store.clock.now_ms() + MAX_CLOCK_AHEAD_MS) << 16
    for change in changes:
        if not 0 < change.version <= limit:
            raise InvalidChange(
                f"change {change.tbl}/{change.key} has version {change.version}, "
                "too far ahead of this node's clock (or not a version)"
            )
    rows = {
        i: _validated(REPLICATED[c.tbl], c)
        for i, c in enumerate(changes)
        if c.tbl != ev.TABLE and _replicated(c)
    }
    async with store.tx() as tx:
        writes = _RowWrites(tx)
        await writes.prefetch([(REPLICATED[changes[i].tbl], row) for i, row in rows.items()])
        for i, change in enumerate(changes):
            if change.tbl == ev.TABLE:
                await writes.flush()  # keep this node's change log in batch order
                applied += await _apply_events(tx, change)
            else:
                applied += writes.offer(REPLICATED[change.tbl], change, rows[i])
        await writes.flush()
        await tx.conn.execute(
            "INSERT INTO peer_cursors (peer, seq, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (peer) DO UPDATE SET seq = MAX(seq, excluded.seq), "
            "updated_at = excluded.updated_at",
            (peer, cursor, tx.now_ms),
        )
    # Observed only once the batch committed, so a rejected batch moves no clock.
    for change in changes:
        store.clock.observe(change.version)
    return applied


def _validated(spec: TableSpec, change: Change) -> dict[str, Any]:
    if change.op != "upsert" or not isinstance(change.data, dict):
        raise InvalidChange(f"{spec.name} change {change.key!r} is not an upsert of a row")
    row = {c: change.data.get(c) for c in spec.cols}
    row["version"], row["origin"] = change.version, change.origin
    problem = spec.problem(row)
    if problem is not None:
        raise InvalidChange(f"{spec.name} change {change.key!r} is malformed: {problem}")
    try:
        built = _BUILDERS[spec.name](row) if spec.name in _BUILDERS else None
        spec.to_sql(row)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidChange(f"{spec.name} change {change.key!r} is malformed: {e}") from e
    if spec.key(row) != change.key or any(row[c] is None for c in spec.key_cols):
        raise InvalidChange(f"{spec.name} change key {change.key!r} does not match its row")
    del built
    return row


def _replicated(change: Change) -> bool:
    if change.tbl not in REPLICATED:
        raise InvalidChange(f"table {change.tbl!r} is not replicated")
    return True


class _RowWrites:
    """The row changes of one batch: decided in memory against one prefetch of what is
    stored, then written with one ``executemany`` per table (a few statements per batch
    instead of three per change)."""

    def __init__(self, tx: Tx) -> None:
        self.tx = tx
        #: (table, key) → (version, origin, status) of the newest row known so far.
        self.known: dict[tuple[str, str], tuple[int, str, str | None]] = {}
        self.rows: dict[str, list[tuple[object, ...]]] = {}
        self.specs: dict[str, TableSpec] = {}
        self.logs: list[tuple[str, str, int, str, str, Any, str | None, int]] = []

    async def prefetch(self, pending: list[tuple[TableSpec, dict[str, Any]]]) -> None:
        by_table: dict[str, tuple[TableSpec, set[str]]] = {}
        for spec, row in pending:
            by_table.setdefault(spec.name, (spec, set()))[1].add(str(row[spec.key_cols[0]]))
        for spec, firsts in by_table.values():
            status = ", status" if spec is DEPLOYMENTS else ""
            cols = ", ".join(spec.key_cols)
            values = sorted(firsts)
            for start in range(0, len(values), 500):
                chunk = values[start : start + 500]
                marks = ", ".join("?" for _ in chunk)
                async with self.tx.conn.execute(
                    f"SELECT {cols}, version, origin{status} FROM {spec.name} "
                    f"WHERE {spec.key_cols[0]} IN ({marks})",
                    chunk,
                ) as cur:
                    for r in await cur.fetchall():
                        key = "/".join(str(r[c]) for c in spec.key_cols)
                        self.known[(spec.name, key)] = (
                            int(r["version"]), r["origin"], r["status"] if status else None,
                        )  # fmt: skip

    def offer(self, spec: TableSpec, change: Change, row: dict[str, Any]) -> int:
        """Queue ``row`` if it is newer than what is known; returns 1 if queued."""
        current = self.known.get((spec.name, change.key))
        if current is not None:
            version, origin, stored_status = current
            if (version, origin) >= (change.version, change.origin):
                return 0
            terminal = stored_status is not None and DeploymentStatus(stored_status) in TERMINAL
            if terminal and row["status"] != stored_status:
                return 0
        status = row["status"] if spec is DEPLOYMENTS else None
        self.known[(spec.name, change.key)] = (change.version, change.origin, status)
        self.specs[spec.name] = spec
        self.rows.setdefault(spec.name, []).append(spec.to_sql(row))
        self.logs.append(
            (
                spec.name,
                change.key,
                change.version,
                change.origin,
                "upsert",
                row,
                change.user,
                change.t,
            )
        )
        value = _BUILDERS[spec.name](row) if spec.name in _BUILDERS else None
        self.tx.notify(
            Notice(spec.name, _notice_key(spec, row), (value,) if value else (), remote=True)
        )
        return 1

    async def flush(self) -> None:
        for name, rows in self.rows.items():
            await self.tx.conn.executemany(self.specs[name].upsert_sql(), rows)
        await self.tx.log_many(self.logs)
        self.rows, self.logs = {}, []


def _notice_key(spec: TableSpec, row: dict[str, Any]) -> str:
    # Result notices are keyed by deployment so deploy watchers can filter on one key.
    return str(row["deployment_id"]) if spec is NODE_RESULTS else spec.key(row)


async def _apply_events(tx: Tx, change: Change) -> int:
    if change.op != "append" or not isinstance(change.data, list):
        raise InvalidChange(f"event change {change.key!r} is not an append of events")
    events: list[Event] = []
    for item in change.data:
        try:
            e = Event(
                change.key, int(item["seq"]), int(item["t"]), str(item["event"]), item["data"]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidChange(f"event change {change.key!r} is malformed: {err}") from err
        if e.seq < 1 or not isinstance(e.data, dict):
            raise InvalidChange(f"event change {change.key!r} has a malformed event")
        events.append(e)
    new = await ev.insert(tx, events)
    if not new:
        return 0
    await tx.log(
        ev.TABLE,
        change.key,
        version=change.version,
        origin=change.origin,
        op="append",
        data=[e.as_dict() for e in new],
        t=change.t,
    )
    tx.notify(Notice(ev.TABLE, change.key, tuple(new), remote=True))
    return 1
