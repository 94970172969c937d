"""Shared fixtures for the storage suite: real SQLite stores in ``tmp_path``, a fake wall
clock, complete deployment rows, and helpers that move changes between stores the way the
replicator does (pull after the stored cursor, apply with the peer's name)."""

from __future__ import annotations

import asyncio
import gc
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from storage.accounts import Accounts
from storage.apply import apply_changes
from storage.hlc import HybridClock
from storage.records import Change, Deployment, Event, Member, NodeResult, Role, User
from storage.store import Store

#: 2023-11-14T22:13:20Z, a realistic epoch-ms starting point for fake clocks.
T0 = 1_700_000_000_000


class FakeWall:
    """A wall clock the test moves by hand (the ``HybridClock`` seam)."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, ms: int = 1) -> int:
        self.ms += ms
        return self.ms


def deployment_fields(**overrides: Any) -> dict[str, Any]:
    """Every column of a new ``pending`` deployment (except version and origin)."""
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
        "deadline_at": None,
        "started_at": T0,
        "completed_at": None,
        "user": "admin",
        "rollback_of": None,
        "error": None,
        "pinned": False,
    }
    fields.update(overrides)
    return fields


@dataclass(frozen=True)
class Snapshot:
    """Everything replicated that a user can see on one node, for convergence checks."""

    deployments: list[Deployment]
    events: dict[str, list[tuple[int, str, dict[str, Any]]]]
    results: dict[str, list[NodeResult]]
    dropped: set[str]
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
        dropped=await store.dropped(ids),
        users=await accounts.list_users(),
        roles=await accounts.list_roles(),
        members=await accounts.list_members(include_deleted=True),
    )


async def all_changes(
    store: Store, after_seq: int = 0, *, skip_origin: str | None = None
) -> tuple[list[Change], int]:
    """Every change-log entry after ``after_seq`` (paging through ``changes_after``)."""
    out: list[Change] = []
    seq = after_seq
    while True:
        batch, last = await store.changes_after(seq, skip_origin=skip_origin)
        out += batch
        if last == seq:
            return out, seq
        seq = last


async def pull(src: Store, dst: Store) -> int:
    """``dst`` pulls ``src``'s changes after its stored cursor, as the replicator does."""
    changes, last = await all_changes(src, await dst.cursor(src.node), skip_origin=dst.node)
    return await apply_changes(dst, src.node, changes, last)


OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture
def wall() -> FakeWall:
    return FakeWall()


async def _migrate_only(path: Path) -> None:
    store = await Store.open(path, node="template")
    await store.close()


@pytest.fixture
async def open_store(
    tmp_path: Path, template: Callable[[str, Builder], Any]
) -> AsyncIterator[OpenStore]:
    """Open a store on a real SQLite file; every store opened is closed at teardown.

    A new node's file starts as a copy of an empty, freshly migrated database (creating
    one from scratch is covered by ``test_db``), which keeps the suite fast.
    """
    empty, _ = template("empty", _migrate_only)
    opened: list[Store] = []

    async def _open(
        node: str = "n1", *, wall: FakeWall | None = None, path: Path | None = None
    ) -> Store:
        if path is None:
            path = tmp_path / f"{node}.sqlite"
            if not path.exists():
                shutil.copyfile(empty, path)
        store = await Store.open(path, node=node, clock=HybridClock(wall or FakeWall()))
        opened.append(store)
        return store

    yield _open
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore, wall: FakeWall) -> Store:
    return await open_store("n1", wall=wall)


def _live_connections() -> set[int]:
    return {
        id(o)
        for o in gc.get_objects()
        if isinstance(o, aiosqlite.Connection) and o._connection is not None
    }


@pytest.fixture
async def leaked_connections() -> AsyncIterator[Callable[[], list[aiosqlite.Connection]]]:
    """Report aiosqlite connections a test left open, and close them afterwards.

    A leaked connection keeps a non-daemon worker thread alive, which would stop the
    test process from ever exiting; closing it here keeps a failing test from hanging
    the suite.
    """
    before = _live_connections()

    def _leaked() -> list[aiosqlite.Connection]:
        gc.collect()
        return [
            o
            for o in gc.get_objects()
            if isinstance(o, aiosqlite.Connection)
            and o._connection is not None
            and id(o) not in before
        ]

    yield _leaked
    for conn in _leaked():
        await conn.close()


@pytest.fixture
def fixtures_dir() -> Path:
    return Path(__file__).parent / "fixtures"


# Helpers handed to tests as fixtures (test modules do not import conftest).


@pytest.fixture(scope="session")
def new_wall() -> type[FakeWall]:
    return FakeWall


@pytest.fixture(scope="session")
def fields() -> Callable[..., dict[str, Any]]:
    return deployment_fields


Builder = Callable[[Path], Coroutine[Any, Any, Any]]


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Builder], Any]:
    """``template(name, build)``: run ``await build(path)`` once per session and return
    ``(path, result)``.

    Tests that need the same prepared database (many rows written through the real store)
    copy the file instead of repeating hundreds of fsync'd transactions each. The builder
    runs on its own event loop in a worker thread, apart from the tests' loops.
    """
    cache: dict[str, tuple[Path, Any]] = {}

    def _get(name: str, build: Builder) -> tuple[Path, Any]:
        if name not in cache:
            path = tmp_path_factory.mktemp("templates") / f"{name}.sqlite"
            with ThreadPoolExecutor(1) as pool:
                result = pool.submit(asyncio.run, build(path)).result()
            cache[name] = (path, result)
        return cache[name]

    return _get


@pytest.fixture
def copy_of(tmp_path: Path) -> Callable[[Path, str], Path]:
    """Copy a template database into this test's directory under a new name."""

    def _copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        shutil.copyfile(src, dst)
        return dst

    return _copy


@pytest.fixture
def create() -> Callable[..., Awaitable[Deployment]]:
    """``await create(store, **overrides)``: a new deployment written by ``store``."""

    async def _create(store: Store, **overrides: Any) -> Deployment:
        return await store.create_deployment(
            deployment_fields(**{"origin_node": store.node, **overrides})
        )

    return _create


@pytest.fixture(name="snapshot")
def snapshot_fixture() -> Callable[[Store], Awaitable[Snapshot]]:
    return snapshot


@pytest.fixture(name="all_changes")
def all_changes_fixture() -> Callable[..., Awaitable[tuple[list[Change], int]]]:
    return all_changes


@pytest.fixture(name="pull")
def pull_fixture() -> Callable[[Store, Store], Awaitable[int]]:
    return pull


@pytest.fixture(name="event_log")
def event_log_fixture() -> Callable[[list[Event]], list[tuple[int, str, dict[str, Any]]]]:
    return event_log
