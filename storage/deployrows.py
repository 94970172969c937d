"""Deployment records: rows, event logs, per-node results, pins, payload drops, what each
node runs, and this node's desired and active releases.

Mixed into :class:`storage.store.Store`. Every replicated write here goes through
``put_row`` (signed, logged); local-only tables (``active_releases``,
``desired_releases``) are written directly.

"The active deploy of a project" has one definition (SPEC 5): the newest ``success``
deploy of that project that applies to this node, newest by the version its row was
created at. :meth:`DeploymentRows.note_deployment` keeps it in ``desired_releases`` as
rows become ``success`` (locally or from a peer); everything else reads it from there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from storage import events as ev
from storage.changelog import Tx
from storage.listing import DeploymentFilter, decode_cursor, encode_cursor
from storage.records import (
    TERMINAL,
    Deployment,
    DeploymentStatus,
    Event,
    NodeResult,
    Notice,
    Page,
)
from storage.rowrules import transition_problem
from storage.tables import (
    DEPLOYMENTS,
    EVENT_BATCHES,
    NODE_COMPONENTS,
    NODE_RESULTS,
    PAYLOAD_DROPS,
    PINS,
    deployment_from,
    result_from,
)

if TYPE_CHECKING:
    from storage.db import Database
    from storage.store import Store

__all__ = ["DeploymentRows"]

_SUCCESS = str(DeploymentStatus.SUCCESS)


class DeploymentRows:
    """Deployment-shaped reads and writes (a mixin of :class:`Store`)."""

    db: Database
    node: str

    def _store(self) -> Store:
        # A mixin of Store: its own transaction and row primitives live there.
        return cast("Store", self)

    # -- deployments ------------------------------------------------------------------

    async def create_deployment(self, fields: dict[str, Any]) -> Deployment:
        """Insert a new deployment row written by this node (status ``pending``).

        Args:
            fields: every data column of ``deployments`` but ``created_version``.
        """
        store = self._store()
        async with store.tx() as tx:
            row = await store.put_row(
                tx, DEPLOYMENTS, {**fields, "created_version": 0}, user=fields.get("user"),
                create=True,
            )  # fmt: skip
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
        """Update a deployment this node originated and/or append events to its log, in
        one transaction.

        Status only moves forward and a finished row never changes; appended events get
        consecutive ``seq`` numbers (the log keeps its head/tail retention) and travel
        in signed batches split by size.

        Raises:
            KeyError: no such deployment.
            TransitionError: the change is not allowed, or another node originated it.
        """
        from storage.store import TransitionError

        store = self._store()
        async with store.tx() as tx:
            current = await store.get_row(DEPLOYMENTS, (deployment_id,), tx)
            if current is None:
                raise KeyError(deployment_id)
            if current["origin_node"] != self.node:
                raise TransitionError(
                    f"deployment {deployment_id} belongs to {current['origin_node']}"
                )
            d = deployment_from(current)
            if changes:
                new = {**current, **changes}
                problem = transition_problem(DEPLOYMENTS, current, new)
                if problem is not None:
                    raise TransitionError(problem)
                d = deployment_from(await store.put_row(tx, DEPLOYMENTS, new, user=user))
                tx.notify(Notice(DEPLOYMENTS.name, deployment_id, (d,)))
            written: list[Event] = []
            if events:
                written = await self._append_events(tx, d, events)
        return d, written

    async def _append_events(
        self, tx: Tx, d: Deployment, events: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[Event]:
        store = self._store()
        top = await ev.max_seq(tx, d.deployment_id)
        numbered = ev.number(d.deployment_id, top, tx.now_ms, events)
        for batch in ev.split(numbered):
            row = {
                "deployment_id": d.deployment_id,
                "first_seq": batch[0].seq,
                "last_seq": batch[-1].seq,
            }
            extra = {"origin_node": d.origin_node, "events": [e.as_dict() for e in batch]}
            await store.put_row(tx, EVENT_BATCHES, row, op="append", extra=extra)
        await ev.insert(tx, numbered)
        tx.notify(Notice(ev.TABLE, d.deployment_id, tuple(numbered)))
        return numbered

    async def _batch_data(self, tx: Tx, row: dict[str, Any]) -> dict[str, Any]:
        """The data of a stored event batch (for re-signing): its events as stored."""
        async with tx.conn.execute(
            "SELECT seq, t, event, data FROM deployment_events WHERE deployment_id = ? "
            "AND seq BETWEEN ? AND ? ORDER BY seq",
            (row["deployment_id"], row["first_seq"], row["last_seq"]),
        ) as cur:
            events = [
                {"seq": r["seq"], "t": r["t"], "event": r["event"], "data": json.loads(r["data"])}
                for r in await cur.fetchall()
            ]
        d = await self._store().get_row(DEPLOYMENTS, (row["deployment_id"],), tx)
        origin = d["origin_node"] if d else self.node
        return {
            "deployment_id": row["deployment_id"],
            "first_seq": row["first_seq"],
            "last_seq": row["last_seq"],
            "origin_node": origin,
            "events": events,
        }

    async def get_deployment(self, deployment_id: str) -> Deployment | None:
        row = await self._store().get_row(DEPLOYMENTS, (deployment_id,))
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
            f"SELECT {', '.join(DEPLOYMENTS.cols)} FROM deployments {page_where} "
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
        newer_than: int | None = None,
    ) -> list[Deployment]:
        """Deployments matching the given conditions, oldest first (by creation version).

        Args:
            newer_than: only rows created at a version above this one.
        """
        clauses: list[str] = []
        params: list[object] = []
        if statuses is not None:
            clauses.append(f"status IN ({', '.join('?' for _ in statuses)})")
            params += [str(s) for s in statuses]
        if terminal is not None:
            # Named statuses either way, never NOT IN: deployments_by_status then finds
            # the few running deploys without scanning every row (an idle rescan asks).
            wanted = [s for s in DeploymentStatus if (s in TERMINAL) == terminal]
            clauses.append(f"status IN ({', '.join('?' for _ in wanted)})")
            params += [str(s) for s in wanted]
        if project is not None:
            clauses.append("project = ?")
            params.append(project)
        if payload_hash is not None:
            clauses.append("payload_hash = ?")
            params.append(payload_hash)
        if newer_than is not None:
            clauses.append("created_version > ?")
            params.append(newer_than)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self.db.fetchall(
            f"SELECT {', '.join(DEPLOYMENTS.cols)} FROM deployments {where} "
            "ORDER BY created_version, deployment_id",
            tuple(params),
        )
        return [deployment_from(DEPLOYMENTS.from_sql(r)) for r in rows]

    async def events(self, deployment_id: str, after_seq: int = 0) -> list[Event]:
        return await ev.read(self.db, deployment_id, after_seq)

    # -- desired releases (SPEC 5: one definition of the active deploy) ----------------

    def _applies(self, row: dict[str, Any]) -> bool:
        return bool(row["replicated"]) or row["origin_node"] == self.node

    async def note_deployment(self, tx: Tx, row: dict[str, Any]) -> None:
        """Keep ``desired_releases`` up to date with a deployment row just written."""
        if row["status"] != _SUCCESS or not self._applies(row):
            return
        await tx.conn.execute(
            "INSERT INTO desired_releases (project, deployment_id, created_version, kind) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (project) DO UPDATE SET "
            "deployment_id = excluded.deployment_id, "
            "created_version = excluded.created_version, kind = excluded.kind "
            # Versions of two nodes can tie: the deployment id breaks it, as it does in
            # rebuild_desired, so every node picks the same whatever the arrival order.
            "WHERE (excluded.created_version, excluded.deployment_id) > "
            "(desired_releases.created_version, desired_releases.deployment_id)",
            (row["project"], row["deployment_id"], row["created_version"], row["kind"]),
        )

    async def rebuild_desired(self) -> None:
        """Recompute ``desired_releases`` from the rows (after a migration or a rename)."""
        store = self._store()
        async with store.tx() as tx:
            await tx.conn.execute("DELETE FROM desired_releases")
            await tx.conn.execute(
                "INSERT INTO desired_releases (project, deployment_id, created_version, kind) "
                "SELECT project, deployment_id, created_version, kind FROM ("
                " SELECT project, deployment_id, created_version, kind, ROW_NUMBER() OVER ("
                "  PARTITION BY project ORDER BY created_version DESC, deployment_id DESC) AS n"
                " FROM deployments WHERE status = ? AND (replicated = 1 OR origin_node = ?)"
                ") WHERE n = 1",
                (_SUCCESS, self.node),
            )

    async def desired(self, project: str) -> Deployment | None:
        """The project's active deploy by the one definition (None if never deployed)."""
        row = await self.db.fetchone(
            "SELECT deployment_id FROM desired_releases WHERE project = ?", (project,)
        )
        return None if row is None else await self.get_deployment(row["deployment_id"])

    async def desired_releases(self) -> dict[str, tuple[str, int, str]]:
        """``{project: (deployment_id, created_version, kind)}`` for every project."""
        rows = await self.db.fetchall("SELECT * FROM desired_releases")
        return {
            r["project"]: (r["deployment_id"], int(r["created_version"]), r["kind"]) for r in rows
        }

    # -- per-node results -------------------------------------------------------------

    async def put_result(self, deployment_id: str, **fields: Any) -> NodeResult:
        """Write this node's result row for a deployment (merging with what is stored)."""
        store = self._store()
        async with store.tx() as tx:
            current = await store.get_row(NODE_RESULTS, (deployment_id, self.node), tx) or {
                "deployment_id": deployment_id,
                "node": self.node,
                "phase": None,
                "error": None,
                "started_at": None,
                "completed_at": None,
                "late": False,
                "install_output": None,
            }
            r = result_from(await store.put_row(tx, NODE_RESULTS, {**current, **fields}))
            tx.notify(Notice(NODE_RESULTS.name, deployment_id, (r,)))
        return r

    async def results(self, deployment_id: str) -> list[NodeResult]:
        rows = await self.db.fetchall(
            f"SELECT {', '.join(NODE_RESULTS.cols)} FROM node_results "
            "WHERE deployment_id = ? ORDER BY node",
            (deployment_id,),
        )
        return [result_from(NODE_RESULTS.from_sql(r)) for r in rows]

    async def results_for(self, deployment_ids: Sequence[str]) -> dict[str, list[NodeResult]]:
        """Result rows of many deployments, grouped by deployment id."""
        out: dict[str, list[NodeResult]] = {i: [] for i in deployment_ids}
        for chunk in _chunks(list(deployment_ids)):
            marks = ", ".join("?" for _ in chunk)
            rows = await self.db.fetchall(
                f"SELECT {', '.join(NODE_RESULTS.cols)} FROM node_results "
                f"WHERE deployment_id IN ({marks}) ORDER BY node",
                tuple(chunk),
            )
            for r in rows:
                result = result_from(NODE_RESULTS.from_sql(r))
                out[result.deployment_id].append(result)
        return out

    async def results_of_node(self, node: str, *, statuses: Sequence[str]) -> list[NodeResult]:
        marks = ", ".join("?" for _ in statuses)
        rows = await self.db.fetchall(
            f"SELECT {', '.join(NODE_RESULTS.cols)} FROM node_results "
            f"WHERE node = ? AND status IN ({marks})",
            (node, *[str(s) for s in statuses]),
        )
        return [result_from(NODE_RESULTS.from_sql(r)) for r in rows]

    # -- pins (one row per deployment and node; the newest wins) ------------------------

    async def set_pin(self, deployment_id: str, pinned: bool, *, user: str | None) -> None:
        store = self._store()
        async with store.tx() as tx:
            row = {"deployment_id": deployment_id, "node": self.node, "pinned": pinned}
            await store.put_row(tx, PINS, row, user=user)
            tx.notify(Notice(PINS.name, deployment_id))

    async def pinned(self, deployment_ids: Sequence[str]) -> set[str]:
        """Which of ``deployment_ids`` are pinned (by the newest pin or unpin anywhere)."""
        newest: dict[str, tuple[int, str, bool]] = {}
        for chunk in _chunks(list(deployment_ids)):
            marks = ", ".join("?" for _ in chunk)
            rows = await self.db.fetchall(
                f"SELECT deployment_id, pinned, version, origin FROM pins "
                f"WHERE deployment_id IN ({marks})",
                tuple(chunk),
            )
            for r in rows:
                key = (int(r["version"]), r["origin"], bool(r["pinned"]))
                if r["deployment_id"] not in newest or key[:2] > newest[r["deployment_id"]][:2]:
                    newest[r["deployment_id"]] = key
        return {d for d, (_, _, pinned) in newest.items() if pinned}

    # -- payload drops (one row per deployment and node; any row means dropped) ---------

    async def mark_payload_dropped(self, deployment_id: str, *, user: str | None) -> bool:
        """Record that a deployment's payload is dropped cluster-wide.

        Returns:
            False if it was already dropped (by any node).
        """
        store = self._store()
        async with store.tx() as tx:
            async with tx.conn.execute(
                "SELECT 1 FROM payload_drops WHERE deployment_id = ? LIMIT 1", (deployment_id,)
            ) as cur:
                if await cur.fetchone() is not None:
                    return False
            row = {"deployment_id": deployment_id, "node": self.node, "dropped_at": tx.now_ms}
            await store.put_row(tx, PAYLOAD_DROPS, row, user=user)
            tx.notify(Notice(PAYLOAD_DROPS.name, deployment_id))
        return True

    async def dropped(self, deployment_ids: Sequence[str]) -> set[str]:
        """Which of ``deployment_ids`` have their payload dropped."""
        out: set[str] = set()
        for chunk in _chunks(list(deployment_ids)):
            marks = ", ".join("?" for _ in chunk)
            rows = await self.db.fetchall(
                f"SELECT DISTINCT deployment_id FROM payload_drops "
                f"WHERE deployment_id IN ({marks})",
                tuple(chunk),
            )
            out |= {r["deployment_id"] for r in rows}
        return out

    async def dropped_by(self, deployment_id: str) -> set[str]:
        """The nodes that recorded dropping ``deployment_id``'s payload."""
        rows = await self.db.fetchall(
            "SELECT node FROM payload_drops WHERE deployment_id = ?", (deployment_id,)
        )
        return {r["node"] for r in rows}

    async def live_references(self, payload_hash: str) -> int:
        """How many deployments still reference ``payload_hash`` without a drop."""
        row = await self.db.fetchone(
            "SELECT COUNT(*) AS n FROM deployments d WHERE d.payload_hash = ? AND NOT EXISTS "
            "(SELECT 1 FROM payload_drops p WHERE p.deployment_id = d.deployment_id)",
            (payload_hash,),
        )
        return int(row["n"]) if row else 0

    # -- what each node runs ------------------------------------------------------------

    async def put_component(self, project: str, **fields: Any) -> dict[str, Any]:
        """Write (merging) this node's ``node_components`` row for ``project``."""
        store = self._store()
        async with store.tx() as tx:
            current = await store.get_row(NODE_COMPONENTS, (self.node, project), tx) or {
                "node": self.node,
                "project": project,
                "deployment_id": None,
                "payload_hash": None,
                "activated_at": None,
                "converged": True,
                "reason": None,
                "process": None,
            }
            new = {**current, **fields}
            if all(current.get(k) == new.get(k) for k in NODE_COMPONENTS.data_cols) and (
                "version" in current
            ):
                return current
            row = await store.put_row(tx, NODE_COMPONENTS, new)
            tx.notify(Notice(NODE_COMPONENTS.name, project))
        return row

    async def components(self) -> list[dict[str, Any]]:
        """Every ``node_components`` row, by project then node."""
        rows = await self.db.fetchall(
            f"SELECT {', '.join(NODE_COMPONENTS.cols)} FROM node_components ORDER BY project, node"
        )
        return [NODE_COMPONENTS.from_sql(r) for r in rows]

    # -- local state ------------------------------------------------------------------

    async def set_active(
        self, project: str, deployment_id: str | None, payload_hash: str | None
    ) -> None:
        """Record (or clear, with ``None``) the release active on this node."""
        store = self._store()
        async with store.tx() as tx:
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

    async def mark_staged(
        self, project: str, deployment_id: str, payload_hash: str | None, *, staged: bool = True
    ) -> None:
        """Record (or forget) that a release was staged completely on this node."""
        store = self._store()
        async with store.tx() as tx:
            if staged:
                await tx.conn.execute(
                    "INSERT OR REPLACE INTO staged_releases "
                    "(project, deployment_id, payload_hash, staged_at) VALUES (?, ?, ?, ?)",
                    (project, deployment_id, payload_hash, tx.now_ms),
                )
            else:
                await tx.conn.execute(
                    "DELETE FROM staged_releases WHERE project = ? AND deployment_id = ?",
                    (project, deployment_id),
                )

    async def staged_releases(self, project: str | None = None) -> dict[str, dict[str, Any]]:
        """Releases staged completely here: ``{deployment_id: {project, payload_hash,
        staged_at}}`` (of one project, or all)."""
        if project is None:
            rows = await self.db.fetchall("SELECT * FROM staged_releases")
        else:
            rows = await self.db.fetchall(
                "SELECT * FROM staged_releases WHERE project = ?", (project,)
            )
        return {r["deployment_id"]: dict(r) for r in rows}

    async def active_releases(self) -> dict[str, dict[str, Any]]:
        rows = await self.db.fetchall("SELECT * FROM active_releases ORDER BY project")
        return {r["project"]: dict(r) for r in rows}


def _chunks(items: list[str], size: int = 500) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
