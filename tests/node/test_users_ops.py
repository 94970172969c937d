"""User and role operations (Harper shapes), password storage, and the audit log."""

from __future__ import annotations

import time
from typing import Any

from helpers import ADMIN, Api, basic

from node.appkeys import Services
from node.auth import verify_password

PW = "first-password-1"


async def _users(api: Api) -> dict[str, Any]:
    status, body = await api.op("list_users")
    assert status == 200 and isinstance(body, list), body
    return {u["username"]: u for u in body}


async def _roles(api: Api) -> dict[str, Any]:
    status, body = await api.op("list_roles")
    assert status == 200 and isinstance(body, list), body
    return {r["role"]: r for r in body}


async def test_user_and_role_lifecycle_in_harper_shapes(api: Api) -> None:
    perm = {"super_user": False, "operations": ["list_deployments", "get_deployment"]}
    status, body = await api.op("add_role", role="viewer", permission=perm)
    assert status == 200, body
    assert body["role"] == "viewer" and body["permission"] == {
        "super_user": False,
        "operations": ["get_deployment", "list_deployments"],
    }
    roles = await _roles(api)
    assert set(roles) == {"super_user", "viewer"}
    assert roles["super_user"]["permission"]["super_user"] is True

    status, body = await api.op("add_user", username="bob", password=PW, role="viewer")
    assert (status, body) == (200, {"message": "bob successfully added"})
    users = await _users(api)
    assert set(users) == {ADMIN[0], "bob"}
    assert users["bob"] == {
        "username": "bob",
        "active": True,
        "role": {"role": "viewer", "permission": roles["viewer"]["permission"]},
    }

    status, body = await api.op(
        "alter_role", role="viewer", permission={"operations": ["list_deployments"]}
    )
    assert status == 200 and body["permission"]["operations"] == ["list_deployments"]
    status, body = await api.op("add_role", role="ops", permission={"super_user": True})
    assert status == 200
    status, body = await api.op("alter_user", username="bob", role="ops")
    assert (status, body) == (200, {"message": "bob successfully altered"})
    assert (await _users(api))["bob"]["role"]["permission"]["super_user"] is True

    status, body = await api.op("drop_user", username="bob")
    assert (status, body) == (200, {"message": "bob successfully deleted"})
    assert set(await _users(api)) == {ADMIN[0]}
    status, body = await api.op("drop_role", role="viewer")
    assert status == 200 and "viewer" in body["message"]
    assert set(await _roles(api)) == {"super_user", "ops"}
    # A dropped user's name can be used again, with a fresh password.
    status, body = await api.op("add_user", username="bob", password="other-password", role="ops")
    assert status == 200
    status, _ = await api.op("list_users", auth=basic("bob", "other-password"))
    assert status == 200
    status, _ = await api.op("list_users", auth=basic("bob", PW))
    assert status == 401


async def test_passwords_are_scrypt_hashes_and_never_returned(api: Api) -> None:
    await api.op("add_user", username="bob", password=PW, role="super_user")
    await api.op("add_user", username="carol", password=PW, role="super_user")
    store = Services(api.app).store
    rows = {
        r["username"]: r["password_hash"]
        for r in await store.db.fetchall("SELECT username, password_hash FROM users")
    }
    for name in ("bob", "carol"):
        scheme, n, r, p, _salt, _digest = rows[name].split("$")
        assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
        assert verify_password(PW, rows[name]) and not verify_password(PW + "x", rows[name])
    assert rows["bob"] != rows["carol"]  # salted
    # Nothing the API answers carries a password or its hash.
    for op, fields in (
        ("list_users", {}),
        ("read_audit_log", {"table": "users"}),
        ("read_audit_log", {"table": "hdb_user", "key": "bob"}),
    ):
        resp = await api.client.post(
            "/", json={"operation": op, **fields}, headers={"Authorization": api.auth}
        )
        text = await resp.text()
        assert resp.status == 200
        assert PW not in text and "scrypt" not in text and "password" not in text
        assert rows["bob"].split("$")[-1] not in text
    # ... nor does the database hold the password itself, in any file.
    await store.db.fetchall("PRAGMA wal_checkpoint(FULL)")
    data_dir = Services(api.app).ctx.blobs.root.parent
    for f in data_dir.glob("cairn.db*"):
        assert PW.encode() not in f.read_bytes(), f


async def test_changed_password_takes_effect_at_once(api: Api) -> None:
    await api.op("add_user", username="bob", password=PW, role="super_user")
    old, new = basic("bob", PW), basic("bob", "second-password-2")
    status, _ = await api.op("list_users", auth=old)  # a verified password is remembered
    assert status == 200
    status, body = await api.op("alter_user", username="bob", password="second-password-2")
    assert status == 200, body
    status, body = await api.op("list_users", auth=old)
    assert status == 401, "the old password still works"
    status, _ = await api.op("list_users", auth=new)
    assert status == 200
    # Users may change their own password; the new one works for the very next call.
    status, _ = await api.op("alter_user", auth=new, username="bob", password="third-password-3")
    assert status == 200
    assert (await api.op("list_users", auth=new))[0] == 401
    assert (await api.op("list_users", auth=basic("bob", "third-password-3")))[0] == 200


async def test_permission_changes_take_effect_at_once(api: Api) -> None:
    await api.op("add_role", role="viewer", permission={"operations": ["list_deployments"]})
    await api.op("add_user", username="bob", password=PW, role="viewer")
    bob = basic("bob", PW)
    assert (await api.op("list_deployments", auth=bob))[0] == 200
    assert (await api.op("list_users", auth=bob))[0] == 403
    await api.op("alter_role", role="viewer", permission={"operations": ["list_users"]})
    assert (await api.op("list_deployments", auth=bob))[0] == 403
    assert (await api.op("list_users", auth=bob))[0] == 200
    await api.op("alter_user", username="bob", role="super_user")
    assert (await api.op("list_roles", auth=bob))[0] == 200


async def test_drop_role_in_use_is_409_and_roles_must_exist(api: Api) -> None:
    await api.op("add_role", role="viewer", permission={"operations": []})
    await api.op("add_role", role="other", permission={"operations": []})
    await api.op("add_user", username="bob", password=PW, role="viewer")
    status, body = await api.op("drop_role", role="viewer")
    assert status == 409 and body["code"] == "conflict" and body["field"] == "role"
    assert "viewer" in (await _roles(api))
    status, body = await api.op("drop_role", role="super_user")
    assert status == 409  # the admin holds it
    await api.op("alter_user", username="bob", role="other")
    status, body = await api.op("drop_role", role="viewer")
    assert status == 200
    status, body = await api.op("add_user", username="carol", password=PW, role="viewer")
    assert status == 404 and body["field"] == "role" and "viewer" in body["error"]
    status, body = await api.op("alter_user", username="bob", role="viewer")
    assert status == 404 and body["field"] == "role"
    status, body = await api.op("drop_role", role="viewer")
    assert status == 404 and body["field"] == "role"


async def test_errors_name_the_field(api: Api) -> None:
    await api.op("add_user", username="bob", password=PW, role="super_user")
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("add_user", {"password": PW, "role": "super_user"}, 400, "username"),
        ("add_user", {"username": "x y", "password": PW, "role": "super_user"}, 400, "username"),
        ("add_user", {"username": 7, "password": PW, "role": "super_user"}, 400, "username"),
        ("add_user", {"username": "carol", "role": "super_user"}, 400, "password"),
        ("add_user", {"username": "carol", "password": "short", "role": "super_user"}, 400,
         "password"),
        ("add_user", {"username": "carol", "password": ["x"], "role": "super_user"}, 400,
         "password"),
        ("add_user", {"username": "carol", "password": PW}, 400, "role"),
        ("add_user", {"username": "carol", "password": PW, "role": "nope"}, 404, "role"),
        ("add_user", {"username": "carol", "password": PW, "role": "super_user",
                      "active": "maybe"}, 400, "active"),
        ("add_user", {"username": "bob", "password": PW, "role": "super_user"}, 409, "username"),
        ("alter_user", {"username": "nobody"}, 404, "username"),
        ("alter_user", {"username": "bob", "password": "short"}, 400, "password"),
        ("alter_user", {"username": "bob", "active": 1}, 400, "active"),
        ("alter_user", {"username": ADMIN[0], "active": False}, 409, "active"),
        ("drop_user", {}, 400, "username"),
        ("drop_user", {"username": "nobody"}, 404, "username"),
        ("drop_user", {"username": ADMIN[0]}, 409, "username"),
        ("add_role", {"permission": {}}, 400, "role"),
        ("add_role", {"role": "r"}, 400, "permission"),
        ("add_role", {"role": "r", "permission": "all"}, 400, "permission"),
        ("add_role", {"role": "r", "permission": {"operations": "x"}}, 400, "permission"),
        ("add_role", {"role": "r", "permission": {"operations": [1]}}, 400, "permission"),
        ("add_role", {"role": "r", "permission": {"super_user": "yes"}}, 400, "permission"),
        ("add_role", {"role": "super_user", "permission": {}}, 409, "role"),
        ("alter_role", {"role": "nope", "permission": {}}, 404, "role"),
        ("drop_role", {"role": ""}, 400, "role"),
        ("read_audit_log", {}, 400, "table"),
        ("read_audit_log", {"table": "secrets"}, 400, "table"),
        ("read_audit_log", {"table": "users", "limit": 0}, 400, "limit"),
        ("read_audit_log", {"table": "users", "since": "yesterday"}, 400, "since"),
    ]  # fmt: skip
    before = await Services(api.app).store.db.fetchone("SELECT COUNT(*) AS n FROM changelog")
    for op, fields, status, field in cases:
        got, body = await api.op(op, **fields)
        assert (got, body.get("field")) == (status, field), (op, fields, body)
        assert body["error"] and body["code"], body
    after = await Services(api.app).store.db.fetchone("SELECT COUNT(*) AS n FROM changelog")
    assert after["n"] == before["n"], "a refused call wrote something"
    # The admin is still active: the refused self-deactivation changed nothing.
    assert (await _users(api))[ADMIN[0]]["active"] is True


async def test_audit_log_shows_who_changed_which_row_when_and_where(api: Api) -> None:
    await api.op("add_user", username="ops", password=PW, role="super_user")
    ops = basic("ops", PW)
    t0 = int(time.time() * 1000)
    await api.op("add_role", role="viewer", permission={"operations": []})
    await api.op("add_user", username="bob", password=PW, role="viewer")
    await api.op("alter_user", auth=ops, username="bob", active=False)
    await api.op("drop_user", auth=ops, username="bob")
    await api.op(
        "alter_role", auth=ops, role="viewer", permission={"operations": ["list_deployments"]}
    )
    t1 = int(time.time() * 1000)

    status, body = await api.op("read_audit_log", table="hdb_user", key="bob")
    assert status == 200 and body["table"] == "hdb_user"
    entries = body["entries"]
    assert [(e["user"], e["operation"]) for e in entries] == [
        ("ops", "delete"),
        ("ops", "upsert"),
        ("admin", "upsert"),
    ]  # newest first
    for e in entries:
        assert e["key"] == "bob" and e["table"] == "users" and e["node"] == "n1"
        assert t0 - 1000 <= e["timestamp"] <= t1 + 1000
        assert isinstance(e["version"], int)
    assert entries[0]["seq"] > entries[1]["seq"] > entries[2]["seq"]

    status, body = await api.op("read_audit_log", table="roles")
    viewer = [e for e in body["entries"] if e["key"] == "viewer"]
    assert [e["user"] for e in viewer] == ["ops", "admin"]
    # Filters: time window and limit.
    status, body = await api.op("read_audit_log", table="users", since=t1 + 60_000)
    assert status == 200 and body["entries"] == []
    first_bob = entries[-1]["timestamp"]
    status, body = await api.op("read_audit_log", table="users", until=first_bob - 1)
    assert "bob" not in {e["key"] for e in body["entries"]}
    (boot,) = [e for e in body["entries"] if e["key"] == ADMIN[0]]
    assert boot["user"] is None  # written by the node itself at first start
    status, body = await api.op("read_audit_log", table="users", since=first_bob)
    assert {e["key"] for e in body["entries"]} == {"bob"}
    status, body = await api.op("read_audit_log", table="users", limit=1)
    assert len(body["entries"]) == 1 and body["entries"][0]["key"] == "bob"
    # Deploys are audited too, with the deploying user.
    _, dep = await api.deploy("web", b"not an archive")
    status, body = await api.op("read_audit_log", table="hdb_deployment", key=dep["deployment_id"])
    assert body["entries"] and {e["user"] for e in body["entries"]} <= {"admin", None}
    assert body["entries"][-1]["user"] == "admin"
