"""The audit log: who changed which row when, from which node (``read_audit_log``).

Local and bounded: every replicated write, local or applied from a peer, adds a line in
the same transaction (event batches excepted: the deployment's own log says what
happened), with the writer's node, version and time, so the history reads the same on
every node. :meth:`AuditLog.trim_audit` keeps the newest lines only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage.changelog import Tx

if TYPE_CHECKING:
    from storage.db import Database

__all__ = ["AuditLog"]


class AuditLog:
    """Audit reads and writes (a mixin of :class:`storage.store.Store`)."""

    db: Database

    async def audit(
        self,
        tx: Tx,
        tbl: str,
        key: str,
        row: dict[str, Any],
        node: str,
        version: int,
        user: str | None,
        t: int,
    ) -> None:
        op = "delete" if row.get("deleted") else "upsert"
        await tx.conn.execute(
            "INSERT INTO audit_log (tbl, key, op, user, node, version, t) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (tbl, key, op, user, node, version, t),
        )

    async def trim_audit(self, tx: Tx, max_entries: int) -> int:
        """Drop the oldest lines beyond ``max_entries``; returns how many went."""
        cur = await tx.conn.execute(
            "DELETE FROM audit_log WHERE id <= "
            "(SELECT id FROM audit_log ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (max_entries,),
        )
        return int(cur.rowcount or 0)

    async def read_audit_log(
        self,
        *,
        table: str,
        key: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Who changed which row of ``table`` when, from which node, newest first."""
        clauses, params = ["tbl = ?"], [table]
        for cond, value in (("key = ?", key), ("t >= ?", since), ("t <= ?", until)):
            if value is not None:
                clauses.append(cond)
                params.append(value)  # type: ignore[arg-type]
        rows = await self.db.fetchall(
            "SELECT id, tbl, key, op, user, node, version, t FROM audit_log "
            f"WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [
            {
                "seq": r["id"],
                "table": r["tbl"],
                "key": r["key"],
                "operation": r["op"],
                "user": r["user"],
                "node": r["node"],
                "version": r["version"],
                "timestamp": r["t"],
            }
            for r in rows
        ]
