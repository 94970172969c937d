"""The database file: schema migrations (fresh and in place), durability pragmas, and
the write transaction's all-or-nothing behaviour."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from contextlib import closing

import pytest

from storage import db as db_module
from storage.accounts import Accounts
from storage.apply import apply_changes
from storage.db import Database, migrations
from storage.errors import SchemaError, StorageError
from storage.records import DeploymentStatus

LATEST = len(migrations())

D_WEB_OK = "3f2b1c4e-8a71-4d5e-9c1a-0b6f2d7e8a90"
D_WEB_FAILED = "6a0e9d2c-1b34-4f8e-a5c7-2d9e0f1b3c45"
D_API_OK = "c81d4e2a-5f60-4b7c-8d9e-1a2b3c4d5e6f"


def query(path, sql):
    """Read the file with the stdlib driver, independently of the code under test."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def columns(path, table):
    return {r[1]: r for r in query(path, f"PRAGMA table_info({table})")}


def user_version(path):
    return query(path, "PRAGMA user_version")[0][0]


def table_names(path):
    return {r[0] for r in query(path, "SELECT name FROM sqlite_master")}


@pytest.fixture
def schema1(tmp_path, fixtures_dir):
    """A copy of the committed schema-1 database (the original must never change)."""
    path = tmp_path / "data" / "cairn.sqlite"
    path.parent.mkdir()
    shutil.copyfile(fixtures_dir / "schema1.sqlite", path)
    return path


def test_shipped_migrations_are_numbered_from_one_without_gaps():
    assert [number for number, _, _ in migrations()] == list(range(1, LATEST + 1))
    assert LATEST >= 2


async def test_fresh_database_is_created_at_the_latest_schema(tmp_path):
    path = tmp_path / "new" / "cairn.sqlite"
    db = await Database.open(path)
    try:
        assert await db.schema_version() == LATEST
    finally:
        await db.close()
    assert user_version(path) == LATEST
    assert columns(path, "deployments")["pinned"][4] == "0"


async def test_an_old_schema_is_upgraded_by_the_same_path_as_a_fresh_one(tmp_path):
    path = tmp_path / "cairn.sqlite"
    old = await Database.open(path, upto=1)
    await old.close()
    assert user_version(path) == 1
    assert "pinned" not in columns(path, "deployments")

    db = await Database.open(path)
    await db.close()
    assert user_version(path) == LATEST
    assert "pinned" in columns(path, "deployments")
    # Opening an up-to-date database again applies nothing (a re-run ALTER would fail).
    db = await Database.open(path)
    await db.close()
    assert user_version(path) == LATEST


async def test_schema1_fixture_is_upgraded_in_place_with_every_row_intact(
    schema1, open_store, new_wall
):
    assert user_version(schema1) == 1, "the committed fixture must stay a schema-1 database"
    assert "pinned" not in columns(schema1, "deployments")

    store = await open_store("n1", path=schema1, wall=new_wall())

    assert await store.db.schema_version() == LATEST
    pinned = columns(schema1, "deployments")["pinned"]
    assert (pinned[3], pinned[4]) == (1, "0")  # NOT NULL DEFAULT 0

    deployments = {d.deployment_id: d for d in await store.deployments()}
    assert set(deployments) == {D_WEB_OK, D_WEB_FAILED, D_API_OK}
    assert not any(d.pinned for d in deployments.values())
    ok = deployments[D_WEB_OK]
    assert (ok.project, ok.status, ok.origin_node, ok.user) == ("web", "success", "n1", "admin")
    assert ok.expected_nodes == ("n1", "n2")
    assert ok.restart_mode == "rolling"
    assert ok.completed_at == ok.started_at + 9_500
    failed = deployments[D_WEB_FAILED]
    assert failed.status is DeploymentStatus.FAILED
    assert failed.error == {
        "message": "install hook exited with status 1",
        "code": "install_failed",
        "phase": "install",
    }
    assert deployments[D_API_OK].origin == "n2"

    events = await store.events(D_WEB_OK)
    assert [e.seq for e in events] == list(range(1, 10))
    assert events[0].data == {"deployment_id": D_WEB_OK, "project": "web"}
    assert events[-1].event == "finished"
    truncated = await store.events(D_WEB_FAILED)
    assert len(truncated) == 200
    assert (truncated[20].seq, truncated[20].event) == (21, "truncated")
    assert truncated[20].data == {"dropped_events": 41}

    results = await store.results(D_WEB_FAILED)
    assert [(r.node, r.status) for r in results] == [("n1", "failed")]
    assert results[0].install_output["lines"] == [
        {"stream": "stderr", "line": "npm ERR! missing script"}
    ]
    assert [(r.node, r.late) for r in await store.results(D_API_OK)] == [
        ("n1", True),
        ("n2", False),
    ]
    assert await store.dropped([D_WEB_OK, D_WEB_FAILED, D_API_OK]) == {D_WEB_FAILED}

    accounts = Accounts(store)
    assert [u.username for u in await accounts.list_users()] == ["admin", "deployer"]
    assert await accounts.get_user("intern") is None
    deployer = await accounts.get_role("deployer")
    assert deployer is not None
    assert "deploy_component" in deployer.permission["operations"]
    assert [m.name for m in await accounts.list_members()] == ["n1", "n2"]

    changes, head = await store.changes_after(0)
    assert head == 18
    assert [c.tbl for c in changes[:3]] == ["members", "members", "roles"]
    assert changes[7].data["deployment_id"] == D_WEB_OK
    assert await store.cursor("n2") == 17
    assert await store.get_meta("cluster_id") == "c-7f3a91"
    active = await store.active_releases()
    assert active["web"]["deployment_id"] == D_WEB_OK
    assert active["api"]["deployment_id"] == D_API_OK


async def test_upgraded_database_keeps_working(schema1, open_store, new_wall):
    # The wall clock here is years behind the versions in the fixture: new writes must
    # still order after everything already stored (the clock is seeded from the log).
    store = await open_store("n1", path=schema1, wall=new_wall(1_000))
    max_before = max(c.version for c in (await store.changes_after(0))[0])

    d, _ = await store.write_deployment(D_WEB_OK, {"pinned": True})
    assert d.pinned is True and d.status == "success"
    assert d.version > max_before
    _, written = await store.write_deployment(
        D_WEB_FAILED, events=[("payload_dropped", {"freed_bytes": 51_002})]
    )
    assert [e.seq for e in written] == [241]
    log = await store.events(D_WEB_FAILED)
    assert len(log) == 200
    assert log[20].data == {"dropped_events": 42}
    assert log[-1].event == "payload_dropped"


async def test_old_change_log_replicates_into_a_fresh_node(schema1, open_store, snapshot):
    """Rows logged before the ``pinned`` column existed still apply on a new node."""
    old = await open_store("n1", path=schema1)
    fresh = await open_store("n3")
    changes, last = await old.changes_after(0)
    assert await apply_changes(fresh, "n1", changes, last) == len(changes)
    assert await snapshot(fresh) == await snapshot(old)


async def test_a_database_from_a_newer_cairn_is_refused(tmp_path):
    path = tmp_path / "cairn.sqlite"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    with pytest.raises(SchemaError, match="newer"):
        await Database.open(path)
    assert user_version(path) == LATEST + 1
    assert "future" in table_names(path)


async def test_a_failed_migration_is_rolled_back_whole(tmp_path, monkeypatch):
    path = tmp_path / "cairn.sqlite"
    db = await Database.open(path)
    async with db.write() as conn:
        await conn.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
    await db.close()

    broken = "CREATE TABLE half_done (x);\nALTER TABLE meta ADD COLUMN extra;\nNOT SQL AT ALL;"
    shipped = migrations()
    monkeypatch.setattr(
        db_module, "migrations", lambda: [*shipped, (LATEST + 1, "9999_broken.sql", broken)]
    )
    with pytest.raises(SchemaError, match="9999_broken"):
        await Database.open(path)

    assert user_version(path) == LATEST
    assert "extra" not in columns(path, "meta")
    assert "half_done" not in table_names(path)
    assert query(path, "SELECT value FROM meta WHERE key = 'k'") == [("v",)]


async def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path, leaked_connections):
    path = tmp_path / "cairn.sqlite"
    junk = b"PK\x03\x04 definitely a zip file, not a database " * 200
    path.write_bytes(junk)
    with pytest.raises(StorageError, match="cannot open database"):
        await Database.open(path)
    assert path.read_bytes() == junk


async def test_refusing_a_non_sqlite_file_leaks_no_connection(tmp_path, leaked_connections):
    path = tmp_path / "cairn.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StorageError):
        await Database.open(path)
    assert leaked_connections() == []


async def test_wal_and_full_synchronous_are_set(tmp_path):
    db = await Database.open(tmp_path / "cairn.sqlite")
    try:
        row = await db.fetchone("PRAGMA journal_mode")
        assert row is not None and row[0] == "wal"
        async with db._writer.execute("PRAGMA synchronous") as cur:
            assert (await cur.fetchone())[0] == 2  # FULL
        async with db._writer.execute("PRAGMA foreign_keys") as cur:
            assert (await cur.fetchone())[0] == 1
    finally:
        await db.close()


async def test_a_failed_write_is_rolled_back_and_the_writer_stays_usable(tmp_path):
    db = await Database.open(tmp_path / "cairn.sqlite")
    try:
        with pytest.raises(RuntimeError):
            async with db.write() as conn:
                await conn.execute("INSERT INTO meta (key, value) VALUES ('a', '1')")
                raise RuntimeError("boom")
        with pytest.raises(StorageError):
            async with db.write() as conn:
                await conn.execute("INSERT INTO meta (key, value) VALUES ('b', '1')")
                await conn.execute("INSERT INTO meta (key, value) VALUES ('b', '2')")
        async with db.write() as conn:
            await conn.execute("INSERT INTO meta (key, value) VALUES ('c', '1')")
        assert [r["key"] for r in await db.fetchall("SELECT key FROM meta")] == ["c"]
    finally:
        await db.close()


async def test_a_cancelled_writer_leaves_no_open_transaction(tmp_path):
    db = await Database.open(tmp_path / "cairn.sqlite")
    inside = asyncio.Event()

    async def stuck_writer():
        async with db.write() as conn:
            await conn.execute("INSERT INTO meta (key, value) VALUES ('lost', '1')")
            inside.set()
            await asyncio.Event().wait()

    try:
        task = asyncio.create_task(stuck_writer())
        await inside.wait()
        # A reader is not blocked by the open write and does not see it.
        assert await db.fetchone("SELECT 1 FROM meta WHERE key = 'lost'") is None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5):
            async with db.write() as conn:
                await conn.execute("INSERT INTO meta (key, value) VALUES ('kept', '1')")
        assert [r["key"] for r in await db.fetchall("SELECT key FROM meta")] == ["kept"]
    finally:
        await db.close()
