"""Shared fixtures for the storage suite: real SQLite stores in ``tmp_path`` (each signed
by its node's test key), a fake wall clock, session templates of prepared databases,
and the helpers of :mod:`storekit` handed to tests as fixtures."""

from __future__ import annotations

import asyncio
import gc
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from storehistory import HistoryIds, build_history
from storekit import FakeWall, HmacSigner, deployment_fields, snapshot

from storage.db import Database
from storage.entries import Signer
from storage.hlc import HybridClock
from storage.records import Deployment
from storage.store import Store

OpenStore = Callable[..., Awaitable[Store]]
Builder = Callable[[Path], Coroutine[Any, Any, Any]]

#: ``open_store(..., signer=DEFAULT)``: the node's own test key.
DEFAULT: Any = object()


@pytest.fixture
def wall() -> FakeWall:
    return FakeWall()


async def _migrate_only(path: Path) -> None:
    db = await Database.open(path)
    await db.close()


@pytest.fixture
async def open_store(
    tmp_path: Path, template: Callable[[str, Builder], Any]
) -> AsyncIterator[OpenStore]:
    """``await open_store(node, wall=, path=, signer=)``: a store on a real SQLite file,
    signed with ``HmacSigner(node)`` unless told otherwise; every store opened is closed
    at teardown.

    A new node's file starts as a copy of an empty, freshly migrated database (creating
    one from scratch is covered by ``test_db``), which keeps the suite fast.
    """
    empty, _ = template("empty", _migrate_only)
    opened: list[Store] = []

    async def _open(
        node: str = "n1",
        *,
        wall: FakeWall | None = None,
        path: Path | None = None,
        signer: Signer | Any = DEFAULT,
    ) -> Store:
        if path is None:
            path = tmp_path / f"{node}.sqlite"
            if not path.exists():
                shutil.copyfile(empty, path)
        store = await Store.open(
            path, node=node, clock=HybridClock(wall or FakeWall()),
            signer=HmacSigner(node) if signer is DEFAULT else signer,
        )  # fmt: skip
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


@pytest.fixture(scope="session")
def new_wall() -> type[FakeWall]:
    return FakeWall


@pytest.fixture(scope="session")
def fields() -> Callable[..., dict[str, Any]]:
    return deployment_fields


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
def snapshot_fixture() -> Callable[[Store], Awaitable[Any]]:
    return snapshot


@dataclass
class History:
    """n1 with the history of :func:`history.write_history` (a copy of the template)."""

    store: Store
    wall: FakeWall
    ids: HistoryIds


@pytest.fixture
async def history(
    template: Callable[[str, Builder], Any],
    copy_of: Callable[[Path, str], Path],
    open_store: OpenStore,
) -> History:
    src, ids = template("history", build_history)
    wall = FakeWall(ids.end_ms)
    store = await open_store("n1", path=copy_of(src, "n1.sqlite"), wall=wall)
    return History(store, wall, ids)
