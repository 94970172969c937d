"""Applying a peer's batch: a replica gets identical rows, redelivery and any delivery
path or batching converge, a finished deployment never changes, last writer wins for
accounts, positions move with their rows and never back, and relayed entries are
verified on the way (while the writer is away)."""

from __future__ import annotations

import pytest
from storekit import (
    KEYRING,
    T0,
    Keyring,
    changelog_rows,
    inject,
    log_entries,
    phash,
    pull,
    replicated_rows,
    snapshot,
)

from storage.accounts import Accounts
from storage.apply import InvalidBatch, Range, apply_batch
from storage.changelog import CHANGELOG
from storage.entries import decode_body
from storage.records import LogInfo
from storage.tables import DEPLOYMENTS
from storage.trim import TrimPolicy, trim


async def logs_table(store):
    rows = await store.db.fetchall(
        "SELECT log_id, writer, head, held_from, bytes, verified FROM logs"
    )
    return sorted((LogInfo(*r) for r in rows), key=lambda i: i.log_id)


async def same_rows(a, b):
    assert await snapshot(a) == await snapshot(b)
    assert await replicated_rows(a) == await replicated_rows(b)


async def test_a_replica_gets_identical_rows(history, open_store):
    n1, ids = history.store, history.ids
    n2 = await open_store("n2")
    got = await pull(n1, n2, max_entries=10)
    assert got.refusals == [] and got.parked == 0
    assert got.entries == got.stored == n1.logs.own_head
    assert got.batches > 1

    await same_rows(n1, n2)
    assert {d.deployment_id: d.status for d in await n2.deployments()} == {
        ids.done: "success", ids.failed: "failed", ids.running: "installing",
    }  # fmt: skip
    assert await n2.pinned([ids.done]) == {ids.done}
    assert await n2.dropped_by(ids.failed) == {"n1"}
    # n2 holds n1's log as it is, and can serve it on, entry for entry.
    assert n2.logs.head(n1.log_id) == n1.logs.own_head
    assert await log_entries(n2, n1.log_id) == await log_entries(n1, n1.log_id)
    assert {r["state"] for r in await changelog_rows(n2, n1.log_id)} == {0}
    assert n2.logs.own_head == 0


async def test_redelivery_applies_nothing_and_changes_nothing(history, open_store):
    n1 = history.store
    n2 = await open_store("n2")
    await pull(n1, n2)
    before, rows, head = await snapshot(n2), await replicated_rows(n2), n2.logs.head(n1.log_id)
    everything = await log_entries(n1, n1.log_id)
    whole = [Range(n1.log_id, 0, head, False)]
    with n2.feed.subscribe() as sub:
        for verifier, direct in ((None, n1.log_id), (KEYRING, None)):
            report = await apply_batch(
                n2, "n1", whole, everything, verifier=verifier, direct_log=direct,
                max_clock_offset_ms=60_000,
            )  # fmt: skip
            assert (report.applied, report.stored, report.duplicates) == (0, 0, head)
        assert sub.drain() == []
    assert await snapshot(n2) == before
    assert await replicated_rows(n2) == rows
    assert n2.logs.head(n1.log_id) == head
    assert len(await changelog_rows(n2)) == head


async def test_overlapping_batches_from_two_senders_apply_each_entry_once(history, open_store):
    n1 = history.store
    n2, n3 = await open_store("n2"), await open_store("n3")
    await pull(n1, n2)
    # n3 asked both for n1's log from 0; n1 answers (0, 10], n2 answers (0, 25].
    a = await n1.read_log(n1.log_id, 0, max_entries=10, max_bytes=1 << 20)
    b = await n2.read_log(n1.log_id, 0, max_entries=25, max_bytes=1 << 20)
    first = await apply_batch(
        n3, "n1", [Range(a.log_id, a.after, a.last, False)], a.entries, verifier=KEYRING,
        direct_log=n1.log_id, max_clock_offset_ms=60_000,
    )  # fmt: skip
    second = await apply_batch(
        n3, "n2", [Range(b.log_id, b.after, b.last, False)], b.entries, verifier=KEYRING,
        direct_log=n2.log_id, max_clock_offset_ms=60_000,
    )  # fmt: skip
    assert (first.stored, second.duplicates, second.stored) == (10, 10, 15)
    assert n3.logs.head(n1.log_id) == 25
    await pull(n1, n3)
    await same_rows(n1, n3)


@pytest.mark.parametrize(
    "path",
    ["one-by-one", "batches-of-7", "relayed", "half-direct-half-relayed", "compacted"],
)
async def test_every_delivery_path_and_batching_converges(history, open_store, path):
    n1 = history.store
    n2, n3 = await open_store("n2"), await open_store("n3")
    if path == "one-by-one":
        await pull(n1, n3, max_entries=1)
    elif path == "batches-of-7":
        await pull(n1, n3, max_entries=7)
    elif path == "relayed":
        await pull(n1, n2, max_entries=13)
        await pull(n2, n3, max_entries=5)
    elif path == "half-direct-half-relayed":
        await pull(n1, n2)
        await pull(n1, n3, max_entries=9, max_batches=3)
        assert 0 < n3.logs.head(n1.log_id) < n1.logs.own_head
        await pull(n2, n3, max_entries=4)
    else:
        await trim(n1, [], TrimPolicy())
        got = await pull(n1, n3, max_entries=6)
        assert got.compacted_ranges == got.batches > 1
    await same_rows(n1, n3)
    assert n3.logs.head(n1.log_id) == n1.logs.own_head


@pytest.mark.parametrize("first", ["n1", "n2"])
async def test_two_writers_converge_whichever_log_arrives_first(open_store, new_wall, first):
    n1 = await open_store("n1", wall=new_wall(T0 + 5))
    n2 = await open_store("n2", wall=new_wall(T0))
    n3 = await open_store("n3")
    a1, a2 = Accounts(n1), Accounts(n2)
    await a1.put_user("carol", password_hash=phash("1"), role="deployer", by=None)
    await a2.put_user("carol", password_hash=phash("2"), role="admin", by=None)
    await a2.put_role("admin", {"super_user": True, "operations": []}, by=None)
    await a1.put_role("admin", {"super_user": False, "operations": ["get_deployment"]}, by=None)
    order = [n1, n2] if first == "n1" else [n2, n1]
    for src in order:
        await pull(src, n3)
    await pull(n1, n2)
    await pull(n2, n1)
    assert await snapshot(n3) == await snapshot(n1) == await snapshot(n2)
    carol = await Accounts(n3).get_user("carol")
    assert (carol.origin, carol.password_hash) == ("n1", phash("1"))


async def test_a_finished_deployment_never_changes_on_a_replica(open_store, create):
    n1 = await open_store("n1")
    n2 = await open_store("n2")
    d = await create(n1)
    done, _ = await n1.write_deployment(d.deployment_id, {"status": "success"})
    await pull(n1, n2)
    assert await n2.get_deployment(d.deployment_id) == done
    # The writer (buggy or hostile) logs newer versions that move it back, fail it and
    # rewrite who ran it: each is quarantined, the row stays as it finished.
    data = DEPLOYMENTS.data(await n1.get_row(DEPLOYMENTS, (d.deployment_id,)))
    for change in ({"status": "activating"}, {"status": "failed"}, {"user": "mallory"}):
        await inject(n1, "deployments", d.deployment_id, {**data, **change})
    got = await pull(n1, n2)
    assert [r.quarantined for r in got.refusals] == [True, True, True]
    assert all("never changes" in r.reason for r in got.refusals)
    assert await n2.get_deployment(d.deployment_id) == done
    assert n2.logs.head(n1.log_id) == n1.logs.own_head == 5


async def test_an_older_write_arriving_later_through_another_log_is_kept_in_the_log_only(
    open_store, create, tmp_path
):
    old = await open_store("n1")
    n2, n3 = await open_store("n2"), await open_store("n3")
    d = await create(old)
    await old.write_deployment(d.deployment_id, {"status": "installing"})
    await pull(old, n2)
    # n1 is rebuilt from an empty disk: a new log, which recovers its rows from n2.
    await old.close()
    rebuilt = await open_store("n1", path=tmp_path / "rebuilt.sqlite")
    assert rebuilt.log_id != old.log_id
    await pull(n2, rebuilt)
    done, _ = await rebuilt.write_deployment(d.deployment_id, {"status": "success"})
    # n3 gets the new log first, then the old one.
    await pull(rebuilt, n3, logs={rebuilt.log_id})
    late = await pull(n2, n3, logs={old.log_id})
    assert (late.stored, late.applied, late.refusals) == (2, 0, [])
    assert await n3.get_deployment(d.deployment_id) == done
    assert [r["oseq"] for r in await changelog_rows(n3, old.log_id)] == [1, 2]


@pytest.mark.parametrize(
    ("n1_ms", "n2_ms", "winner"),
    [(5_000, 1_000, "n1"), (1_000, 5_000, "n2"), (3_000, 3_000, "n2")],
    ids=["n1-later", "n2-later", "tie-broken-by-name"],
)
async def test_users_roles_and_members_are_last_writer_wins(
    open_store, new_wall, n1_ms, n2_ms, winner
):
    n1 = await open_store("n1", wall=new_wall(T0 + n1_ms))
    n2 = await open_store("n2", wall=new_wall(T0 + n2_ms))
    written = {}
    for store in (n1, n2):
        a = Accounts(store)
        written[store.node] = (
            await a.put_user("alice", password_hash=phash(store.node), role="r", by="root"),
            await a.put_role("r", {"super_user": store.node == "n1", "operations": []}, by=None),
            await a.put_member("n9", f"wss://{store.node}.example:9933", by=None),
        )
    if n1_ms == n2_ms:
        assert written["n1"][0].version == written["n2"][0].version
    await pull(n1, n2)
    await pull(n2, n1)
    for store in (n1, n2):
        a = Accounts(store)
        got = (await a.get_user("alice"), await a.get_role("r"), await a.get_member("n9"))
        assert got == written[winner]
    # And the winner stays put when anything is delivered again, relayed or not.
    n3 = await open_store("n3")
    await pull(n1, n3)
    await pull(n2, n3)
    assert await snapshot(n3) == await snapshot(n1) == await snapshot(n2)


async def test_a_later_delete_wins_over_an_earlier_update_elsewhere(open_store, new_wall):
    w1, w2 = new_wall(), new_wall()
    n1, n2 = await open_store("n1", wall=w1), await open_store("n2", wall=w2)
    a1, a2 = Accounts(n1), Accounts(n2)
    await a1.put_user("carol", password_hash=phash("h"), role="r", by=None)
    await pull(n1, n2)
    w2.advance(10)
    await a2.put_user("carol", password_hash=phash("h2"), role="r", by=None)
    w1.advance(20)
    assert await a1.delete_user("carol", by=None) is True
    await pull(n1, n2)
    await pull(n2, n1)
    for accounts in (a1, a2):
        assert await accounts.get_user("carol") is None
        assert "carol" not in {u.username for u in await accounts.list_users()}

    # Re-adding after the delete (later still) brings the user back everywhere.
    w2.advance(100)
    await a2.put_user("carol", password_hash=phash("h3"), role="r", by=None)
    await pull(n2, n1)
    assert (await a1.get_user("carol")).password_hash == phash("h3")


async def test_positions_are_stored_with_their_batch_and_never_move_back(history, open_store):
    n1 = history.store
    n2 = await open_store("n2")
    assert n2.logs.head(n1.log_id) == 0
    await pull(n1, n2, max_entries=10, max_batches=1)
    assert n2.logs.head(n1.log_id) == 10
    assert await logs_table(n2) == sorted(n2.logs.all(), key=lambda i: i.log_id)
    await pull(n1, n2)
    head = n1.logs.own_head
    assert n2.logs.head(n1.log_id) == head
    # An old batch delivered again changes nothing and does not move the position back.
    old = await n1.read_log(n1.log_id, 0, max_entries=3, max_bytes=1 << 20)
    report = await apply_batch(
        n2, "n1", [Range(n1.log_id, 0, old.last, False)], old.entries, verifier=None,
        direct_log=n1.log_id, max_clock_offset_ms=60_000,
    )  # fmt: skip
    assert report.duplicates == 3
    assert n2.logs.head(n1.log_id) == head
    assert await logs_table(n2) == sorted(n2.logs.all(), key=lambda i: i.log_id)
    await n2.close()
    reopened = await open_store("n2")
    assert reopened.logs.head(n1.log_id) == head
    assert reopened.logs.own == n2.logs.own


async def test_a_batch_that_fails_midway_leaves_rows_and_positions_as_they_were(
    history, open_store, monkeypatch
):
    n1 = history.store
    n2 = await open_store("n2")
    await pull(n1, n2, max_entries=5, max_batches=1)
    rows, table, before = await replicated_rows(n2), await logs_table(n2), n2.logs.all()
    calls = 0
    real_audit = n2.audit

    async def failing_audit(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("disk on fire")
        await real_audit(*args, **kwargs)

    monkeypatch.setattr(n2, "audit", failing_audit)
    with n2.feed.subscribe() as sub, pytest.raises(RuntimeError):
        await pull(n1, n2, max_entries=20)
    assert sub.drain() == []
    assert calls == 4
    assert await replicated_rows(n2) == rows
    assert await logs_table(n2) == table
    assert n2.logs.all() == before
    assert len(await changelog_rows(n2)) == 5
    monkeypatch.undo()
    await pull(n1, n2)
    await same_rows(n1, n2)


def _entries_of(chunk):
    return list(chunk.entries)


@pytest.mark.parametrize(
    "case",
    [
        "outside-range",
        "out-of-order",
        "dense-missing-entry",
        "log-twice",
        "ends-before-start",
        "malformed-log-id",
    ],
)
async def test_a_batch_of_the_wrong_shape_is_refused_whole(history, open_store, case):
    n1 = history.store
    n2 = await open_store("n2")
    chunk = await n1.read_log(n1.log_id, 0, max_entries=6, max_bytes=1 << 20)
    entries = _entries_of(chunk)
    ranges = [Range(n1.log_id, 0, 6, False)]
    if case == "outside-range":
        ranges = [Range(n1.log_id, 0, 5, False)]
    elif case == "out-of-order":
        entries[2], entries[3] = entries[3], entries[2]
    elif case == "dense-missing-entry":
        del entries[4]
    elif case == "log-twice":
        ranges = [Range(n1.log_id, 0, 6, False), Range(n1.log_id, 0, 6, True)]
    elif case == "ends-before-start":
        ranges = [Range(n1.log_id, 6, 0, True)]
        entries = []
    else:
        ranges = [Range(n1.log_id, 0, 6, False), Range("../etc", 0, 10**9, True)]
    with pytest.raises(InvalidBatch):
        await apply_batch(
            n2, "n1", ranges, entries, verifier=KEYRING, direct_log=n1.log_id,
            max_clock_offset_ms=60_000,
        )  # fmt: skip
    assert n2.logs.head(n1.log_id) == 0
    assert await changelog_rows(n2) == []
    assert await n2.deployments() == []


async def test_a_range_past_the_receivers_position_is_a_gap_and_other_logs_still_apply(
    history, open_store
):
    n1 = history.store
    n2, n3 = await open_store("n2"), await open_store("n3")
    await Accounts(n2).put_member("n2", "wss://10.0.0.2:9933", by=None)
    await pull(n1, n2)
    later = await n2.read_log(n1.log_id, 5, max_entries=5, max_bytes=1 << 20)
    own = await n2.read_log(n2.log_id, 0, max_entries=5, max_bytes=1 << 20)
    report = await apply_batch(
        n3, "n2",
        [Range(n1.log_id, 5, later.last, False), Range(n2.log_id, 0, own.last, False)],
        [*later.entries, *own.entries], verifier=KEYRING, direct_log=n2.log_id,
        max_clock_offset_ms=60_000,
    )  # fmt: skip
    assert report.gaps == [n1.log_id]
    assert n3.logs.head(n1.log_id) == 0
    assert n3.logs.head(n2.log_id) == 1
    assert [m.name for m in await Accounts(n3).list_members()] == ["n2"]
    assert await n3.deployments() == []


async def test_changes_reach_a_third_node_through_a_relay_while_the_writer_is_away(
    history, open_store
):
    n1 = history.store
    n2, n3 = await open_store("n2"), await open_store("n3")
    await pull(n1, n2)
    await Accounts(n2).put_user("dave", password_hash=phash("d"), role="r", by="alice")
    expected = await replicated_rows(n1)
    await n1.close()

    keyring = Keyring(["n1", "n2"])
    got = await pull(n2, n3, verifier=keyring)
    assert got.refusals == []
    # n1's entries came from n2: each was verified as n1's; n2's own came over its session.
    assert keyring.checked == {"n1": n1.logs.own_head}
    rows = await replicated_rows(n3)
    assert {t: [r for r in rs if r["origin"] == "n1"] for t, rs in rows.items()} == expected
    assert (await Accounts(n3).get_user("dave")).origin == "n2"
    # Nothing more to move, and asking again moves nothing.
    again = await pull(n2, n3, verifier=keyring)
    assert (again.batches, again.entries) == (0, 0)

    # Not over a direct session: n2's own entries are verified too.
    n4 = await open_store("n4")
    strict = Keyring(["n1", "n2"])
    await pull(n2, n4, verifier=strict, direct=False)
    assert strict.checked == {"n1": n1.logs.own_head, "n2": 1}
    assert await replicated_rows(n4) == rows


async def test_a_relay_without_the_writers_key_delivers_nothing_of_it(history, open_store):
    n1 = history.store
    n2, n3 = await open_store("n2"), await open_store("n3")
    await pull(n1, n2)
    got = await pull(n2, n3, verifier=Keyring(["n2"]))
    assert [(r.log_id, r.oseq, r.quarantined) for r in got.refusals] == [(n1.log_id, 1, False)]
    assert "unknown key k-n1" in got.refusals[0].reason
    assert n3.logs.head(n1.log_id) == 0
    assert await n3.deployments() == []


async def test_applied_changes_are_announced_as_remote_after_commit(history, open_store):
    n1, ids = history.store, history.ids
    n2 = await open_store("n2")
    with n2.feed.subscribe(lambda n: not n2.db._writer.in_transaction) as sub:
        got = await pull(n1, n2, max_entries=1000)
        notices = sub.drain()
    assert got.batches == 1
    assert notices[-1].tbl == CHANGELOG
    data = [n for n in notices if n.tbl != CHANGELOG]
    assert all(n.remote for n in data)
    done = [n for n in data if n.tbl == "deployments" and n.key == ids.done]
    assert done[-1].rows == (await n2.get_deployment(ids.done),)
    results = [n for n in data if n.tbl == "node_results"]
    assert {n.key for n in results} == {ids.done, ids.failed}
    events = [n for n in data if n.tbl == "deployment_events"]
    assert sum(len(n.rows) for n in events) == 4 + 1 + 230 + 1


async def test_a_replicas_next_write_orders_after_what_it_applied(open_store, new_wall):
    ahead = await open_store("n1", wall=new_wall(T0 + 30_000))
    behind = await open_store("n2", wall=new_wall(T0))
    u = await Accounts(ahead).put_user("erin", password_hash=phash("1"), role="r", by=None)
    await pull(ahead, behind)
    mine = await Accounts(behind).put_user("erin", password_hash=phash("2"), role="r", by=None)
    assert mine.version > u.version
    await pull(behind, ahead)
    assert (await Accounts(ahead).get_user("erin")).password_hash == phash("2")


async def test_the_audit_log_reads_the_same_on_every_node(history, open_store, new_wall):
    n1, ids = history.store, history.ids
    n2 = await open_store("n2", wall=new_wall(T0 + 100_000_000))
    await pull(n1, n2)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seq"} for r in rows]

    for table, key in (("deployments", ids.done), ("users", None), ("pins", None)):
        mine = await n1.read_audit_log(table=table, key=key, limit=1000)
        assert mine
        assert strip(await n2.read_audit_log(table=table, key=key, limit=1000)) == strip(mine)
    # Each line names the writer's node and when it wrote (not when it arrived).
    [line] = await n2.read_audit_log(table="payload_drops", limit=10)
    [e] = [x for x in map(decode_body, [y.body for y in await log_entries(n1, n1.log_id)])
           if x.tbl == "payload_drops"]  # fmt: skip
    assert (line["node"], line["user"], line["key"]) == ("n1", "admin", f"{ids.failed}/n1")
    assert line["timestamp"] <= e.t < T0 + 100_000_000


async def test_a_remote_change_is_announced_under_the_same_key_as_the_writers_own(
    open_store, create
):
    n1, n2 = await open_store("n1"), await open_store("n2")
    with n1.feed.subscribe(lambda n: n.tbl != CHANGELOG) as local:
        d = await create(n1)
        await n1.write_deployment(d.deployment_id, {"status": "success"}, [("finished", {})])
        await n1.put_result(d.deployment_id, status="active")
        await n1.set_pin(d.deployment_id, True, user="alice")
        await n1.mark_payload_dropped(d.deployment_id, user="alice")
        await n1.put_component("web", deployment_id=d.deployment_id)
        await Accounts(n1).put_user("eve", password_hash=phash("e"), role="r", by=None)
        written = [(n.tbl, n.key) for n in local.drain()]
    with n2.feed.subscribe(lambda n: n.tbl != CHANGELOG) as remote:
        await pull(n1, n2, max_entries=1)
        applied = [(n.tbl, n.key) for n in remote.drain()]
    assert applied == written
    assert ("payload_drops", d.deployment_id) in applied
