"""The store's deployment records: forward-only status, one change-log entry per write,
notices after commit, listing with filters and paging, and local-only state."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from storage.changelog import CHANGELOG
from storage.errors import StorageError
from storage.hlc import HybridClock
from storage.records import TERMINAL, Deployment, DeploymentStatus, Event
from storage.store import DeploymentFilter, Store, TransitionError

FORWARD = [
    "pending", "extracting", "installing", "loading", "staging", "replicating",
    "activating", "restarting",
]  # fmt: skip
TERMINALS = sorted(str(s) for s in TERMINAL)
ALL = FORWARD + TERMINALS


async def head(store):
    changes, _ = await store.changes_after(0)
    return changes


async def test_create_stores_every_field_and_logs_one_change(store, fields, wall):
    row = fields(
        project="api", expected_nodes=["n1", "n2", "n3"], restart_mode="rolling",
        error=None, package_identifier="https://example.com/api.tgz", user="alice",
    )  # fmt: skip
    d = await store.create_deployment(row)

    assert await store.get_deployment(row["deployment_id"]) == d
    assert d.status is DeploymentStatus.PENDING
    assert (d.project, d.user, d.restart_mode) == ("api", "alice", "rolling")
    assert d.expected_nodes == ("n1", "n2", "n3")
    assert d.package_identifier == "https://example.com/api.tgz"
    assert d.origin == "n1" and d.version > 0
    [change] = await head(store)
    assert (change.tbl, change.key, change.op) == ("deployments", d.deployment_id, "upsert")
    assert (change.version, change.origin, change.user) == (d.version, "n1", "alice")
    assert change.data["status"] == "pending"
    assert change.t == wall.ms


async def test_status_moves_forward_with_one_change_per_write(store, create, wall):
    d = await create(store)
    previous = d
    for status in [*FORWARD[1:], "success"]:
        wall.advance()
        before = await head(store)
        d, events = await store.write_deployment(d.deployment_id, {"status": status})
        after = await head(store)
        assert events == []
        assert d.status == status
        assert await store.get_deployment(d.deployment_id) == d
        assert len(after) == len(before) + 1
        new = after[-1]
        assert new.seq == before[-1].seq + 1
        assert new.version == d.version > previous.version
        assert new.data["status"] == status
        previous = d
    assert d.terminal


async def test_status_may_skip_forward(store, create):
    d = await create(store)
    d, _ = await store.write_deployment(d.deployment_id, {"status": "staging"})
    d, _ = await store.write_deployment(d.deployment_id, {"status": "failed"})
    assert d.status is DeploymentStatus.FAILED


@pytest.mark.parametrize(
    ("current", "older"),
    [(FORWARD[i], FORWARD[j]) for i in range(len(FORWARD)) for j in range(i)],
)
async def test_status_never_moves_backwards(store, create, current, older):
    d = await create(store, status=current)
    logged = len(await head(store))
    with store.feed.subscribe() as sub:
        with pytest.raises(TransitionError):
            await store.write_deployment(d.deployment_id, {"status": older, "phase": "x"})
        assert sub.drain() == []
    assert await store.get_deployment(d.deployment_id) == d
    assert len(await head(store)) == logged


@pytest.mark.parametrize(("terminal", "other"), [(t, o) for t in TERMINALS for o in ALL if o != t])
async def test_a_terminal_status_never_changes(store, create, terminal, other):
    d = await create(store, status=terminal, completed_at=123)
    with pytest.raises(TransitionError):
        await store.write_deployment(d.deployment_id, {"status": other})
    assert await store.get_deployment(d.deployment_id) == d


async def test_a_terminal_deployment_can_still_be_pinned_and_unpinned(store, create):
    d = await create(store)
    done, _ = await store.write_deployment(d.deployment_id, {"status": "success"})
    pinned, _ = await store.write_deployment(d.deployment_id, {"pinned": True})
    assert (pinned.status, pinned.pinned) == ("success", True)
    assert pinned.version > done.version
    unpinned, _ = await store.write_deployment(d.deployment_id, {"pinned": False})
    assert (unpinned.status, unpinned.pinned) == ("success", False)
    assert (await store.get_deployment(d.deployment_id)).pinned is False
    assert [c.data["pinned"] for c in await head(store)][-2:] == [True, False]


async def test_a_rejected_transition_also_discards_the_events_of_that_write(store, create):
    d = await create(store, status="installing")
    with pytest.raises(TransitionError):
        await store.write_deployment(
            d.deployment_id, {"status": "pending"}, [("warning", {"message": "lost"})]
        )
    assert await store.events(d.deployment_id) == []
    assert len(await head(store)) == 1


async def test_an_unknown_status_is_rejected(store, create):
    d = await create(store)
    with pytest.raises((ValueError, StorageError)):
        await store.write_deployment(d.deployment_id, {"status": "done"})
    assert await store.get_deployment(d.deployment_id) == d


async def test_writing_an_unknown_deployment_raises_key_error(store):
    with pytest.raises(KeyError):
        await store.write_deployment("no-such-id", {"status": "failed"})
    with pytest.raises(KeyError):
        await store.write_deployment("no-such-id", events=[("warning", {"message": "x"})])
    assert await head(store) == []


async def test_creating_an_existing_deployment_does_not_replace_it(store, create, fields):
    d = await create(store)
    done, _ = await store.write_deployment(d.deployment_id, {"status": "success"})
    with pytest.raises(StorageError):
        await store.create_deployment(fields(deployment_id=d.deployment_id, project="other"))
    assert await store.get_deployment(d.deployment_id) == done


async def test_events_get_consecutive_seqs_with_one_change_per_write(store, create, wall):
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

    changes = await head(store)
    assert [(c.tbl, c.op) for c in changes[1:]] == [
        ("deployment_events", "append"),
        ("deployment_events", "append"),
    ]
    assert changes[2].data == [e.as_dict() for e in second]
    assert changes[1].version < changes[2].version


async def test_status_and_events_in_one_write_are_committed_together(store, create):
    d = await create(store)
    updated, written = await store.write_deployment(
        d.deployment_id,
        {"status": "failed", "phase": "install", "completed_at": 99,
         "error": {"message": "exit 1", "code": "install_failed", "phase": "install"}},
        [("error", {"message": "exit 1", "code": "install_failed", "phase": "install"}),
         ("finished", {"status": "failed"})],
    )  # fmt: skip
    assert updated.status == "failed"
    assert updated.error == {"message": "exit 1", "code": "install_failed", "phase": "install"}
    assert [e.event for e in await store.events(d.deployment_id)] == ["error", "finished"]
    assert written == await store.events(d.deployment_id)
    changes = await head(store)
    # One entry per table written, in the order the write made them.
    assert [c.tbl for c in changes] == ["deployments", "deployments", "deployment_events"]


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


async def test_the_change_log_pages_by_count_and_by_bytes(store, create):
    for _ in range(5):
        d = await create(store)
        await store.write_deployment(d.deployment_id, events=[("warning", {"message": "x" * 500})])
    everything, head = await store.changes_after(0)
    assert [c.seq for c in everything] == list(range(1, 11)) and head == 10

    page, last = await store.changes_after(3, limit=4)
    assert [c.seq for c in page] == [4, 5, 6, 7] and last == 7
    small, last = await store.changes_after(0, max_bytes=1)
    assert [c.seq for c in small] == [1] and last == 1  # never an empty page while behind
    seen, seq = [], 0
    while True:
        batch, last = await store.changes_after(seq, max_bytes=1200)
        if last == seq:
            break
        assert len(batch) == 1 or sum(c.size for c in batch) <= 1200
        seen += batch
        seq = last
    assert seen == everything
    assert await store.changes_after(head) == ([], head)


async def test_versions_keep_increasing_when_the_wall_clock_goes_back(
    open_store, create, new_wall, tmp_path
):
    wall = new_wall()
    store = await open_store("n1", wall=wall)
    d = await create(store)
    wall.advance(-60_000)
    later, _ = await store.write_deployment(d.deployment_id, {"status": "extracting"})
    assert later.version > d.version
    await store.close()

    # After a restart the clock is seeded from the stored log, not from the wall.
    reopened = await open_store("n1", wall=new_wall(wall.ms - 3_600_000))
    again, _ = await reopened.write_deployment(d.deployment_id, {"status": "installing"})
    assert again.version > later.version


async def test_results_are_merged_per_node(store, create):
    d = await create(store)
    first = await store.put_result(d.deployment_id, status="fetching", started_at=10)
    second = await store.put_result(d.deployment_id, status="staged", phase="install")
    assert (second.status, second.phase, second.started_at) == ("staged", "install", 10)
    assert second.version > first.version
    assert await store.results(d.deployment_id) == [second]
    assert await store.results_of_node("n1", statuses=["staged"]) == [second]
    assert await store.results_of_node("n1", statuses=["failed"]) == []


async def test_a_payload_drop_is_recorded_once_and_leaves_the_status_alone(store, create):
    d = await create(store, status="success", payload_hash="cd" * 32)
    other = await create(store, status="success", payload_hash="cd" * 32)
    assert await store.live_references("cd" * 32) == 2
    assert await store.mark_payload_dropped(d.deployment_id, user="alice") is True
    assert await store.mark_payload_dropped(d.deployment_id, user="alice") is False
    assert await store.dropped([d.deployment_id, other.deployment_id]) == {d.deployment_id}
    assert await store.live_references("cd" * 32) == 1
    assert (await store.get_deployment(d.deployment_id)).status == "success"
    assert [c.tbl for c in await head(store)].count("payload_drops") == 1


async def test_local_state_is_never_put_in_the_change_log(store):
    await store.set_active("web", "d-1", "ab" * 32)
    await store.set_meta("cluster_id", "c-1")
    await store.set_meta("cluster_id", "c-2")
    assert (await store.active_releases())["web"]["deployment_id"] == "d-1"
    await store.set_active("web", None, None)
    assert await store.active_releases() == {}
    assert await store.get_meta("cluster_id") == "c-2"
    assert await store.get_meta("missing") is None
    assert await store.head_seq() == 0


async def test_audit_log_names_who_changed_what_from_which_node(store, create, wall):
    d = await create(store, user="alice")
    wall.advance(1000)
    await store.write_deployment(d.deployment_id, {"status": "failed"}, user="bob")
    audit = await store.read_audit_log(table="deployments", key=d.deployment_id)
    assert [(a["user"], a["node"], a["timestamp"]) for a in audit] == [
        ("bob", "n1", wall.ms),
        ("alice", "n1", wall.ms - 1000),
    ]
    assert await store.read_audit_log(table="deployments", since=wall.ms) == audit[:1]


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
T = 1_700_000_000_000


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


@pytest.mark.parametrize(("filt", "keep"), FILTERS, ids=[str(f) for f, _ in FILTERS])
async def test_list_filters_in_sql_newest_first(listed, filt, keep):
    store, made = listed
    expected = newest_first([d for d in made if keep(d)])
    page = await store.list_deployments(DeploymentFilter(**filt), limit=100)
    assert page.deployments == expected
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


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 11, 12, 13])
@pytest.mark.parametrize("filt", [{}, {"project": "web"}, {"until": T + 3000}])
async def test_cursor_paging_returns_every_row_exactly_once(listed, limit, filt):
    store, made = listed
    f = DeploymentFilter(**filt)
    expected = newest_first([d for d in made if FILTERS_BY_KEY[tuple(filt)](d)])
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


@pytest.mark.parametrize(
    "cursor",
    [
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
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
    ],
)
async def test_a_malformed_cursor_is_a_value_error(listed, cursor):
    store, _ = listed
    with pytest.raises(ValueError, match="cursor"):
        await store.list_deployments(DeploymentFilter(), limit=5, cursor=cursor)


@pytest.mark.parametrize("cursor", [_b64("null"), _b64("5"), _b64(json.dumps([2**70, "id"]))])
async def test_a_cursor_of_the_wrong_json_shape_is_a_value_error(listed, cursor):
    store, _ = listed
    with pytest.raises(ValueError, match="cursor"):
        await store.list_deployments(DeploymentFilter(), limit=5, cursor=cursor)
