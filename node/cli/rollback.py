"""``cairn deployments rollback``: deploy again what an earlier deploy deployed.

``rollback ID`` re-applies deployment ID's stored payload (``deploy_component
{rollback_from}``). ``rollback --previous --project P`` finds the deploy to go back to
itself, through ``list_deployments {project, status: success}`` (newest first): the
current deploy is the newest successful one; the target is the next older successful
deploy that differs from it, skipping deploys of the same payload (rolling back to them
would change nothing) and deploys whose payload is no longer on the node. What it picked,
and what it skipped, is printed before the deploy starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from node.cli.common import (
    EXIT_USAGE,
    CommandError,
    Conn,
    connection_options,
    human_stream,
    run,
)
from node.cli.deploy import Renderer, deploy_fields, deploy_options, watch_deploy
from node.cli.ids import resolve_deployment_id
from node.cli.render import format_time

if TYPE_CHECKING:
    from node.cli.api.client import Client

__all__ = ["Previous", "pick_previous", "rollback"]

_PAGE = 100


@dataclass(frozen=True, slots=True)
class Previous:
    """The deploy ``--previous`` picked, the current one, and what was passed over."""

    target: dict[str, Any]
    current: dict[str, Any]
    skipped: list[tuple[dict[str, Any], str]] = field(default_factory=list)

    def explain(self) -> list[str]:
        """Lines telling the operator what was picked and why."""
        t, c = self.target, self.current
        lines = [
            f"Rolling back {t['project']} to deployment {t['deployment_id']} "
            f"(deployed {format_time(t.get('started_at'))} by {t.get('user') or '-'}, "
            f"sha256 {(t.get('payload_hash') or '-')[:12]}), the successful deploy before "
            f"the current one, {c['deployment_id']} "
            f"(deployed {format_time(c.get('started_at'))})"
        ]
        for d, why in self.skipped:
            lines.append(f"  skipped {d['deployment_id']}: {why}")
        return lines


def _choose(successes: list[dict[str, Any]]) -> Previous | None:
    """Pick from a project's successful rows, newest first (pure: tested without a node).

    Raises:
        CommandError: the newest successful row dropped the component.
    """
    if not successes:
        return None
    current = successes[0]
    if current.get("kind") == "drop":
        raise CommandError(
            f"{current['project']} was dropped by deployment {current['deployment_id']}: "
            "nothing runs to roll back from; deploy an older one by id with "
            "`cairn deployments rollback ID`",
            code="not_deployed",
        )
    skipped: list[tuple[dict[str, Any], str]] = []
    for d in successes[1:]:
        if d.get("kind") == "drop":
            skipped.append((d, "it dropped the component"))
        elif d.get("payload_hash") == current.get("payload_hash"):
            skipped.append((d, "same payload as the current deploy"))
        elif not d.get("payload_blob_present"):
            skipped.append((d, "its payload is no longer on this node (deleted or pruned)"))
        else:
            return Previous(d, current, skipped)
    return Previous({}, current, skipped)


async def pick_previous(client: Client, project: str) -> Previous:
    """The deploy ``rollback --previous`` goes back to.

    Raises:
        CommandError: the project has no successful deploy, or none before the current
            one that can be rolled back to (exit 1).
    """
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        fields: dict[str, Any] = {"project": project, "status": "success", "limit": _PAGE}
        if cursor:
            fields["cursor"] = cursor
        page = await client.op("list_deployments", **fields)
        rows += page["deployments"]
        choice = _choose(rows)
        cursor = page.get("next_cursor")
        if choice is not None and choice.target:
            return choice
        if not cursor:
            break
    if choice is None:
        raise CommandError(f"{project} has no successful deploy on this node", code="not_found")
    reasons = "; ".join(f"{d['deployment_id']}: {why}" for d, why in choice.skipped)
    raise CommandError(
        f"{project} has no successful deploy before the current one "
        f"({choice.current['deployment_id']}) to roll back to"
        + (f" (skipped {reasons})" if reasons else ""),
        code="nothing_to_roll_back_to",
    )


@click.command("rollback")
@click.argument("deployment_id", metavar="[ID]", required=False)
@click.option(
    "--previous",
    is_flag=True,
    help="roll back to the successful deploy before the current one of --project",
)
@click.option("--project", "-p", help="the component (with --previous)")
@deploy_options
@connection_options
def rollback(
    conn: Conn, deployment_id: str | None, previous: bool, project: str | None,
    as_json: bool, **opts: Any,
) -> None:  # fmt: skip
    """Deploy again exactly what deployment ID (or a unique prefix of it) deployed.

    With --previous --project P, roll P back to its previous successful deploy (what was
    picked is printed first). Exits 0 when the rollback deploy succeeded, 1 when it
    failed.
    """
    if previous == (deployment_id is not None):
        raise click.UsageError("give a deployment ID, or --previous with --project")
    if previous and project is None:
        raise click.UsageError("--previous needs --project: which component to roll back")
    render = Renderer(human_stream(as_json))

    async def main() -> int:
        async with conn.client() as client:
            if deployment_id is not None:
                did = await resolve_deployment_id(client, deployment_id)
                source = await client.op("get_deployment", deployment_id=did)
                if project is not None and source["project"] != project:
                    raise CommandError(
                        f"deployment {did} deployed {source['project']}, not {project}",
                        exit_code=EXIT_USAGE,
                        code="project_mismatch",
                    )
            else:
                assert project is not None
                picked = await pick_previous(client, project)
                for line in picked.explain():
                    render.line(line)
                source = picked.target
            fields = deploy_fields(source["project"], **opts)
            fields["rollback_from"] = source["deployment_id"]
            return await watch_deploy(client.deploy(fields), render, as_json, record=False)

    run(main, as_json=as_json)
