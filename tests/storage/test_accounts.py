"""Users, roles and cluster membership: typed access, replicated writes, tombstoned
deletes that hide rows without forgetting them."""

from __future__ import annotations

import pytest

from storage.accounts import Accounts

DEPLOYER = {"super_user": False, "operations": ["deploy_component", "list_deployments"]}


@pytest.fixture
def accounts(store):
    return Accounts(store)


async def test_a_user_is_stored_and_read_back(accounts, store):
    u = await accounts.put_user("alice", password_hash="scrypt$1", role="deployer", by="admin")
    assert await accounts.get_user("alice") == u
    assert (u.username, u.password_hash, u.role, u.active, u.deleted) == (
        "alice", "scrypt$1", "deployer", True, False,
    )  # fmt: skip
    assert (u.origin, u.version > 0) == ("n1", True)
    assert await accounts.get_user("nobody") is None
    [change] = (await store.changes_after(0))[0]
    assert (change.tbl, change.key, change.user) == ("users", "alice", "admin")


async def test_users_are_listed_by_name(accounts):
    for name in ("carol", "alice", "bob"):
        await accounts.put_user(name, password_hash="h", role="deployer", by=None)
    assert [u.username for u in await accounts.list_users()] == ["alice", "bob", "carol"]


async def test_altering_a_user_writes_a_newer_version(accounts, store):
    first = await accounts.put_user("alice", password_hash="h1", role="deployer", by=None)
    second = await accounts.put_user(
        "alice", password_hash="h2", role="super_user", active=False, by="admin"
    )
    assert second.version > first.version
    got = await accounts.get_user("alice")
    assert (got.password_hash, got.role, got.active) == ("h2", "super_user", False)
    assert [u.username for u in await accounts.list_users()] == ["alice"]
    assert await store.head_seq() == 2


async def test_a_deleted_user_is_a_tombstone(accounts, store):
    await accounts.put_user("alice", password_hash="scrypt$secret", role="deployer", by=None)
    await accounts.put_user("bob", password_hash="h", role="deployer", by=None)
    assert await accounts.delete_user("alice", by="admin") is True

    assert await accounts.get_user("alice") is None
    assert [u.username for u in await accounts.list_users()] == ["bob"]
    assert await accounts.delete_user("alice", by="admin") is False
    assert await accounts.delete_user("nobody", by="admin") is False
    # The row is kept (so the delete replicates and wins) but holds no credential.
    changes, _ = await store.changes_after(0)
    tombstone = changes[-1]
    assert len(changes) == 3
    assert (tombstone.key, tombstone.data["deleted"], tombstone.data["password_hash"]) == (
        "alice", True, "",
    )  # fmt: skip

    back = await accounts.put_user("alice", password_hash="h2", role="deployer", by="admin")
    assert back.deleted is False
    assert await accounts.get_user("alice") == back


async def test_roles_are_stored_listed_and_tombstoned(accounts):
    su = await accounts.put_role("super_user", {"super_user": True}, by=None)
    dep = await accounts.put_role("deployer", DEPLOYER, by="admin")
    assert await accounts.get_role("deployer") == dep
    assert dep.permission == DEPLOYER
    assert [r.role for r in await accounts.list_roles()] == ["deployer", "super_user"]

    altered = await accounts.put_role("deployer", {**DEPLOYER, "operations": []}, by="admin")
    assert altered.version > dep.version
    assert (await accounts.get_role("deployer")).permission["operations"] == []

    assert await accounts.delete_role("deployer", by="admin") is True
    assert await accounts.get_role("deployer") is None
    assert await accounts.list_roles() == [su]
    assert await accounts.delete_role("deployer", by="admin") is False


async def test_a_role_is_in_use_while_a_live_user_has_it(accounts):
    await accounts.put_role("deployer", DEPLOYER, by=None)
    assert await accounts.role_in_use("deployer") is False
    await accounts.put_user("alice", password_hash="h", role="deployer", by=None)
    await accounts.put_user("bob", password_hash="h", role="deployer", by=None)
    assert await accounts.role_in_use("deployer") is True
    await accounts.delete_user("alice", by=None)
    assert await accounts.role_in_use("deployer") is True
    await accounts.put_user("bob", password_hash="h", role="super_user", by=None)
    assert await accounts.role_in_use("deployer") is False
    assert await accounts.role_in_use("super_user") is True


async def test_members_are_stored_listed_and_tombstoned(accounts):
    await accounts.put_member("n2", "wss://10.0.0.2:9933", by="admin")
    n1 = await accounts.put_member("n1", "wss://10.0.0.1:9933", by="admin")
    moved = await accounts.put_member("n2", "wss://10.0.0.22:9933", by="admin")
    assert await accounts.get_member("n2") == moved
    assert [(m.name, m.url) for m in await accounts.list_members()] == [
        ("n1", "wss://10.0.0.1:9933"),
        ("n2", "wss://10.0.0.22:9933"),
    ]

    assert await accounts.delete_member("n2", by="admin") is True
    assert await accounts.delete_member("n2", by="admin") is False
    assert await accounts.list_members() == [n1]
    everyone = await accounts.list_members(include_deleted=True)
    assert [(m.name, m.deleted) for m in everyone] == [("n1", False), ("n2", True)]
    assert (await accounts.get_member("n2")).deleted is True
    assert await accounts.get_member("n9") is None


async def test_account_changes_are_announced_after_commit(accounts, store):
    with store.feed.subscribe(lambda n: n.tbl != "changelog") as sub:
        await accounts.put_user("alice", password_hash="h", role="r", by=None)
        await accounts.put_role("r", {}, by=None)
        await accounts.put_member("n2", "wss://x", by=None)
        await accounts.delete_user("alice", by=None)
        assert [(n.tbl, n.key) for n in sub.drain()] == [
            ("users", "alice"),
            ("roles", "r"),
            ("members", "n2"),
            ("users", "alice"),
        ]


async def test_a_delete_replicates_as_a_tombstone(accounts, store, open_store, pull):
    await accounts.put_user("alice", password_hash="h", role="deployer", by=None)
    await accounts.put_member("n3", "wss://n3", by=None)
    n2 = await open_store("n2")
    await pull(store, n2)
    assert await Accounts(n2).get_user("alice") is not None
    await accounts.delete_user("alice", by="admin")
    await accounts.delete_member("n3", by="admin")
    await pull(store, n2)
    replica = Accounts(n2)
    assert await replica.get_user("alice") is None
    assert await replica.list_users() == []
    assert await replica.list_members() == []
    assert await replica.list_members(include_deleted=True) == await accounts.list_members(
        include_deleted=True
    )
