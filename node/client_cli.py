"""The client commands of ``cairn``: deploy, deployments, users and roles.

Thin clients of the operations API (:mod:`node.client`). This module holds what every
client command shares (connection options, the runner that turns errors into exit codes)
and ``deployments list|show|payload|prune``; :mod:`node.client_deploy` has ``deploy``,
``tail`` and ``rollback``, :mod:`node.client_admin` users and roles.

Every command takes ``--target``, ``--user`` and ``--password`` (or ``CAIRN_TARGET``,
``CAIRN_USER``, ``CAIRN_PASSWORD``). Exit codes: 0 success; 1 a failed deploy or an error
answer from the node; 2 usage errors, refused credentials and unreachable targets.
Failures are one line on stderr, never a traceback. With ``--json`` stdout carries only
the JSON result; human output then goes to stderr.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from node.client_render import (
    format_duration,
    format_size,
    format_table,
    format_time,
    render_event,
)

if TYPE_CHECKING:  # the client imports aiohttp: loaded when a command runs, not at start
    from node.client import Client

__all__ = [
    "Conn",
    "connection_options",
    "connection_options_auth_user",
    "fail",
    "human_stream",
    "print_json",
    "register",
    "run",
]

_STATUSES = (
    "pending", "extracting", "installing", "loading", "staging", "replicating", "activating",
    "restarting", "success", "failed", "rolled_back",
)  # fmt: skip


def fail(message: str, code: int) -> NoReturn:
    """Print ``cairn: message`` on stderr and exit with ``code``."""
    click.echo(f"cairn: {message}", err=True)
    sys.exit(code)


# -- connection options -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conn:
    """Where and as whom a command talks to a node."""

    target: str
    user: str | None
    password: str | None
    ca: Path | None

    def client(self) -> Client:
        from node.client import Client

        return Client(self.target, user=self.user, password=self.password, ca_file=self.ca)


def _connection(*user_flags: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A decorator adding ``--target``, the user flags, ``--password`` and ``--ca``; the
    command receives them as ``conn``."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def wrapper(
            target: str, auth_user: str | None, password: str | None, ca: Path | None,
            **kwargs: Any,
        ) -> None:  # fmt: skip
            if not re.match(r"^https?://[^/\s]+", target):
                raise click.BadParameter(
                    f"{target!r} is not an http(s) URL", param_hint="'--target' / CAIRN_TARGET"
                )
            if auth_user is not None and password is None:
                if not sys.stdin.isatty():
                    raise click.UsageError("no password: pass --password or set CAIRN_PASSWORD")
                password = click.prompt(f"Password for {auth_user}", hide_input=True, err=True)
            command(conn=Conn(target, auth_user, password, ca), **kwargs)

        options = [
            click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         envvar="CAIRN_CA", help="CA bundle for an https target [env CAIRN_CA]"),
            click.option("--password", envvar="CAIRN_PASSWORD",
                         help="password [env CAIRN_PASSWORD; prompted on a terminal]"),
            click.option(*user_flags, "auth_user", envvar="CAIRN_USER",
                         help="user to sign in as [env CAIRN_USER]"),
            click.option("--target", "-t", envvar="CAIRN_TARGET", default="http://127.0.0.1:9925",
                         show_default=True, help="admin URL of a node [env CAIRN_TARGET]"),
        ]  # fmt: skip
        for option in options:
            wrapper = option(wrapper)
        return wrapper

    return decorate


#: ``--target/--user/--password/--ca`` (``--auth-user`` is an alias of ``--user``).
connection_options = _connection("--user", "-u", "--auth-user")
#: The same for commands where ``--user`` is a filter: sign in with ``--auth-user``.
connection_options_auth_user = _connection("--auth-user")


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> NoReturn:
    """Run a command's coroutine; turn client errors into one line and an exit code."""
    from node.client_errors import ApiError, AuthError, ConnectError, StreamError

    try:
        code = asyncio.run(main())
    except AuthError as e:
        fail(f"{e.describe()}: check --user/--password (or CAIRN_USER/CAIRN_PASSWORD)", 2)
    except ApiError as e:
        fail(e.describe(), 2 if e.status == 400 else 1)
    except ConnectError as e:
        fail(str(e), 2)
    except StreamError as e:
        fail(str(e), 2)
    except BrokenPipeError:
        # The reader (``| head``) went away: stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    sys.exit(code)


def human_stream(as_json: bool) -> TextIO:
    """Where human-readable lines go: stderr when stdout is reserved for JSON."""
    return sys.stderr if as_json else sys.stdout


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    click.echo(json.dumps(value, indent=2, sort_keys=False))


@click.group("deployments")
def deployments() -> None:
    """List, inspect, follow, download and roll back deployments."""


def _parse_time(value: str) -> int:
    """Epoch ms, ``15m``/``2h``/``3d`` ago, or an ISO date/time (local unless zoned)."""
    text = value.strip()
    if text.isdigit():
        return int(text)
    m = re.fullmatch(r"(\d+)\s*([smhd])", text)
    if m:
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int((time.time() - seconds) * 1000)
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use epoch milliseconds, an age like 15m/2h/3d, or an ISO date"
        ) from None


def _time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else _parse_time(value)


@deployments.command("list")
@click.option("--project", "-p", help="only this component")
@click.option("--status", type=click.Choice(_STATUSES), help="only this status")
@click.option("--user", "by_user", help="only deploys asked for by this user")
@click.option(
    "--since", metavar="TIME", callback=_time_option, help="started at or after (ms, 2h, ISO date)"
)
@click.option(
    "--until", metavar="TIME", callback=_time_option, help="started at or before (ms, 2h, ISO date)"
)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--cursor", help="continue a listing (from the previous page's hint)")
@click.option("--json", "as_json", is_flag=True, help="print the raw answer as JSON")
@connection_options_auth_user
def list_deployments(conn: Conn, as_json: bool, by_user: str | None, **filters: Any) -> None:
    """Deployments, newest first."""
    fields = {k: v for k, v in {**filters, "user": by_user}.items() if v is not None}

    async def main() -> int:
        async with conn.client() as client:
            page = await client.op("list_deployments", **fields)
        if as_json:
            print_json(page)
            return 0
        rows = [
            [
                d["deployment_id"], d["project"], d["status"], d.get("user") or "-",
                format_time(d.get("started_at")),
                format_duration(d["completed_at"] - d["started_at"]) if d.get("completed_at")
                else "-",
                _nodes_cell(d),
            ]
            for d in page["deployments"]
        ]  # fmt: skip
        if not rows:
            click.echo("No deployments.")
            return 0
        headers = ["DEPLOYMENT", "PROJECT", "STATUS", "USER", "STARTED", "TOOK", "NODES"]
        for line in format_table(headers, rows):
            click.echo(line)
        shown = len(rows)
        if page.get("next_cursor"):
            click.echo(f"{shown} of {page['total']}; more with --cursor {page['next_cursor']}",
                       err=True)  # fmt: skip
        return 0

    run(main)


def _nodes_cell(d: dict[str, Any]) -> str:
    results = d.get("peer_results") or []
    good = sum(1 for r in results if r.get("status") in ("active", "staged"))
    return f"{good}/{len(results)}"


@deployments.command("show")
@click.argument("deployment_id")
@click.option("--json", "as_json", is_flag=True, help="print the record as JSON")
@connection_options
def show(conn: Conn, deployment_id: str, as_json: bool) -> None:
    """One deployment: its record, its nodes and its event log."""

    async def main() -> int:
        async with conn.client() as client:
            d = await client.op("get_deployment", deployment_id=deployment_id)
        if as_json:
            print_json(d)
            return 0
        took = (
            format_duration(d["completed_at"] - d["started_at"]) if d.get("completed_at") else "-"
        )
        payload = "-"
        if d.get("payload_hash"):
            where = "on this node" if d.get("payload_blob_present") else "not on this node"
            payload = (f"sha256 {d['payload_hash']}, {format_size(d.get('payload_size') or 0)} "
                       f"({where})")  # fmt: skip
        error = d.get("error")
        facts = [
            ("deployment", d["deployment_id"]), ("project", d["project"]),
            ("status", d["status"]), ("phase", d.get("phase") or "-"),
            ("user", d.get("user") or "-"), ("origin", d.get("origin_node") or "-"),
            ("started", format_time(d.get("started_at"))),
            ("completed", f"{format_time(d.get('completed_at'))} (took {took})"),
            ("payload", payload), ("restart", d.get("restart_mode") or "-"),
            ("rollback of", d.get("rollback_of") or "-"),
            ("error", f"{error['message']} [{error['code']}] in phase {error.get('phase')}"
             if error else "-"),
        ]  # fmt: skip
        for name, value in facts:
            click.echo(f"{name + ':':<13}{value}")
        click.echo("\nNodes:")
        rows = [
            [r["node"], r["status"], r.get("phase") or "-",
             (r.get("error") or {}).get("code", "-") if r.get("error") else "-"]
            for r in d.get("peer_results") or []
        ]  # fmt: skip
        for line in format_table(["NODE", "STATUS", "PHASE", "ERROR"], rows):
            click.echo(f"  {line}")
        click.echo("\nEvents:")
        for e in d.get("event_log") or []:
            text = render_event(e["event"], e["data"])
            if text is not None:
                click.echo(f"  {e['seq']:>4}  {text}")
        return 0

    run(main)


@deployments.command("payload")
@click.argument("deployment_id")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="file to write (- for stdout)")  # fmt: skip
@connection_options
def payload(conn: Conn, deployment_id: str, output: Path) -> None:
    """Download the payload a deployment was made from (sha256 checked)."""

    async def main() -> int:
        to_stdout = str(output) == "-"
        part = output.with_name(f".{output.name}.part")
        async with conn.client() as client:
            if to_stdout:
                got = await client.download(deployment_id, sys.stdout.buffer)
            else:
                with part.open("wb") as f:
                    try:
                        got = await client.download(deployment_id, f)
                    except BaseException:
                        part.unlink(missing_ok=True)
                        raise
        if got.expected_sha256 and got.expected_sha256 != got.sha256:
            if not to_stdout:
                part.unlink(missing_ok=True)
            fail(f"payload sha256 {got.sha256} does not match {got.expected_sha256}", 1)
        if not to_stdout:
            os.replace(part, output)
        click.echo(f"Saved {format_size(got.size)} to {output} (sha256 {got.sha256})", err=True)
        return 0

    run(main)


@deployments.command("prune")
@click.option("--project", "-p", help="only this component")
@click.option("--dry-run", is_flag=True, help="report what would be freed")
@click.option("--json", "as_json", is_flag=True)
@connection_options
def prune(conn: Conn, project: str | None, dry_run: bool, as_json: bool) -> None:
    """Drop payloads the retention policy no longer keeps (records stay)."""

    async def main() -> int:
        fields: dict[str, Any] = {"dry_run": dry_run}
        if project:
            fields["project"] = project
        async with conn.client() as client:
            result = await client.op("prune_deployment_payloads", **fields)
        if as_json:
            print_json(result)
            return 0
        verb = "Would free" if dry_run else "Freed"
        dropped = result.get("dropped") or []
        click.echo(f"{verb} {format_size(int(result.get('freed_bytes') or 0))} "
                   f"({len(dropped)} payloads)")  # fmt: skip
        for did in dropped:
            click.echo(f"  {did}")
        return 0

    run(main)


def register(cli: click.Group) -> None:
    """Attach ``deploy``, ``deployments``, ``users`` and ``roles`` to the root group."""
    from node.client_admin import roles, users
    from node.client_deploy import deploy, rollback, tail

    deployments.add_command(tail)
    deployments.add_command(rollback)
    cli.add_command(deploy)
    cli.add_command(deployments)
    cli.add_command(users)
    cli.add_command(roles)
