"""``cairn deployments payload|pin|unpin|delete-payload|prune``: a deploy's stored payload.

``payload`` downloads it (sha256 checked); ``pin``/``unpin`` keep it from (or give it
back to) the retention policy; ``delete-payload`` frees it on every node (the record
stays; the node warns when that leaves some node unable to converge);  ``prune`` applies
the retention policy. Ids may be unique prefixes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from node.cli.common import (
    EXIT_USAGE,
    CommandError,
    Conn,
    connection_options,
    human_stream,
    json_option,
    print_json,
    run,
)
from node.cli.ids import resolve_deployment_id
from node.cli.render import format_size

__all__ = ["delete_payload", "payload", "pin", "prune", "unpin"]


@click.command("payload")
@click.argument("deployment_id", metavar="ID")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="file to write (- for stdout)")  # fmt: skip
@json_option
@connection_options
def payload(conn: Conn, deployment_id: str, output: Path, as_json: bool) -> None:
    """Download the payload deployment ID was made from (sha256 checked).

    With --json, a summary ({deployment_id, file, size, sha256}) goes to stdout, so the
    payload itself cannot: give a file with -o.
    """
    from node.cli.api.errors import describe_os_error

    to_stdout = str(output) == "-"
    if to_stdout and as_json:
        raise click.UsageError("--json prints a summary on stdout: write the payload with -o FILE")

    async def main() -> int:
        part = output.with_name(f".{output.name}.part")
        async with conn.client() as client:
            did = await resolve_deployment_id(client, deployment_id)
            if to_stdout:
                got = await client.download(did, sys.stdout.buffer)
            else:
                try:
                    f = part.open("wb")
                except OSError as e:
                    raise CommandError(
                        f"cannot write {output}: {describe_os_error(e)}",
                        exit_code=EXIT_USAGE,
                        code="local_error",
                    ) from e
                with f:
                    try:
                        got = await client.download(did, f)
                    except BaseException:
                        part.unlink(missing_ok=True)
                        raise
        if got.expected_sha256 and got.expected_sha256 != got.sha256:
            if not to_stdout:
                part.unlink(missing_ok=True)
            raise CommandError(
                f"the payload's sha256 {got.sha256} does not match the node's "
                f"{got.expected_sha256}; download it again",
                code="checksum_mismatch",
            )
        if not to_stdout:
            os.replace(part, output)
        if as_json:
            print_json({"deployment_id": did, "file": str(output), "size": got.size,
                        "sha256": got.sha256})  # fmt: skip
        click.echo(f"Saved {format_size(got.size)} to {output} (sha256 {got.sha256})", err=True)
        return 0

    run(main, as_json=as_json)


def _pin(conn: Conn, deployment_id: str, pinned: bool, as_json: bool) -> None:
    async def main() -> int:
        async with conn.client() as client:
            did = await resolve_deployment_id(client, deployment_id)
            result = await client.op("pin_deployment", deployment_id=did, pinned=pinned)
        if as_json:
            print_json(result)
        elif pinned:
            click.echo(f"Pinned deployment {did}: retention keeps its payload")
        else:
            click.echo(f"Unpinned deployment {did}: retention may drop its payload again")
        return 0

    run(main, as_json=as_json)


@click.command("pin")
@click.argument("deployment_id", metavar="ID")
@json_option
@connection_options
def pin(conn: Conn, deployment_id: str, as_json: bool) -> None:
    """Keep deployment ID's payload whatever the retention policy says."""
    _pin(conn, deployment_id, True, as_json)


@click.command("unpin")
@click.argument("deployment_id", metavar="ID")
@json_option
@connection_options
def unpin(conn: Conn, deployment_id: str, as_json: bool) -> None:
    """Let the retention policy drop deployment ID's payload again."""
    _pin(conn, deployment_id, False, as_json)


@click.command("delete-payload")
@click.argument("deployment_id", metavar="ID")
@json_option
@connection_options
def delete_payload(conn: Conn, deployment_id: str, as_json: bool) -> None:
    """Delete deployment ID's payload on every node (its record stays).

    The deploy can no longer be rolled back to. Refused (exit 1) while it is running.
    """

    async def main() -> int:
        async with conn.client() as client:
            did = await resolve_deployment_id(client, deployment_id)
            result = await client.op("delete_deployment_payload", deployment_id=did)
        if as_json:
            print_json(result)
        else:
            freed = int(result.get("freed_bytes") or 0)
            click.echo(f"Deleted the payload of deployment {did}: freed {format_size(freed)} "
                       "here; every node frees its copy")  # fmt: skip
        if result.get("warning"):
            click.echo(f"warning: {result['warning']}", file=human_stream(as_json))
        return 0

    run(main, as_json=as_json)


@click.command("prune")
@click.option("--project", "-p", help="only this component")
@click.option("--dry-run", is_flag=True, help="report what would be freed")
@json_option
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

    run(main, as_json=as_json)
