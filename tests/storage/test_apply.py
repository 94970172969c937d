"""Applying a peer's changes: identical rows, idempotent redelivery, order-independent
convergence, monotonic terminal status, last-writer-wins accounts, cursors committed with
their batch, transitive propagation, and whole-batch rejection of anything malformed."""

from __future__ import annotations

import dataclasses
import random

import pytest

from storage.accounts import Accounts
from storage.apply import InvalidChange, apply_changes
from storage.changelog import CHANGELOG
from storage.errors import StorageError
from storage.hlc import HybridClock
from storage.records import Change, Deployment, DeploymentStatus
from storage.store import Store


@dataclasses.dataclass
class History:
    store: Store
    done: Deployment  # success, then pinned
    failed: Deployment
    running: Deployment  # still installing


async def _build_history(path, fields, new_wall):
    """A realistic change log on n1: three deploys with events and results, a payload
    drop, and accounts with updates and tombstones."""
    wall = new_wall()
    store = await Store.open(path, node="n1", clock=HybridClock(wall))
    try:
        return await _write_history(store, wall, fields)
    finally:
        await store.close()


async def _write_history(store, wall, fields):
    async def create(store, **overrides):
        return await store.create_deployment(fields(**overrides))

    accounts = Accounts(store)
    await accounts.put_member("n1", "wss://10.0.0.1:9933", by="admin")
    await accounts.put_member("n2", "wss://10.0.0.2:9933", by="admin")
    await accounts.put_member("n3", "wss://10.0.0.3:9933", by="admin")
    await accounts.delete_member("n3", by="admin")
    await accounts.put_role("super_user", {"super_user": True}, by=None)
    await accounts.put_role("deployer", {"operations": ["deploy_component"]}, by="admin")
    await accounts.put_user("admin", password_hash="scrypt$a", role="super_user", by=None)
    await accounts.put_user("alice", password_hash="scrypt$b", role="deployer", by="admin")
    await accounts.put_user("bob", password_hash="scrypt$c", role="deployer", by="admin")
    await accounts.put_user("alice", password_hash="scrypt$b2", role="deployer", by="alice")
    await accounts.delete_user("bob", by="admin")

    done = await create(store, project="web", user="alice")
    for status in ("extracting", "installing", "staging", "activating"):
        wall.advance(100)
        await store.write_deployment(
            done.deployment_id, {"status": status, "phase": status},
            [("phase", {"phase": status, "status": "start"})],
        )  # fmt: skip
        await store.put_result(done.deployment_id, status="staged", phase=status)
    await store.put_result(done.deployment_id, status="active", completed_at=wall.ms)
    done, _ = await store.write_deployment(
        done.deployment_id, {"status": "success", "completed_at": wall.advance(50)},
        [("finished", {"status": "success"})],
    )  # fmt: skip
    done, _ = await store.write_deployment(done.deployment_id, {"pinned": True})

    wall.advance(1000)
    failed = await create(store, project="api", user="admin", started_at=wall.ms)
    await store.write_deployment(
        failed.deployment_id, events=[("install", {"stream": "stderr", "line": f"e{i}"})
                                      for i in range(230)],
    )  # fmt: skip
    await store.put_result(failed.deployment_id, status="failed", error={"code": "install_failed"})
    failed, _ = await store.write_deployment(
        failed.deployment_id,
        {"status": "failed", "error": {"message": "exit 1", "code": "install_failed",
                                       "phase": "install"}},
        [("finished", {"status": "failed"})],
    )  # fmt: skip
    await store.mark_payload_dropped(failed.deployment_id, user="admin")

    wall.advance(1000)
    running = await create(store, project="web", started_at=wall.ms)
    running, _ = await store.write_deployment(running.deployment_id, {"status": "installing"})
    return done.deployment_id, failed.deployment_id, running.deployment_id, wall.ms


@pytest.fixture
async def history(template, copy_of, fields, new_wall, open_store):
    src, (done, failed, running, end_ms) = template(
        "history", lambda path: _build_history(path, fields, new_wall)
    )
    store = await open_store("n1", path=copy_of(src, "n1.sqlite"), wall=new_wall(end_ms))
    return History(
        store,
        await store.get_deployment(done),
        await store.get_deployment(failed),
        await store.get_deployment(running),
    )


async def empty(store, snapshot):
    snap = await snapshot(store)
    return not (snap.deployments or snap.users or snap.roles or snap.members)


def key(change):
    """What a change says, independent of which node's log it sits in."""
    return (change.tbl, change.key, change.version, change.origin, change.op, change.data)


async def test_a_replica_gets_identical_rows(history, open_store, all_changes, snapshot):
    n1 = history.store
    changes, last = await all_changes(n1)
    n2 = await open_store("n2")
    assert await apply_changes(n2, "n1", changes, last) == len(changes)
    assert await snapshot(n2) == await snapshot(n1)
    assert {d.deployment_id: d.status for d in await n2.deployments()} == {
        history.done.deployment_id: "success",
        history.failed.deployment_id: "failed",
        history.running.deployment_id: "installing",
    }
    replica = await n2.get_deployment(history.done.deployment_id)
    assert replica == history.done
    assert (replica.version, replica.origin, replica.pinned) == (history.done.version, "n1", True)


async def test_redelivery_applies_nothing_and_changes_nothing(
    history, open_store, all_changes, snapshot
):
    changes, last = await all_changes(history.store)
    n2 = await open_store("n2")
    await apply_changes(n2, "n1", changes, last)
    before, head = await snapshot(n2), await n2.head_seq()
    # Including the change whose events were partly truncated away on arrival.
    truncated = [c for c in changes if c.tbl == "deployment_events" and len(c.data) == 230]
    assert len(truncated) == 1
    redelivered = changes
    with n2.feed.subscribe() as sub:
        assert await apply_changes(n2, "n1", redelivered, last) == 0
        assert await apply_changes(n2, "n1", redelivered[::-1], last) == 0
        assert sub.drain() == []
    assert await snapshot(n2) == before
    assert await n2.head_seq() == head
    assert await n2.cursor("n1") == last


@pytest.mark.parametrize("order", ["reversed", "seed0", "seed1", "one-by-one"])
async def test_any_delivery_order_converges(history, open_store, all_changes, snapshot, order):
    changes, last = await all_changes(history.store)
    n2 = await open_store("n2")
    if order == "reversed":
        await apply_changes(n2, "n1", changes[::-1], last)
    elif order == "one-by-one":
        rng = random.Random(7)
        for change in rng.sample(changes, k=len(changes)) + rng.sample(changes, k=10):
            await apply_changes(n2, "n1", [change], change.seq)
    else:
        rng = random.Random(int(order[-1]))
        shuffled = changes + rng.sample(changes, k=len(changes) // 3)
        rng.shuffle(shuffled)
        half = len(shuffled) // 2
        await apply_changes(n2, "n1", shuffled[:half], 0)
        await apply_changes(n2, "n1", shuffled[half:], last)
    assert await snapshot(n2) == await snapshot(history.store)


async def test_a_terminal_deployment_never_goes_back_on_a_replica(history, open_store, all_changes):
    changes, _ = await all_changes(history.store)
    done_id = history.done.deployment_id
    rows = [c for c in changes if c.tbl == "deployments" and c.key == done_id]
    terminal = next(c for c in rows if c.data["status"] == "success")
    older = [c for c in rows if c.version < terminal.version]
    assert [c.data["status"] for c in older][:2] == ["pending", "extracting"]

    n2 = await open_store("n2")
    assert await apply_changes(n2, "n1", [terminal], 0) == 1
    for change in reversed(older):
        assert await apply_changes(n2, "n1", [change], 0) == 0
        assert (await n2.get_deployment(done_id)).status is DeploymentStatus.SUCCESS

    # Even a newer version with a non-terminal status (a buggy or hostile writer) cannot
    # undo it; a newer version that keeps the status (pinning) still applies.
    regress = dataclasses.replace(
        terminal, version=terminal.version + 10, data={**terminal.data, "status": "activating"}
    )
    assert await apply_changes(n2, "n1", [regress], 0) == 0
    other_terminal = dataclasses.replace(
        terminal, version=terminal.version + 11, data={**terminal.data, "status": "failed"}
    )
    assert await apply_changes(n2, "n1", [other_terminal], 0) == 0
    assert (await n2.get_deployment(done_id)).status is DeploymentStatus.SUCCESS
    pin = next(c for c in rows if c.data["pinned"])
    assert await apply_changes(n2, "n1", [pin], 0) == 1
    assert await n2.get_deployment(done_id) == history.done


@pytest.mark.parametrize(
    ("n1_ms", "n2_ms", "winner"),
    [(5_000, 1_000, "n1"), (1_000, 5_000, "n2"), (3_000, 3_000, "n2")],
    ids=["n1-later", "n2-later", "tie-broken-by-name"],
)
async def test_accounts_are_last_writer_wins_across_nodes(
    open_store, new_wall, pull, n1_ms, n2_ms, winner
):
    n1 = await open_store("n1", wall=new_wall(1_700_000_000_000 + n1_ms))
    n2 = await open_store("n2", wall=new_wall(1_700_000_000_000 + n2_ms))
    a1, a2 = Accounts(n1), Accounts(n2)
    u1 = await a1.put_user("alice", password_hash="from-n1", role="admin", by="root")
    u2 = await a2.put_user("alice", password_hash="from-n2", role="deployer", by="root")
    if n1_ms == n2_ms:
        assert u1.version == u2.version
    await pull(n1, n2)
    await pull(n2, n1)
    on1, on2 = await a1.get_user("alice"), await a2.get_user("alice")
    assert on1 == on2
    assert (on1.origin, on1.password_hash) == (winner, f"from-{winner}")
    # And the winner stays put when anything is redelivered.
    await apply_changes(n2, "n1", (await n1.changes_after(0))[0], 0)
    assert await a2.get_user("alice") == on1


async def test_a_later_delete_wins_over_an_earlier_update_elsewhere(open_store, new_wall, pull):
    w1, w2 = new_wall(), new_wall()
    n1, n2 = await open_store("n1", wall=w1), await open_store("n2", wall=w2)
    a1, a2 = Accounts(n1), Accounts(n2)
    await a1.put_user("carol", password_hash="h", role="r", by=None)
    await pull(n1, n2)
    w2.advance(10)
    await a2.put_user("carol", password_hash="h2", role="r", by=None)
    w1.advance(20)
    assert await a1.delete_user("carol", by=None) is True
    await pull(n1, n2)
    await pull(n2, n1)
    for accounts in (a1, a2):
        assert await accounts.get_user("carol") is None
        assert "carol" not in {u.username for u in await accounts.list_users()}

    # Re-adding after the delete (later still) brings the user back everywhere.
    w2.advance(100)
    await a2.put_user("carol", password_hash="h3", role="r", by=None)
    await pull(n2, n1)
    assert (await a1.get_user("carol")).password_hash == "h3"


async def test_the_peer_cursor_is_stored_with_the_batch_and_never_moves_back(
    history, open_store, all_changes
):
    changes, last = await all_changes(history.store)
    n2 = await open_store("n2")
    assert await n2.cursor("n1") == 0
    await apply_changes(n2, "n1", changes[:10], changes[9].seq)
    assert await n2.cursor("n1") == changes[9].seq
    await apply_changes(n2, "n1", changes[10:], last)
    assert await n2.cursor("n1") == last
    await apply_changes(n2, "n1", changes[:3], changes[2].seq)  # an old batch redelivered
    assert await n2.cursor("n1") == last
    await apply_changes(n2, "n3", [], 7)  # an empty batch still records progress
    assert await n2.cursors() == {"n1": last, "n3": 7}
    await n2.close()
    reopened = await open_store("n2")
    assert await reopened.cursor("n1") == last


async def test_applied_changes_enter_the_local_log_with_their_original_version_and_origin(
    history, open_store, all_changes
):
    changes, last = await all_changes(history.store)
    n2 = await open_store("n2")
    await apply_changes(n2, "n1", changes, last)
    relayed, _ = await all_changes(n2)
    assert [key(c) for c in relayed] == [key(c) for c in changes]
    assert [c.user for c in relayed] == [c.user for c in changes]


async def test_the_audit_log_reads_the_same_on_every_node(history, open_store, new_wall, pull):
    n2 = await open_store("n2", wall=new_wall(1_800_000_000_000))
    await pull(history.store, n2)
    done_id = history.done.deployment_id

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seq"} for r in rows]

    assert strip(await n2.read_audit_log(table="deployments", key=done_id)) == strip(
        await history.store.read_audit_log(table="deployments", key=done_id)
    )


async def test_changes_reach_a_third_node_through_a_relay_while_the_origin_is_down(
    history, open_store, pull, snapshot
):
    n1 = history.store
    n2, n3 = await open_store("n2"), await open_store("n3")
    await pull(n1, n2)
    expected = await snapshot(n1)
    await n1.close()
    await pull(n2, n3)
    assert await snapshot(n3) == expected
    assert (await n3.get_deployment(history.done.deployment_id)).origin == "n1"
    # n3 now has everything: pulling from n2 again brings nothing.
    assert await pull(n2, n3) == 0


async def test_skip_origin_leaves_out_the_receivers_own_writes_but_advances(
    history, open_store, pull, all_changes
):
    n1 = history.store
    n2 = await open_store("n2")
    await pull(n1, n2)
    n1_head = await n2.head_seq()
    await n2.put_result(history.done.deployment_id, status="active", completed_at=5)
    await Accounts(n2).put_user("dave", password_hash="h", role="deployer", by="alice")

    everything, head = await all_changes(n2)
    skipped, last = await n2.changes_after(0, skip_origin="n2")
    assert last == head == await n2.head_seq()
    assert [c.seq for c in skipped] == [c.seq for c in everything if c.origin != "n2"]
    assert len(skipped) == n1_head
    # A page made only of the receiver's own entries still moves the cursor past them.
    only_own, last = await n2.changes_after(n1_head, skip_origin="n2")
    assert (only_own, last) == ([], head)
    # n2's own writes go back to n1, and nothing of n1's comes back to it.
    n1_before = await n1.head_seq()
    assert await pull(n2, n1) == 2
    assert await n1.head_seq() == n1_before + 2
    assert await n1.cursor("n2") == head
    assert [r.node for r in await n1.results(history.done.deployment_id)] == ["n1", "n2"]
    assert (await Accounts(n1).get_user("dave")).origin == "n2"


async def test_applied_changes_are_announced_as_remote_after_commit(
    history, open_store, all_changes
):
    changes, last = await all_changes(history.store)
    n2 = await open_store("n2")
    with n2.feed.subscribe(lambda n: not n2.db._writer.in_transaction) as sub:
        await apply_changes(n2, "n1", changes, last)
        notices = sub.drain()
    assert len(notices) == len(changes) + 1
    assert notices[-1].tbl == CHANGELOG
    assert all(n.remote for n in notices[:-1])
    done = [n for n in notices if n.tbl == "deployments" and n.key == history.done.deployment_id]
    assert done[-1].rows == (history.done,)
    results = [n for n in notices if n.tbl == "node_results"]
    assert {n.key for n in results} == {history.done.deployment_id, history.failed.deployment_id}
    events = [n for n in notices if n.tbl == "deployment_events"]
    assert sum(len(n.rows) for n in events) == len(
        [e for c in changes if c.tbl == "deployment_events" for e in c.data]
    )


async def test_a_replicas_next_write_orders_after_what_it_applied(open_store, new_wall, pull):
    ahead = await open_store("n1", wall=new_wall(1_700_000_000_000 + 3_600_000))
    behind = await open_store("n2", wall=new_wall(1_700_000_000_000))
    u = await Accounts(ahead).put_user("erin", password_hash="h", role="r", by=None)
    await pull(ahead, behind)
    mine = await Accounts(behind).put_user("erin", password_hash="h2", role="r", by=None)
    assert mine.version > u.version
    await pull(behind, ahead)
    assert (await Accounts(ahead).get_user("erin")).password_hash == "h2"


# -- rejected batches ---------------------------------------------------------------


def _change(tbl, key, data, *, op="upsert", version=1 << 40, origin="n1"):
    return Change(seq=999, tbl=tbl, key=key, version=version, origin=origin, op=op,
                  data=data, user=None, t=0)  # fmt: skip


def _deployment_row(fields, **overrides):
    return {**fields(deployment_id="d-1"), "version": 1 << 40, "origin": "n1", **overrides}


def _without(row, column):
    return {k: v for k, v in row.items() if k != column}


BAD_TABLES = ["peer_cursors", "active_releases", "meta", "changelog", "blobs", "sqlite_master",
              "users; DROP TABLE users", ""]  # fmt: skip


def bad_changes(fields):
    row = _deployment_row(fields)
    result = {"deployment_id": "d-1", "node": "n1", "status": "staged", "phase": None,
              "error": None, "started_at": None, "completed_at": None, "late": False,
              "install_output": None}  # fmt: skip
    user = {"username": "eve", "password_hash": "h", "role": "r", "active": True,
            "deleted": False}  # fmt: skip
    event = {"seq": 1, "t": 5, "event": "warning", "data": {"message": "m"}}
    return {
        "deployment-not-an-upsert": _change("deployments", "d-1", row, op="delete"),
        "deployment-data-is-a-list": _change("deployments", "d-1", list(row.items())),
        "deployment-data-is-none": _change("deployments", "d-1", None),
        "deployment-missing-status": _change("deployments", "d-1", _without(row, "status")),
        "deployment-bad-status": _change("deployments", "d-1", {**row, "status": "done"}),
        "deployment-missing-started_at": _change("deployments", "d-1", _without(row, "started_at")),
        "deployment-missing-timeout": _change("deployments", "d-1", _without(row, "timeout_ms")),
        "deployment-key-mismatch": _change("deployments", "d-2", row),
        "deployment-missing-key": _change("deployments", "None", _without(row, "deployment_id")),
        "result-bad-status": _change("node_results", "d-1/n1", {**result, "status": "great"}),
        "result-key-mismatch": _change("node_results", "d-1/n2", result),
        "user-key-mismatch": _change("users", "mallory", user),
        "events-not-an-append": _change("deployment_events", "d-1", [event]),
        "events-data-not-a-list": _change("deployment_events", "d-1", event, op="append"),
        "event-missing-seq": _change(
            "deployment_events", "d-1", [_without(event, "seq")], op="append"
        ),
        "event-seq-zero": _change("deployment_events", "d-1", [{**event, "seq": 0}], op="append"),
        "event-data-not-a-dict": _change(
            "deployment_events", "d-1", [{**event, "data": "x"}], op="append"
        ),
        "event-is-not-a-mapping": _change("deployment_events", "d-1", ["warning"], op="append"),
    }


# Columns that are NOT NULL in SQL but that the row builders accept as None.
NOT_NULL_GAPS = {
    "deployment-missing-project": ("deployments", "d-1", "project"),
    "deployment-missing-expected_nodes": ("deployments", "d-1", "expected_nodes"),
    "user-missing-password_hash": ("users", "eve", "password_hash"),
    "payload-drop-missing-dropped_by": ("payload_drops", "d-1", "dropped_by"),
}


@pytest.fixture
async def valid(store, create, all_changes):
    """A short valid batch from n1 (a deploy, its events, a user) to wrap a bad change in."""
    d = await create(store)
    await store.write_deployment(d.deployment_id, events=[("warning", {"message": "m"})])
    await Accounts(store).put_user("admin", password_hash="h", role="super_user", by=None)
    changes, _ = await all_changes(store)
    return changes


async def assert_batch_rejected(n1_changes, bad, n2, snapshot):
    position = len(n1_changes) // 2
    batch = [*n1_changes[:position], bad, *n1_changes[position:]]
    with n2.feed.subscribe() as sub:
        with pytest.raises(InvalidChange):
            await apply_changes(n2, "n1", batch, 12345)
        assert sub.drain() == []
    assert await empty(n2, snapshot)
    assert await n2.head_seq() == 0
    assert await n2.cursor("n1") == 0


@pytest.mark.parametrize("table", BAD_TABLES)
async def test_a_change_to_a_table_that_is_not_replicated_rejects_the_whole_batch(
    store, valid, open_store, snapshot, table
):
    changes = valid
    n2 = await open_store("n2")
    await n2.set_meta("cluster_id", "c-1")
    bad = _change(table, "cluster_id", {"key": "cluster_id", "value": "evil", "seq": 0})
    await assert_batch_rejected(changes, bad, n2, snapshot)
    assert await n2.get_meta("cluster_id") == "c-1"
    # A valid batch afterwards goes through: the rejection left nothing half-open.
    await apply_changes(n2, "n1", changes, changes[-1].seq)
    assert await snapshot(n2) == await snapshot(store)


@pytest.mark.parametrize("case", sorted(bad_changes(lambda **kw: {})))
async def test_a_malformed_change_rejects_the_whole_batch(
    valid, open_store, snapshot, fields, case
):
    n2 = await open_store("n2")
    await assert_batch_rejected(valid, bad_changes(fields)[case], n2, snapshot)


@pytest.mark.parametrize("case", sorted(NOT_NULL_GAPS))
async def test_a_change_missing_a_required_column_is_an_invalid_change(
    valid, open_store, snapshot, fields, case
):
    tbl, key_, column = NOT_NULL_GAPS[case]
    rows = {
        "deployments": _deployment_row(fields),
        "users": {"username": "eve", "password_hash": "h", "role": "r", "active": True,
                  "deleted": False},
        "payload_drops": {"deployment_id": "d-1", "dropped_by": "n1", "dropped_at": 5},
    }  # fmt: skip
    n2 = await open_store("n2")
    bad = _change(tbl, key_, _without(rows[tbl], column))
    try:
        await assert_batch_rejected(valid, bad, n2, snapshot)
    except StorageError:
        # Whatever the error type, nothing of the batch may have been applied.
        assert await empty(n2, snapshot)
        assert await n2.cursor("n1") == 0
        raise


async def test_a_version_beyond_64_bits_is_rejected_and_the_node_stays_writable(
    open_store, new_wall
):
    n2 = await open_store("n2", wall=new_wall())
    user = {"username": "eve", "password_hash": "h", "role": "r", "active": True,
            "deleted": False}  # fmt: skip
    bad = _change("users", "eve", user, version=2**64)
    try:
        with pytest.raises(InvalidChange):
            await apply_changes(n2, "n1", [bad], 1)
    finally:
        assert await Accounts(n2).get_user("eve") is None
        assert await n2.cursor("n1") == 0
    mine = await Accounts(n2).put_user("frank", password_hash="h", role="r", by=None)
    assert mine.version < 2**63
