"""The one definition of a project's active deploy (SPEC 5), kept in ``desired_releases``:
the newest success by the version its row was created at, whatever the wall clocks and
``started_at`` say and whatever order rows arrive in; and the facts any node may record
about a deployment (pins, payload drops), one row per node, which never conflict."""

from __future__ import annotations

from storekit import T0, pull, quarantine_rows, snapshot


async def succeed(store, d):
    done, _ = await store.write_deployment(d.deployment_id, {"status": "success"})
    return done


async def desired_id(store, project="web"):
    d = await store.desired(project)
    return None if d is None else d.deployment_id


async def test_the_newest_success_by_creation_wins_and_never_goes_back(store, create):
    assert await store.desired("web") is None
    # d1 claims a later start than d2 (a wall clock ahead), but was created first.
    d1 = await create(store, started_at=T0 + 36_000_000)
    d2 = await create(store, started_at=T0)
    assert d1.created_version < d2.created_version
    await succeed(store, d2)
    assert await desired_id(store) == d2.deployment_id
    await succeed(store, d1)
    assert await desired_id(store) == d2.deployment_id
    d3 = await create(store)
    await store.write_deployment(d3.deployment_id, {"status": "failed"})
    d4 = await create(store, project="api")
    await succeed(store, d4)
    assert await store.desired_releases() == {
        "web": (d2.deployment_id, d2.created_version, "deploy"),
        "api": (d4.deployment_id, d4.created_version, "deploy"),
    }
    # Rebuilding from the rows (after a migration or a rename) gives the same answer.
    before = await store.desired_releases()
    await store.rebuild_desired()
    assert await store.desired_releases() == before


async def test_a_deploy_made_after_seeing_another_wins_whatever_the_wall_clocks(
    open_store, new_wall, create
):
    ahead = await open_store("n1", wall=new_wall(T0 + 50_000))
    behind = await open_store("n2", wall=new_wall(T0))
    d1 = await succeed(ahead, await create(ahead, started_at=T0 + 50_000))
    await pull(ahead, behind)
    assert await desired_id(behind) == d1.deployment_id
    d2 = await succeed(behind, await create(behind, started_at=T0))
    assert d2.started_at < d1.started_at and d2.created_version > d1.created_version
    await pull(behind, ahead)
    for store in (ahead, behind):
        assert await desired_id(store) == d2.deployment_id


async def test_replicas_agree_on_the_desired_release_whatever_order_rows_arrive(open_store, create):
    n1, n2 = await open_store("n1"), await open_store("n2")
    d1 = await create(n1)
    d2 = await create(n2)  # concurrently: in the same millisecond, the same version
    assert d1.created_version == d2.created_version
    await succeed(n2, d2)
    await succeed(n1, d1)
    newest = max((d1, d2), key=lambda d: (d.created_version, d.deployment_id))
    n3, n4 = await open_store("n3"), await open_store("n4")
    await pull(n1, n3)
    await pull(n2, n3)
    await pull(n2, n4)
    await pull(n1, n4)
    await pull(n1, n2)
    await pull(n2, n1)
    for store in (n1, n2, n3, n4):
        assert await desired_id(store) == newest.deployment_id


async def test_a_node_local_deploy_is_desired_only_on_its_origin(open_store, create):
    n1, n2 = await open_store("n1"), await open_store("n2")
    shared = await succeed(n1, await create(n1))
    local = await succeed(n1, await create(n1, replicated=False, expected_nodes=["n1"]))
    await pull(n1, n2)
    assert await desired_id(n1) == local.deployment_id
    assert await desired_id(n2) == shared.deployment_id


async def test_pins_by_two_nodes_are_two_rows_and_the_newest_wins(open_store, new_wall, create):
    w1, w2 = new_wall(), new_wall()
    n1, n2 = await open_store("n1", wall=w1), await open_store("n2", wall=w2)
    d = await succeed(n1, await create(n1))
    await pull(n1, n2)
    await n1.set_pin(d.deployment_id, True, user="alice")
    w2.advance(10)
    await n2.set_pin(d.deployment_id, False, user="bob")
    await pull(n1, n2)
    await pull(n2, n1)
    for store in (n1, n2):
        assert await store.pinned([d.deployment_id]) == set()
    # n1 pins again, later than n2's unpin: pinned everywhere.
    w1.advance(100)
    await n1.set_pin(d.deployment_id, True, user="alice")
    await pull(n1, n2)
    await pull(n2, n1)
    for store in (n1, n2):
        assert await store.pinned([d.deployment_id]) == {d.deployment_id}
        assert await quarantine_rows(store) == []
    rows = await n2.db.fetchall("SELECT node FROM pins ORDER BY node")
    assert [r["node"] for r in rows] == ["n1", "n2"]
    # The deployment row itself was never rewritten by anyone but its origin.
    assert await n2.get_deployment(d.deployment_id) == d


async def test_payload_drops_by_two_nodes_never_conflict(open_store, create):
    n1, n2 = await open_store("n1"), await open_store("n2")
    d = await succeed(n1, await create(n1, payload_hash="cd" * 32))
    await n1.write_deployment(d.deployment_id, events=[("finished", {"status": "success"})])
    await pull(n1, n2)
    assert await n1.mark_payload_dropped(d.deployment_id, user="alice") is True
    assert await n2.mark_payload_dropped(d.deployment_id, user="bob") is True
    await pull(n1, n2)
    await pull(n2, n1)
    for store in (n1, n2):
        assert await store.dropped_by(d.deployment_id) == {"n1", "n2"}
        assert await store.dropped([d.deployment_id]) == {d.deployment_id}
        assert await store.live_references("cd" * 32) == 0
        assert await store.mark_payload_dropped(d.deployment_id, user="carol") is False
        assert await quarantine_rows(store) == []
    assert await snapshot(n1) == await snapshot(n2)
    assert await n2.get_deployment(d.deployment_id) == d
