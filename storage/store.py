"""The store: every replicated and local row of a node, behind typed async methods.

One method writes a replicated row (:meth:`Store.put_row`): it ticks the hybrid clock,
appends a signed entry to this node's own change log, writes the row with that entry's
envelope, and records who did it in the audit log, all in one transaction; the
transaction's notices go out on the change feed once it has committed. Changes from
peers are applied by :mod:`storage.apply` through the same tables.

The deployment-shaped reads and writes live in :mod:`storage.deployrows`, what senders
read in :mod:`storage.serve`, the audit log in :mod:`storage.audit`; :class:`Store`
mixes them together.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from storage.audit import AuditLog
from storage.changelog import CHANGELOG, ChangeFeed, Tx
from storage.db import Database
from storage.deployrows import DeploymentRows
from storage.entries import (
    UNSIGNED,
    UNSIGNED_KEY_ID,
    Entry,
    EntryError,
    Signer,
    decode_body,
    encode_body,
    log_writer,
    new_log_id,
    signing_message,
)
from storage.errors import StorageError
from storage.faults import NO_FAULTS, Faults
from storage.hlc import HybridClock
from storage.logstate import LogState
from storage.records import LogInfo, Notice
from storage.rowrules import check_row
from storage.rules import RuleError
from storage.serve import LogReads
from storage.tables import DEPLOYMENTS, EVENT_BATCHES, REPLICATED, TableSpec

__all__ = ["InvalidRow", "Store", "TransitionError"]

log = structlog.get_logger(__name__)


class TransitionError(StorageError):
    """A write would move a deployment backwards or change a finished one."""


class InvalidRow(StorageError):
    """A row this node was about to write breaks the record's rules (a bug upstream)."""


class Store(DeploymentRows, LogReads, AuditLog):
    """All of a node's rows. Construct with :meth:`open`."""

    def __init__(
        self,
        db: Database,
        *,
        node: str,
        clock: HybridClock,
        feed: ChangeFeed,
        logs: LogState,
        signer: Signer,
        faults: Faults = NO_FAULTS,
    ) -> None:
        self.db = db
        self.faults = faults
        self.node = node
        self.clock = clock
        self.feed = feed
        self.logs = logs
        self.signer = signer

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        node: str,
        clock: HybridClock | None = None,
        feed: ChangeFeed | None = None,
        signer: Signer = UNSIGNED,
        faults: Faults = NO_FAULTS,
    ) -> Store:
        """Open (or create) the database at ``path``, migrate it, and get it ready.

        The first open makes this database's log id. A node renamed since (or a data
        directory given to another node) gets a new log: a log has one writer.
        """
        db = await Database.open(path)
        try:
            meta = {r["key"]: r["value"] for r in await db.fetchall("SELECT * FROM meta")}
            log_id = meta.get("log_id")
            fresh = log_id is None or log_writer(log_id) != node
            if fresh:
                log_id = new_log_id(node)
            assert log_id is not None
            logs = await LogState.load(db, log_id, node)
            store = cls(
                db, node=node, clock=clock or HybridClock(), feed=feed or ChangeFeed(),
                logs=logs, signer=signer, faults=faults,
            )  # fmt: skip
            if fresh:
                async with store.tx() as tx:
                    await store._set_meta(tx, "log_id", log_id)
                    logs.put(tx, LogInfo(log_id, node, 0, 1, 0))
                log.info("change_log_created", node=node, log_id=log_id)
            await store._seed_clock()
            if meta.get("desired_for") != node:
                await store.rebuild_desired()
                await store.set_meta("desired_for", node)
        except BaseException:
            await db.close()
            raise
        return store

    async def _seed_clock(self) -> None:
        for spec in REPLICATED.values():
            row = await self.db.fetchone(f"SELECT MAX(version) AS v FROM {spec.name}")
            if row is not None and row["v"] is not None:
                self.clock.observe(int(row["v"]))

    async def close(self) -> None:
        await self.db.close()

    @property
    def log_id(self) -> str:
        """This node's own change log."""
        return self.logs.own

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[Tx]:
        """A write transaction; its notices are published after it commits."""
        async with self.db.write() as conn:
            tx = Tx(conn, self.clock.now_ms())
            yield tx
            await self.logs.flush(tx)
        for callback in tx.after_commit:
            callback()
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
        op: str = "upsert",
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write ``row`` as a new version by this node, signed and logged.

        Args:
            tx: the open transaction.
            spec: the table.
            row: the row's data columns (``version`` and ``origin`` are set here).
            user: who asked for the change (the audit log's user).
            create: the row must not exist yet (a conflict raises StorageError).
            op: ``upsert``, or ``append`` for an event batch.
            extra: more fields for the entry's data than the row's columns (an event
                batch carries its events).

        Returns:
            The row as stored.

        Raises:
            InvalidRow: the row breaks the record's rules.
        """
        version = self.clock.tick()
        row = dict(row, version=version, origin=self.node)
        if spec is DEPLOYMENTS and create:
            row["created_version"] = version
        try:
            check_row(spec, row)
        except (RuleError, KeyError) as e:
            raise InvalidRow(f"refusing to write a bad {spec.name} row: {e}") from e
        data = spec.data(row)
        if extra:
            data.update(extra)
        envelope = await self.append_own(tx, spec.name, spec.key(row), version, op, data, user)
        sql = spec.insert_sql() if create else spec.upsert_sql()
        await tx.conn.execute(sql, spec.to_sql(row, envelope))
        if spec is not EVENT_BATCHES:
            await self.audit(tx, spec.name, spec.key(row), row, self.node, version, user, tx.now_ms)
        if spec is DEPLOYMENTS:
            await self.note_deployment(tx, row)
        return row

    async def append_own(
        self,
        tx: Tx,
        tbl: str,
        key: str,
        version: int,
        op: str,
        data: dict[str, Any],
        user: str | None,
    ) -> tuple[object, ...]:
        """Append a signed entry to this node's log; returns the row envelope."""
        info = self.logs.get(self.logs.own, tx)
        assert info is not None
        oseq = info.head + 1
        entry = Entry(self.logs.own, oseq, self.node, tbl, key, version, op, data, user, tx.now_ms)
        try:
            body = encode_body(entry)
        except EntryError as e:
            raise InvalidRow(str(e)) from e
        sig = self.signer.sign(signing_message(body))
        key_id = self.signer.key_id
        await tx.conn.execute(
            "INSERT INTO changelog (log_id, oseq, writer, tbl, key, version, entry, sig, key_id, "
            "state, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
            (self.logs.own, oseq, self.node, tbl, key, version, body, sig, key_id, tx.now_ms),
        )
        self.logs.put(
            tx,
            self.logs.advanced(
                info, head=oseq, added_bytes=len(body), compacted=False, verified=True
            ),
        )
        tx.logged += 1
        return (self.logs.own, oseq, body, sig, key_id)

    async def get_row(
        self, spec: TableSpec, key: Sequence[object], tx: Tx | None = None
    ) -> dict[str, Any] | None:
        if tx is not None:
            async with tx.conn.execute(spec.select_sql(), tuple(key)) as cur:
                row = await cur.fetchone()
        else:
            row = await self.db.fetchone(spec.select_sql(), tuple(key))
        return None if row is None else spec.from_sql(row)

    async def resign(self) -> int:
        """Re-sign the rows this node wrote that carry no usable signature.

        Rows written before schema 3, or while the node had no cluster key, are logged
        again as new entries with their own version, so peers (and nodes that join
        later) can verify them. Returns how many rows were re-signed.
        """
        if self.signer.key_id == UNSIGNED_KEY_ID:
            return 0
        count = 0
        for spec in REPLICATED.values():
            while True:
                rows = await self.db.fetchall(
                    f"SELECT * FROM {spec.name} WHERE origin = ? AND "
                    "(key_id IS NULL OR key_id = ?) LIMIT 500",
                    (self.node, UNSIGNED_KEY_ID),
                )
                if not rows:
                    break
                async with self.tx() as tx:
                    for r in rows:
                        row = spec.from_sql(r)
                        data = spec.data(row)
                        op = "upsert"
                        if spec is EVENT_BATCHES:
                            # The batch as written (retention may since have dropped
                            # some of its events here; a receiver needs all of them).
                            op = "append"
                            data = (
                                decode_body(bytes(r["entry"])).data
                                if r["entry"] is not None
                                else await self._batch_data(tx, row)
                            )
                        envelope = await self.append_own(
                            tx, spec.name, spec.key(row), row["version"], op, data, None
                        )
                        await tx.conn.execute(spec.upsert_sql(), spec.to_sql(row, envelope))
                count += len(rows)
        count += await self._batch_legacy_events()
        await self._drop_unsigned_entries()
        if count:
            log.info("rows_resigned", node=self.node, rows=count, key_id=self.signer.key_id)
        return count

    async def _batch_legacy_events(self) -> int:
        """Give events written before schema 3 (by deployments this node originated)
        the signed batches they never had: one per run of consecutive seqs, so a node
        that joins later receives them too."""
        rows = await self.db.fetchall(
            "SELECT e.deployment_id, e.seq, e.t, e.event, e.data FROM deployment_events e "
            "JOIN deployments d ON d.deployment_id = e.deployment_id "
            "WHERE d.origin_node = ? AND NOT EXISTS (SELECT 1 FROM event_batches b "
            "WHERE b.deployment_id = e.deployment_id) ORDER BY e.deployment_id, e.seq",
            (self.node,),
        )
        runs: list[list[Any]] = []
        for r in rows:
            last = runs[-1][-1] if runs else None
            if (
                last is None
                or last["deployment_id"] != r["deployment_id"]
                or (last["seq"] + 1 != r["seq"])
            ):
                runs.append([])
            runs[-1].append(r)
        for start in range(0, len(runs), 200):
            async with self.tx() as tx:
                for run in runs[start : start + 200]:
                    await self._put_legacy_batch(tx, run)
        return len(runs)

    async def _put_legacy_batch(self, tx: Tx, run: list[Any]) -> None:
        first, last = run[0], run[-1]
        row = {
            "deployment_id": first["deployment_id"],
            "first_seq": int(first["seq"]),
            "last_seq": int(last["seq"]),
        }
        events = [
            {"seq": int(r["seq"]), "t": int(r["t"]), "event": r["event"],
             "data": json.loads(r["data"])}
            for r in run
        ]  # fmt: skip
        await self.put_row(
            tx, EVENT_BATCHES, row, op="append",
            extra={"origin_node": self.node, "events": events},
        )  # fmt: skip

    async def _drop_unsigned_entries(self) -> None:
        """Serve the part of this node's log written without a key from the rows.

        Those entries are superseded by their re-signed copies (or by later writes). A
        peer pulling them from this node directly would take them (the session proves
        who wrote them) but could never relay them, so a node joining while this one is
        away would stop at the first of them. Below ``held_from`` a log is served
        compacted, from rows that now carry signed entries.
        """
        row = await self.db.fetchone(
            "SELECT MAX(oseq) AS upto FROM changelog WHERE log_id = ? AND key_id = ?",
            (self.logs.own, UNSIGNED_KEY_ID),
        )
        if row is None or row["upto"] is None:
            return
        upto = int(row["upto"])
        async with self.tx() as tx:
            await tx.conn.execute(
                "DELETE FROM changelog WHERE log_id = ? AND oseq <= ?", (self.logs.own, upto)
            )
            info = self.logs.get(self.logs.own, tx)
            assert info is not None
            if upto + 1 > info.held_from:
                self.logs.put(tx, replace(info, held_from=upto + 1))

    # -- member certificates (local) -------------------------------------------------

    async def put_cert(
        self, key_id: str, node: str, der: bytes, not_before_ms: int, not_after_ms: int
    ) -> None:
        """Keep a member certificate (by key id) so entries it signed can be verified and
        relayed after a restart."""
        async with self.tx() as tx:
            await tx.conn.execute(
                "INSERT OR IGNORE INTO certs (key_id, node, der, not_before, not_after) "
                "VALUES (?, ?, ?, ?, ?)",
                (key_id, node, der, not_before_ms, not_after_ms),
            )

    async def certs(self) -> list[tuple[str, bytes]]:
        """Every kept certificate as ``(key_id, der)``."""
        rows = await self.db.fetchall("SELECT key_id, der FROM certs ORDER BY key_id")
        return [(r["key_id"], bytes(r["der"])) for r in rows]

    # -- local state ------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        row = await self.db.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row["value"])

    async def set_meta(self, key: str, value: str) -> None:
        async with self.tx() as tx:
            await self._set_meta(tx, key, value)

    async def _set_meta(self, tx: Tx, key: str, value: str) -> None:
        await tx.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
