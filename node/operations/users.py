"""User and role operations, shaped as in Harper's operations API."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from node.auth import hash_password
from node.errors import BadRequest, Conflict, NotFound
from node.operations.registry import Call, Registry

__all__ = ["registry"]

registry = Registry()

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


def _name(call: Call, field: str) -> str:
    value = call.fields.req_str(field, max_len=128)
    if not _NAME_RE.match(value):
        raise BadRequest(f"'{field}' must be letters, digits, '.', '_', '@' or '-'", field=field)
    return value


def _password(call: Call, *, required: bool) -> str | None:
    value = call.fields.string("password", required=required, max_len=1024)
    if value is not None and len(value) < 8:
        raise BadRequest("'password' must be at least 8 characters", field="password")
    return value


def _permission(call: Call) -> dict[str, Any]:
    perm = call.fields.obj("permission", required=True)
    assert perm is not None
    ops = perm.get("operations", [])
    if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
        raise BadRequest(
            "'permission.operations' must be a list of operation names", field="permission"
        )
    su = perm.get("super_user", False)
    if not isinstance(su, bool):
        raise BadRequest("'permission.super_user' must be true or false", field="permission")
    return {"super_user": su, "operations": sorted(set(ops))}


async def _role_exists(call: Call, role: str) -> None:
    if await call.services.accounts.get_role(role) is None:
        raise NotFound(f"role {role} not found", field="role")


@registry.add("add_user")
async def add_user(call: Call) -> dict[str, Any]:
    accounts = call.services.accounts
    username = _name(call, "username")
    password = _password(call, required=True)
    role = _name(call, "role")
    active = call.fields.boolean("active", default=True)
    await _role_exists(call, role)
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
    await _role_exists(call, role)
    active = call.fields.boolean("active", default=user.active)
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
    if not await call.services.accounts.delete_user(username, by=call.principal.username):
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
    if await accounts.get_role(role) is not None:
        raise Conflict(f"role {role} already exists", field="role")
    stored = await accounts.put_role(role, permission, by=call.principal.username)
    return {"role": stored.role, "permission": stored.permission, "message": f"role {role} added"}


@registry.add("alter_role")
async def alter_role(call: Call) -> dict[str, Any]:
    accounts = call.services.accounts
    role = _name(call, "role")
    await _role_exists(call, role)
    stored = await accounts.put_role(role, _permission(call), by=call.principal.username)
    return {"role": stored.role, "permission": stored.permission, "message": f"role {role} altered"}


@registry.add("drop_role")
async def drop_role(call: Call) -> dict[str, Any]:
    accounts = call.services.accounts
    role = _name(call, "role")
    await _role_exists(call, role)
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
