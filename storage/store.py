"""The store: every replicated and local row of a node, behind typed async methods.

One method writes a replicated row: it ticks the hybrid clock, writes the row and appends
its change-log entry in one transaction, then publishes a :class:`Notice` on the change
feed once the transaction has committed. Remote changes are applied by
:mod:`storage.apply` through the same primitives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from storage import events as ev
from storage.changelog import CHANGELOG, ChangeFeed, Tx
from storage.db import Database
from storage.errors import StorageError
from storage.hlc import HybridClock
from storage.listing import DeploymentFilter, decode_cursor, encode_cursor
from storage.logreads import ChangeLogReads
from storage.records import (
    TERMINAL,
    Deployment,
    DeploymentStatus,
    Event,
    NodeResult,
    Notice,
    Page,
    status_rank,
)
from storage.tables import (
    DEPLOYMENTS,
    NODE_RESULTS,
    PAYLOAD_DROPS,
    TableSpec,
    deployment_from,
    result_from,
)

__all__ = ["DeploymentFilter", "Store", "TransitionError"]


class TransitionError(StorageError):
    """A write would move a deployment backwards or out of a terminal status."""


class Store(ChangeLogReads):
    """All of a node's rows. Construct with :meth:`open`."""

    def __init__(self, db: Database, *, node: str, clock: HybridClock, feed: ChangeFeed):
        self.db = db
        self.node = node
        self.clock = clock
        self.feed = feed

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        node: str,
        clock: HybridClock | None = None,
        feed: ChangeFeed | None = None,
    ) -> Store:
        """Open the database at ``path`` (migrating it) and seed the clock from it."""
        db = await Database.open(path)
        store = cls(db, node=node, clock=clock or HybridClock(), feed=feed or ChangeFeed())
        row = await db.fetchone("SELECT MAX(version) AS v FROM changelog")
        if row is not None and row["v"] is not None:
            store.clock.observe(int(row["v"]))
        return store

    async def close(self) -> None:
        await self.db.close()

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        """A write transaction; its notices are published after it commits."""
        async with self.db.write() as conn:
            tx = Tx(conn, self.clock.now_ms())
            yield tx
        if tx.logged:
            tx.notices.append(Notice(CHANGELOG, ""))
        self.feed.publish(tx.notices)

    # -- replicated row primitive -----------------------------------------------------

    async def put_row(
        self,
        tx: Tx,
        spec: TableSpec,
        row: dict[str, Any],
        *,
        user: str | None = None,
        create: bool = False,
    ) -> dict[str, Any]:
        """Write ``row`` as a new local version and log it. Returns the stored row.

        With ``create``, the row must not exist yet (a conflict raises StorageError).
        """
        row = dict(row, version=self.clock.tick(), origin=self.node)
        sql = spec.insert_sql() if create else spec.upsert_sql()
        await tx.conn.execute(sql, spec.to_sql(row))
        await tx.log(
            spec.name,
            spec.key(row),
            version=row["version"],
            origin=self.node,
            op="upsert",
            data=row,
            user=user,
        )
        return row

    async def get_row(
        self, spec: TableSpec, key: Sequence[object], tx: Tx | None = None
    ) -> dict[str, Any] | None:
        if tx is not None:
            async with tx.conn.execute(spec.select_sql(), tuple(key)) as cur:
                row = await cur.fetchone()
        else:
            row = await self.db.fetchone(spec.select_sql(), tuple(key))
        return None if row is None else spec.from_sql(row)

    # -- deployments ------------------------------------------------------------------

    async def create_deployment(self, fields: dict[str, Any]) -> Deployment:
        """Insert a new deployment row written by this node (status ``pending``).

        Args:
            fields: every column of ``deployments`` except ``version`` and ``origin``.
        """
        async with self.tx() as tx:
            row = await self.put_row(tx, DEPLOYMENTS, fields, user=fields.get("user"), create=True)
            d = deployment_from(row)
            tx.notify(Notice(DEPLOYMENTS.name, d.deployment_id, (d,)))
        return d

    async def write_deployment(
        self,
        deployment_id: str,
        changes: dict[str, Any] | None = None,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
        *,
        user: str | None = None,
    ) -> tuple[Deployment, list[Event]]:
        """Update a deployment row and/or append events to its log, in one transaction.

        Status only moves forward and a terminal status never changes; appended events
        get consecutive ``seq`` numbers and the log keeps its head/tail retention.

        Raises:
            KeyError: no such deployment.
            TransitionError: the status change is not allowed.
        """
        async with self.tx() as tx:
            current = await self.get_row(DEPLOYMENTS, (deployment_id,), tx)
            if current is None:
                raise KeyError(deployment_id)
            d = deployment_from(current)
            if changes:
                if "deployment_id" in changes and changes["deployment_id"] != deployment_id:
                    raise ValueError("a deployment's id cannot be changed")
                _check_transition(d, changes)
                d = deployment_from(
                    await self.put_row(tx, DEPLOYMENTS, {**current, **changes}, user=user)
                )
                tx.notify(Notice(DEPLOYMENTS.name, deployment_id, (d,)))
            written: list[Event] = []
            if events:
                written = await ev.append(tx, deployment_id, events)
                await tx.log(
                    ev.TABLE,
                    deployment_id,
                    version=self.clock.tick(),
                    origin=self.node,
                    op="append",
                    data=[e.as_dict() for e in written],
                )
                tx.notify(Notice(ev.TABLE, deployment_id, tuple(written)))
        return d, written

    async def get_deployment(self, deployment_id: str) -> Deployment | None:
        row = await self.get_row(DEPLOYMENTS, (deployment_id,))
        return None if row is None else deployment_from(row)

    async def list_deployments(
        self, filt: DeploymentFilter, *, limit: int, offset: int = 0, cursor: str | None = None
    ) -> Page:
        """Newest first, filtered and paged in SQL.

        Raises:
            ValueError: ``cursor`` is malformed.
        """
        clauses, params = filt.where()
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        count = await self.db.fetchone(
            f"SELECT COUNT(*) AS n FROM deployments {where}", tuple(params)
        )
        total = int(count["n"]) if count else 0
        page_clauses, page_params = list(clauses), list(params)
        if cursor is not None:
            started_at, deployment_id = decode_cursor(cursor)
            page_clauses.append("(started_at, deployment_id) < (?, ?)")
            page_params += [started_at, deployment_id]
            offset = 0
        page_where = f"WHERE {' AND '.join(page_clauses)}" if page_clauses else ""
        rows = await self.db.fetchall(
            f"SELECT * FROM deployments {page_where} "
            "ORDER BY started_at DESC, deployment_id DESC LIMIT ? OFFSET ?",
            (*page_params, limit + 1, offset),
        )
        items = [deployment_from(DEPLOYMENTS.from_sql(r)) for r in rows[:limit]]
        next_cursor = encode_cursor(items[-1]) if len(rows) > limit and items else None
        return Page(items, total, next_cursor)

    async def deployments(
        self,
        *,
        statuses: Sequence[str] | None = None,
        terminal: bool | None = None,
        project: str | None = None,
        payload_hash: str | None = None,
    ) -> list[Deployment]:
        """Deployments matching the given conditions, oldest first."""
        clauses: list[str] = []
        params: list[object] = []
        if statuses is not None:
            clauses.append(f"status IN ({', '.join('?' for _ in statuses)})")
            params += list(statuses)
        if terminal is not None:
            marks = ", ".join("?" for _ in TERMINAL)
            clauses.append(f"status {'IN' if terminal else 'NOT IN'} ({marks})")
            params += [str(s) for s in TERMINAL]
        if project is not None:
            clauses.append("project = ?")
            params.append(project)
        if payload_hash is not None:
            clauses.append("payload_hash = ?")
            params.append(payload_hash)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self.db.fetchall(
            f"SELECT * FROM deployments {where} ORDER BY started_at, deployment_id", tuple(params)
        )
        return [deployment_from(DEPLOYMENTS.from_sql(r)) for r in rows]

    async def latest_success_per_project(self) -> list[Deployment]:
        """For each project, its newest ``success`` deployment."""
        rows = await self.db.fetchall(
            "SELECT d.* FROM deployments d JOIN (SELECT project, MAX(started_at) AS s "
            "FROM deployments WHERE status = 'success' GROUP BY project) m "
            "ON d.project = m.project AND d.started_at = m.s WHERE d.status = 'success' "
            "ORDER BY d.project"
        )
        return [deployment_from(DEPLOYMENTS.from_sql(r)) for r in rows]

    async def events(self, deployment_id: str, after_seq: int = 0) -> list[Event]:
        return await ev.read(self.db, deployment_id, after_seq)

    # -- per-node results -------------------------------------------------------------

    async def put_result(self, deployment_id: str, **fields: Any) -> NodeResult:
        """Write this node's result row for a deployment (merging with what is stored)."""
        async with self.tx() as tx:
            current = await self.get_row(NODE_RESULTS, (deployment_id, self.node), tx) or {
                "deployment_id": deployment_id,
                "node": self.node,
                "phase": None,
                "error": None,
                "started_at": None,
                "completed_at": None,
                "late": False,
                "install_output": None,
            }
            r = result_from(await self.put_row(tx, NODE_RESULTS, {**current, **fields}))
            tx.notify(Notice(NODE_RESULTS.name, deployment_id, (r,)))
        return r

    async def results(self, deployment_id: str) -> list[NodeResult]:
        rows = await self.db.fetchall(
            "SELECT * FROM node_results WHERE deployment_id = ? ORDER BY node", (deployment_id,)
        )
        return [result_from(NODE_RESULTS.from_sql(r)) for r in rows]

    async def results_for(self, deployment_ids: Sequence[str]) -> dict[str, list[NodeResult]]:
        """Result rows of many deployments, grouped by deployment id."""
        out: dict[str, list[NodeResult]] = {i: [] for i in deployment_ids}
        if not deployment_ids:
            return out
        marks = ", ".join("?" for _ in deployment_ids)
        rows = await self.db.fetchall(
            f"SELECT * FROM node_results WHERE deployment_id IN ({marks}) ORDER BY node",
            tuple(deployment_ids),
        )
        for r in rows:
            result = result_from(NODE_RESULTS.from_sql(r))
            out[result.deployment_id].append(result)
        return out

    async def active_by_node(self) -> list[dict[str, Any]]:
        """Per project and node, the newest deployment whose result there is ``active``."""
        rows = await self.db.fetchall(
            "SELECT d.project, r.node, d.deployment_id, d.payload_hash, r.completed_at, d.kind "
            "FROM node_results r JOIN deployments d ON d.deployment_id = r.deployment_id "
            "WHERE r.status = 'active' ORDER BY d.project, r.node, d.started_at"
        )
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            latest[(r["project"], r["node"])] = dict(r)
        return list(latest.values())

    async def results_of_node(self, node: str, *, statuses: Sequence[str]) -> list[NodeResult]:
        marks = ", ".join("?" for _ in statuses)
        rows = await self.db.fetchall(
            f"SELECT * FROM node_results WHERE node = ? AND status IN ({marks})", (node, *statuses)
        )
        return [result_from(NODE_RESULTS.from_sql(r)) for r in rows]

    # -- payload drops ----------------------------------------------------------------

    async def mark_payload_dropped(self, deployment_id: str, *, user: str | None) -> bool:
        """Record that a deployment's payload is dropped cluster-wide. False if it was."""
        async with self.tx() as tx:
            if await self.get_row(PAYLOAD_DROPS, (deployment_id,), tx) is not None:
                return False
            row = {"deployment_id": deployment_id, "dropped_by": self.node, "dropped_at": tx.now_ms}
            await self.put_row(tx, PAYLOAD_DROPS, row, user=user)
            tx.notify(Notice(PAYLOAD_DROPS.name, deployment_id))
        return True

    async def dropped(self, deployment_ids: Sequence[str]) -> set[str]:
        """Which of ``deployment_ids`` have their payload dropped."""
        if not deployment_ids:
            return set()
        marks = ", ".join("?" for _ in deployment_ids)
        rows = await self.db.fetchall(
            f"SELECT deployment_id FROM payload_drops WHERE deployment_id IN ({marks})",
            tuple(deployment_ids),
        )
        return {r["deployment_id"] for r in rows}

    async def live_references(self, payload_hash: str) -> int:
        """How many deployments still reference ``payload_hash`` without a drop."""
        row = await self.db.fetchone(
            "SELECT COUNT(*) AS n FROM deployments d WHERE d.payload_hash = ? AND NOT EXISTS "
            "(SELECT 1 FROM payload_drops p WHERE p.deployment_id = d.deployment_id)",
            (payload_hash,),
        )
        return int(row["n"]) if row else 0

    # -- local state ------------------------------------------------------------------

    async def set_active(
        self, project: str, deployment_id: str | None, payload_hash: str | None
    ) -> None:
        """Record (or clear, with ``None``) the release active on this node."""
        async with self.tx() as tx:
            if deployment_id is None:
                await tx.conn.execute("DELETE FROM active_releases WHERE project = ?", (project,))
            else:
                await tx.conn.execute(
                    "INSERT INTO active_releases "
                    "(project, deployment_id, payload_hash, activated_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (project) DO UPDATE SET "
                    "deployment_id=excluded.deployment_id, payload_hash=excluded.payload_hash, "
                    "activated_at=excluded.activated_at",
                    (project, deployment_id, payload_hash, tx.now_ms),
                )
            tx.notify(Notice("active_releases", project))

    async def active_releases(self) -> dict[str, dict[str, Any]]:
        rows = await self.db.fetchall("SELECT * FROM active_releases ORDER BY project")
        return {r["project"]: dict(r) for r in rows}

    async def get_meta(self, key: str) -> str | None:
        row = await self.db.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row["value"])

    async def set_meta(self, key: str, value: str) -> None:
        async with self.tx() as tx:
            await tx.conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- change log -------------------------------------------------------------------


def _check_transition(d: Deployment, changes: dict[str, Any]) -> None:
    new = changes.get("status")
    if new is None or new == d.status:
        return
    if d.terminal:
        raise TransitionError(f"deployment {d.deployment_id} is {d.status}; it cannot become {new}")
    if status_rank(new) < status_rank(d.status):
        raise TransitionError(
            f"deployment {d.deployment_id} cannot go from {d.status} back to {new}"
        )
    DeploymentStatus(new)
