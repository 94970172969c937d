"""``cairn components [PROJECT]``, ``components logs PROJECT``, ``components drop PROJECT``.

``components`` (the same as ``components list``) asks one node ``get_components`` and
shows, per project, which deployment each node runs; ``components logs`` asks that
node for the recent output of a component's process (``get_component_logs``);
``components drop`` removes a component from every node (``drop_component``, recorded
as a deployment row). A project called ``list``, ``logs`` or ``drop`` is shown with
``cairn components list NAME``.
"""

from __future__ import annotations

from typing import Any

import click

from node.cli.common import (
    EXIT_USAGE,
    CommandError,
    Conn,
    connection_options,
    json_option,
    print_json,
    run,
)
from node.cli.render import format_table, format_time, summary_line

__all__ = ["components"]

#: Per-node fields shown as they are; any others a node adds go to the NOTE column.
_KNOWN = {"node", "deployment_id", "payload_hash", "activated_at"}


class _ListByDefault(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to ``list``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group("components", cls=_ListByDefault)
def components() -> None:
    """What runs where (cairn components [PROJECT]), and a component's recent output."""


def _project(value: str | None) -> str | None:
    from storage.rules import RuleError, check_project

    if value is None:
        return None
    try:
        return check_project(value)
    except RuleError:
        raise CommandError(
            f"{value!r} is not a valid component name", exit_code=EXIT_USAGE, code="invalid_input"
        ) from None


def _note(entry: dict[str, Any], wanted: str | None) -> str:
    """What is worth saying about one node's copy of a component."""
    notes = [f"{k}={v}" for k, v in sorted(entry.items()) if k not in _KNOWN and v is not None]
    if wanted is not None and entry.get("deployment_id") != wanted:
        notes.insert(0, "differs from this node")
    return ", ".join(notes) or "-"


def component_rows(answer: dict[str, Any]) -> list[list[str]]:
    """One row per project and node, from a ``get_components`` answer (pure)."""
    rows = []
    for c in answer.get("components") or []:
        nodes = c.get("nodes") or []
        if not nodes:
            rows.append([c["project"], "-", c.get("deployment_id") or "-", "-",
                         format_time(c.get("activated_at")), "not active on any node"])  # fmt: skip
        for n in sorted(nodes, key=lambda n: str(n.get("node"))):
            rows.append([
                c["project"], str(n.get("node")), n.get("deployment_id") or "-",
                (n.get("payload_hash") or "-")[:12], format_time(n.get("activated_at")),
                _note(n, c.get("deployment_id")),
            ])  # fmt: skip
    return rows


@components.command("list")
@click.argument("project", required=False)
@json_option
@connection_options
def list_components(conn: Conn, project: str | None, as_json: bool) -> None:
    """Per project (or only PROJECT): the deployment each node runs."""

    async def main() -> int:
        name = _project(project)
        async with conn.client() as client:
            answer = await client.op("get_components")
        if name is not None:
            found = [c for c in answer.get("components") or [] if c.get("project") == name]
            if not found:
                raise CommandError(
                    f"{name} is not deployed (as seen by node {answer.get('node')}); "
                    "`cairn components` lists what is",
                    code="not_found",
                )
            answer = {**answer, "components": found}
        if as_json:
            print_json(answer)
            return 0
        rows = component_rows(answer)
        click.echo(f"As seen by node {answer.get('node')}:")
        if not rows:
            click.echo("No components are deployed.")
            return 0
        headers = ["PROJECT", "NODE", "DEPLOYMENT", "SHA256", "ACTIVATED", "NOTE"]
        for line in format_table(headers, rows):
            click.echo(line)
        return 0

    run(main, as_json=as_json)


@components.command("logs")
@click.argument("project")
@click.option("--lines", "-n", default=100, show_default=True, type=click.IntRange(min=1),
              help="how many of the most recent lines")  # fmt: skip
@json_option
@connection_options
def logs(conn: Conn, project: str, lines: int, as_json: bool) -> None:
    """The recent output of PROJECT's process on the target node (``--target``).

    Lines are ``TIME  LINE``, with ``! `` marking stderr.
    """

    async def main() -> int:
        name = _project(project)
        async with conn.client() as client:
            answer = await client.op("get_component_logs", project=name, lines=lines)
        if as_json:
            print_json(answer)
            return 0
        for entry in answer.get("lines") or []:
            mark = "! " if entry.get("stream") == "stderr" else ""
            click.echo(f"{format_time(entry.get('t'))}  {mark}{entry.get('line', '')}")
        if answer.get("truncated"):
            click.echo(f"cairn: older lines of {name} on node {answer.get('node')} were "
                       "not kept", err=True)  # fmt: skip
        return 0

    run(main, as_json=as_json)


@components.command("drop")
@click.argument("project")
@click.option("--no-replicate", is_flag=True, help="drop it on the target node only")
@click.option("--ignore-replication-errors", is_flag=True,
              help="go on without nodes that fail or do not answer")  # fmt: skip
@json_option
@connection_options
def drop(
    conn: Conn, project: str, no_replicate: bool, ignore_replication_errors: bool, as_json: bool
) -> None:
    """Remove PROJECT from every node (recorded as a deployment; exit 1 if it failed)."""

    async def main() -> int:
        fields: dict[str, Any] = {"project": _project(project)}
        if no_replicate:
            fields["replicated"] = False
        if ignore_replication_errors:
            fields["ignore_replication_errors"] = True
        async with conn.client() as client:
            result = await client.op("drop_component", **fields)
        if as_json:
            print_json(result)
        else:
            click.echo(summary_line(result))
        return 0

    run(main, as_json=as_json)
