"""Trimming: the change log is a transport, not the record.

An entry of a log is trimmed once every other member has said it holds that entry (the
positions members report when they subscribe and as they apply, kept in
``member_positions``); a member that never returns cannot pin the log forever, because
entries older than ``max_age_s`` or beyond ``max_entries`` go too. Whoever is then
behind the trimmed point catches up from the compacted rows (:mod:`storage.serve`):
catch-up costs what the current state costs, not what the history did. Parked entries
(and everything after them in their log) stay until they are applied. The audit log is
kept to its newest ``audit_max_entries`` lines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from storage.changelog import Tx
from storage.entries import log_writer
from storage.store import Store

__all__ = ["TrimPolicy", "TrimReport", "record_positions", "trim"]

_PARKED: Final = 1


@dataclass(frozen=True, slots=True)
class TrimPolicy:
    """How long the change log keeps entries no member needs any more."""

    max_age_s: float = 7 * 86_400.0
    max_entries: int = 1_000_000
    audit_max_entries: int = 100_000


@dataclass
class TrimReport:
    """What one pass trimmed, per reason, and what is left."""

    by_members: int = 0
    by_age: int = 0
    by_size: int = 0
    audit: int = 0
    remaining: int = 0
    #: Per log: the member holding trimming back the most, and its position.
    held_back_by: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.by_members + self.by_age + self.by_size


async def record_positions(store: Store, member: str, positions: Mapping[str, int]) -> None:
    """Remember how far ``member`` holds each log (only logs this node holds, and only
    forward: a position never moves back)."""
    rows = [
        (member, log_id, int(oseq))
        for log_id, oseq in positions.items()
        if store.logs.get(log_id) is not None and isinstance(oseq, int) and oseq >= 0
    ]
    if not rows:
        return
    async with store.tx() as tx:
        await tx.conn.executemany(
            "INSERT INTO member_positions (member, log_id, oseq, updated_at) "
            f"VALUES (?, ?, ?, {tx.now_ms}) ON CONFLICT (member, log_id) DO UPDATE SET "
            "oseq = MAX(oseq, excluded.oseq), updated_at = excluded.updated_at",
            rows,
        )


async def trim(store: Store, members: Iterable[str], policy: TrimPolicy) -> TrimReport:
    """One trimming pass over every log this node holds.

    Args:
        store: this node's store.
        members: every other current member (each must hold an entry before it goes).
        policy: age and size bounds.
    """
    report = TrimReport()
    others = sorted(set(members) - {store.node})
    rows = await store.db.fetchall("SELECT member, log_id, oseq FROM member_positions")
    held: dict[tuple[str, str], int] = {(r["member"], r["log_id"]): int(r["oseq"]) for r in rows}
    parked = {
        r["log_id"]: int(r["first"])
        for r in await store.db.fetchall(
            "SELECT log_id, MIN(oseq) AS first FROM changelog WHERE state = ? GROUP BY log_id",
            (_PARKED,),
        )
    }
    now = store.clock.now_ms()
    cutoff_ms = now - int(policy.max_age_s * 1000)
    async with store.tx() as tx:
        for info in store.logs.all():
            # A member holds its own logs by definition.
            waiting = [(held.get((m, info.log_id), 0), m) for m in others
                       if m != log_writer(info.log_id)]  # fmt: skip
            safe = min(waiting)[0] if waiting else info.head
            if waiting and safe < info.head:
                pos, member = min(waiting)
                report.held_back_by[info.log_id] = (member, pos)
            limit = min(info.head, parked.get(info.log_id, info.head + 1) - 1)
            safe = min(safe, limit)
            cur = await tx.conn.execute(
                "DELETE FROM changelog WHERE log_id = ? AND oseq <= ?", (info.log_id, safe)
            )
            report.by_members += int(cur.rowcount or 0)
            # Age: the prefix of this log received before the cut-off.
            async with tx.conn.execute(
                "SELECT MAX(oseq) FROM changelog WHERE log_id = ? AND received_at < ? "
                "AND oseq <= ?",
                (info.log_id, cutoff_ms, limit),
            ) as c:
                r = await c.fetchone()
            aged = int(r[0]) if r and r[0] is not None else 0
            if aged > safe:
                cur = await tx.conn.execute(
                    "DELETE FROM changelog WHERE log_id = ? AND oseq <= ?", (info.log_id, aged)
                )
                report.by_age += int(cur.rowcount or 0)
                safe = aged
            if safe + 1 > info.held_from:
                store.logs.put(tx, replace(info, held_from=safe + 1))
        async with tx.conn.execute("SELECT COUNT(*) FROM changelog") as c:
            r = await c.fetchone()
        count = int(r[0]) if r else 0
        if count > policy.max_entries:
            report.by_size += await _trim_oldest(store, tx, count - policy.max_entries, parked)
            count -= report.by_size
        report.remaining = count
        report.audit = await store.trim_audit(tx, policy.audit_max_entries)
        store.faults.hit("trim.before_commit")
    return report


async def _trim_oldest(store: Store, tx: Tx, excess: int, parked: dict[str, int]) -> int:
    """Trim the oldest ``excess`` entries (by arrival), each log only as a prefix."""
    async with tx.conn.execute(
        "SELECT log_id, MAX(oseq) AS upto FROM (SELECT log_id, oseq FROM changelog "
        "ORDER BY seq LIMIT ?) GROUP BY log_id",
        (excess,),
    ) as cur:
        cuts = [(r["log_id"], int(r["upto"])) for r in await cur.fetchall()]
    removed = 0
    for log_id, upto in cuts:
        upto = min(upto, parked.get(log_id, upto + 1) - 1)
        c = await tx.conn.execute(
            "DELETE FROM changelog WHERE log_id = ? AND oseq <= ?", (log_id, upto)
        )
        removed += int(c.rowcount or 0)
        info = store.logs.get(log_id, tx)
        if info is not None and upto + 1 > info.held_from:
            store.logs.put(tx, replace(info, held_from=upto + 1))
    return removed
