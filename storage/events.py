"""Deployment event logs with head/tail retention, written as signed batches.

A log keeps at most :data:`MAX_EVENTS` events: the first :data:`HEAD`, one ``truncated``
marker with the cumulative count of events dropped, and the newest :data:`TAIL`. The
marker takes the seq of the first event it replaces (``HEAD + 1``), so stored seqs only
increase. Retention is a function of the highest seq alone, so every node that has
applied the same events stores the same log, whatever order they arrived in.

Events travel as batches (:data:`storage.tables.EVENT_BATCHES`): one signed entry per
batch, split by encoded size when written (:func:`split`), so no batch can outgrow a
frame. A batch row is dropped once retention has dropped every event it carried.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from storage.changelog import Tx
from storage.db import Database
from storage.records import Event

__all__ = [
    "BATCH_BYTES",
    "HEAD",
    "MAX_EVENTS",
    "TABLE",
    "TAIL",
    "insert",
    "max_seq",
    "number",
    "read",
    "split",
]

TABLE = "deployment_events"
MAX_EVENTS = 200
HEAD = 20
TAIL = MAX_EVENTS - HEAD - 1
MARKER_SEQ = HEAD + 1
#: Encoded event data per batch: well under an entry's limit, whatever the events hold.
BATCH_BYTES: Final = 192 * 1024
_EVENT_OVERHEAD: Final = 64


async def max_seq(tx: Tx, deployment_id: str) -> int:
    async with tx.conn.execute(
        "SELECT MAX(seq) FROM deployment_events WHERE deployment_id = ?", (deployment_id,)
    ) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def number(
    deployment_id: str, after: int, now_ms: int, events: Sequence[tuple[str, dict[str, Any]]]
) -> list[Event]:
    """Give ``events`` the seqs after ``after``."""
    return [
        Event(deployment_id, after + i, now_ms, name, data)
        for i, (name, data) in enumerate(events, start=1)
    ]


def _size(e: Event) -> int:
    return len(json.dumps(e.data, separators=(",", ":"))) + len(e.event) + _EVENT_OVERHEAD


def split(events: Sequence[Event], max_bytes: int = BATCH_BYTES) -> list[list[Event]]:
    """Cut consecutive events into batches of at most ``max_bytes`` encoded (a single
    event larger than that goes alone; writers cap event data well below it)."""
    batches: list[list[Event]] = []
    current: list[Event] = []
    used = 0
    for e in events:
        size = _size(e)
        if current and used + size > max_bytes:
            batches.append(current)
            current, used = [], 0
        current.append(e)
        used += size
    if current:
        batches.append(current)
    return batches


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
            stored_top[e.deployment_id] = await max_seq(tx, e.deployment_id)
    rows = []
    for e in events:
        # An event that this node's log had already dropped is old news: putting it back
        # would make a redelivery look new. (Events new to this node are announced even
        # if retention drops them at once, so live subscribers still see them.)
        dropped_below = _first_kept(stored_top[e.deployment_id])
        if dropped_below > MARKER_SEQ + 1 and MARKER_SEQ <= e.seq < dropped_below:
            continue
        rows.append(e)
    for e in rows:
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
    top = await max_seq(tx, deployment_id)
    first_kept = _first_kept(top)
    if first_kept <= MARKER_SEQ + 1:
        return
    await tx.conn.execute(
        "DELETE FROM deployment_events WHERE deployment_id = ? AND seq >= ? AND seq < ?",
        (deployment_id, MARKER_SEQ, first_kept),
    )
    # A batch all of whose events are gone has nothing left to send.
    await tx.conn.execute(
        "DELETE FROM event_batches WHERE deployment_id = ? AND first_seq >= ? AND last_seq < ?",
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
