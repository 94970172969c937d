"""The change logs: one log id per database and writer, what a node holds of every log
(head, held_from), compacted catch-up from the rows once entries are trimmed, trimming
by members' positions, age and size, and re-signing rows written without a key."""

from __future__ import annotations

from storekit import (
    KEYRING,
    changelog_rows,
    log_entries,
    phash,
    pull,
    replicated_rows,
    snapshot,
)

from storage.accounts import Accounts
from storage.entries import UNSIGNED, decode_body, is_log_id, log_writer
from storage.events import MAX_EVENTS
from storage.trim import TrimPolicy, record_positions, trim

DAY_MS = 86_400_000


async def same_rows(a, b):
    assert await snapshot(a) == await snapshot(b)
    assert await replicated_rows(a) == await replicated_rows(b)


def info(store, log_id):
    i = store.logs.get(log_id)
    return None if i is None else (i.head, i.held_from)


# -- log identity --------------------------------------------------------------------------


async def test_a_database_gets_its_log_id_once(open_store):
    n1 = await open_store("n1")
    assert is_log_id(n1.log_id) and log_writer(n1.log_id) == "n1"
    assert info(n1, n1.log_id) == (0, 1)
    await Accounts(n1).put_member("n1", "wss://10.0.0.1:9933", by=None)
    log_id = n1.log_id
    await n1.close()
    again = await open_store("n1")
    assert again.log_id == log_id
    assert info(again, log_id) == (1, 1)
    assert await again.get_meta("log_id") == log_id


async def test_a_node_rebuilt_from_an_empty_disk_starts_a_new_log(open_store, tmp_path):
    old = await open_store("n1")
    await Accounts(old).put_member("n1", "wss://10.0.0.1:9933", by=None)
    await old.close()
    rebuilt = await open_store("n1", path=tmp_path / "rebuilt" / "cairn.sqlite")
    assert rebuilt.log_id != old.log_id and log_writer(rebuilt.log_id) == "n1"
    assert rebuilt.logs.positions() == {rebuilt.log_id: 0}


async def test_a_database_opened_under_another_name_writes_a_new_log(open_store, create, tmp_path):
    n1 = await open_store("n1", path=tmp_path / "data.sqlite")
    d = await create(n1)
    await n1.write_deployment(d.deployment_id, {"status": "success"})
    old_log = n1.log_id
    served = await log_entries(n1, old_log)
    await n1.close()

    renamed = await open_store("n9", path=tmp_path / "data.sqlite")
    assert renamed.log_id != old_log and log_writer(renamed.log_id) == "n9"
    # The old log is still held (and served) as it was; new writes go to the new log.
    assert info(renamed, old_log) == (2, 1)
    assert await log_entries(renamed, old_log) == served
    await Accounts(renamed).put_member("n9", "wss://10.0.0.9:9933", by=None)
    assert info(renamed, renamed.log_id) == (1, 1)
    [e] = await log_entries(renamed, renamed.log_id)
    assert (e.writer, e.key_id, decode_body(e.body).writer) == ("n9", "k-n9", "n9")
    # What applies to this node is recomputed for its new name (n1's success does:
    # it is replicated).
    assert set(await renamed.desired_releases()) == {"web"}


# -- dense and compacted catch-up ------------------------------------------------------------


async def two_logs(history, open_store):
    """n1 holds its own history and n2's log (n2's writes, pulled into n1)."""
    n1 = history.store
    n2 = await open_store("n2")
    await pull(n1, n2)
    a2 = Accounts(n2)
    await a2.put_user("alice", password_hash=phash("from n2"), role="deployer", by="n2")
    await a2.put_member("n2", "wss://10.0.0.22:9933", by="admin")
    await n2.put_result(history.ids.done, status="active")
    await n2.set_pin(history.ids.done, False, user="bob")
    await pull(n2, n1)
    return n1, n2


async def test_a_dense_replica_holds_every_entry_from_the_first(history, open_store):
    n1, n2 = await two_logs(history, open_store)
    assert info(n1, n2.log_id) == (4, 1)
    assert info(n2, n1.log_id) == (n1.logs.own_head, 1)
    bytes_held = sum(len(e.body) for e in await log_entries(n1, n1.log_id))
    assert n2.logs.get(n1.log_id).bytes == bytes_held


async def test_a_trimmed_log_is_served_compacted_and_a_new_node_gets_every_row(history, open_store):
    n1, n2 = await two_logs(history, open_store)
    history_entries = n1.logs.own_head + n1.logs.head(n2.log_id)
    report = await trim(n1, [], TrimPolicy())
    assert report.by_members == history_entries and report.remaining == 0
    assert await changelog_rows(n1) == []
    assert info(n1, n1.log_id) == (n1.logs.own_head, n1.logs.own_head + 1)
    assert info(n1, n2.log_id) == (4, 5)

    n3 = await open_store("n3")
    got = await pull(n1, n3, max_entries=8)
    assert got.refusals == [] and got.compacted_ranges == got.ranges > got.batches > 1
    # Only the entries behind current rows travel: fewer than the history had.
    assert got.entries < history_entries
    await same_rows(n1, n3)
    assert await snapshot(n3) == await snapshot(n2)
    ids = history.ids
    assert len((await snapshot(n3)).events[ids.failed]) == MAX_EVENTS
    assert (await Accounts(n3).get_user("alice")).origin == "n2"
    # n3 holds both logs up to their heads, none of their entries: it serves rows too.
    assert info(n3, n1.log_id) == (n1.logs.own_head, n1.logs.own_head + 1)
    assert info(n3, n2.log_id) == (4, 5)
    assert await changelog_rows(n3) == []

    # New writes follow the log densely, from the compacted position on.
    await Accounts(n1).put_member("n3", "wss://10.0.0.3:9933", by="admin")
    more = await pull(n1, n3)
    assert (more.entries, more.compacted_ranges) == (1, 0)
    assert info(n3, n1.log_id) == (n1.logs.own_head, n1.logs.own_head)
    # A fourth node catching up from n3 gets the same: compacted, then dense.
    n4 = await open_store("n4")
    await pull(n3, n4, max_entries=5)
    await same_rows(n1, n4)


async def test_a_compacted_catch_up_broken_off_resumes_from_the_last_batch(history, open_store):
    n1, _ = await two_logs(history, open_store)
    await trim(n1, [], TrimPolicy())
    n3 = await open_store("n3")
    await pull(n1, n3, max_entries=3, max_batches=2)
    positions = n3.logs.positions()
    assert 0 < positions[n1.log_id] < n1.logs.own_head
    await n3.close()
    n3 = await open_store("n3")
    assert n3.logs.positions() == positions
    await pull(n1, n3, max_entries=3)
    await same_rows(n1, n3)


async def test_a_log_whose_compacted_part_was_all_overwritten_still_catches_up(open_store):
    n1, n2, n3 = await open_store("n1"), await open_store("n2"), await open_store("n3")
    await Accounts(n1).put_user("alice", password_hash=phash("1"), role="r", by=None)
    await trim(n1, [], TrimPolicy())
    await pull(n1, n2)
    await Accounts(n2).put_user("alice", password_hash=phash("2"), role="r", by=None)
    await pull(n2, n1)
    await Accounts(n1).put_user("bob", password_hash=phash("b"), role="r", by=None)
    # n1's log: entry 1 was trimmed and its row overwritten since; entry 2 is held.
    assert info(n1, n1.log_id) == (2, 2)
    got = await pull(n1, n3)
    assert got.gaps == []
    assert n3.logs.head(n1.log_id) == 2
    assert {u.username for u in await Accounts(n3).list_users()} == {"alice", "bob"}
    await same_rows(n1, n3)


# -- trimming ------------------------------------------------------------------------------


async def ten_entries(store):
    accounts = Accounts(store)
    for i in range(10):
        await accounts.put_member(f"m{i}", f"wss://m{i}.example:9933", by=None)


async def test_trimming_waits_for_the_slowest_member(open_store):
    n1 = await open_store("n1")
    await ten_entries(n1)
    log_id = n1.log_id
    await record_positions(n1, "n2", {log_id: 4, "n5/" + "0" * 32: 99})
    await record_positions(n1, "n3", {log_id: 7})
    report = await trim(n1, ["n1", "n2", "n3"], TrimPolicy())
    assert (report.by_members, report.by_age, report.by_size, report.remaining) == (4, 0, 0, 6)
    assert report.held_back_by == {log_id: ("n2", 4)}
    assert [r["oseq"] for r in await changelog_rows(n1)] == list(range(5, 11))
    assert info(n1, log_id) == (10, 5)
    # A position never moves back; a member that reports more lets trimming go on.
    await record_positions(n1, "n2", {log_id: 2})
    assert (await trim(n1, ["n2", "n3"], TrimPolicy())).by_members == 0
    await record_positions(n1, "n2", {log_id: 9})
    report = await trim(n1, ["n2", "n3"], TrimPolicy())
    assert (report.by_members, report.held_back_by) == (3, {log_id: ("n3", 7)})
    # A member that never reported holds everything left.
    report = await trim(n1, ["n2", "n3", "n4"], TrimPolicy())
    assert (report.total, report.held_back_by) == (0, {log_id: ("n4", 0)})
    # Below held_from the log is served compacted, above it densely.
    low = await n1.read_log(log_id, 0, max_entries=100, max_bytes=1 << 20)
    high = await n1.read_log(log_id, 7, max_entries=100, max_bytes=1 << 20)
    assert (low.compacted, low.last) == (True, 7)
    assert [e.oseq for e in low.entries] == [1, 2, 3, 4, 5, 6, 7]
    assert (high.compacted, high.last) == (False, 10)


async def test_a_log_is_not_held_back_by_its_own_writer(open_store):
    n1, n2 = await open_store("n1"), await open_store("n2")
    await ten_entries(n2)
    await pull(n2, n1)
    await record_positions(n1, "n3", {n2.log_id: 10})
    report = await trim(n1, ["n2", "n3"], TrimPolicy())
    assert report.by_members == 10 and report.held_back_by == {}
    assert info(n1, n2.log_id) == (10, 11)


async def test_old_entries_go_even_when_a_member_never_returns(open_store, new_wall):
    wall = new_wall()
    n1 = await open_store("n1", wall=wall)
    await ten_entries(n1)
    wall.advance(8 * DAY_MS)
    await Accounts(n1).put_member("late", "wss://late.example:9933", by=None)
    report = await trim(n1, ["n2"], TrimPolicy(max_age_s=7 * 86_400))
    assert (report.by_members, report.by_age, report.remaining) == (0, 10, 1)
    assert info(n1, n1.log_id) == (11, 11)
    # The member that was away catches up from the rows.
    n2 = await open_store("n2", wall=wall)
    got = await pull(n1, n2)
    assert got.compacted_ranges == 1 and got.parked == 0
    await same_rows(n1, n2)


async def test_the_log_is_bounded_in_entries_oldest_first(open_store):
    n1, n2 = await open_store("n1"), await open_store("n2")
    await ten_entries(n2)
    await pull(n2, n1)
    await ten_entries(n1)
    report = await trim(n1, ["n3"], TrimPolicy(max_entries=5))
    assert (report.by_members, report.by_size, report.remaining) == (0, 15, 5)
    assert [r["oseq"] for r in await changelog_rows(n1, n1.log_id)] == [6, 7, 8, 9, 10]
    assert await changelog_rows(n1, n2.log_id) == []
    assert info(n1, n1.log_id) == (10, 6) and info(n1, n2.log_id) == (10, 11)
    n3 = await open_store("n3")
    await pull(n1, n3)
    await same_rows(n1, n3)


async def test_the_audit_log_keeps_its_newest_lines(open_store):
    n1 = await open_store("n1")
    await ten_entries(n1)
    everything = await n1.read_audit_log(table="members", limit=100)
    report = await trim(n1, ["n2"], TrimPolicy(audit_max_entries=4))
    assert report.audit == 6
    assert await n1.read_audit_log(table="members", limit=100) == everything[:4]
    assert (await trim(n1, ["n2"], TrimPolicy(audit_max_entries=4))).audit == 0


# -- re-signing ------------------------------------------------------------------------------


async def test_rows_written_without_a_key_are_re_signed_once_there_is_one(
    open_store, create, tmp_path
):
    path = tmp_path / "n1.sqlite"
    n1 = await open_store("n1", path=path, signer=UNSIGNED)
    assert await n1.resign() == 0
    d = await create(n1)
    await n1.write_deployment(
        d.deployment_id, {"status": "success"},
        [("install", {"stream": "stdout", "line": f"l{i}"}) for i in range(250)],
    )  # fmt: skip
    await n1.write_deployment(d.deployment_id, events=[("finished", {"status": "success"})])
    await Accounts(n1).put_user("admin", password_hash=phash("a"), role="r", by=None)
    await Accounts(n1).put_user("admin", password_hash=phash("b"), role="r", by=None)
    await n1.put_result(d.deployment_id, status="active")
    # Over n1's own session its unsigned entries are taken; relayed, they are not.
    n4, n5 = await open_store("n4"), await open_store("n5")
    assert (await pull(n1, n4)).refusals == []
    refused = await pull(n4, n5)
    assert [r.reason for r in refused.refused] == ["signature: unknown key unsigned"]
    head = n1.logs.own_head
    versions = {t: [r["version"] for r in rows] for t, rows in (await replicated_rows(n1)).items()}
    await n1.close()

    n1 = await open_store("n1", path=path)
    assert await n1.resign() == 5
    assert await n1.resign() == 0
    assert n1.logs.own_head == head + 5
    rows = await replicated_rows(n1)
    assert {r["key_id"] for rs in rows.values() for r in rs} == {"k-n1"}
    assert {t: [r["version"] for r in rs] for t, rs in rows.items()} == versions
    # The unsigned entries left the log: that part is served from the (signed) rows.
    assert {r["oseq"] for r in await changelog_rows(n1)} == set(range(head + 1, head + 6))
    assert info(n1, n1.log_id) == (head + 5, head + 1)

    # A node joining now gets only signed entries, which it can relay to the next one.
    n2, n3 = await open_store("n2"), await open_store("n3")
    assert (await pull(n1, n2)).refusals == []
    assert await replicated_rows(n2) == rows
    assert (await pull(n2, n3, verifier=KEYRING)).refusals == []
    await same_rows(n1, n3)
    assert len((await snapshot(n3)).events[d.deployment_id]) == MAX_EVENTS
    # A node that took the unsigned entries before keeps the signed rows of the same writes.
    assert (await pull(n1, n4)).refusals == []
    assert await replicated_rows(n4) == rows
