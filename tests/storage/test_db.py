"""The database file: schema migrations (fresh and in place, schema 1 and 2 data carried
into schema 3), durability pragmas, the write transaction's all-or-nothing behaviour, and
the reader pool: reads that don't queue and never go stale, cancelled or not."""

from __future__ import annotations

import asyncio
import random
import shutil
import sqlite3
import threading
from contextlib import closing, suppress

import pytest
from helpers import wait_until
from storekit import pull, replicated_rows

from storage import db as db_module
from storage.accounts import Accounts
from storage.db import Database, migrations
from storage.errors import SchemaError, StorageError
from storage.records import DeploymentStatus
from storage.tables import REPLICATED

LATEST = len(migrations())

D_WEB_OK = "3f2b1c4e-8a71-4d5e-9c1a-0b6f2d7e8a90"
D_WEB_FAILED = "6a0e9d2c-1b34-4f8e-a5c7-2d9e0f1b3c45"
D_API_OK = "c81d4e2a-5f60-4b7c-8d9e-1a2b3c4d5e6f"
#: The fixture's clock (see fixtures/make_schema1_fixture.py).
T = 1_699_990_000_000


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
    assert LATEST == 4


async def test_fresh_database_is_created_at_the_latest_schema(tmp_path):
    path = tmp_path / "new" / "cairn.sqlite"
    db = await Database.open(path)
    try:
        assert await db.schema_version() == LATEST
    finally:
        await db.close()
    assert user_version(path) == LATEST
    assert {"logs", "pins", "event_batches", "audit_log", "quarantine"} <= table_names(path)
    assert "peer_cursors" not in table_names(path)
    assert "pinned" not in columns(path, "deployments")


async def test_an_old_schema_is_upgraded_by_the_same_path_as_a_fresh_one(tmp_path):
    path = tmp_path / "cairn.sqlite"
    old = await Database.open(path, upto=1)
    await old.close()
    assert user_version(path) == 1
    db = await Database.open(path)
    await db.close()
    assert user_version(path) == LATEST
    fresh = tmp_path / "fresh.sqlite"
    await (await Database.open(fresh)).close()
    assert query(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == query(
        fresh, "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    )
    # Opening an up-to-date database again applies nothing (a re-run ALTER would fail).
    db = await Database.open(path)
    await db.close()
    assert user_version(path) == LATEST


async def test_schema1_fixture_is_upgraded_in_place_with_every_record_intact(
    schema1, open_store, new_wall
):
    assert user_version(schema1) == 1, "the committed fixture must stay a schema-1 database"
    store = await open_store("n1", path=schema1, wall=new_wall())
    assert await store.db.schema_version() == LATEST

    deployments = {d.deployment_id: d for d in await store.deployments()}
    assert set(deployments) == {D_WEB_OK, D_WEB_FAILED, D_API_OK}
    ok = deployments[D_WEB_OK]
    assert (ok.project, ok.status, ok.origin_node, ok.user) == ("web", "success", "n1", "admin")
    assert ok.expected_nodes == ("n1", "n2")
    assert ok.restart_mode == "rolling"
    assert ok.completed_at == ok.started_at + 9_500
    # Deploys are ordered by the version their row was created at: before schema 3,
    # the start time stands in for it.
    assert ok.created_version == ok.started_at << 16
    assert [d.deployment_id for d in await store.deployments()] == [D_WEB_OK, D_WEB_FAILED,
                                                                    D_API_OK]  # fmt: skip
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
    # The old payload drop still means dropped, recorded as its writer's.
    assert await store.dropped([D_WEB_OK, D_WEB_FAILED, D_API_OK]) == {D_WEB_FAILED}
    assert await store.dropped_by(D_WEB_FAILED) == {"n1"}
    assert await store.live_references(deployments[D_WEB_FAILED].payload_hash) == 0
    assert await store.pinned(list(deployments)) == set()

    accounts = Accounts(store)
    assert [u.username for u in await accounts.list_users()] == ["admin", "deployer"]
    assert await accounts.get_user("intern") is None
    deployer = await accounts.get_role("deployer")
    assert "deploy_component" in deployer.permission["operations"]
    assert [m.name for m in await accounts.list_members()] == ["n1", "n2"]

    # The old change log is gone as a transport and kept as the audit log's history.
    audit = await store.read_audit_log(table="deployments", limit=100)
    assert [(a["key"], a["node"], a["operation"], a["user"]) for a in reversed(audit)] == [
        (D_WEB_OK, "n1", "upsert", "admin"),
        (D_WEB_FAILED, "n1", "upsert", "admin"),
        (D_API_OK, "n2", "upsert", "admin"),
    ]
    assert audit[0]["timestamp"] == deployments[D_API_OK].version >> 16
    assert query(schema1, "SELECT COUNT(*) FROM audit_log") == [(18,)]
    assert query(schema1, "SELECT COUNT(*) FROM changelog") == [(0,)]
    assert "peer_cursors" not in table_names(schema1)
    # Rows from before schema 3 carry no signed entry (their writers re-sign them).
    assert query(schema1, "SELECT COUNT(*) FROM deployments WHERE log_id IS NULL") == [(3,)]
    assert store.logs.positions() == {store.log_id: 0}

    assert await store.get_meta("cluster_id") == "c-7f3a91"
    active = await store.active_releases()
    assert active["web"]["deployment_id"] == D_WEB_OK
    assert active["api"]["deployment_id"] == D_API_OK
    assert {p: v[0] for p, v in (await store.desired_releases()).items()} == {
        "web": D_WEB_OK, "api": D_API_OK,
    }  # fmt: skip


async def test_schema2_pinned_flags_become_pins_rows(schema1, open_store):
    db = await Database.open(schema1, upto=2)
    async with db.write() as conn:
        await conn.execute(
            "UPDATE deployments SET pinned = 1 WHERE deployment_id IN (?, ?)",
            (D_WEB_OK, D_API_OK),
        )
    await db.close()
    assert user_version(schema1) == 2

    store = await open_store("n1", path=schema1)
    assert await store.pinned([D_WEB_OK, D_WEB_FAILED, D_API_OK]) == {D_WEB_OK, D_API_OK}
    rows = query(schema1, "SELECT deployment_id, node, pinned, origin FROM pins ORDER BY node")
    assert rows == [(D_WEB_OK, "n1", 1, "n1"), (D_API_OK, "n2", 1, "n2")]
    assert "pinned" not in columns(schema1, "deployments")
    # Unpinning is a newer row by this node, and wins.
    await store.set_pin(D_WEB_OK, False, user="admin")
    assert await store.pinned([D_WEB_OK, D_API_OK]) == {D_API_OK}


async def test_an_upgraded_database_keeps_working(schema1, open_store, new_wall):
    # The wall clock here is years behind the versions in the fixture: new writes must
    # still order after everything already stored (the clock is seeded from the rows).
    store = await open_store("n1", path=schema1, wall=new_wall(1_000))
    newest = max(int(r[0]) for spec in REPLICATED.values()
                 for r in query(schema1, f"SELECT version FROM {spec.name}"))  # fmt: skip
    _, written = await store.write_deployment(
        D_WEB_FAILED, events=[("payload_dropped", {"freed_bytes": 51_002})]
    )
    assert [e.seq for e in written] == [241]
    log = await store.events(D_WEB_FAILED)
    assert len(log) == 200
    assert log[20].data == {"dropped_events": 42}
    assert log[-1].event == "payload_dropped"
    await store.set_pin(D_WEB_OK, True, user="admin")
    assert await store.pinned([D_WEB_OK]) == {D_WEB_OK}
    [pin] = query(schema1, "SELECT version FROM pins")
    assert pin[0] > newest
    assert store.logs.own_head == 2


async def test_migrated_rows_are_re_signed_and_replicate_to_a_new_node(schema1, open_store):
    old = await open_store("n1", path=schema1, wall=None)
    # Rows this node wrote before schema 3: deployments, results, a drop, accounts, and
    # one event batch per run of consecutive events of each deploy it originated.
    assert await old.resign() == 2 + 3 + 1 + 2 + 2 + 2 + 3
    assert query(schema1, "SELECT COUNT(*) FROM deployments WHERE log_id IS NULL") == [(1,)]
    fresh = await open_store("n3")
    got = await pull(old, fresh)
    assert got.refusals == []
    mine = {
        t: [r for r in rows if r["origin"] == "n1"]
        for t, rows in (await replicated_rows(old)).items()
    }
    assert await replicated_rows(fresh) == mine
    assert {d.deployment_id for d in await fresh.deployments()} == {D_WEB_OK, D_WEB_FAILED}
    assert await fresh.dropped_by(D_WEB_FAILED) == {"n1"}


async def test_events_written_before_schema_3_reach_a_new_node(schema1, open_store):
    old = await open_store("n1", path=schema1)
    await old.resign()
    fresh = await open_store("n3")
    await pull(old, fresh)
    assert [e.seq for e in await fresh.events(D_WEB_OK)] == list(range(1, 10))


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


async def test_a_file_that_is_not_sqlite_is_refused_left_alone_and_leaks_nothing(
    tmp_path, leaked_connections
):
    path = tmp_path / "cairn.sqlite"
    junk = b"PK\x03\x04 definitely a zip file, not a database " * 200
    path.write_bytes(junk)
    with pytest.raises(StorageError, match="cannot open database"):
        await Database.open(path)
    assert path.read_bytes() == junk
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
        # Readers cannot write, whatever they are asked.
        with pytest.raises(StorageError, match="readonly"):
            await db.fetchall("INSERT INTO meta (key, value) VALUES ('x', 'y')")
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


# -- the reader pool ----------------------------------------------------------------------

READERS = 4
COUNTER = "SELECT CAST(value AS INTEGER) AS n FROM meta WHERE key = 'n'"


async def bump(db, n):
    async with db.write() as conn:
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('n', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(n),),
        )


async def counter(db):
    rows = await db.fetchall(COUNTER)
    return int(rows[0]["n"]) if rows else 0


def free_readers(db):
    return db._readers._free.qsize()


@pytest.fixture
async def pool(tmp_path):
    db = await Database.open(tmp_path / "cairn.sqlite")
    gate = threading.Event()
    entered = threading.Semaphore(0)

    def block():
        entered.release()
        return int(gate.wait(10))

    for conn in db._readers._conns:
        conn.create_function("block", 0, block)
    db.gate, db.entered = gate, entered
    yield db
    gate.set()
    await db.close()


async def entered(db, count):
    """Wait until ``count`` reads are inside ``block()`` (in their worker threads)."""
    for _ in range(count):
        assert await asyncio.to_thread(db.entered.acquire, timeout=10)


async def test_reads_do_not_queue_behind_a_slow_read(pool):
    db = pool
    await bump(db, 1)
    slow = [asyncio.create_task(db.fetchall(f"SELECT block(), ({COUNTER})"))
            for _ in range(READERS - 1)]  # fmt: skip
    await entered(db, READERS - 1)
    assert await counter(db) == 1
    assert not any(t.done() for t in slow)
    db.gate.set()
    assert [(await t)[0][1] for t in slow] == [1] * (READERS - 1)


async def test_a_read_cancelled_mid_statement_leaves_no_snapshot_behind(pool):
    db = pool
    await bump(db, 1)
    # Every reader is inside a statement that began before the next commit.
    reads = [asyncio.create_task(db.fetchall(f"SELECT block(), ({COUNTER})"))
             for _ in range(READERS)]  # fmt: skip
    await entered(db, READERS)
    await bump(db, 2)  # readers never block the writer
    for t in reads:
        t.cancel()
    for t in reads:
        with pytest.raises(asyncio.CancelledError):
            await t
    db.gate.set()
    await wait_until(lambda: free_readers(db) == READERS, timeout_s=10, what="readers back")
    # Every connection now sees the latest commit: nothing kept the old snapshot.
    seen = await asyncio.gather(*(db.fetchall(f"SELECT block(), ({COUNTER})")
                                  for _ in range(READERS)))  # fmt: skip
    assert [rows[0][1] for rows in seen] == [2] * READERS


async def test_reads_cancelled_at_random_points_under_write_load_never_go_stale(pool):
    db = pool
    db.gate.set()
    rng = random.Random(20261130)
    committed = 0
    slow = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000) "
        f"SELECT x, ({COUNTER}) FROM c"
    )

    async def writer():
        nonlocal committed
        for n in range(1, 151):
            await bump(db, n)
            committed = n

    writing = asyncio.create_task(writer())
    cancelled = checked = 0
    # Rounds until the writer is done and enough reads were cancelled and checked (how
    # many rounds the writes take depends on the machine's speed).
    while not writing.done() or cancelled <= 50 or checked <= 20:
        reads = [asyncio.create_task(db.fetchall(slow if rng.random() < 0.5 else COUNTER))
                 for _ in range(rng.randint(1, READERS + 2))]  # fmt: skip
        for _ in range(rng.randrange(6)):
            await asyncio.sleep(0)  # let the reads get to a random point
        for t in reads:
            if rng.random() < 0.7 and t.cancel():
                cancelled += 1
        floor = committed
        assert await counter(db) >= floor
        checked += 1
        for t in reads:
            with suppress(asyncio.CancelledError):
                await t
    await writing
    assert cancelled > 50 and checked > 20
    await wait_until(lambda: free_readers(db) == READERS, timeout_s=10, what="readers back")
    seen = await asyncio.gather(*(db.fetchall(COUNTER) for _ in range(READERS * 3)))
    assert {int(rows[0]["n"]) for rows in seen} == {150}
