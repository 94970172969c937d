"""``cairn deployments ...``: list, show, payload and prune (tail and rollback come
from :mod:`node.cli.deploy`).

Thin clients of the operations API (:mod:`node.cli.api.client`); the shared options
and the runner that turns errors into exit codes are in :mod:`node.cli.common`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from node.cli.common import (
    Conn,
    connection_options,
    connection_options_auth_user,
    fail,
    print_json,
    run,
    time_option,
)
from node.cli.deploy import rollback, tail
from node.cli.render import (
    format_duration,
    format_size,
    format_table,
    format_time,
    render_event,
)

__all__ = ["deployments"]

_STATUSES = (
    "pending", "extracting", "installing", "loading", "staging", "replicating", "activating",
    "restarting", "success", "failed", "rolled_back",
)  # fmt: skip


@click.group("deployments")
def deployments() -> None:
    """List, inspect, follow, download and roll back deployments."""


@deployments.command("list")
@click.option("--project", "-p", help="only this component")
@click.option("--status", type=click.Choice(_STATUSES), help="only this status")
@click.option("--user", "by_user", help="only deploys asked for by this user")
@click.option(
    "--since", metavar="TIME", callback=time_option, help="started at or after (ms, 2h, ISO date)"
)
@click.option(
    "--until", metavar="TIME", callback=time_option, help="started at or before (ms, 2h, ISO date)"
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


deployments.add_command(tail)
deployments.add_command(rollback)
