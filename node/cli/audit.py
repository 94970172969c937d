"""``cairn audit``: who changed which replicated row when, from which node.

A thin client of ``read_audit_log {table, key, since, until, limit}``. Without
``--table`` every audited table is asked and the entries are merged, newest first.
"""

from __future__ import annotations

from typing import Any

import click

from node.cli.common import Conn, connection_options, json_option, print_json, run, time_option
from node.cli.render import format_table, format_time

__all__ = ["AUDIT_TABLES", "audit", "merge_entries"]

#: The tables ``read_audit_log`` knows (Harper's names ``hdb_*`` are accepted too).
AUDIT_TABLES = (
    "deployments", "deployment_events", "node_results", "payload_drops", "users", "roles",
    "members",
)  # fmt: skip
_ALIASES = ("hdb_deployment", "hdb_user", "hdb_role", "hdb_nodes")


def merge_entries(answers: list[list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Entries of several tables as one list, newest first, at most ``limit`` (pure)."""
    merged = [e for entries in answers for e in entries]
    merged.sort(key=lambda e: (e.get("timestamp") or 0, e.get("seq") or 0), reverse=True)
    return merged[:limit]


@click.command("audit")
@click.option("--table", type=click.Choice(AUDIT_TABLES + _ALIASES),
              help="only this table [default: all of them]")  # fmt: skip
@click.option("--key", help="only changes of this row (a deployment id, user, role or node name)")
@click.option("--since", metavar="TIME", callback=time_option,
              help="changed at or after (ms, 15m/2h/3d ago, ISO date)")  # fmt: skip
@click.option("--until", metavar="TIME", callback=time_option,
              help="changed at or before (ms, 15m/2h/3d ago, ISO date)")  # fmt: skip
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@json_option
@connection_options
def audit(
    conn: Conn, table: str | None, key: str | None, since: int | None, until: int | None,
    limit: int, as_json: bool,
) -> None:  # fmt: skip
    """The audit log: who changed which row when, from which node, newest first."""
    filters = {k: v for k, v in {"key": key, "since": since, "until": until}.items()
               if v is not None}  # fmt: skip

    async def main() -> int:
        tables = [table] if table else list(AUDIT_TABLES)
        async with conn.client() as client:
            answers = [
                (await client.op("read_audit_log", table=t, limit=limit, **filters))["entries"]
                for t in tables
            ]
        entries = merge_entries(answers, limit)
        if as_json:
            print_json({"entries": entries})
            return 0
        if not entries:
            click.echo("No changes.")
            return 0
        rows = [
            [format_time(e.get("timestamp")), str(e.get("table")), str(e.get("key")),
             str(e.get("operation")), e.get("user") or "-", e.get("node") or "-"]
            for e in entries
        ]  # fmt: skip
        for line in format_table(["TIME", "TABLE", "KEY", "OPERATION", "USER", "NODE"], rows):
            click.echo(line)
        return 0

    run(main, as_json=as_json)
