"""A realistic history written through the real store, built once per session (see the
``template`` fixture) and copied into each test that needs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storekit import FakeWall, HmacSigner, deployment_fields, phash

from storage.accounts import Accounts
from storage.hlc import HybridClock
from storage.store import Store

__all__ = ["HistoryIds", "build_history", "write_history"]


@dataclass(frozen=True)
class HistoryIds:
    done: str  # success, pinned, with events and results
    failed: str  # failed, 230 events (the log is truncated), payload dropped
    running: str  # still installing
    end_ms: int  # the wall clock when the history ends


async def build_history(path: Path) -> HistoryIds:
    wall = FakeWall()
    store = await Store.open(path, node="n1", clock=HybridClock(wall), signer=HmacSigner("n1"))
    try:
        return await write_history(store, wall)
    finally:
        await store.close()


async def write_history(store: Store, wall: FakeWall) -> HistoryIds:
    """Three deploys with events and results, a pin, a payload drop, what runs where,
    and accounts with updates and tombstones: every replicated table, written by
    ``store``'s node."""
    node = store.node

    async def create(**overrides: object) -> str:
        d = await store.create_deployment(deployment_fields(origin_node=node, **overrides))
        return d.deployment_id

    accounts = Accounts(store)
    await accounts.put_member("n1", "wss://10.0.0.1:9933", by="admin")
    await accounts.put_member("n2", "wss://10.0.0.2:9933", by="admin")
    await accounts.put_member("n3", "wss://10.0.0.3:9933", by="admin")
    await accounts.delete_member("n3", by="admin")
    await accounts.put_role("super_user", {"super_user": True, "operations": []}, by=None)
    await accounts.put_role(
        "deployer", {"super_user": False, "operations": ["deploy_component"]}, by="admin"
    )
    await accounts.put_user("admin", password_hash=phash("admin"), role="super_user", by=None)
    await accounts.put_user("alice", password_hash=phash("a1"), role="deployer", by="admin")
    await accounts.put_user("bob", password_hash=phash("b"), role="deployer", by="admin")
    await accounts.put_user("alice", password_hash=phash("a2"), role="deployer", by="alice")
    await accounts.delete_user("bob", by="admin")

    done = await create(project="web", user="alice")
    for status in ("extracting", "installing", "staging", "activating"):
        wall.advance(100)
        await store.write_deployment(
            done, {"status": status, "phase": status},
            [("phase", {"phase": status, "status": "start"})],
        )  # fmt: skip
        await store.put_result(done, status="staged", phase=status)
    await store.put_result(done, status="active", completed_at=wall.ms)
    await store.write_deployment(
        done, {"status": "success", "completed_at": wall.advance(50)},
        [("finished", {"status": "success"})],
    )  # fmt: skip
    await store.set_pin(done, True, user="alice")
    await store.put_component(
        "web", deployment_id=done, payload_hash="ab" * 32, activated_at=wall.ms
    )

    wall.advance(1000)
    failed = await create(project="api", user="admin", started_at=wall.ms)
    await store.write_deployment(
        failed, events=[("install", {"stream": "stderr", "line": f"e{i}"}) for i in range(230)]
    )
    error = {"message": "exit 1", "code": "install_failed", "phase": "install"}
    await store.put_result(failed, status="failed", error=error)
    await store.write_deployment(
        failed, {"status": "failed", "error": error, "completed_at": wall.advance(10)},
        [("finished", {"status": "failed"})],
    )  # fmt: skip
    await store.mark_payload_dropped(failed, user="admin")

    wall.advance(1000)
    running = await create(project="web", started_at=wall.ms)
    await store.write_deployment(running, {"status": "installing"})
    return HistoryIds(done, failed, running, wall.ms)
