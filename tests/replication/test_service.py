"""Replication between in-process services over real TLS and real SQLite stores."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ADMIN, Api, component, until_users_here
from mesh import HASH, Mesh, dump, new_deployment, wait_until
from procs import free_port

from node.app import create_app
from node.appkeys import Services
from node.cluster import cluster_factory, load_signer
from node.config import parse_config
from replication.codec import decode, encode
from replication.messages import Batch, LogRange, WireEntry
from replication.peer_queue import Backoff, ChangeReceiver, PeerStats
from replication.session import Settings
from storage.records import DeploymentStatus, NodeStatus
from storage.store import Store


async def _write_some(store: Store, tag: str, users: int = 3) -> str:
    """A deployment with events and a result, plus users: every kind of replicated row."""
    from storage.accounts import Accounts

    d = await store.create_deployment(new_deployment(store.node))
    await store.write_deployment(
        d.deployment_id,
        {"status": DeploymentStatus.EXTRACTING},
        [("deployment", {"deployment_id": d.deployment_id}), ("install", {"line": tag})],
    )
    await store.put_result(d.deployment_id, status=NodeStatus.STAGED, phase="stage")
    for i in range(users):
        await Accounts(store).put_user(f"{tag}{i}", password_hash=HASH, role="r", by="admin")
    return d.deployment_id


async def _converged(*stores: Store) -> bool:
    dumps = [await dump(s) for s in stores]
    return all(d == dumps[0] for d in dumps[1:])


# -- moving rows ----------------------------------------------------------------------


async def test_two_nodes_replicate_both_ways(mesh: Mesh) -> None:
    a, b = await mesh.add("a", "b")
    await mesh.start("a")
    await mesh.start("b")
    await mesh.connected("a", "b")
    did = await _write_some(a.store, "from-a")
    await _write_some(b.store, "from-b")
    await b.accounts.put_role("r", {"super_user": False, "operations": []}, by="admin")

    await wait_until(lambda: _converged(a.store, b.store), what="identical stores")
    copy = await b.store.get_deployment(did)
    assert copy is not None and copy.origin == "a" and copy.status == "extracting"
    assert [e.event for e in await b.store.events(did)] == ["deployment", "install"]
    assert [r.node for r in await b.store.results(did)] == ["a"]

    # Each side holds the other's log up to its head, and nothing is left to send; b's
    # own writes never came back to it.
    await wait_until(
        lambda: b.store.logs.head(a.store.log_id) == a.store.logs.own_head,
        what="b holds a's log",
    )
    assert a.store.logs.head(b.store.log_id) == b.store.logs.own_head
    status = await b.svc.status()
    assert status["peers"][0]["lag_changes"] == 0
    assert status["peers"][0]["lag_bytes"] == 0


async def test_three_nodes_converge(mesh: Mesh) -> None:
    nodes = await mesh.add("a", "b", "c")
    for n in nodes:
        await mesh.start(n.name)
    await mesh.connected("a", "b", "c")
    for n in nodes:
        await _write_some(n.store, f"by-{n.name}-")
    # Concurrent writes of one row on every node: last writer wins everywhere.
    for n in nodes:
        await n.accounts.put_user("shared", password_hash=HASH, role=f"r{n.name}", by=n.name)

    await wait_until(lambda: _converged(*(n.store for n in nodes)), what="3 identical stores")
    winners = {(await n.accounts.get_user("shared")).role for n in nodes}  # type: ignore[union-attr]
    assert len(winners) == 1
    assert len((await dump(nodes[0].store))["users"]) == 3 * 3 + 1


async def test_restart_resumes_from_stored_position(mesh: Mesh) -> None:
    a, b = await mesh.add("a", "b")
    await mesh.start("a")
    await mesh.start("b")
    await mesh.connected("a", "b")
    for i in range(10):
        await a.accounts.put_user(f"u{i}", password_hash=HASH, role="r", by="admin")
    await wait_until(lambda: _converged(a.store, b.store), what="first ten")
    await mesh.stop("b")
    position = b.store.logs.head(a.store.log_id)
    assert position == a.store.logs.own_head

    for i in range(10, 15):
        await a.accounts.put_user(f"u{i}", password_hash=HASH, role="r", by="admin")
    assert (await b.accounts.get_user("u14")) is None
    await mesh.start("b")
    await wait_until(lambda: _converged(a.store, b.store), what="the five written meanwhile")
    peer = (await b.svc.status())["peers"][0]
    # Only what was written while b was away travelled: the subscription started at the
    # stored position, not at zero.
    assert peer["changes_received"] == 5
    assert peer["changes_applied"] == 5
    assert b.store.logs.head(a.store.log_id) == position + 5


async def test_transitive_while_origin_is_down(mesh: Mesh) -> None:
    a, b, c = await mesh.add("a", "b", "c")
    for n in (a, b):
        await mesh.start(n.name)
    await mesh.connected("a", "b")
    did = await _write_some(a.store, "only-a")
    await wait_until(lambda: _converged(a.store, b.store), what="b has a's rows")
    await mesh.stop("a")

    await mesh.start("c")
    await wait_until(lambda: _converged(b.store, c.store), what="c has a's rows via b")
    d = await c.store.get_deployment(did)
    assert d is not None and d.origin == "a"
    peers = {p["name"]: p for p in (await c.svc.status())["peers"]}
    assert peers["a"]["state"] != "connected"
    assert peers["a"]["changes_received"] == 0
    assert peers["b"]["changes_applied"] >= 6  # deployment, events, result, three users
    assert peers["b"]["scope"] == "relay" and peers["b"]["refused"] == 0


async def _batches(store: Store, limit: int) -> list[Batch]:
    """A sender's batches of its own log, through the codec (what the wire carries)."""
    out: list[Batch] = []
    after = 0
    while True:
        chunk = await store.read_log(store.log_id, after, max_entries=limit, max_bytes=1 << 20)
        if chunk.last == after:
            return out
        msg = Batch(
            (LogRange(store.log_id, after, chunk.last, chunk.compacted),),
            tuple(WireEntry(e.log_id, e.oseq, e.writer, e.key_id, e.body, e.sig)
                  for e in chunk.entries),
            0, 0,
        )  # fmt: skip
        decoded = decode(encode(msg))
        assert isinstance(decoded, Batch)
        out.append(decoded)
        after = chunk.last


async def test_duplicated_and_reordered_batches_leave_identical_state(mesh: Mesh) -> None:
    a, *receivers = await mesh.add("a", "r0", "r1", "r2")
    first = await _write_some(a.store, "u", users=5)
    await _write_some(a.store, "u", users=5)  # newer versions of the same users
    await a.store.write_deployment(first, {"status": DeploymentStatus.FAILED})
    batches = await _batches(a.store, limit=3)
    assert len(batches) > 4

    async def feed(node: Any, seq: list[Batch]) -> list[Any]:
        rx = ChangeReceiver(node.store, "a", a.store.log_id, PeerStats(), keyring=None,
                            max_clock_offset_ms=60_000)  # fmt: skip
        return [await rx.on_batch(batch) for batch in seq]

    await feed(receivers[0], batches)  # in order: the reference
    # Every batch twice, then everything again newest first (all behind the position).
    await feed(receivers[1], [b for b in batches for _ in (0, 1)])
    await feed(receivers[1], list(reversed(batches)))
    # A batch that skips ahead is a gap: nothing of it applies; delivery then resumes.
    (report,) = await feed(receivers[2], [batches[1]])
    assert report.gaps == [a.store.log_id] and report.applied == 0
    assert receivers[2].store.logs.head(a.store.log_id) == 0
    await feed(receivers[2], batches)

    reference = await dump(receivers[0].store)
    assert reference["users"] and reference["deployment_events"]
    for other in receivers[1:]:
        assert await dump(other.store) == reference
    assert reference == await dump(a.store)
    d = await receivers[1].store.get_deployment(first)
    assert d is not None and d.status is DeploymentStatus.FAILED


# -- membership and status ------------------------------------------------------------


async def test_cluster_status_shapes_and_states(mesh: Mesh) -> None:
    a, b, c, _d = await mesh.add("a", "b", "c", "d")  # d is configured, never started
    accepted: list[asyncio.StreamWriter] = []

    async def mute(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)  # c takes the connection and never says a word

    silent = await asyncio.start_server(mute, "127.0.0.1", c.port)
    try:
        await mesh.start("a")
        await mesh.start("b")
        await mesh.connected("a", "b")
        await a.accounts.put_user("x", password_hash=HASH, role="r", by="admin")
        await wait_until(lambda: _converged(a.store, b.store))

        async def settled() -> dict[str, Any] | None:
            status = await a.svc.status()
            p = {p["name"]: p for p in status["peers"]}
            d_down = p["d"]["state"] == "disconnected" and p["d"]["last_error"] is not None
            return status if d_down and accepted and p["c"]["state"] == "connecting" else None

        status = await wait_until(settled, what="c connecting and d disconnected")
    finally:
        silent.close()
        for w in accepted:
            w.close()
        await silent.wait_closed()
    assert status["node"] == "a" and status["cluster_id"] == mesh.cluster_id
    assert [p["name"] for p in status["peers"]] == ["b", "c", "d"]
    keys = {"name", "url", "state", "last_seen", "lag_changes", "lag_bytes", "transfers",
            "last_error"}  # fmt: skip
    for p in status["peers"]:
        assert keys <= p.keys()
    pb, pc, pd = status["peers"]
    assert pb["state"] == "connected" and pb["url"] == b.url and pb["inbound"] is True
    assert pb["lag_changes"] == 0 and pb["lag_bytes"] == 0 and pb["transfers"] == []
    assert abs(pb["last_seen"] - time.time() * 1000) < 10_000
    assert pc["state"] == "connecting" and pc["last_seen"] is None  # stuck in the TLS handshake
    assert pd["state"] == "disconnected" and "cannot reach 'd'" in pd["last_error"]
    assert pd["last_seen"] is None and pd["inbound"] is False and pd["lag_changes"] is None
    assert a.svc.members() == ["a", "b", "c", "d"]
    assert a.svc.connected() == {"b"}


async def test_members_added_and_removed_without_restart(mesh: Mesh) -> None:
    a, b, d = await mesh.add("a", "b", "d")
    a.peers = [p for p in a.peers if p.name == "b"]
    b.peers = [p for p in b.peers if p.name == "a"]
    d.peers = [p for p in d.peers if p.name == "a"]
    for n in (a, b, d):
        await mesh.start(n.name)
    await mesh.connected("a", "b")

    async def d_refused_by_a() -> bool:
        peer = (await d.svc.status())["peers"][0]
        return "not a member" in (peer["last_error"] or "")

    await wait_until(d_refused_by_a, what="a refusing d")
    assert "d" not in a.svc.members()

    await a.accounts.put_member("d", d.url, by="admin")  # add_node
    await mesh.connected("a", "d")
    assert a.svc.members() == ["a", "b", "d"]
    await wait_until(lambda: "d" in b.svc.members(), what="membership replicated to b")

    assert await a.accounts.delete_member("d", by="admin")  # remove_node
    await wait_until(
        lambda: "d" not in a.svc.connected() | a.svc.subscribers(), what="d disconnected"
    )
    await wait_until(d_refused_by_a, what="a refusing d again")
    assert a.svc.members() == ["a", "b"]

    # A tombstone removes even a peer named in the config file.
    await a.accounts.put_member("b", b.url, by="admin")
    # Read-your-writes while senders read the store all the time (storage/db.py's read lock).
    assert await a.accounts.delete_member("b", by="admin")
    await wait_until(lambda: a.svc.members() == ["a"], what="b removed")
    await wait_until(lambda: not a.svc.connected() and not a.svc.subscribers())


async def test_stop_leaves_nothing_running(mesh: Mesh) -> None:
    before = asyncio.all_tasks()
    a, b = await mesh.add("a", "b")
    await mesh.start("a")
    await mesh.start("b")
    await mesh.connected("a", "b")
    await a.accounts.put_user("x", password_hash=HASH, role="r", by="admin")
    await wait_until(lambda: _converged(a.store, b.store))
    await mesh.stop("a")
    await mesh.stop("b")
    assert a.store.feed.subscriber_count == 0 and b.store.feed.subscriber_count == 0
    assert asyncio.all_tasks() - before == set()


def test_backoff_is_exponential_jittered_and_bounded() -> None:
    backoff = Backoff(0.1, 2.0)
    rng = random.Random(7)
    caps = [min(2.0, 0.1 * 2**n) for n in range(10)]
    delays = [backoff.delay(n, rng) for n in range(10)]
    for delay, cap in zip(delays, caps, strict=True):
        assert cap / 2 <= delay <= cap
    again = random.Random(7)
    assert delays == [backoff.delay(n, again) for n in range(10)]  # the rng is the only input
    assert backoff.delay(10_000, rng) <= 2.0  # no overflow however long it has failed
    assert len({round(backoff.delay(9, random.Random(s)), 6) for s in range(20)}) > 10


def test_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="dead_after_s"):
        Settings(heartbeat_s=2.0, dead_after_s=1.0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        Settings(chunk_bytes=64 << 20)
    with pytest.raises(ValueError, match="credit"):
        Settings(credit_batches=0)


# -- three real node apps -------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


async def test_three_node_apps_deploy_end_to_end(
    aiohttp_client: Any, tmp_path: Path, mesh: Mesh
) -> None:
    names = ["n1", "n2", "n3"]
    ports = {n: free_port() for n in names}
    apis: dict[str, Api] = {}
    for name in names:
        certs = mesh.issue(name)
        config = parse_config(
            {
                "node": {"name": name, "data_dir": str(tmp_path / "apps" / name)},
                "auth": {"bootstrap_user": ADMIN[0], "bootstrap_password": ADMIN[1]},
                "peer": {"host": "127.0.0.1", "port": ports[name]},
                "tls": {"ca": str(mesh.ca), "cert": str(certs.cert), "key": str(certs.key)},
                "peers": [
                    {"name": o, "url": f"wss://127.0.0.1:{ports[o]}"} for o in names if o != name
                ],
                "replication": {
                    "heartbeat_s": 0.2,
                    "dead_after_s": 1.5,
                    "reconnect_min_s": 0.05,
                    "reconnect_max_s": 0.3,
                },
            },
            base=tmp_path,
            env={},
        )
        app = create_app(config, cluster_factory=cluster_factory, signer=load_signer(config))
        apis[name] = Api(await aiohttp_client(app), app)

    def services(name: str) -> Services:
        return Services(apis[name].app)

    await wait_until(
        lambda: all(services(n).ctx.cluster.connected() == set(names) - {n} for n in names),
        what="full mesh",
    )
    for name in names:  # each creates (or receives) the admin user once caught up
        await until_users_here(apis[name])
    status, body = await apis["n1"].op("cluster_status")
    assert status == 200 and [p["state"] for p in body["peers"]] == ["connected"] * 2

    payload = component(check="test -f index.html", **{"data.bin": "x" * 100_000})
    status, body = await apis["n1"].deploy("web", payload)
    assert status == 200, body
    did = body["deployment_id"]
    assert [(r["node"], r["status"]) for r in body["peer_results"]] == [
        (n, "active") for n in names
    ]

    async def record(name: str) -> dict[str, Any] | None:
        status, rec = await apis[name].op("get_deployment", deployment_id=did)
        return rec if status == 200 and rec["status"] == "success" else None

    records = [await wait_until(lambda n=n: record(n), what=f"success on {n}") for n in names]

    def essentials(rec: dict[str, Any]) -> tuple[Any, ...]:
        results = tuple((r["node"], r["status"]) for r in rec["peer_results"])
        return rec["payload_hash"], rec["status"], tuple(rec["expected_nodes"]), results

    assert len({essentials(r) for r in records}) == 1
    assert essentials(records[0])[3] == tuple((n, "active") for n in names)
    trees = []
    for name in names:
        ctx = services(name).ctx
        assert ctx.components.current("web") == did
        trees.append(_tree(ctx.components.release_dir("web", did)))
        assert ctx.blobs.stats() == (1, len(payload))
    assert trees[0] == trees[1] == trees[2] and "data.bin" in trees[0]
