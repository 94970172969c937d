"""Helpers for the storage suite: a fake wall clock, a deterministic signer and keyring,
complete deployment rows, convergence snapshots, and :func:`pull`, which moves entries
between two stores the way a replication session does (read each log the sender holds
after the receiver's position, apply the batch with the sender as the peer).

Storage tests must not import ``replication``: signatures here are HMAC-SHA256 with one
key per node and key ids ``k-<node>``, behind the same ``Signer``/``Verifier`` seams the
real ``NodeSigner``/``Keyring`` fill.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from storage.accounts import Accounts
from storage.apply import ApplyReport, Range, Refusal, apply_batch
from storage.changelog import Tx
from storage.entries import (
    Entry,
    SignedEntry,
    encode_body,
    signing_message,
)
from storage.records import Deployment, Event, Member, NodeResult, Role, User
from storage.store import Store
from storage.tables import REPLICATED

__all__ = [
    "KEYRING",
    "OFFSET_MS",
    "T0",
    "FakeWall",
    "HmacSigner",
    "Keyring",
    "PullResult",
    "Snapshot",
    "changelog_rows",
    "deployment_fields",
    "event_log",
    "forge",
    "inject",
    "inject_raw",
    "log_entries",
    "phash",
    "pull",
    "quarantine_rows",
    "replicated_rows",
    "snapshot",
]

#: 2023-11-14T22:13:20Z, a realistic epoch-ms starting point for fake clocks.
T0 = 1_700_000_000_000
#: The default clock offset a receiver tolerates (``max_clock_offset_s`` = 60).
OFFSET_MS = 60_000


class FakeWall:
    """A wall clock the test moves by hand (the ``HybridClock`` seam)."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, ms: int = 1) -> int:
        self.ms += ms
        return self.ms


def _key(node: str) -> bytes:
    return hashlib.sha256(f"cairn test key of {node}".encode()).digest()


class HmacSigner:
    """A node's signing key in tests: HMAC-SHA256 under a key derived from its name."""

    def __init__(self, node: str, *, key: bytes | None = None) -> None:
        self.node = node
        self._key = key if key is not None else _key(node)

    @property
    def key_id(self) -> str:
        return f"k-{self.node}"

    def sign(self, message: bytes) -> bytes:
        return hmac.new(self._key, message, hashlib.sha256).digest()


class Keyring:
    """The verifier: knows ``k-<node>`` for the given nodes; counts what it checked."""

    def __init__(self, nodes: list[str]) -> None:
        self._keys = {f"k-{n}": (n, _key(n)) for n in nodes}
        self.checked: Counter[str] = Counter()

    def verify(
        self, *, writer: str, key_id: str, message: bytes, sig: bytes, at_ms: int
    ) -> str | None:
        self.checked[writer] += 1
        known = self._keys.get(key_id)
        if known is None:
            return f"unknown key {key_id[:32]}"
        node, key = known
        if node != writer:
            return f"key {key_id} belongs to {node}, not {writer}"
        if not hmac.compare_digest(hmac.new(key, message, hashlib.sha256).digest(), sig):
            return f"bad signature by {writer}"
        return None


#: Knows every node name the suite uses.
KEYRING = Keyring([f"n{i}" for i in range(1, 10)])


def deployment_fields(**overrides: Any) -> dict[str, Any]:
    """Every data column of a new ``pending`` deployment but ``created_version``."""
    fields: dict[str, Any] = {
        "deployment_id": str(uuid.uuid4()),
        "project": "web",
        "kind": "deploy",
        "package_identifier": None,
        "payload_hash": "ab" * 32,
        "payload_size": 1234,
        "status": "pending",
        "phase": None,
        "expected_nodes": ["n1", "n2"],
        "activate_nodes": [],
        "origin_node": "n1",
        "restart_mode": None,
        "replicated": True,
        "ignore_replication_errors": False,
        "timeout_ms": 120_000,
        "started_at": T0,
        "completed_at": None,
        "user": "admin",
        "rollback_of": None,
        "superseded_by": None,
        "error": None,
    }
    fields.update(overrides)
    return fields


def phash(tag: str) -> str:
    """A well-formed scrypt password hash, deterministic per ``tag`` (not of any password)."""
    salt = base64.b64encode(hashlib.sha256(f"salt {tag}".encode()).digest()[:16]).decode()
    digest = base64.b64encode(hashlib.sha256(f"hash {tag}".encode()).digest()).decode()
    return f"scrypt$16384$8$1${salt}${digest}"


# -- convergence --------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything replicated that a user can see on one node, for convergence checks."""

    deployments: list[Deployment]
    events: dict[str, list[tuple[int, str, dict[str, Any]]]]
    results: dict[str, list[NodeResult]]
    dropped: dict[str, set[str]]
    pinned: set[str]
    components: list[dict[str, Any]]
    users: list[User]
    roles: list[Role]
    members: list[Member]


def event_log(events: list[Event]) -> list[tuple[int, str, dict[str, Any]]]:
    """A stored log as ``(seq, event, data)``: ``t`` of a truncation marker is local."""
    return [(e.seq, e.event, e.data) for e in events]


async def snapshot(store: Store) -> Snapshot:
    deployments = await store.deployments()
    ids = [d.deployment_id for d in deployments]
    accounts = Accounts(store)
    return Snapshot(
        deployments=deployments,
        events={i: event_log(await store.events(i)) for i in ids},
        results={i: await store.results(i) for i in ids},
        dropped={i: await store.dropped_by(i) for i in ids},
        pinned=await store.pinned(ids),
        components=await store.components(),
        users=await accounts.list_users(),
        roles=await accounts.list_roles(),
        members=await accounts.list_members(include_deleted=True),
    )


async def replicated_rows(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Every replicated row as stored, envelope (log, position, body, signature) included."""
    out: dict[str, list[dict[str, Any]]] = {}
    for spec in REPLICATED.values():
        rows = await store.db.fetchall(
            f"SELECT * FROM {spec.name} ORDER BY {', '.join(spec.key_cols)}"
        )
        out[spec.name] = [dict(r) for r in rows]
    return out


async def changelog_rows(store: Store, log_id: str | None = None) -> list[dict[str, Any]]:
    """The change log as stored: ``(log_id, oseq, state)`` and more, in log order."""
    where, params = ("WHERE log_id = ?", (log_id,)) if log_id else ("", ())
    rows = await store.db.fetchall(
        f"SELECT log_id, oseq, writer, tbl, key, state FROM changelog {where} "
        "ORDER BY log_id, oseq",
        params,
    )
    return [dict(r) for r in rows]


async def quarantine_rows(store: Store) -> list[dict[str, Any]]:
    rows = await store.db.fetchall(
        "SELECT peer, log_id, oseq, writer, tbl, key, reason FROM quarantine ORDER BY id"
    )
    return [dict(r) for r in rows]


async def log_entries(store: Store, log_id: str, after: int = 0) -> list[SignedEntry]:
    """Every entry ``store`` serves of ``log_id`` after ``after`` (dense or compacted)."""
    out: list[SignedEntry] = []
    while True:
        chunk = await store.read_log(log_id, after, max_entries=500, max_bytes=1 << 24)
        if chunk.last == after:
            return out
        out += chunk.entries
        after = chunk.last


# -- moving entries -----------------------------------------------------------------------


@dataclass
class PullResult:
    """What one :func:`pull` did, summed over its batches."""

    batches: int = 0
    entries: int = 0
    applied: int = 0
    stored: int = 0
    parked: int = 0
    duplicates: int = 0
    ranges: int = 0
    compacted_ranges: int = 0
    refusals: list[Refusal] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)

    def add(self, report: ApplyReport, entries: int, ranges: list[Range]) -> None:
        self.batches += 1
        self.ranges += len(ranges)
        self.compacted_ranges += sum(r.compacted for r in ranges)
        self.entries += entries
        self.applied += report.applied
        self.stored += report.stored
        self.parked += report.parked
        self.duplicates += report.duplicates
        self.refusals += report.refusals
        self.gaps += report.gaps

    @property
    def quarantined(self) -> list[Refusal]:
        return [r for r in self.refusals if r.quarantined]

    @property
    def refused(self) -> list[Refusal]:
        return [r for r in self.refusals if not r.quarantined]


async def pull(
    src: Store,
    dst: Store,
    *,
    direct: bool = True,
    verifier: Any = None,
    max_clock_offset_ms: int = OFFSET_MS,
    max_entries: int = 64,
    max_bytes: int = 1 << 20,
    logs: set[str] | None = None,
    max_batches: int | None = None,
) -> PullResult:
    """``dst`` pulls every log ``src`` holds, from its own positions, until nothing moves.

    Each batch carries a chunk of every log that has something to send (as a sender
    does), and is applied with ``src`` as the session's peer: with ``direct``, entries of
    ``src``'s own log skip the signature check (the session proves who sent them); every
    other entry is verified. A log that was refused or found a gap is not asked again in
    this pull (a receiver stops taking it from that peer for the session).

    Args:
        logs: only these logs (default: every log ``src`` holds).
        max_batches: stop after this many batches (a catch-up broken off).
    """
    result = PullResult()
    stopped: set[str] = set()
    while max_batches is None or result.batches < max_batches:
        ranges: list[Range] = []
        entries: list[SignedEntry] = []
        for info in src.logs.all():
            if info.log_id in stopped or (logs is not None and info.log_id not in logs):
                continue
            after = dst.logs.sent_position(
                info.log_id, from_writer=direct and info.log_id == src.log_id
            )
            chunk = await src.read_log(
                info.log_id, after, max_entries=max_entries, max_bytes=max_bytes
            )
            if chunk.last == after:
                continue
            ranges.append(Range(chunk.log_id, chunk.after, chunk.last, chunk.compacted))
            entries += chunk.entries
        if not ranges:
            break
        before = dst.logs.positions()
        report = await apply_batch(
            dst, src.node, ranges, entries, verifier=verifier or KEYRING,
            direct_log=src.log_id if direct else None, max_clock_offset_ms=max_clock_offset_ms,
        )  # fmt: skip
        result.add(report, len(entries), ranges)
        stopped |= {r.log_id for r in report.refusals if not r.quarantined} | set(report.gaps)
        if dst.logs.positions() == before:
            break  # nothing moved: asking again would send the same batch
    return result


# -- entries a writer may put in its own log, whatever they hold ----------------------------


async def inject(
    store: Store,
    tbl: str,
    key: str,
    data: Any,
    *,
    op: str = "upsert",
    version: int | None = None,
    user: str | None = None,
) -> int:
    """Append an entry to ``store``'s own log without writing (or checking) the row: a
    buggy or hostile writer. Signed with the store's key; returns its position."""
    async with store.tx() as tx:
        envelope = await store.append_own(
            tx, tbl, key, version or store.clock.tick(), op, data, user
        )
    return int(envelope[1])  # type: ignore[call-overload]


async def inject_raw(store: Store, body: bytes) -> int:
    """Append a raw body (any bytes) to ``store``'s own log, signed by its key."""
    async with store.tx() as tx:
        info = store.logs.get(store.log_id, tx)
        assert info is not None
        oseq = info.head + 1
        await _insert_entry(tx, store, oseq, body)
        advanced = store.logs.advanced(
            info, head=oseq, added_bytes=len(body), verified=True, compacted=False
        )
        store.logs.put(tx, advanced)
        tx.logged += 1
    return oseq


async def _insert_entry(tx: Tx, store: Store, oseq: int, body: bytes) -> None:
    await tx.conn.execute(
        "INSERT INTO changelog (log_id, oseq, writer, tbl, key, version, entry, sig, key_id, "
        "state, received_at) VALUES (?, ?, ?, '?', '?', 0, ?, ?, ?, 0, ?)",
        (store.log_id, oseq, store.node, body, store.signer.sign(signing_message(body)),
         store.signer.key_id, tx.now_ms),
    )  # fmt: skip


def forge(
    signer: HmacSigner,
    *,
    log_id: str,
    oseq: int,
    writer: str,
    tbl: str,
    key: str,
    data: Any,
    version: int,
    op: str = "upsert",
    user: str | None = None,
    t: int = T0,
    sent_as: tuple[str, int, str] | None = None,
    key_id: str | None = None,
) -> SignedEntry:
    """An entry built and signed by ``signer``, whoever it claims to be.

    Args:
        sent_as: the routing in the clear ``(log_id, oseq, writer)`` when it differs from
            what the body says.
        key_id: the key id sent with it (default: the signer's).
    """
    body = encode_body(Entry(log_id, oseq, writer, tbl, key, version, op, data, user, t))
    route = sent_as or (log_id, oseq, writer)
    return SignedEntry(*route, key_id or signer.key_id, body, signer.sign(signing_message(body)))
