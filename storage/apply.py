"""Applying a peer's batch of entries: verified, checked, idempotent, one transaction.

A batch covers, for each log it carries, a range ``(after, last]`` of that log
(:class:`Range`): dense (every entry of the range is in the batch) or compacted (only the
entries whose rows are still current; see :mod:`storage.serve`). Each entry goes through
the same gates, in order, and ends in exactly one of these outcomes:

- **refused** (not from its writer): the signature does not verify against the
  writer's cluster certificate, the key is unknown, or the routing (log, position,
  writer) does not match what was signed. Nothing of it is stored and the log's
  position stops before it, so the genuine entry can still arrive by another path.
  Entries over a direct session from their own writer need no signature check: the
  mutual-TLS session already proves who sent them.
- **quarantined** (from its writer, but not acceptable): an unknown table, a malformed
  row, a value that breaks the record's rules (the validator the admin API uses), a
  writer that is not the row's single writer, a change to a finished deployment or to
  what was fixed when it started. It is stored (so it travels on in order) and recorded
  with its reason in ``quarantine``, and the position moves past it.
- **parked**: its version is more than ``max_clock_offset_ms`` ahead of this node's
  clock. Stored, applied later by :func:`retry_parked` once the clock has caught up;
  the link is not stopped and this node's clock is not dragged forward.
- **applied**: its row is written when ``(version, origin)`` is newer than the stored
  one (last writer wins; a finished deployment never changes), events are inserted, the
  entry joins this node's change log so it can be relayed, and a notice goes out once
  the transaction commits. An entry whose row is not newer is kept in the log only.

The positions (``logs``) move in the same transaction as the rows, so a batch is applied
whole or not at all, and redelivered, duplicated or reordered batches converge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from storage import events as ev
from storage.changelog import Tx
from storage.entries import (
    UNSIGNED_KEY_ID,
    Entry,
    EntryError,
    SignedEntry,
    Verifier,
    decode_body,
    is_log_id,
    log_writer,
    signing_message,
)
from storage.errors import StorageError
from storage.hlc import version_ms
from storage.records import Event, LogInfo, Notice
from storage.rowrules import check_event_batch, check_row, transition_problem, writer_problem
from storage.rules import RuleError
from storage.store import Store
from storage.tables import (
    DEPLOYMENTS,
    EVENT_BATCHES,
    NODE_COMPONENTS,
    NODE_RESULTS,
    PAYLOAD_DROPS,
    PINS,
    REPLICATED,
    TableSpec,
    deployment_from,
    member_from,
    result_from,
    role_from,
    user_from,
)

__all__ = [
    "ApplyReport",
    "InvalidBatch",
    "Range",
    "Refusal",
    "apply_batch",
    "retry_parked",
]

log = structlog.get_logger(__name__)

APPLIED: Final = 0
PARKED: Final = 1
QUARANTINED: Final = 2
_QUARANTINE_KEEP: Final = 1000

_BUILDERS = {
    DEPLOYMENTS.name: deployment_from,
    NODE_RESULTS.name: result_from,
    "users": user_from,
    "roles": role_from,
    "members": member_from,
}


#: Tables whose notices name a row by one column, not by the row's whole key: what a
#: deployment's watchers and the reconciler look up (a payload drop names its deployment).
_NOTICE_KEY: Final = {
    NODE_RESULTS.name: "deployment_id",
    PINS.name: "deployment_id",
    PAYLOAD_DROPS.name: "deployment_id",
    NODE_COMPONENTS.name: "project",
}


class InvalidBatch(StorageError):
    """The batch's structure is wrong (entries outside their declared ranges, out of
    order, or missing from a dense range): nothing of it is applied."""


@dataclass(frozen=True, slots=True)
class Range:
    """What a batch covers of one log."""

    log_id: str
    after: int
    last: int
    compacted: bool


@dataclass(frozen=True, slots=True)
class Refusal:
    """An entry that was refused or quarantined, and why."""

    log_id: str
    oseq: int
    writer: str
    tbl: str | None
    key: str | None
    reason: str
    quarantined: bool


@dataclass
class ApplyReport:
    """What a batch did."""

    applied: int = 0
    stored: int = 0
    duplicates: int = 0
    parked: int = 0
    refusals: list[Refusal] = field(default_factory=list)
    #: Logs whose range could not start at this node's position (a gap): re-subscribe.
    gaps: list[str] = field(default_factory=list)


@dataclass
class _Known:
    """What the batch knows of a row: stored or written earlier in this batch."""

    version: int
    origin: str
    signed: bool
    row: dict[str, Any] | None  # full row for deployments (transition checks)


class _Batch:
    def __init__(self, store: Store, tx: Tx, peer: str, max_offset_ms: int) -> None:
        self.store = store
        self.tx = tx
        self.peer = peer
        self.limit_ms = store.clock.now_ms() + max_offset_ms
        self.known: dict[tuple[str, str], _Known | None] = {}
        self.report = ApplyReport()
        self.log_rows: list[tuple[object, ...]] = []
        self.observed: list[int] = []

    async def known_row(self, spec: TableSpec, key: str, row: dict[str, Any]) -> _Known | None:
        if (spec.name, key) not in self.known:
            where = " AND ".join(f"{c} = ?" for c in spec.key_cols)
            cols = ", ".join(spec.cols) if spec is DEPLOYMENTS else "version, origin"
            async with self.tx.conn.execute(
                f"SELECT {cols}, key_id FROM {spec.name} WHERE {where}",
                tuple(row[c] for c in spec.key_cols),
            ) as cur:
                r = await cur.fetchone()
            self.known[(spec.name, key)] = (
                None
                if r is None
                else _Known(
                    int(r["version"]),
                    r["origin"],
                    r["key_id"] not in (None, UNSIGNED_KEY_ID),
                    spec.from_sql(r) if spec is DEPLOYMENTS else None,
                )
            )
        return self.known[(spec.name, key)]

    def refuse(self, se: SignedEntry, reason: str, e: Entry | None, *, quarantine: bool) -> None:
        self.report.refusals.append(
            Refusal(se.log_id, se.oseq, se.writer, e.tbl if e else None, e.key if e else None,
                    reason, quarantine)
        )  # fmt: skip

    def store_entry(self, se: SignedEntry, e: Entry | None, state: int) -> None:
        self.log_rows.append(
            (se.log_id, se.oseq, se.writer, e.tbl if e else "?", e.key if e else "?",
             e.version if e else 0, se.body, se.sig, se.key_id, state, self.tx.now_ms)
        )  # fmt: skip
        self.report.stored += 1


def _row_of(spec: TableSpec, e: Entry) -> dict[str, Any]:
    """The row an entry writes (raises RuleError when the data has the wrong shape)."""
    data = e.data
    if spec is EVENT_BATCHES:
        if e.op != "append":
            raise RuleError("op", "an event batch is an append")
        row, _events = check_event_batch(data)
    else:
        if e.op != "upsert":
            raise RuleError("op", f"{spec.name} changes are upserts")
        if not isinstance(data, dict) or set(data) != set(spec.data_cols):
            raise RuleError("data", f"a {spec.name} row must carry exactly its columns")
        row = dict(data)
    row["version"], row["origin"] = e.version, e.writer
    check_row(spec, row)
    if spec.key(row) != e.key:
        raise RuleError("key", f"entry key {e.key!r} does not match its row")
    problem = writer_problem(spec, row, e.writer)
    if problem is None and spec is EVENT_BATCHES and data["origin_node"] != e.writer:
        problem = f"events of a deployment are written by its origin, not by {e.writer}"
    if problem is not None:
        raise RuleError("writer", problem)
    return row


async def apply_batch(
    store: Store,
    peer: str,
    ranges: Sequence[Range],
    entries: Sequence[SignedEntry],
    *,
    verifier: Verifier | None,
    direct_log: str | None,
    max_clock_offset_ms: int,
) -> ApplyReport:
    """Apply one batch from ``peer`` (the session's authenticated node).

    Args:
        store: this node's store.
        peer: who sent the batch.
        ranges: what it covers of each log, in any order.
        entries: the entries, in log order within each log.
        verifier: checks signatures (None: every entry must come from ``direct_log``).
        direct_log: the peer's own current log id: its entries need no signature check.
        max_clock_offset_ms: how far ahead of this node's clock a version may be.

    Raises:
        InvalidBatch: the batch's structure is wrong (nothing is applied).
        StorageError: the database failed (nothing is applied).
    """
    by_log = _check_structure(ranges, entries)
    async with store.tx() as tx:
        batch = _Batch(store, tx, peer, max_clock_offset_ms)
        for r in ranges:
            await _apply_range(batch, r, by_log.get(r.log_id, []), verifier, direct_log)
        if batch.log_rows:
            await tx.conn.executemany(
                "INSERT OR IGNORE INTO changelog (log_id, oseq, writer, tbl, key, version, "
                "entry, sig, key_id, state, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch.log_rows,
            )
            tx.logged += len(batch.log_rows)
        await _record_refusals(tx, peer, batch.report.refusals)
        store.faults.hit("apply.before_commit")
    store.faults.hit("apply.after_commit")
    for version in batch.observed:
        store.clock.observe(version)
    for refusal in batch.report.refusals:
        log.warning(
            "change_quarantined" if refusal.quarantined else "change_refused",
            peer=peer, log_id=refusal.log_id, oseq=refusal.oseq, writer=refusal.writer,
            tbl=refusal.tbl, key=refusal.key, reason=refusal.reason,
        )  # fmt: skip
    return batch.report


def _check_structure(
    ranges: Sequence[Range], entries: Sequence[SignedEntry]
) -> dict[str, list[SignedEntry]]:
    declared = {r.log_id: r for r in ranges}
    if len(declared) != len(ranges):
        raise InvalidBatch("a log is declared twice in one batch")
    if not all(is_log_id(log_id) for log_id in declared):
        raise InvalidBatch("a range names a malformed log id")
    by_log: dict[str, list[SignedEntry]] = {}
    for se in entries:
        r = declared.get(se.log_id)
        if r is None or not r.after < se.oseq <= r.last:
            raise InvalidBatch(f"entry {se.log_id}/{se.oseq} is outside the batch's ranges")
        run = by_log.setdefault(se.log_id, [])
        if run and se.oseq <= run[-1].oseq:
            raise InvalidBatch(f"entries of log {se.log_id} are out of order")
        run.append(se)
    for r in ranges:
        if r.last < r.after:
            raise InvalidBatch(f"range of log {r.log_id} ends before it starts")
        run = by_log.get(r.log_id, [])
        if not r.compacted and len(run) != r.last - r.after:
            raise InvalidBatch(f"dense range of log {r.log_id} is missing entries")
    return by_log


async def _apply_range(
    batch: _Batch,
    r: Range,
    run: list[SignedEntry],
    verifier: Verifier | None,
    direct_log: str | None,
) -> None:
    store = batch.store
    info = store.logs.get(r.log_id, batch.tx)
    head = info.head if info is not None else 0
    if r.after > head:
        batch.report.gaps.append(r.log_id)
        return
    if info is None:
        if r.last <= head:
            return  # an empty range of a log this node never heard of
        # A compacted range may hold no entry at all (every row it wrote was overwritten
        # since): the position still moves, or the dense part after it would be a gap.
        info = LogInfo(r.log_id, log_writer(r.log_id), 0, 1, 0)
    reached = r.last
    added = 0
    from_writer = r.log_id == direct_log
    # The writer itself is asked again from the verified position (what a relay only
    # claimed is sent once more): apply what lies above it, idempotently.
    floor = min(head, info.verified) if from_writer else head
    for se in run:
        if se.oseq <= floor:
            batch.report.duplicates += 1
            continue
        outcome = await _apply_entry(batch, se, info.writer, verifier, direct_log, r.compacted)
        if outcome is None:  # refused: stop this log just before it
            reached = se.oseq - 1
            break
        added += len(se.body)
    verified = not r.compacted or from_writer
    if reached > head or (verified and reached > info.verified):
        compacted = r.compacted and reached > head
        store.logs.put(
            batch.tx,
            store.logs.advanced(
                info, head=reached, added_bytes=added, compacted=compacted, verified=verified
            ),
        )


async def _apply_entry(
    batch: _Batch,
    se: SignedEntry,
    writer: str,
    verifier: Verifier | None,
    direct_log: str | None,
    compacted: bool,
) -> int | None:
    """Apply one entry; returns its state, or None when it was refused."""
    decode_error: str | None = None
    try:
        e: Entry | None = decode_body(se.body)
    except EntryError as err:
        e, decode_error = None, str(err)
    if se.writer != writer:
        batch.refuse(se, f"log {se.log_id} is written by {writer}", e, quarantine=False)
        return None
    direct = se.log_id == direct_log and se.writer == batch.peer
    if not direct:
        problem = (
            "no verifier for a relayed entry"
            if verifier is None
            else verifier.verify(
                writer=se.writer, key_id=se.key_id, message=signing_message(se.body),
                sig=se.sig, at_ms=e.t if e is not None else 0,
            )
        )  # fmt: skip
        if problem is not None:
            batch.refuse(se, f"signature: {problem}", e, quarantine=False)
            return None
    if e is not None and (e.log_id, e.oseq, e.writer) != (se.log_id, se.oseq, se.writer):
        batch.refuse(se, "the signed entry sits elsewhere than it was sent", e, quarantine=False)
        return None
    # From here on the entry is its writer's: whatever it holds, the position moves on.
    if e is None:
        return _quarantine(batch, se, None, f"malformed entry: {decode_error}", compacted)
    spec = REPLICATED.get(e.tbl)
    if spec is None:
        return _quarantine(batch, se, e, f"table {e.tbl[:64]!r} is not replicated", compacted)
    try:
        row = _row_of(spec, e)
    except RuleError as err:
        return _quarantine(batch, se, e, f"{spec.name}: {err.message}", compacted)
    if version_ms(e.version) > batch.limit_ms:
        batch.report.parked += 1
        batch.store_entry(se, e, PARKED)
        return PARKED
    problem = await _write(batch, spec, e, row, se)
    if problem is not None:
        return _quarantine(batch, se, e, problem, compacted)
    if not compacted:
        batch.store_entry(se, e, APPLIED)
    return APPLIED


def _quarantine(
    batch: _Batch, se: SignedEntry, e: Entry | None, reason: str, compacted: bool
) -> int:
    batch.refuse(se, reason, e, quarantine=True)
    if not compacted:
        batch.store_entry(se, e, QUARANTINED)
    return QUARANTINED


async def _write(
    batch: _Batch, spec: TableSpec, e: Entry, row: dict[str, Any], se: SignedEntry
) -> str | None:
    """Write the row if it is newer; returns why not when the change is refused."""
    if spec is EVENT_BATCHES:
        # The batch names its origin itself: check it against the deployment when this
        # node holds it, or any member could write into another node's deployment log.
        d = await batch.known_row(DEPLOYMENTS, row["deployment_id"], row)
        if d is not None and d.row is not None and d.row["origin_node"] != e.writer:
            return (
                f"events of deployment {row['deployment_id']} are written by its origin "
                f"({d.row['origin_node']}), not by {e.writer}"
            )
    known = await batch.known_row(spec, e.key, row)
    if known is not None:
        if (known.version, known.origin) > (e.version, e.writer):
            return None  # an older write: kept in the log, not applied
        if (known.version, known.origin) == (e.version, e.writer):
            if known.signed:
                return None  # redelivery
            # The same write, now signed (its writer re-signed it): keep the signature.
        else:
            problem = transition_problem(spec, known.row, row)
            if problem is not None:
                return problem
    tx = batch.tx
    envelope = (se.log_id, se.oseq, se.body, se.sig, se.key_id)
    await tx.conn.execute(spec.upsert_sql(), spec.to_sql(row, envelope))
    batch.known[(spec.name, e.key)] = _Known(
        e.version, e.writer, se.key_id != UNSIGNED_KEY_ID, row if spec is DEPLOYMENTS else None
    )
    batch.observed.append(e.version)
    batch.report.applied += 1
    store = batch.store
    if spec is EVENT_BATCHES:
        _row, events = check_event_batch(e.data)
        new = await ev.insert(
            tx,
            [Event(row["deployment_id"], x["seq"], x["t"], x["event"], x["data"]) for x in events],
        )
        if new:
            tx.notify(Notice(ev.TABLE, row["deployment_id"], tuple(new), remote=True))
        return None
    await store.audit(tx, spec.name, e.key, row, e.writer, e.version, e.user, e.t)
    if spec is DEPLOYMENTS:
        await store.note_deployment(tx, row)
    build = _BUILDERS.get(spec.name)
    value = build(row) if build is not None else None
    # Announced under the key the writer's own notice uses (storage.deployrows).
    notice_key = str(row[_NOTICE_KEY[spec.name]]) if spec.name in _NOTICE_KEY else e.key
    tx.notify(Notice(spec.name, notice_key, (value,) if value is not None else (), remote=True))
    return None


async def _record_refusals(tx: Tx, peer: str, refusals: list[Refusal]) -> None:
    if not refusals:
        return
    await tx.conn.executemany(
        "INSERT INTO quarantine (peer, log_id, oseq, writer, tbl, key, reason, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (peer, r.log_id, r.oseq, r.writer, r.tbl, (r.key or "")[:512], r.reason[:1024],
             tx.now_ms)
            for r in refusals
        ],
    )  # fmt: skip
    await tx.conn.execute(
        "DELETE FROM quarantine WHERE id <= "
        "(SELECT id FROM quarantine ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (_QUARANTINE_KEEP,),
    )
    tx.notify(Notice("quarantine", peer))


async def retry_parked(store: Store, *, max_clock_offset_ms: int, limit: int = 500) -> int:
    """Apply parked entries whose version this node's clock has now reached.

    Returns:
        How many entries left the parked state.
    """
    limit_ms = store.clock.now_ms() + max_clock_offset_ms
    # Only the entries whose time has come: a backlog still waiting (a peer far ahead)
    # must not hide one that is ready behind it.
    rows = await store.db.fetchall(
        "SELECT log_id, oseq, writer, key_id, entry, sig, version FROM changelog "
        "WHERE state = ? AND version < ? ORDER BY seq LIMIT ?",
        (PARKED, (limit_ms + 1) << 16, limit),
    )
    ready = [r for r in rows if version_ms(int(r["version"])) <= limit_ms]
    if not ready:
        return 0
    async with store.tx() as tx:
        batch = _Batch(store, tx, "parked", max_clock_offset_ms)
        for r in ready:
            se = SignedEntry(
                r["log_id"], int(r["oseq"]), r["writer"], r["key_id"], bytes(r["entry"]),
                bytes(r["sig"]),
            )  # fmt: skip
            e = decode_body(se.body)
            spec = REPLICATED[e.tbl]
            state = APPLIED
            try:
                problem = await _write(batch, spec, e, _row_of(spec, e), se)
            except RuleError as err:
                problem = err.message
            if problem is not None:
                batch.refuse(se, problem, e, quarantine=True)
                state = QUARANTINED
            await tx.conn.execute(
                "UPDATE changelog SET state = ? WHERE log_id = ? AND oseq = ?",
                (state, se.log_id, se.oseq),
            )
        await _record_refusals(tx, "parked", batch.report.refusals)
    for version in batch.observed:
        store.clock.observe(version)
    return len(ready)
