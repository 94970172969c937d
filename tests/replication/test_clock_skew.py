"""A node whose clock runs an hour ahead (issue 8, "Clocks"): in-process services over
real TLS and real SQLite, every node's hybrid clock over a fake wall clock.

What it shows: no link stops; the skewed node's changes are parked on the others, with
the alarm (``parked`` in ``cluster_status``, ``cairn_replication_parked`` in /metrics),
and without dragging their clocks forward; changes flow normally the other way; and
once its clock is corrected and the others' clocks reach the versions it minted while
skewed, everything is applied and every node holds the same state, and its new changes
are no longer parked.

(A corrected node's hybrid clock does not go back: what it writes until real time
reaches the versions it minted while skewed is ahead too, and parked as well. That is
why convergence here needs the others' clocks to pass the skew; see
docs/operations.md, "A node's clock was far ahead".)
"""

from __future__ import annotations

from typing import Any

from mesh import HASH, Mesh, dump, new_deployment, wait_until

from node.metrics import Metrics
from storage.hlc import HybridClock, version_ms, wall_ms
from storage.store import Store

HOUR_MS = 3_600_000


async def _parked(store: Store, writer: str) -> int:
    row = await store.db.fetchone(
        "SELECT COUNT(*) AS n FROM changelog WHERE state = 1 AND writer = ?", (writer,)
    )
    return int(row["n"]) if row else 0


def _metric(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


async def test_a_node_an_hour_ahead_is_parked_not_followed_and_converges_later(
    mesh: Mesh,
) -> None:
    now = [wall_ms()]  # the true time, moved by hand
    skew = [HOUR_MS]  # how far c's clock is ahead of it
    clocks = {
        "a": HybridClock(lambda: now[0]),
        "b": HybridClock(lambda: now[0]),
        "c": HybridClock(lambda: now[0] + skew[0]),
    }
    a, b, c = await mesh.add("a", "b", "c", clocks=clocks)
    for n in (a, b, c):
        await mesh.start(n.name)
    await mesh.connected("a", "b", "c")

    # c writes while an hour ahead: a user and a deployment row.
    await c.accounts.put_user("carol", password_hash=HASH, role="r", by="admin")
    d = await c.store.create_deployment(new_deployment("c"))

    async def parked_everywhere() -> bool:
        return all([await _parked(n.store, "c") >= 2 for n in (a, b)])

    await wait_until(parked_everywhere, timeout_s=15, what="c's changes to be parked on a and b")
    for n in (a, b):
        assert await n.accounts.get_user("carol") is None
        assert await n.store.get_deployment(d.deployment_id) is None
        status = await n.svc.status()
        peer = next(p for p in status["peers"] if p["name"] == "c")
        assert peer["state"] == "connected" and peer["parked"] >= 2, peer
        text = await Metrics().render(n.store, n.blobs, status)
        assert _metric(text, "cairn_replication_parked") >= 2
        # Not dragged forward: what a and b write is stamped with their own time.
        assert version_ms(n.store.clock.tick()) < now[0] + 60_000

    # The links go on, both ways: what a and b write reaches everyone, c included.
    await a.accounts.put_user("alice", password_hash=HASH, role="r", by="admin")
    await b.accounts.put_user("bob", password_hash=HASH, role="r", by="admin")

    async def flowing() -> bool:
        return all(
            [await n.accounts.get_user(u) is not None for n in (a, b, c) for u in ("alice", "bob")]
        )

    await wait_until(flowing, timeout_s=15, what="a's and b's users to reach every node")

    # c's clock is corrected; then the true time reaches what c minted while ahead.
    skew[0] = 0
    now[0] += HOUR_MS
    for n in (a, b):
        await n.svc.maintain_once()  # the maintenance pass retries parked entries

    async def converged() -> bool:
        dumps = [await dump(n.store) for n in (a, b, c)]
        return dumps[0] == dumps[1] == dumps[2]

    await wait_until(converged, timeout_s=15, what="every node to hold the same state")
    for n in (a, b):
        assert await _parked(n.store, "c") == 0
        assert await n.accounts.get_user("carol") is not None
        assert await n.store.get_deployment(d.deployment_id) is not None
        text = await Metrics().render(n.store, n.blobs, await n.svc.status())
        assert _metric(text, "cairn_replication_parked") == 0

    # From here on c's changes apply at once (nothing parked, no maintenance pass).
    await c.accounts.put_user("carol-later", password_hash=HASH, role="r", by="admin")

    async def applied() -> bool:
        return all([await n.accounts.get_user("carol-later") is not None for n in (a, b)])

    await wait_until(applied, timeout_s=15, what="c's new change to be applied")
    for n in (a, b):
        assert await _parked(n.store, "c") == 0
        peer: dict[str, Any] = next(p for p in (await n.svc.status())["peers"] if p["name"] == "c")
        assert peer["state"] == "connected" and peer["disconnects"] == 0, peer
