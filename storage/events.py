"""Deployment event logs with head/tail retention.

A log keeps at most :data:`MAX_EVENTS` events: the first :data:`HEAD`, one ``truncated``
marker with the cumulative count of events dropped, and the newest :data:`TAIL`. The
marker takes the seq of the first event it replaces (``HEAD + 1``), so stored seqs only
increase. Retention is a function of the highest seq alone, so every node that has
applied the same events stores the same log, whatever order they arrived in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from storage.changelog import Tx
from storage.db import Database
from storage.records import Event

__all__ = ["HEAD", "MAX_EVENTS", "TABLE", "TAIL", "append", "insert", "read"]

TABLE = "deployment_events"
MAX_EVENTS = 200
HEAD = 20
TAIL = MAX_EVENTS - HEAD - 1
MARKER_SEQ = HEAD + 1


async def _max_seq(tx: Tx, deployment_id: str) -> int:
    async with tx.conn.execute(
        "SELECT MAX(seq) FROM deployment_events WHERE deployment_id = ?", (deployment_id,)
    ) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def append(
    tx: Tx, deployment_id: str, events: Sequence[tuple[str, dict[str, Any]]]
) -> list[Event]:
    """Append events with the next seqs; returns them as written (before retention)."""
    seq = await _max_seq(tx, deployment_id)
    written = []
    for name, data in events:
        seq += 1
        written.append(Event(deployment_id, seq, tx.now_ms, name, data))
    await insert(tx, written)
    return written


async def insert(tx: Tx, events: Sequence[Event]) -> list[Event]:
    """Insert events (ignoring seqs already stored) and apply retention.

    Returns:
        The events that were new to this node.
    """
    new: list[Event] = []
    by_deployment: set[str] = set()
    stored_top: dict[str, int] = {}
    for e in events:
        if e.deployment_id not in stored_top:
            stored_top[e.deployment_id] = await _max_seq(tx, e.deployment_id)
    for e in events:
        # An event that this node's log had already dropped is old news: putting it back
        # would make a redelivery look new and keep it travelling between nodes forever.
        # (Events new to this node are announced and relayed even if retention drops them
        # at once, so live subscribers and other nodes still see them.)
        dropped_below = _first_kept(stored_top[e.deployment_id])
        if dropped_below > MARKER_SEQ + 1 and MARKER_SEQ <= e.seq < dropped_below:
            continue
        cur = await tx.conn.execute(
            "INSERT OR IGNORE INTO deployment_events (deployment_id, seq, t, event, data) "
            "VALUES (?, ?, ?, ?, ?)",
            (e.deployment_id, e.seq, e.t, e.event, json.dumps(e.data, separators=(",", ":"))),
        )
        if cur.rowcount:
            new.append(e)
            by_deployment.add(e.deployment_id)
        await cur.close()
    for deployment_id in by_deployment:
        await _retain(tx, deployment_id)
    return new


def _first_kept(top: int) -> int:
    """The first seq of the tail that a log whose highest seq is ``top`` keeps."""
    return top - TAIL + 1


async def _retain(tx: Tx, deployment_id: str) -> None:
    top = await _max_seq(tx, deployment_id)
    first_kept = _first_kept(top)
    if first_kept <= MARKER_SEQ + 1:
        return
    await tx.conn.execute(
        "DELETE FROM deployment_events WHERE deployment_id = ? AND seq >= ? AND seq < ?",
        (deployment_id, MARKER_SEQ, first_kept),
    )
    dropped = first_kept - MARKER_SEQ
    await tx.conn.execute(
        "INSERT INTO deployment_events (deployment_id, seq, t, event, data) VALUES (?, ?, ?, ?, ?)",
        (
            deployment_id,
            MARKER_SEQ,
            tx.now_ms,
            "truncated",
            json.dumps({"dropped_events": dropped}),
        ),
    )


async def read(db: Database, deployment_id: str, after_seq: int = 0) -> list[Event]:
    """The stored log of a deployment after ``after_seq``, in seq order."""
    rows = await db.fetchall(
        "SELECT seq, t, event, data FROM deployment_events "
        "WHERE deployment_id = ? AND seq > ? ORDER BY seq",
        (deployment_id, after_seq),
    )
    return [
        Event(deployment_id, int(r["seq"]), int(r["t"]), r["event"], json.loads(r["data"]))
        for r in rows
    ]
