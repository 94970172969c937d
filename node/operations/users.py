"""User and role operations, shaped as in Harper's operations API.

Delegated administration never escalates. A caller that is not a super user may only
act on what is no stronger than itself: it may create, alter, assign or drop a role, or
create, alter or drop a user, only when that role (the target's current role, and the
role it would get) grants no operation the caller lacks and is not a super user role.
Only a super user may create or alter a super user role, give a user one, or touch a
super user's account (a new password for an admin is as good as being one). Every check
happens before anything is written, so a refusal is a 403 with no side effect.

Operation names in a permission are checked against the node's operation registry
(``storage.rules.check_permission``): a misspelt name is a 400, not a silent no-op.
"""

from __future__ import annotations

import asyncio
from typing import Any

from node.api import OPERATIONS
from node.auth import Principal, hash_password
from node.errors import BadRequest, Conflict, Forbidden, NotFound
from node.operations.registry import Call, Registry
from storage import rules

__all__ = ["covers", "registry"]

registry = Registry()


def _name(call: Call, field: str) -> str:
    if field == "role":
        return call.fields.role_name(field)
    return call.fields.username(field)


def _password(call: Call, *, required: bool) -> str | None:
    value = call.fields.string("password", required=required, max_len=1024)
    if value is not None and len(value) < 8:
        raise BadRequest("'password' must be at least 8 characters", field="password")
    return value


def _permission(call: Call) -> dict[str, Any]:
    perm = call.fields.obj("permission", required=True)
    try:
        return rules.check_permission(perm, known_operations=call.app[OPERATIONS].names())
    except rules.RuleError as e:
        raise BadRequest(e.message, field="permission") from None


def covers(principal: Principal, permission: dict[str, Any] | None) -> bool:
    """True when ``principal`` is at least as strong as a role with ``permission``.

    A super user covers everything; anyone else covers a permission that is not
    ``super_user`` and whose operations are a subset of its own. A missing role (None)
    grants nothing, so it is covered.
    """
    if principal.super_user:
        return True
    if permission is None:
        return True
    if permission.get("super_user"):
        return False
    ops = permission.get("operations") or []
    return all(isinstance(o, str) and o in principal.operations for o in ops)


def _refuse(call: Call, what: str) -> Forbidden:
    return Forbidden(
        f"user {call.principal.username} may not {what}: a role may only be granted or "
        "managed by a user whose own role is at least as strong",
        code="privilege_escalation",
    )


async def _role_permission(call: Call, role: str) -> dict[str, Any] | None:
    stored = await call.services.accounts.get_role(role)
    return None if stored is None else stored.permission


async def _existing_role(call: Call, role: str) -> dict[str, Any]:
    permission = await _role_permission(call, role)
    if permission is None:
        raise NotFound(f"role {role} not found", field="role")
    return permission


@registry.add("add_user")
async def add_user(call: Call) -> dict[str, Any]:
    accounts = call.services.accounts
    username = _name(call, "username")
    password = _password(call, required=True)
    role = _name(call, "role")
    active = call.fields.boolean("active", default=True)
    if not covers(call.principal, await _existing_role(call, role)):
        raise _refuse(call, f"create a user with role {role}")
    if await accounts.get_user(username) is not None:
        raise Conflict(f"user {username} already exists", field="username")
    assert password is not None
    hashed = await asyncio.to_thread(hash_password, password)
    await accounts.put_user(
        username, password_hash=hashed, role=role, active=active, by=call.principal.username
    )
    return {"message": f"{username} successfully added"}


@registry.add("alter_user")
async def alter_user(call: Call) -> dict[str, Any]:
    accounts = call.services.accounts
    username = _name(call, "username")
    user = await accounts.get_user(username)
    if user is None:
        raise NotFound(f"user {username} not found", field="username")
    password = _password(call, required=False)
    role = _name(call, "role") if call.fields.has("role") else user.role
    new_permission = await _existing_role(call, role)
    active = call.fields.boolean("active", default=user.active)
    if not covers(call.principal, await _role_permission(call, user.role)):
        raise _refuse(call, f"alter user {username} (role {user.role})")
    if not covers(call.principal, new_permission):
        raise _refuse(call, f"give user {username} role {role}")
    if username == call.principal.username and not active:
        # Same lock-out as dropping yourself, which drop_user refuses.
        raise Conflict("you cannot deactivate the user you are signed in as", field="active")
    hashed = await asyncio.to_thread(hash_password, password) if password else user.password_hash
    await accounts.put_user(
        username, password_hash=hashed, role=role, active=active, by=call.principal.username
    )
    return {"message": f"{username} successfully altered"}


@registry.add("drop_user")
async def drop_user(call: Call) -> dict[str, Any]:
    username = _name(call, "username")
    if username == call.principal.username:
        raise Conflict("you cannot drop the user you are signed in as", field="username")
    accounts = call.services.accounts
    user = await accounts.get_user(username)
    if user is None:
        raise NotFound(f"user {username} not found", field="username")
    if not covers(call.principal, await _role_permission(call, user.role)):
        raise _refuse(call, f"drop user {username} (role {user.role})")
    if not await accounts.delete_user(username, by=call.principal.username):
        raise NotFound(f"user {username} not found", field="username")
    return {"message": f"{username} successfully deleted"}


@registry.add("list_users")
async def list_users(call: Call) -> list[dict[str, Any]]:
    accounts = call.services.accounts
    roles = {r.role: r for r in await accounts.list_roles()}
    out = []
    for u in await accounts.list_users():
        role = roles.get(u.role)
        out.append(
            {
                "username": u.username,
                "active": u.active,
                "role": {"role": u.role, "permission": role.permission if role else None},
            }
        )
    return out


@registry.add("add_role")
async def add_role(call: Call) -> dict[str, Any]:
    accounts = call.services.accounts
    role = _name(call, "role")
    permission = _permission(call)
    if not covers(call.principal, permission):
        raise _refuse(call, f"create role {role} with more than its own permission")
    if await accounts.get_role(role) is not None:
        raise Conflict(f"role {role} already exists", field="role")
    stored = await accounts.put_role(role, permission, by=call.principal.username)
    return {"role": stored.role, "permission": stored.permission, "message": f"role {role} added"}


@registry.add("alter_role")
async def alter_role(call: Call) -> dict[str, Any]:
    accounts = call.services.accounts
    role = _name(call, "role")
    current = await _existing_role(call, role)
    permission = _permission(call)
    if not covers(call.principal, current):
        raise _refuse(call, f"alter role {role}")
    if not covers(call.principal, permission):
        raise _refuse(call, f"give role {role} more than its own permission")
    stored = await accounts.put_role(role, permission, by=call.principal.username)
    return {"role": stored.role, "permission": stored.permission, "message": f"role {role} altered"}


@registry.add("drop_role")
async def drop_role(call: Call) -> dict[str, Any]:
    accounts = call.services.accounts
    role = _name(call, "role")
    if not covers(call.principal, await _existing_role(call, role)):
        raise _refuse(call, f"drop role {role}")
    if await accounts.role_in_use(role):
        raise Conflict(
            f"role {role} is assigned to users; move them to another role first", field="role"
        )
    await accounts.delete_role(role, by=call.principal.username)
    return {"message": f"role {role} successfully deleted"}


@registry.add("list_roles")
async def list_roles(call: Call) -> list[dict[str, Any]]:
    return [
        {"role": r.role, "permission": r.permission}
        for r in await call.services.accounts.list_roles()
    ]
