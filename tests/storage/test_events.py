"""Deployment event logs: head/tail retention with a cumulative ``truncated`` marker,
written as signed batches, and the same stored log on every node whichever way the
batches travel (dense, relayed, compacted after trimming, in any batch size)."""

from __future__ import annotations

import pytest
from storekit import event_log, pull

from storage.apply import Range, apply_batch
from storage.events import HEAD, MAX_EVENTS, TAIL
from storage.trim import TrimPolicy, trim


def install_line(seq):
    return {"stream": "stdout", "line": f"line {seq}"}


async def write_events(store, deployment_id, batches):
    """Append ``sum(batches)`` install events in writes of the given sizes."""
    written = []
    for size in batches:
        first = len(written) + 1
        _, out = await store.write_deployment(
            deployment_id,
            events=[("install", install_line(s)) for s in range(first, first + size)],
        )
        written += out
    return written


def expected_log(top):
    """The stored log after ``top`` events: SPEC 5's first 20 + marker + newest 179."""
    if top <= MAX_EVENTS:
        return [(s, "install", install_line(s)) for s in range(1, top + 1)]
    dropped = top - (MAX_EVENTS - 1)
    return [
        *[(s, "install", install_line(s)) for s in range(1, HEAD + 1)],
        (HEAD + 1, "truncated", {"dropped_events": dropped}),
        *[(s, "install", install_line(s)) for s in range(top - TAIL + 1, top + 1)],
    ]


def test_retention_constants_match_the_contract():
    assert (MAX_EVENTS, HEAD, TAIL) == (200, 20, 179)


@pytest.mark.parametrize(
    "batches",
    [[1000], [50] * 20, [137, 1, 62, 300, 199, 301], [190, 10, 1, 799]],
    ids=["one", "fifties", "ragged", "around-200"],
)
async def test_a_long_log_keeps_the_first_20_a_marker_and_the_newest_179(store, create, batches):
    d = await create(store)
    written = await write_events(store, d.deployment_id, batches)
    assert [e.seq for e in written] == list(range(1, 1001))

    stored = await store.events(d.deployment_id)
    assert len(stored) == 200
    seqs = [e.seq for e in stored]
    assert seqs[:21] == list(range(1, 22))
    assert seqs[21:] == list(range(822, 1001))
    marker = stored[20]
    assert (marker.event, marker.data) == ("truncated", {"dropped_events": 1000 - 199})
    assert event_log(stored) == expected_log(1000)
    # A batch whose events all fell out of the log is not kept (nothing left to send).
    rows = await store.db.fetchall(
        "SELECT first_seq, last_seq FROM event_batches WHERE deployment_id = ?",
        (d.deployment_id,),
    )
    assert all(r["first_seq"] <= HEAD + 1 or r["last_seq"] >= 822 for r in rows)


async def test_retention_boundaries(store, create):
    for top in [1, 199, 200, 201, 202, 221, 222, 400]:
        d = await create(store)
        await write_events(store, d.deployment_id, [top])
        stored = await store.events(d.deployment_id)
        assert event_log(stored) == expected_log(top), top
        if top == 200:
            assert "truncated" not in {e.event for e in stored}
        if top == 201:
            assert stored[20].data == {"dropped_events": 2}
            assert [e.seq for e in stored][19:23] == [20, 21, 23, 24]


async def test_the_marker_count_is_cumulative_and_later_seqs_continue(store, create):
    d = await create(store)
    await write_events(store, d.deployment_id, [300])
    assert (await store.events(d.deployment_id))[20].data == {"dropped_events": 101}
    _, more = await store.write_deployment(
        d.deployment_id,
        events=[("warning", {"message": "slow"}), ("finished", {"status": "failed"})],
    )
    assert [e.seq for e in more] == [301, 302]
    stored = await store.events(d.deployment_id)
    assert len(stored) == 200
    assert stored[20].data == {"dropped_events": 103}
    assert [e.event for e in stored[-2:]] == ["warning", "finished"]


async def test_reading_after_a_seq_resumes_from_the_stored_tail(store, create):
    d = await create(store)
    await write_events(store, d.deployment_id, [500])
    tail = await store.events(d.deployment_id, after_seq=HEAD + 1)
    assert [e.seq for e in tail] == list(range(322, 501))
    assert await store.events(d.deployment_id, after_seq=100) == tail
    assert [e.seq for e in await store.events(d.deployment_id, after_seq=498)] == [499, 500]
    assert await store.events(d.deployment_id, after_seq=500) == []


async def test_the_live_notice_carries_every_event_even_those_not_kept(store, create):
    d = await create(store)
    with store.feed.subscribe(lambda n: n.tbl == "deployment_events") as sub:
        await write_events(store, d.deployment_id, [250])
        [notice] = sub.drain()
    assert [e.seq for e in notice.rows] == list(range(1, 251))


@pytest.mark.parametrize("path", ["dense-one-by-one", "relayed", "compacted"])
async def test_a_replica_stores_the_same_log_whichever_way_the_batches_travel(
    store, create, open_store, path
):
    d = await create(store)
    await write_events(store, d.deployment_id, [90, 5, 120, 1, 200, 300, 84, 200])
    n2, n3 = await open_store("n2"), await open_store("n3")
    if path == "dense-one-by-one":
        with n3.feed.subscribe(lambda n: n.tbl == "deployment_events") as sub:
            await pull(store, n3, max_entries=1)
            announced = [e.seq for n in sub.drain() for e in n.rows]
        assert announced == list(range(1, 1001))
    elif path == "relayed":
        await pull(store, n2, max_entries=3)
        await pull(n2, n3, max_entries=2)
    else:
        await trim(store, [], TrimPolicy())
        got = await pull(store, n3, max_entries=2)
        assert got.compacted_ranges == got.batches
        # Batches whose events all fell out of the origin's log are not sent at all.
        assert got.entries < 1 + 8
    assert event_log(await n3.events(d.deployment_id)) == expected_log(1000)
    assert event_log(await n3.events(d.deployment_id)) == event_log(
        await store.events(d.deployment_id)
    )


async def test_redelivered_event_batches_change_nothing(store, create, open_store):
    d = await create(store)
    await write_events(store, d.deployment_id, [100, 200])  # the first batch falls out
    replica = await open_store("n2")
    await pull(store, replica)
    before = await replica.events(d.deployment_id)
    chunk = await store.read_log(store.log_id, 0, max_entries=100, max_bytes=1 << 22)
    with replica.feed.subscribe() as sub:
        report = await apply_batch(
            replica, "n1", [Range(store.log_id, 0, chunk.last, False)], chunk.entries,
            verifier=None, direct_log=store.log_id, max_clock_offset_ms=60_000,
        )  # fmt: skip
        assert sub.drain() == []
    assert (report.applied, report.duplicates) == (0, 3)
    assert await replica.events(d.deployment_id) == before


async def test_replicating_a_truncated_log_across_three_nodes_quiesces(store, create, open_store):
    d = await create(store)
    await write_events(store, d.deployment_id, [100, 150])
    nodes = [store, await open_store("n2"), await open_store("n3")]
    moved_per_round = []
    for _ in range(3):
        moved = 0
        for src in nodes:
            for dst in nodes:
                if src is not dst:
                    moved += (await pull(src, dst)).entries
        moved_per_round.append(moved)
    for node in nodes[1:]:
        assert event_log(await node.events(d.deployment_id)) == expected_log(250)
    assert moved_per_round[-1] == 0, moved_per_round
