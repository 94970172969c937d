"""Delegated administration without escalation, through the real app.

Callers: the super user, ``useradmin`` (every user and role operation plus two reads)
and ``narrow`` (the user and role operations only). Targets: roles that grant nothing,
less, exactly the caller's operations, more, and ``super_user``. Every user and role
operation is tried for every (caller, target) pair; the expected answer is computed
independently (a super user may do all; anyone else only what involves a role whose
operations are a subset of its own and that is not a super user role), and a refusal is
a 403 ``privilege_escalation`` that leaves users, roles and the change log untouched.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import ADMIN, Api, basic

from node.appkeys import Services

PASSWORD = "delegation-password-1"
ADMIN_OPS = ["add_user", "alter_user", "drop_user", "add_role", "alter_role", "drop_role"]
CALLERS: dict[str, list[str] | None] = {
    "admin": None,  # the bootstrap super user
    "useradmin": [*ADMIN_OPS, "list_users", "list_roles"],
    "narrow": list(ADMIN_OPS),
}
TARGETS: dict[str, dict[str, Any]] = {
    "empty": {"super_user": False, "operations": []},
    "lesser": {"super_user": False, "operations": ["list_users"]},
    "same": {"super_user": False, "operations": [*ADMIN_OPS, "list_users", "list_roles"]},
    "stronger": {"super_user": False, "operations": [*ADMIN_OPS, "deploy_component"]},
    "super": {"super_user": True, "operations": []},
}


def _expected(caller: str, target: str) -> bool:
    ops = CALLERS[caller]
    perm = TARGETS[target]
    if ops is None:
        return True
    return not perm["super_user"] and set(perm["operations"]) <= set(ops)


async def _state(api: Api) -> dict[str, Any]:
    db = Services(api.app).store.db
    out: dict[str, Any] = {}
    for table in ("users", "roles", "changelog"):
        out[table] = sorted(tuple(r) for r in await db.fetchall(f"SELECT * FROM {table}"))
    return out


async def _setup(api: Api) -> dict[str, str]:
    auth = {"admin": basic(*ADMIN)}
    for caller, ops in CALLERS.items():
        if ops is None:
            continue
        await _ok(api, "add_role", role=f"c-{caller}", permission={"operations": ops})
        await _ok(api, "add_user", username=f"c-{caller}", password=PASSWORD, role=f"c-{caller}")
        auth[caller] = basic(f"c-{caller}", PASSWORD)
    for target, perm in TARGETS.items():
        await _ok(api, "add_role", role=f"t-{target}", permission=perm)
    return auth


async def _ok(api: Api, op: str, **fields: Any) -> None:
    status, body = await api.op(op, **fields)
    assert status == 200, (op, fields, body)


def _cases(caller: str, target: str) -> list[tuple[str, dict[str, Any], list[tuple[str, Any]]]]:
    """(operation, fields, set-up calls the admin makes first) for one pair."""
    tag = f"{caller}-{target}"
    role = f"t-{target}"
    perm = TARGETS[target]
    return [
        ("add_user", {"username": f"new-{tag}", "password": PASSWORD, "role": role}, []),
        (  # a new password for a user holding the target role
            "alter_user",
            {"username": f"pw-{tag}", "password": "another-password-2"},
            [("add_user", {"username": f"pw-{tag}", "password": PASSWORD, "role": role})],
        ),
        (  # promote a user from a role granting nothing to the target role
            "alter_user",
            {"username": f"up-{tag}", "role": role},
            [("add_user", {"username": f"up-{tag}", "password": PASSWORD, "role": "t-empty"})],
        ),
        ("drop_user", {"username": f"dr-{tag}"},
         [("add_user", {"username": f"dr-{tag}", "password": PASSWORD, "role": role})]),
        ("add_role", {"role": f"r-{tag}", "permission": perm}, []),
        (  # raise a role granting nothing to the target's permission
            "alter_role",
            {"role": f"ar-{tag}", "permission": perm},
            [("add_role", {"role": f"ar-{tag}", "permission": TARGETS["empty"]})],
        ),
        (  # cut down a role as strong as the target
            "alter_role",
            {"role": f"cut-{tag}", "permission": TARGETS["empty"]},
            [("add_role", {"role": f"cut-{tag}", "permission": perm})],
        ),
        ("drop_role", {"role": f"dro-{tag}"},
         [("add_role", {"role": f"dro-{tag}", "permission": perm})]),
    ]  # fmt: skip


@pytest.mark.parametrize("caller", list(CALLERS))
async def test_escalation_matrix(api: Api, caller: str) -> None:
    auth = await _setup(api)
    tried = 0
    for target in TARGETS:
        allowed = _expected(caller, target)
        for op, fields, setup in _cases(caller, target):
            for setup_op, setup_fields in setup:
                await _ok(api, setup_op, **setup_fields)
            before = await _state(api)
            status, body = await api.op(op, auth=auth[caller], **fields)
            tried += 1
            if allowed:
                assert status == 200, (caller, target, op, fields, body)
                assert await _state(api) != before, (caller, target, op)
            else:
                assert status == 403, (caller, target, op, fields, body)
                assert body["code"] == "privilege_escalation", body
                assert await _state(api) == before, (caller, target, op)
    assert tried == len(TARGETS) * 8


async def test_a_delegated_admin_cannot_make_itself_or_anyone_super(api: Api) -> None:
    auth = await _setup(api)
    me = "c-useradmin"
    before = await _state(api)
    refusals: list[tuple[str, dict[str, Any]]] = [
        ("alter_user", {"username": me, "role": "super_user"}),
        ("alter_user", {"username": me, "role": "t-stronger"}),
        ("alter_role", {"role": "c-useradmin", "permission": {"super_user": True}}),
        ("alter_role", {"role": "c-useradmin",
                        "permission": {"operations": [*ADMIN_OPS, "deploy_component"]}}),
        ("add_user", {"username": "root2", "password": PASSWORD, "role": "super_user"}),
        ("add_role", {"role": "root2", "permission": {"super_user": True}}),
        ("alter_user", {"username": ADMIN[0], "password": "taken-over-password"}),
        ("drop_user", {"username": ADMIN[0]}),
        ("drop_role", {"role": "super_user"}),
    ]  # fmt: skip
    for op, fields in refusals:
        status, body = await api.op(op, auth=auth["useradmin"], **fields)
        assert status == 403, (op, fields, body)
        assert await _state(api) == before, (op, fields)
    # The admin can still sign in with its own password: nothing was taken over.
    status, _ = await api.op("list_users")
    assert status == 200
    # Lowering its own role is allowed (and takes effect on the next call).
    status, body = await api.op(
        "alter_role",
        auth=auth["useradmin"],
        role="c-useradmin",
        permission={"operations": ["list_users"]},
    )
    assert status == 200, body
    status, body = await api.op("list_roles", auth=auth["useradmin"])
    assert status == 403, body


@pytest.mark.parametrize(
    ("permission", "needle"),
    [
        ({"operations": ["deploy_componet"]}, "deploy_componet"),
        ({"operations": ["list_users", "DROP TABLE"]}, "operation names"),
        ({"operations": "list_users"}, "operation names"),
        ({"super_user": "yes"}, "super_user"),
        ({"operations": [], "tables": {"x": 1}}, "unknown keys"),
    ],
)
async def test_role_permissions_name_real_operations(
    api: Api, permission: dict[str, Any], needle: str
) -> None:
    await _ok(api, "add_role", role="existing", permission={"operations": []})
    before = await _state(api)
    for op, role in (("add_role", "fresh"), ("alter_role", "existing")):
        status, body = await api.op(op, role=role, permission=permission)
        assert status == 400, (op, body)
        assert body["field"] == "permission" and needle in body["error"], body
    assert await _state(api) == before


async def test_user_and_role_names_are_whole_strings(api: Api) -> None:
    before = await _state(api)
    for name in ("bob\n", "bob ", "\nbob", "bo\x00b", "-bob", ""):
        status, body = await api.op("add_user", username=name, password=PASSWORD, role="super_user")
        assert status == 400 and body["field"] == "username", (name, body)
        status, body = await api.op("add_role", role=name, permission={"operations": []})
        assert status == 400 and body["field"] == "role", (name, body)
    assert await _state(api) == before
