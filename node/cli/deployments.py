"""``cairn deployments ...``: list and show here; ``tail`` comes from :mod:`node.cli.deploy`,
``rollback`` from :mod:`node.cli.rollback`, and the payload commands (``payload``,
``prune``, ``pin``, ``unpin``, ``delete-payload``) from :mod:`node.cli.payloads`.

Every command that takes a deployment id also takes a unique prefix of one
(:mod:`node.cli.ids`).
"""

from __future__ import annotations

from typing import Any

import click

from node.cli.common import Conn, connection_options, json_option, print_json, run, time_option
from node.cli.deploy import tail
from node.cli.ids import resolve_deployment_id
from node.cli.payloads import delete_payload, payload, pin, prune, unpin
from node.cli.render import format_duration, format_size, format_table, format_time, render_event
from node.cli.rollback import rollback

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
@click.option("--deployed-by", "by_user", metavar="USER", help="only deploys asked for by USER")
@click.option(
    "--since", metavar="TIME", callback=time_option, help="started at or after (ms, 2h, ISO date)"
)
@click.option(
    "--until", metavar="TIME", callback=time_option, help="started at or before (ms, 2h, ISO date)"
)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--cursor", help="continue a listing (from the previous page's hint)")
@json_option
@connection_options
def list_deployments(conn: Conn, as_json: bool, by_user: str | None, **filters: Any) -> None:
    """Deployments, newest first (filtered and paged by the node)."""
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

    run(main, as_json=as_json)


def _nodes_cell(d: dict[str, Any]) -> str:
    results = d.get("peer_results") or []
    good = sum(1 for r in results if r.get("status") in ("active", "staged"))
    return f"{good}/{len(results)}"


@deployments.command("show")
@click.argument("deployment_id", metavar="ID")
@json_option
@connection_options
def show(conn: Conn, deployment_id: str, as_json: bool) -> None:
    """Deployment ID (or a unique prefix): its record, its nodes and its event log."""

    async def main() -> int:
        async with conn.client() as client:
            did = await resolve_deployment_id(client, deployment_id)
            d = await client.op("get_deployment", deployment_id=did)
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
            ("pinned", "yes (retention keeps its payload)" if d.get("pinned") else "no"),
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

    run(main, as_json=as_json)


for _command in (tail, rollback, payload, pin, unpin, delete_payload, prune):
    deployments.add_command(_command)
