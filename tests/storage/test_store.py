"""The store's own writes: one signed entry per write in this node's log, the row keeping
that entry's envelope, forward-only deployments whose fixed fields never change, notices
after commit, the record's rules on every write, listing with filters and paging, and
local-only state."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json

import pytest
from storekit import KEYRING, T0, changelog_rows, log_entries, pull

from storage.changelog import CHANGELOG
from storage.entries import MAX_ENTRY_BYTES, decode_body, signing_message
from storage.errors import StorageError
from storage.hlc import HybridClock
from storage.listing import DeploymentFilter
from storage.records import TERMINAL, Deployment, DeploymentStatus, Event
from storage.store import InvalidRow, Store, TransitionError

FORWARD = [
    "pending", "extracting", "installing", "loading", "staging", "replicating",
    "activating", "restarting",
]  # fmt: skip
TERMINALS = sorted(str(s) for s in TERMINAL)
ALL = FORWARD + TERMINALS


async def entries(store):
    """This node's own log, decoded, in order."""
    return [decode_body(e.body) for e in await log_entries(store, store.log_id)]


async def test_create_stores_every_field_and_logs_one_signed_entry(store, fields, wall):
    row = fields(
        project="api", expected_nodes=["n1", "n2", "n3"], restart_mode="rolling",
        package_identifier="https://example.com/api.tgz", user="alice",
    )  # fmt: skip
    d = await store.create_deployment(row)

    assert await store.get_deployment(row["deployment_id"]) == d
    assert d.status is DeploymentStatus.PENDING
    assert (d.project, d.user, d.restart_mode) == ("api", "alice", "rolling")
    assert d.expected_nodes == ("n1", "n2", "n3")
    assert d.package_identifier == "https://example.com/api.tgz"
    assert d.origin == "n1" and d.version > 0
    assert d.created_version == d.version

    [signed] = await log_entries(store, store.log_id)
    assert (signed.log_id, signed.oseq, signed.writer, signed.key_id) == (
        store.log_id, 1, "n1", "k-n1",
    )  # fmt: skip
    assert KEYRING.verify(writer="n1", key_id="k-n1", message=signing_message(signed.body),
                          sig=signed.sig, at_ms=0) is None  # fmt: skip
    e = decode_body(signed.body)
    assert (e.tbl, e.key, e.op, e.version, e.user, e.t) == (
        "deployments", d.deployment_id, "upsert", d.version, "alice", wall.ms,
    )  # fmt: skip
    assert e.data["status"] == "pending" and e.data["created_version"] == d.version
    # The row keeps the envelope of the entry that wrote it: it can be served as it is.
    r = await store.db.fetchone(
        "SELECT log_id, oseq, entry, sig, key_id FROM deployments WHERE deployment_id = ?",
        (d.deployment_id,),
    )
    assert tuple(r) == (store.log_id, 1, signed.body, signed.sig, "k-n1")
    assert store.logs.own_head == 1


async def test_status_moves_forward_with_one_entry_per_write(store, create, wall):
    d = await create(store)
    previous = d
    for status in [*FORWARD[1:], "success"]:
        wall.advance()
        d, events = await store.write_deployment(d.deployment_id, {"status": status})
        assert events == []
        assert d.status == status
        assert await store.get_deployment(d.deployment_id) == d
        assert d.version > previous.version
        assert d.created_version == previous.created_version
        previous = d
    logged = await entries(store)
    assert [e.oseq for e in logged] == list(range(1, len(FORWARD) + 2))
    assert [e.data["status"] for e in logged] == [*FORWARD, "success"]
    assert logged[-1].version == d.version
    assert d.terminal


async def test_status_may_skip_forward(store, create):
    d = await create(store)
    d, _ = await store.write_deployment(d.deployment_id, {"status": "staging"})
    d, _ = await store.write_deployment(d.deployment_id, {"status": "failed"})
    assert d.status is DeploymentStatus.FAILED


async def test_status_never_moves_backwards(store, create):
    for i, current in enumerate(FORWARD):
        d = await create(store, status=current)
        head = store.logs.own_head
        for older in FORWARD[:i]:
            with store.feed.subscribe() as sub:
                with pytest.raises(TransitionError, match="back to"):
                    await store.write_deployment(d.deployment_id, {"status": older, "phase": "x"})
                assert sub.drain() == []
            assert await store.get_deployment(d.deployment_id) == d
        assert store.logs.own_head == head


async def test_a_finished_deployment_never_changes(store, create):
    for terminal in TERMINALS:
        d = await create(store, status=terminal, completed_at=T0 + 123)
        head = store.logs.own_head
        for other in ALL:
            with pytest.raises(TransitionError, match="never changes"):
                await store.write_deployment(d.deployment_id, {"status": other, "phase": "again"})
        with pytest.raises(TransitionError, match="never changes"):
            await store.write_deployment(d.deployment_id, {"user": "mallory"})
        assert await store.get_deployment(d.deployment_id) == d
        assert store.logs.own_head == head


FIXED = [
    {"project": "api"},
    {"user": "mallory"},
    {"origin_node": "n2"},
    {"started_at": T0 + 1},
    {"expected_nodes": ["n1"]},
    {"timeout_ms": 1},
    {"kind": "drop"},
    {"rollback_of": "00000000-0000-4000-8000-000000000001"},
    {"created_version": 5},
    {"payload_hash": "cd" * 32},
    {"payload_size": 1},
    {"replicated": False},
    {"package_identifier": "other"},
    {"ignore_replication_errors": True},
]


async def test_what_a_deployment_fixed_when_it_started_never_changes(store, create):
    d = await create(store)
    for change in FIXED:
        with pytest.raises(TransitionError, match="cannot change"):
            await store.write_deployment(d.deployment_id, {"status": "installing", **change})
    assert await store.get_deployment(d.deployment_id) == d
    assert store.logs.own_head == 1


async def test_the_payload_is_recorded_once_when_it_arrives(store, create):
    d = await create(store, payload_hash=None, payload_size=None)
    d, _ = await store.write_deployment(
        d.deployment_id, {"payload_hash": "cd" * 32, "payload_size": 10}
    )
    assert (d.payload_hash, d.payload_size) == ("cd" * 32, 10)
    with pytest.raises(TransitionError):
        await store.write_deployment(d.deployment_id, {"payload_hash": "ef" * 32})


async def test_only_the_origin_writes_a_deployment(open_store, create):
    n1, n2 = await open_store("n1"), await open_store("n2")
    d = await create(n1)
    await pull(n1, n2)
    with pytest.raises(TransitionError, match="belongs to n1"):
        await n2.write_deployment(d.deployment_id, {"status": "failed"})
    with pytest.raises(TransitionError):
        await n2.write_deployment(d.deployment_id, events=[("warning", {"message": "x"})])
    assert n2.logs.own_head == 0


async def test_a_rejected_transition_also_discards_the_events_of_that_write(store, create):
    d = await create(store, status="installing")
    with pytest.raises(TransitionError):
        await store.write_deployment(
            d.deployment_id, {"status": "pending"}, [("warning", {"message": "lost"})]
        )
    assert await store.events(d.deployment_id) == []
    assert store.logs.own_head == 1
    assert len(await changelog_rows(store)) == 1


async def test_an_unknown_status_is_refused(store, create):
    d = await create(store)
    with pytest.raises((ValueError, StorageError)):
        await store.write_deployment(d.deployment_id, {"status": "done"})
    assert await store.get_deployment(d.deployment_id) == d


BAD_ROWS = [
    {"project": "a/b"},
    {"project": "site\n"},
    {"payload_hash": "AB" * 32},
    {"payload_hash": "zz" * 32},
    {"deployment_id": "d-1"},
    {"expected_nodes": []},
    {"expected_nodes": ["n1", "n1"]},
    {"activate_nodes": ["n9"]},
    {"origin_node": "../n1"},
    {"timeout_ms": -1},
    {"status": "done"},
    {"error": {"message": "x"}},
    {"started_at": 0},
    {"user": "bad user"},
    {"package_identifier": "x" * 5000},
]


async def test_a_row_that_breaks_the_rules_is_never_written(store, fields):
    with store.feed.subscribe() as sub:
        for bad in BAD_ROWS:
            with pytest.raises(InvalidRow):
                await store.create_deployment(fields(**bad))
        assert sub.drain() == []
    assert await store.deployments() == []
    assert store.logs.own_head == 0
    assert await changelog_rows(store) == []


async def test_a_bad_result_or_component_is_never_written(store, create):
    d = await create(store)
    with pytest.raises(InvalidRow):
        await store.put_result(d.deployment_id, status="great")
    with pytest.raises(InvalidRow):
        await store.put_result(d.deployment_id, status="failed", phase="Not A Phase")
    with pytest.raises(InvalidRow):
        await store.put_component("a/b", deployment_id=d.deployment_id)
    assert await store.results(d.deployment_id) == []
    assert await store.components() == []
    assert store.logs.own_head == 1


async def test_writing_an_unknown_deployment_raises_key_error(store):
    unknown = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(KeyError):
        await store.write_deployment(unknown, {"status": "failed"})
    with pytest.raises(KeyError):
        await store.write_deployment(unknown, events=[("warning", {"message": "x"})])
    assert store.logs.own_head == 0


async def test_creating_an_existing_deployment_does_not_replace_it(store, create, fields):
    d = await create(store)
    done, _ = await store.write_deployment(d.deployment_id, {"status": "success"})
    with pytest.raises(StorageError):
        await store.create_deployment(fields(deployment_id=d.deployment_id, project="other"))
    assert await store.get_deployment(d.deployment_id) == done
    # The entry of the failed write went with its transaction, in memory as on disk.
    assert store.logs.own_head == 2
    assert [r["oseq"] for r in await changelog_rows(store)] == [1, 2]
    await store.write_deployment(d.deployment_id, events=[("finished", {})])
    assert store.logs.own_head == 3


async def test_events_get_consecutive_seqs_with_one_entry_per_write(store, create, wall):
    d = await create(store)
    _, first = await store.write_deployment(
        d.deployment_id,
        events=[("deployment", {"deployment_id": d.deployment_id, "project": "web"}),
                ("phase", {"phase": "ingest", "status": "start"})],
    )  # fmt: skip
    wall.advance(5)
    _, second = await store.write_deployment(
        d.deployment_id, events=[("phase", {"phase": "ingest", "status": "done"})]
    )
    assert [e.seq for e in first + second] == [1, 2, 3]
    assert second[0].t == wall.ms
    assert await store.events(d.deployment_id) == first + second
    assert await store.events(d.deployment_id, after_seq=2) == second

    logged = await entries(store)
    assert [(e.tbl, e.op, e.key) for e in logged[1:]] == [
        ("event_batches", "append", f"{d.deployment_id}/1"),
        ("event_batches", "append", f"{d.deployment_id}/3"),
    ]
    assert logged[2].data == {
        "deployment_id": d.deployment_id, "first_seq": 3, "last_seq": 3, "origin_node": "n1",
        "events": [e.as_dict() for e in second],
    }  # fmt: skip
    assert logged[1].version < logged[2].version


async def test_large_event_writes_are_split_into_entries_that_fit_a_frame(store, create):
    d = await create(store)
    line = "x" * 4000
    _, written = await store.write_deployment(
        d.deployment_id, events=[("install", {"stream": "stdout", "line": line})] * 150
    )
    assert [e.seq for e in written] == list(range(1, 151))
    batches = [e for e in await log_entries(store, store.log_id)][1:]
    assert len(batches) >= 3
    assert all(len(b.body) <= MAX_ENTRY_BYTES for b in batches)
    spans = [(decode_body(b.body).data["first_seq"], decode_body(b.body).data["last_seq"])
             for b in batches]  # fmt: skip
    assert spans[0][0] == 1 and spans[-1][1] == 150
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(spans))


async def test_status_and_events_in_one_write_are_committed_together(store, create):
    d = await create(store)
    error = {"message": "exit 1", "code": "install_failed", "phase": "install"}
    updated, written = await store.write_deployment(
        d.deployment_id,
        {"status": "failed", "phase": "install", "completed_at": T0 + 99, "error": error},
        [("error", error), ("finished", {"status": "failed"})],
    )
    assert updated.status == "failed"
    assert updated.error == error
    assert [e.event for e in await store.events(d.deployment_id)] == ["error", "finished"]
    assert written == await store.events(d.deployment_id)
    assert [e.tbl for e in await entries(store)] == ["deployments", "deployments", "event_batches"]


async def test_notices_are_published_after_commit_and_carry_the_written_values(store, create):
    in_tx_at_publish = []

    def seen(notice):
        in_tx_at_publish.append(store.db._writer.in_transaction)
        return True

    with store.feed.subscribe(seen) as sub:
        d = await create(store)
        assert [(n.tbl, n.key, n.rows) for n in sub.drain()] == [
            ("deployments", d.deployment_id, (d,)),
            (CHANGELOG, "", ()),
        ]
        updated, written = await store.write_deployment(
            d.deployment_id, {"status": "extracting"}, [("phase", {"phase": "extract"})]
        )
        notices = sub.drain()
    assert [(n.tbl, n.key) for n in notices] == [
        ("deployments", d.deployment_id),
        ("deployment_events", d.deployment_id),
        (CHANGELOG, ""),
    ]
    assert notices[0].rows == (updated,)
    assert isinstance(notices[0].rows[0], Deployment)
    assert notices[1].rows == tuple(written)
    assert all(isinstance(e, Event) for e in notices[1].rows)
    assert not any(n.remote for n in notices)
    assert in_tx_at_publish and not any(in_tx_at_publish)
    assert store.feed.subscriber_count == 0


async def test_a_subscriber_waiting_on_the_feed_is_woken_by_a_write(store, create):
    with store.feed.subscribe(lambda n: n.tbl == "deployments") as sub:
        waiter = asyncio.create_task(sub.get(timeout_s=5))
        d = await create(store)
        notices = await waiter
    assert [n.rows for n in notices] == [(d,)]


async def test_a_subscriber_that_falls_behind_is_told_to_reread(store, create):
    with store.feed.subscribe(lambda n: n.tbl == "deployments", maxsize=3) as slow:
        with store.feed.subscribe(lambda n: n.tbl == "deployments") as fast:
            made = [await create(store) for _ in range(5)]
            assert [n.rows for n in fast.drain()] == [(d,) for d in made]
            assert fast.overflowed is False
        assert slow.overflowed is True
        kept = slow.drain()
    assert 0 < len(kept) <= 3
    assert kept[-1].rows == (made[-1],)


async def test_a_log_is_read_in_pages_by_count_and_by_bytes(store, create):
    for _ in range(5):
        d = await create(store)
        await store.write_deployment(d.deployment_id, events=[("warning", {"message": "x" * 500})])
    log_id = store.log_id
    everything = await store.read_log(log_id, 0, max_entries=100, max_bytes=1 << 20)
    assert [e.oseq for e in everything.entries] == list(range(1, 11))
    assert (everything.after, everything.last, everything.compacted) == (0, 10, False)

    page = await store.read_log(log_id, 3, max_entries=4, max_bytes=1 << 20)
    assert [e.oseq for e in page.entries] == [4, 5, 6, 7] and page.last == 7
    small = await store.read_log(log_id, 0, max_entries=100, max_bytes=1)
    assert [e.oseq for e in small.entries] == [1] and small.last == 1  # never empty while behind
    seen, after = [], 0
    while True:
        chunk = await store.read_log(log_id, after, max_entries=100, max_bytes=1200)
        if chunk.last == after:
            break
        assert len(chunk.entries) == 1 or sum(len(e.body) for e in chunk.entries) <= 1200
        assert chunk.entries[0].oseq == after + 1 and chunk.entries[-1].oseq == chunk.last
        seen += chunk.entries
        after = chunk.last
    assert seen == everything.entries
    done = await store.read_log(log_id, 10, max_entries=100, max_bytes=1 << 20)
    assert (done.last, done.entries) == (10, [])
    unknown = await store.read_log("n7/" + "0" * 32, 0, max_entries=100, max_bytes=1 << 20)
    assert (unknown.last, unknown.entries) == (0, [])


async def test_versions_keep_increasing_when_the_wall_clock_goes_back(open_store, create, new_wall):
    wall = new_wall()
    store = await open_store("n1", wall=wall)
    d = await create(store)
    wall.advance(-60_000)
    later, _ = await store.write_deployment(d.deployment_id, {"status": "extracting"})
    assert later.version > d.version
    await store.close()

    # After a restart the clock is seeded from the stored rows, not from the wall.
    reopened = await open_store("n1", wall=new_wall(wall.ms - 3_600_000))
    again, _ = await reopened.write_deployment(d.deployment_id, {"status": "installing"})
    assert again.version > later.version
    assert reopened.logs.own_head == 3


async def test_results_are_merged_per_node(store, create):
    d = await create(store)
    first = await store.put_result(d.deployment_id, status="fetching", started_at=T0 + 10)
    second = await store.put_result(d.deployment_id, status="staged", phase="install")
    assert (second.status, second.phase, second.started_at) == ("staged", "install", T0 + 10)
    assert second.version > first.version
    assert await store.results(d.deployment_id) == [second]
    assert await store.results_for([d.deployment_id, "x"]) == {d.deployment_id: [second], "x": []}
    assert await store.results_of_node("n1", statuses=["staged"]) == [second]
    assert await store.results_of_node("n1", statuses=["failed"]) == []


async def test_a_payload_drop_is_recorded_once_and_leaves_the_status_alone(store, create):
    d = await create(store, status="success", payload_hash="cd" * 32)
    other = await create(store, status="success", payload_hash="cd" * 32)
    assert await store.live_references("cd" * 32) == 2
    assert await store.mark_payload_dropped(d.deployment_id, user="alice") is True
    assert await store.mark_payload_dropped(d.deployment_id, user="alice") is False
    assert await store.dropped([d.deployment_id, other.deployment_id]) == {d.deployment_id}
    assert await store.dropped_by(d.deployment_id) == {"n1"}
    assert await store.live_references("cd" * 32) == 1
    assert (await store.get_deployment(d.deployment_id)).status == "success"
    assert [e.tbl for e in await entries(store)].count("payload_drops") == 1


async def test_a_finished_deployment_can_still_be_pinned_and_unpinned(store, create):
    d = await create(store)
    done, _ = await store.write_deployment(d.deployment_id, {"status": "success"})
    await store.set_pin(d.deployment_id, True, user="alice")
    assert await store.pinned([d.deployment_id]) == {d.deployment_id}
    await store.set_pin(d.deployment_id, False, user="alice")
    assert await store.pinned([d.deployment_id]) == set()
    # The deployment row itself is untouched: pins are rows of their own.
    assert await store.get_deployment(d.deployment_id) == done
    assert [e.data["pinned"] for e in await entries(store) if e.tbl == "pins"] == [True, False]


async def test_a_component_row_is_merged_and_not_rewritten_when_unchanged(store, create):
    d = await create(store)
    first = await store.put_component("web", deployment_id=d.deployment_id,
                                      payload_hash="ab" * 32, activated_at=T0)  # fmt: skip
    head = store.logs.own_head
    assert await store.put_component("web", deployment_id=d.deployment_id) == first
    assert store.logs.own_head == head
    moved = await store.put_component("web", converged=False, reason="waiting")
    assert (moved["deployment_id"], moved["converged"], moved["reason"]) == (
        d.deployment_id, False, "waiting",
    )  # fmt: skip
    assert await store.components() == [moved]
    assert store.logs.own_head == head + 1


async def test_local_state_is_never_put_in_the_change_log(store):
    d_id = "00000000-0000-4000-8000-000000000001"
    await store.set_active("web", d_id, "ab" * 32)
    await store.mark_staged("web", d_id, "ab" * 32)
    await store.set_meta("cluster_id", "c-1")
    await store.set_meta("cluster_id", "c-2")
    assert (await store.active_releases())["web"]["deployment_id"] == d_id
    assert set(await store.staged_releases("web")) == {d_id}
    await store.set_active("web", None, None)
    await store.mark_staged("web", d_id, None, staged=False)
    assert await store.active_releases() == {}
    assert await store.staged_releases() == {}
    assert await store.get_meta("cluster_id") == "c-2"
    assert await store.get_meta("missing") is None
    assert store.logs.own_head == 0
    assert await changelog_rows(store) == []


async def test_the_audit_log_names_who_changed_what_from_which_node(store, create, wall):
    d = await create(store, user="alice")
    wall.advance(1000)
    await store.write_deployment(d.deployment_id, {"status": "failed"}, user="bob")
    audit = await store.read_audit_log(table="deployments", key=d.deployment_id)
    assert [(a["user"], a["node"], a["timestamp"], a["operation"]) for a in audit] == [
        ("bob", "n1", wall.ms, "upsert"),
        ("alice", "n1", wall.ms - 1000, "upsert"),
    ]
    assert await store.read_audit_log(table="deployments", since=wall.ms) == audit[:1]
    assert await store.read_audit_log(table="deployments", until=wall.ms - 1) == audit[1:]
    assert await store.read_audit_log(table="deployments", limit=1) == audit[:1]
    # Event batches are not audited: the deployment's own log says what happened.
    await store.write_deployment(d.deployment_id, events=[("finished", {})])
    assert await store.read_audit_log(table="event_batches") == []


# -- list_deployments ---------------------------------------------------------------


def _uuid(n):
    return f"00000000-0000-4000-8000-{n:012d}"


# (n, project, status, user, started_at offset): several share a started_at.
ROWS = [
    (1, "web", "success", "alice", 0),
    (2, "api", "failed", "bob", 1000),
    (3, "web", "failed", "alice", 1000),
    (4, "web", "installing", "bob", 1000),
    (5, "api", "success", "alice", 2000),
    (6, "web", "success", "carol", 3000),
    (7, "web", "success", "alice", 3000),
    (8, "api", "pending", "bob", 3000),
    (9, "db", "rolled_back", "carol", 4000),
    (10, "web", "failed", "bob", 5000),
    (11, "api", "success", "alice", 5000),
    (12, "web", "success", "alice", 6000),
]
T = T0


async def _build_listing(path, fields):
    store = await Store.open(path, node="n1", clock=HybridClock(lambda: T))
    try:
        for n, project, status, user, offset in ROWS:
            await store.create_deployment(
                fields(deployment_id=_uuid(n), project=project, status=status, user=user,
                       started_at=T + offset)
            )  # fmt: skip
    finally:
        await store.close()


@pytest.fixture
async def listed(template, copy_of, fields, open_store, new_wall):
    """A store holding ROWS (created once per session, copied for each test)."""
    src, _ = template("listing", lambda path: _build_listing(path, fields))
    store = await open_store("n1", path=copy_of(src, "n1.sqlite"), wall=new_wall(T))
    made = await store.deployments()
    assert len(made) == len(ROWS)
    return store, made


def newest_first(deployments):
    return sorted(deployments, key=lambda d: (d.started_at, d.deployment_id), reverse=True)


FILTERS = [
    ({}, lambda d: True),
    ({"project": "web"}, lambda d: d.project == "web"),
    ({"status": "failed"}, lambda d: d.status == "failed"),
    ({"user": "alice"}, lambda d: d.user == "alice"),
    ({"since": T + 3000}, lambda d: d.started_at >= T + 3000),
    ({"until": T + 3000}, lambda d: d.started_at <= T + 3000),
    ({"since": T + 1000, "until": T + 1000}, lambda d: d.started_at == T + 1000),
    (
        {"project": "web", "status": "success", "since": T + 1, "until": T + 5999},
        lambda d: d.project == "web" and d.status == "success" and T < d.started_at < T + 6000,
    ),
    ({"project": "nope"}, lambda d: False),
]


async def test_list_filters_in_sql_newest_first(listed):
    store, made = listed
    for filt, keep in FILTERS:
        expected = newest_first([d for d in made if keep(d)])
        page = await store.list_deployments(DeploymentFilter(**filt), limit=100)
        assert page.deployments == expected, filt
        assert page.total == len(expected)
        assert page.next_cursor is None


async def test_list_since_and_until_are_inclusive(listed):
    store, _ = listed
    page = await store.list_deployments(DeploymentFilter(since=T + 3000, until=T + 3000), limit=100)
    assert [d.deployment_id for d in page.deployments] == [_uuid(8), _uuid(7), _uuid(6)]


async def test_list_pages_by_limit_and_offset(listed):
    store, made = listed
    expected = newest_first(made)
    seen = []
    for offset in range(0, 15, 5):
        page = await store.list_deployments(DeploymentFilter(), limit=5, offset=offset)
        assert page.total == len(made)
        seen += page.deployments
    assert seen == expected
    page = await store.list_deployments(DeploymentFilter(project="web"), limit=2, offset=2)
    assert page.deployments == newest_first([d for d in made if d.project == "web"])[2:4]
    assert page.total == 7


FILTERS_BY_KEY = {
    (): lambda d: True,
    ("project",): lambda d: d.project == "web",
    ("until",): lambda d: d.started_at <= T + 3000,
}


@pytest.mark.parametrize("filt", [{}, {"project": "web"}, {"until": T + 3000}])
async def test_cursor_paging_returns_every_row_exactly_once(listed, filt):
    store, made = listed
    f = DeploymentFilter(**filt)
    expected = newest_first([d for d in made if FILTERS_BY_KEY[tuple(filt)](d)])
    for limit in [1, 2, 3, 5, 11, 12, 13]:
        seen, cursor, pages = [], None, 0
        while True:
            page = await store.list_deployments(f, limit=limit, cursor=cursor)
            assert page.total == len(expected)
            assert len(page.deployments) <= limit
            seen += page.deployments
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
            assert pages <= len(expected), "cursor paging does not terminate"
        assert [d.deployment_id for d in seen] == [d.deployment_id for d in expected]
        assert pages == max(1, -(-len(expected) // limit))


async def test_list_queries_walk_an_index_in_order(listed):
    """Every list query (each filter, with and without a cursor) is served by an index
    that also gives its order: no scan of the table, no sort in a temporary B-tree, so
    a page costs the same at 100,000 rows as at ten (bench/list_deployments.py)."""
    store, _ = listed
    seen: list[str] = []
    conns = store.db._readers._conns
    for conn in conns:
        conn.set_trace_callback(seen.append)  # the statements as run, values bound
    try:
        for filt, _keep in FILTERS:
            page = await store.list_deployments(DeploymentFilter(**filt), limit=1)
            if page.next_cursor:
                await store.list_deployments(
                    DeploymentFilter(**filt), limit=1, cursor=page.next_cursor
                )
    finally:
        for conn in conns:
            conn.set_trace_callback(None)
    queries = [q for q in seen if q.lstrip().upper().startswith("SELECT")]
    assert len(queries) >= 2 * len(FILTERS)
    for sql in queries:
        plan = [r[3] for r in conns[0].execute("EXPLAIN QUERY PLAN " + sql)]
        assert not any("TEMP B-TREE" in step for step in plan), (sql, plan)
        assert not any(
            step.startswith("SCAN deployments") and "INDEX" not in step for step in plan
        ), (sql, plan)


async def test_cursor_paging_is_stable_while_new_deployments_arrive(listed, create):
    store, _ = listed
    first = await store.list_deployments(DeploymentFilter(), limit=4)
    last = first.deployments[-1]
    await create(store, started_at=T + 10_000)  # newer than every page: not revisited
    await create(store, started_at=T + 3000, deployment_id=_uuid(99))  # lands in a later page
    rest, cursor = [], first.next_cursor
    while cursor is not None:
        page = await store.list_deployments(DeploymentFilter(), limit=4, cursor=cursor)
        rest += page.deployments
        cursor = page.next_cursor
    everything = newest_first(await store.deployments())
    assert rest == [
        d
        for d in everything
        if (d.started_at, d.deployment_id) < (last.started_at, last.deployment_id)
    ]
    assert _uuid(99) in {d.deployment_id for d in rest}
    assert not {d.deployment_id for d in rest} & {d.deployment_id for d in first.deployments}


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


BAD_CURSORS = [
    "",
    "%%% not base64 %%%",
    _b64("garbage"),
    _b64("[1]"),
    _b64("[1, 2, 3]"),
    _b64('["1700000000000", "id"]'),
    _b64("[1700000000000, 5]"),
    _b64('{"a": 1}'),
    _b64('{"started_at": 1, "deployment_id": 2}'),
    _b64('[1.5, "id"]'),
    _b64("null"),
    _b64("5"),
    _b64(json.dumps([2**70, "id"])),
    base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
]


async def test_a_malformed_cursor_is_a_value_error(listed):
    store, _ = listed
    for cursor in BAD_CURSORS:
        with pytest.raises(ValueError, match="cursor"):
            await store.list_deployments(DeploymentFilter(), limit=5, cursor=cursor)
