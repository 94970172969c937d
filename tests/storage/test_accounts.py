"""Users, roles and cluster membership: typed access, signed replicated writes,
tombstoned deletes that hide rows without forgetting them, and the record's rules on
every value (scrypt parameters, permission shapes, names, urls)."""

from __future__ import annotations

import pytest
from storekit import log_entries, phash, pull

from storage.accounts import Accounts
from storage.entries import decode_body
from storage.store import InvalidRow

DEPLOYER = {"super_user": False, "operations": ["deploy_component", "list_deployments"]}
SUPER = {"super_user": True, "operations": []}


@pytest.fixture
def accounts(store):
    return Accounts(store)


async def logged(store):
    return [decode_body(e.body) for e in await log_entries(store, store.log_id)]


async def test_a_user_is_stored_and_read_back(accounts, store):
    u = await accounts.put_user("alice", password_hash=phash("1"), role="deployer", by="admin")
    assert await accounts.get_user("alice") == u
    assert (u.username, u.password_hash, u.role, u.active, u.deleted) == (
        "alice", phash("1"), "deployer", True, False,
    )  # fmt: skip
    assert (u.origin, u.version > 0) == ("n1", True)
    assert await accounts.get_user("nobody") is None
    [e] = await logged(store)
    assert (e.tbl, e.key, e.user, e.version) == ("users", "alice", "admin", u.version)


async def test_users_are_listed_by_name(accounts):
    for name in ("carol", "alice", "bob"):
        await accounts.put_user(name, password_hash=phash(name), role="deployer", by=None)
    assert [u.username for u in await accounts.list_users()] == ["alice", "bob", "carol"]


async def test_altering_a_user_writes_a_newer_version(accounts, store):
    first = await accounts.put_user("alice", password_hash=phash("1"), role="deployer", by=None)
    second = await accounts.put_user(
        "alice", password_hash=phash("2"), role="super_user", active=False, by="admin"
    )
    assert second.version > first.version
    got = await accounts.get_user("alice")
    assert (got.password_hash, got.role, got.active) == (phash("2"), "super_user", False)
    assert [u.username for u in await accounts.list_users()] == ["alice"]
    assert store.logs.own_head == 2


async def test_a_deleted_user_is_a_tombstone(accounts, store):
    await accounts.put_user("alice", password_hash=phash("secret"), role="deployer", by=None)
    await accounts.put_user("bob", password_hash=phash("b"), role="deployer", by=None)
    assert await accounts.delete_user("alice", by="admin") is True

    assert await accounts.get_user("alice") is None
    assert [u.username for u in await accounts.list_users()] == ["bob"]
    assert await accounts.delete_user("alice", by="admin") is False
    assert await accounts.delete_user("nobody", by="admin") is False
    # The row is kept (so the delete replicates and wins) but holds no credential.
    entries = await logged(store)
    tombstone = entries[-1]
    assert len(entries) == 3
    assert (tombstone.key, tombstone.data["deleted"], tombstone.data["password_hash"]) == (
        "alice", True, "",
    )  # fmt: skip
    [line, *_] = await store.read_audit_log(table="users", key="alice")
    assert (line["operation"], line["user"]) == ("delete", "admin")

    back = await accounts.put_user("alice", password_hash=phash("2"), role="deployer", by="admin")
    assert back.deleted is False
    assert await accounts.get_user("alice") == back


async def test_roles_are_stored_listed_and_tombstoned(accounts):
    su = await accounts.put_role("super_user", SUPER, by=None)
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
    await accounts.put_user("alice", password_hash=phash("a"), role="deployer", by=None)
    await accounts.put_user("bob", password_hash=phash("b"), role="deployer", by=None)
    assert await accounts.role_in_use("deployer") is True
    await accounts.delete_user("alice", by=None)
    assert await accounts.role_in_use("deployer") is True
    await accounts.put_user("bob", password_hash=phash("b"), role="super_user", by=None)
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


@pytest.mark.parametrize(
    ("write", "field"),
    [
        (lambda a: a.put_user("alice", password_hash="scrypt$a", role="r", by=None), "hash"),
        (
            lambda a: a.put_user(
                "alice",
                password_hash="scrypt$1048576$32$16$" + phash("x").split("$", 4)[4],
                role="r",
                by=None,
            ),
            "scrypt",
        ),
        (lambda a: a.put_user("bad name", password_hash=phash("a"), role="r", by=None), "user"),
        (lambda a: a.put_user("alice", password_hash=phash("a"), role="a/b", by=None), "role"),
        (lambda a: a.put_role("r", {"super_user": "yes"}, by=None), "permission"),
        (lambda a: a.put_role("r", {"super_user": True}, by=None), "canonical"),
        (lambda a: a.put_role("r", {"operations": ["b", "a"]}, by=None), "canonical"),
        (lambda a: a.put_member("n2", "http://10.0.0.2:9933", by=None), "url"),
        (lambda a: a.put_member("../n2", "wss://10.0.0.2:9933", by=None), "name"),
    ],
    ids=[
        "hash",
        "scrypt-bounds",
        "username",
        "role-name",
        "permission-shape",
        "permission-not-canonical",
        "operations-unsorted",
        "url",
        "member-name",
    ],
)
async def test_values_against_the_rules_are_never_written(accounts, store, write, field):
    with pytest.raises(InvalidRow):
        await write(accounts)
    assert store.logs.own_head == 0
    assert await accounts.list_users() == [] and await accounts.list_roles() == []


async def test_account_changes_are_announced_after_commit(accounts, store):
    with store.feed.subscribe(lambda n: n.tbl != "changelog") as sub:
        await accounts.put_user("alice", password_hash=phash("a"), role="r", by=None)
        await accounts.put_role("r", SUPER, by=None)
        await accounts.put_member("n2", "wss://x", by=None)
        await accounts.delete_user("alice", by=None)
        assert [(n.tbl, n.key) for n in sub.drain()] == [
            ("users", "alice"),
            ("roles", "r"),
            ("members", "n2"),
            ("users", "alice"),
        ]


async def test_a_delete_replicates_as_a_tombstone(accounts, store, open_store):
    await accounts.put_user("alice", password_hash=phash("a"), role="deployer", by=None)
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
