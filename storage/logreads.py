"""Reads of the change log: what peers pull, their cursors, and the audit log."""

from __future__ import annotations

from typing import Any

from storage.changelog import decode_change
from storage.db import Database
from storage.records import Change

__all__ = ["ChangeLogReads"]


class ChangeLogReads:
    """Change-log queries, mixed into :class:`storage.store.Store`."""

    db: Database

    async def head_seq(self) -> int:
        row = await self.db.fetchone("SELECT MAX(seq) AS s FROM changelog")
        return int(row["s"]) if row is not None and row["s"] is not None else 0

    async def changes_after(
        self,
        after_seq: int,
        *,
        limit: int = 500,
        max_bytes: int = 4 << 20,
        skip_origin: str | None = None,
    ) -> tuple[list[Change], int]:
        """Entries after ``after_seq`` in order, and the last seq examined.

        Entries written by ``skip_origin`` are not returned (the receiver wrote them),
        but the returned seq still moves past them so the receiver's cursor advances.
        """
        rows = await self.db.fetchall(
            "SELECT * FROM changelog WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        )
        out: list[Change] = []
        last, size = after_seq, 0
        for row in rows:
            change = decode_change(row)
            if out and size + change.size > max_bytes:
                break
            last = change.seq
            if change.origin != skip_origin:
                out.append(change)
                size += change.size
        return out, last

    async def backlog_bytes(
        self, after_seq: int, *, skip_origin: str | None = None, window: int = 100_000
    ) -> int:
        """Bytes of change data after ``after_seq`` not written by ``skip_origin``.

        A replication sender reports it as the receiver's lag in bytes. At most
        ``window`` entries are counted, so the cost stays bounded however far behind.
        """
        row = await self.db.fetchone(
            "SELECT COALESCE(SUM(length(data)), 0) AS n FROM (SELECT data FROM changelog "
            "WHERE seq > ? AND origin IS NOT ? ORDER BY seq LIMIT ?)",
            (after_seq, skip_origin, window),
        )
        return int(row["n"]) if row is not None else 0

    async def cursor(self, peer: str) -> int:
        row = await self.db.fetchone("SELECT seq FROM peer_cursors WHERE peer = ?", (peer,))
        return int(row["seq"]) if row else 0

    async def cursors(self) -> dict[str, int]:
        rows = await self.db.fetchall("SELECT peer, seq FROM peer_cursors")
        return {r["peer"]: int(r["seq"]) for r in rows}

    async def read_audit_log(
        self,
        *,
        table: str,
        key: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Who changed which row of ``table`` when, from which node, newest first.

        Rows of replicated changes appear once per node they passed through, with the
        origin node and version of the write, so the history is the same on every node.
        """
        clauses, params = ["tbl = ?"], [table]
        for cond, value in (("key = ?", key), ("t >= ?", since), ("t <= ?", until)):
            if value is not None:
                clauses.append(cond)
                params.append(value)  # type: ignore[arg-type]
        rows = await self.db.fetchall(
            "SELECT seq, tbl, key, version, origin, op, data, user, t FROM changelog "
            f"WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?",
            (*params, limit),
        )
        return [
            {
                "seq": r["seq"],
                "table": r["tbl"],
                "key": r["key"],
                "operation": _audit_op(r),
                "user": r["user"],
                "node": r["origin"],
                "version": r["version"],
                "timestamp": r["t"],
            }
            for r in rows
        ]


def _audit_op(row: Any) -> str:
    """``delete`` for a tombstone write (users, roles, members), else the logged op."""
    if row["op"] == "upsert":
        data = decode_change(row).data
        if isinstance(data, dict) and data.get("deleted"):
            return "delete"
    return str(row["op"])
