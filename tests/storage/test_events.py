"""Deployment event logs: head/tail retention with a cumulative ``truncated`` marker,
and convergence of the stored log across nodes whatever order the events arrive in."""

from __future__ import annotations

import random

import pytest

from storage.apply import apply_changes
from storage.events import HEAD, MAX_EVENTS, TAIL


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
async def test_a_long_log_keeps_the_first_20_a_marker_and_the_newest_179(
    store, create, event_log, batches
):
    d = await create(store)
    written = await write_events(store, d.deployment_id, batches)
    assert [e.seq for e in written] == list(range(1, 1001))

    stored = await store.events(d.deployment_id)
    assert len(stored) == 200
    seqs = [e.seq for e in stored]
    assert seqs == sorted(set(seqs))
    assert seqs[:21] == list(range(1, 22))
    assert seqs[21:] == list(range(822, 1001))
    marker = stored[20]
    assert (marker.event, marker.data) == ("truncated", {"dropped_events": 1000 - 199})
    assert [e.event for e in stored].count("truncated") == 1
    assert event_log(stored) == expected_log(1000)


@pytest.mark.parametrize("top", [1, 199, 200, 201, 202, 221, 222, 400])
async def test_retention_boundaries(store, create, event_log, top):
    d = await create(store)
    await write_events(store, d.deployment_id, [top])
    stored = await store.events(d.deployment_id)
    assert event_log(stored) == expected_log(top)
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


@pytest.mark.parametrize("seed", range(3))
async def test_a_replica_stores_the_same_log_whatever_order_events_arrive_in(
    store, create, open_store, all_changes, event_log, seed
):
    d = await create(store)
    await write_events(store, d.deployment_id, [90, 5, 120, 1, 200, 300, 84, 200])
    changes, last = await all_changes(store)
    rng = random.Random(seed)
    shuffled = changes + rng.sample(changes, k=len(changes) // 2)  # with duplicates
    rng.shuffle(shuffled)

    replica = await open_store("n2")
    for i, change in enumerate(shuffled):
        await apply_changes(replica, "n1", [change], last if i == len(shuffled) - 1 else 0)
        partial = [e.seq for e in await replica.events(d.deployment_id)]
        assert len(partial) <= MAX_EVENTS
        assert partial == sorted(set(partial))

    assert event_log(await replica.events(d.deployment_id)) == event_log(
        await store.events(d.deployment_id)
    )
    assert event_log(await replica.events(d.deployment_id)) == expected_log(1000)


async def test_a_replica_applying_one_batch_in_reverse_stores_the_same_log(
    store, create, open_store, all_changes, event_log
):
    d = await create(store)
    await write_events(store, d.deployment_id, [150, 150, 150])
    changes, last = await all_changes(store)
    replica = await open_store("n2")
    await apply_changes(replica, "n1", list(reversed(changes)), last)
    assert event_log(await replica.events(d.deployment_id)) == expected_log(450)


async def test_redelivering_events_that_were_truncated_away_changes_nothing(
    store, create, open_store, all_changes
):
    d = await create(store)
    await write_events(store, d.deployment_id, [100, 200])  # the first batch falls out
    changes, last = await all_changes(store)
    replica = await open_store("n2")
    await apply_changes(replica, "n1", changes, last)
    head = await replica.head_seq()

    with replica.feed.subscribe() as sub:
        assert await apply_changes(replica, "n1", changes, last) == 0
        assert sub.drain() == []
    assert await replica.head_seq() == head


async def test_replicating_a_truncated_log_across_three_nodes_quiesces(
    store, create, open_store, pull, event_log
):
    d = await create(store)
    await write_events(store, d.deployment_id, [100, 150])
    nodes = [store, await open_store("n2"), await open_store("n3")]
    applied_per_round = []
    for _ in range(6):
        applied = 0
        for src in nodes:
            for dst in nodes:
                if src is not dst:
                    applied += await pull(src, dst)
        applied_per_round.append(applied)
    for node in nodes[1:]:
        assert event_log(await node.events(d.deployment_id)) == expected_log(250)
    assert applied_per_round[-1] == 0, applied_per_round
