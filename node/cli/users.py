"""``cairn users ...`` and ``cairn roles ...``: thin clients of the user and role operations.

New passwords come from ``--new-password`` or ``CAIRN_NEW_PASSWORD``, or are prompted for
(twice, hidden) on a terminal; ``--password`` is always the caller's own. Operations a
role is allowed are checked against the real operation names before anything is sent
(:mod:`node.cli.api.operations`): a misspelt one is a usage error naming the closest.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from node.cli.api.operations import OPERATIONS, closest_operation, unknown_operations
from node.cli.common import Conn, connection_options, json_option, print_json, run
from node.cli.render import format_table

__all__ = ["roles", "users"]


def _new_password(given: str | None, *, required: bool) -> str | None:
    if given is not None or not required:
        return given
    if not sys.stdin.isatty():
        raise click.UsageError("no new password: pass --new-password or set CAIRN_NEW_PASSWORD")
    value: str = click.prompt("New password", hide_input=True, confirmation_prompt=True, err=True)
    return value


def _call(conn: Conn, operation: str, *, as_json: bool = False, **fields: Any) -> None:
    """Run one operation and print its ``message`` (or the whole answer as JSON)."""

    async def main() -> int:
        async with conn.client() as client:
            result = await client.op(operation, **fields)
        if as_json:
            print_json(result)
        elif isinstance(result, dict) and "message" in result:
            click.echo(result["message"])
        return 0

    run(main, as_json=as_json)


_new_password_option = click.option(
    "--new-password", envvar="CAIRN_NEW_PASSWORD",
    help="the user's password [env CAIRN_NEW_PASSWORD; prompted on a terminal]",
)  # fmt: skip


@click.group("users")
def users() -> None:
    """List, add, alter and drop users."""


@users.command("list")
@json_option
@connection_options
def list_users(conn: Conn, as_json: bool) -> None:
    """Users with their role (passwords are never shown)."""

    async def main() -> int:
        async with conn.client() as client:
            found = await client.op("list_users")
        if as_json:
            print_json(found)
            return 0
        rows = []
        for u in found:
            perm = (u.get("role") or {}).get("permission") or {}
            rows.append([
                u["username"], (u.get("role") or {}).get("role") or "-",
                "yes" if perm.get("super_user") else "no", "yes" if u.get("active") else "no",
            ])  # fmt: skip
        for line in format_table(["USER", "ROLE", "SUPER_USER", "ACTIVE"], rows):
            click.echo(line)
        return 0

    run(main, as_json=as_json)


@users.command("add")
@click.argument("username")
@click.option("--role", required=True, help="the role to give the user")
@_new_password_option
@click.option("--inactive", is_flag=True, help="create the user disabled")
@json_option
@connection_options
def add_user(
    conn: Conn, username: str, role: str, new_password: str | None, inactive: bool, as_json: bool
) -> None:
    """Add a user."""
    password = _new_password(new_password, required=True)
    _call(conn, "add_user", as_json=as_json, username=username, password=password, role=role,
          active=not inactive)  # fmt: skip


@users.command("alter")
@click.argument("username")
@click.option("--role", help="a new role")
@_new_password_option
@click.option("--active/--inactive", default=None, help="enable or disable the user")
@json_option
@connection_options
def alter_user(
    conn: Conn, username: str, role: str | None, new_password: str | None, active: bool | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Change a user's role, password or active flag."""
    fields: dict[str, Any] = {"username": username}
    if role is not None:
        fields["role"] = role
    if new_password is not None:
        fields["password"] = new_password
    if active is not None:
        fields["active"] = active
    if len(fields) == 1:
        raise click.UsageError("nothing to change: give --role, --new-password or --active")
    _call(conn, "alter_user", as_json=as_json, **fields)


@users.command("drop")
@click.argument("username")
@json_option
@connection_options
def drop_user(conn: Conn, username: str, as_json: bool) -> None:
    """Drop a user."""
    _call(conn, "drop_user", as_json=as_json, username=username)


@click.group("roles")
def roles() -> None:
    """List, add, alter and drop roles."""


@roles.command("list")
@json_option
@connection_options
def list_roles(conn: Conn, as_json: bool) -> None:
    """Roles and what they may do."""

    async def main() -> int:
        async with conn.client() as client:
            found = await client.op("list_roles")
        if as_json:
            print_json(found)
            return 0
        rows = [
            [
                r["role"],
                "yes" if r["permission"].get("super_user") else "no",
                ", ".join(r["permission"].get("operations") or []) or "-",
            ]
            for r in found
        ]
        for line in format_table(["ROLE", "SUPER_USER", "OPERATIONS"], rows):
            click.echo(line)
        return 0

    run(main, as_json=as_json)


def _permission(super_user: bool, operations: tuple[str, ...]) -> dict[str, Any]:
    """The permission document, every operation name checked.

    Raises:
        click.BadParameter: a name is not an operation (naming the closest real one).
    """
    ops = sorted({o.strip() for item in operations for o in item.split(",") if o.strip()})
    unknown = unknown_operations(ops)
    if unknown:
        problems = []
        for name in unknown:
            guess = closest_operation(name)
            problems.append(f"{name!r} is not an operation" +
                            (f" (did you mean {guess!r}?)" if guess else ""))  # fmt: skip
        raise click.BadParameter(
            "; ".join(problems) + "; `cairn roles operations` lists them all",
            param_hint="'--allow'",
        )
    return {"super_user": super_user, "operations": ops}


_role_options = [
    click.option("--super-user", is_flag=True, help="may do everything"),
    click.option("--allow", "operations", multiple=True, metavar="OPERATION",
                 help="an operation the role may run (repeat, or comma-separate); "
                      "`cairn roles operations` lists them"),
]  # fmt: skip


@roles.command("add")
@click.argument("role")
@_role_options[0]
@_role_options[1]
@json_option
@connection_options
def add_role(
    conn: Conn, role: str, super_user: bool, operations: tuple[str, ...], as_json: bool
) -> None:
    """Add a role: ``cairn roles add deployer --allow deploy_component,get_deployment``."""
    permission = _permission(super_user, operations)
    _call(conn, "add_role", as_json=as_json, role=role, permission=permission)


@roles.command("alter")
@click.argument("role")
@_role_options[0]
@_role_options[1]
@json_option
@connection_options
def alter_role(
    conn: Conn, role: str, super_user: bool, operations: tuple[str, ...], as_json: bool
) -> None:
    """Replace a role's permission."""
    permission = _permission(super_user, operations)
    _call(conn, "alter_role", as_json=as_json, role=role, permission=permission)


@roles.command("drop")
@click.argument("role")
@json_option
@connection_options
def drop_role(conn: Conn, role: str, as_json: bool) -> None:
    """Drop a role (no user may still have it)."""
    _call(conn, "drop_role", as_json=as_json, role=role)


@roles.command("operations")
@json_option
def list_operations(as_json: bool) -> None:
    """The operation names a role may be allowed (no node is asked)."""
    if as_json:
        print_json(sorted(OPERATIONS))
        return
    for name in sorted(OPERATIONS):
        click.echo(name)
