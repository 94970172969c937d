"""``cairn deploy`` and ``cairn deployments tail``, and the rendering of a deploy's events
that they share with ``cairn deployments rollback`` (:mod:`node.cli.rollback`).

All three render a deploy's live events as lines (:func:`node.cli.render.render_event`)
and end with the deploy's outcome: 0 success, 1 failed. ``deploy`` packs a directory into
a temporary tar.gz first (so the upload's total is known), then streams it as multipart
with ``Accept: text/event-stream``: the upload goes in and the events come out on the same
request. On a terminal the upload is a progress bar, otherwise one ``Uploaded <size>``
line.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from node.cli.common import (
    EXIT_FAILED,
    Conn,
    connection_options,
    human_stream,
    print_json,
    run,
)
from node.cli.ids import resolve_deployment_id
from node.cli.render import ProgressBar, format_size, render_event, summary_line

if TYPE_CHECKING:  # the client imports aiohttp: loaded when a command runs, not at start
    from node.cli.api.stream import StreamEvent

__all__ = ["Renderer", "deploy", "deploy_fields", "deploy_options", "tail", "watch_deploy"]


class Renderer:
    """Prints a deploy's events as lines, above the upload bar while it is shown.

    Without a terminal the upload is one ``Uploaded <size>`` line, printed once the
    upload is complete *and* the node has accepted the request (its first event came),
    so refused credentials or input print nothing but the error.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.bar: ProgressBar | None = None
        self._accepted = False
        self._uploaded: int | None = None
        self._reported = False

    def line(self, text: str) -> None:
        if self.bar is not None and not self.bar.finished:
            self.bar.println(text)
        else:
            click.echo(text, file=self.out)

    def upload_progress(self, total: int) -> Callable[[int], None]:
        """A progress callback: a bar on a terminal, else one ``Uploaded`` line."""
        if self.out.isatty():
            self.bar = ProgressBar(total, self.out)
            return self.bar.update

        def plain(sent: int) -> None:
            if sent >= total:
                self._uploaded = total
                self._report_upload()

        return plain

    def _report_upload(self) -> None:
        if self._uploaded is not None and self._accepted and not self._reported:
            self._reported = True
            self.line(f"Uploaded {format_size(self._uploaded)}")

    def event(self, ev: StreamEvent) -> None:
        if not self._accepted:
            self._accepted = True
            self._report_upload()
        text = render_event(ev.event, ev.data)
        if text is not None:
            self.line(text)

    def close(self) -> None:
        """Take an unfinished bar off the screen (the upload was refused or broke off)."""
        if self.bar is not None:
            self.bar.abandon()


async def watch_deploy(events: Any, render: Renderer, as_json: bool, *, record: bool) -> int:
    """Render a stream of deploy events to its end; returns the exit code.

    Args:
        record: the ``done`` result is a deployment record (``tail``), not a deploy answer.
    """
    from node.cli.api.stream import deploy_result_from_record

    async for ev in events:
        if not ev.terminal:
            render.event(ev)
            continue
        if ev.event == "done":
            result = ev.data.get("result") or {}
            ok, body = deploy_result_from_record(result) if record else (True, result)
            if as_json:
                print_json(result)
            if ok:
                render.line(summary_line(body))
                return 0
        else:
            body = ev.data if isinstance(ev.data, dict) else {"error": str(ev.data)}
            if as_json:
                print_json(body)
        text = f"{body.get('error', 'failed')} [{body.get('code', 'error')}]"
        where = [f"phase {body['phase']}"] if body.get("phase") else []
        if body.get("failed_nodes"):
            where.append(f"failed nodes: {', '.join(body['failed_nodes'])}")
        if body.get("deployment_id"):
            where.append(f"deployment {body['deployment_id']}")
        click.echo(f"cairn: deploy failed: {text}" + (f" ({'; '.join(where)})" if where else ""),
                   err=True)  # fmt: skip
        return 1
    return EXIT_FAILED  # the client only ends a stream with done or error


def deploy_fields(
    project: str, restart: str | None, no_replicate: bool, timeout_ms: int | None,
    ignore_replication_errors: bool,
) -> dict[str, Any]:  # fmt: skip
    fields: dict[str, Any] = {"project": project}
    if restart is not None:
        fields["restart"] = "rolling" if restart == "rolling" else restart == "true"
    if no_replicate:
        fields["replicated"] = False
    if timeout_ms is not None:
        fields["deployment_timeout"] = timeout_ms
    if ignore_replication_errors:
        fields["ignore_replication_errors"] = True
    return fields


def deploy_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option("--json", "as_json", is_flag=True,
                     help="print the final result as JSON on stdout (events go to stderr)"),
        click.option("--ignore-replication-errors", is_flag=True,
                     help="go on without nodes that fail or do not answer"),
        click.option("--timeout-ms", type=click.IntRange(min=100),
                     help="deployment_timeout in milliseconds [node default 120000]"),
        click.option("--no-replicate", is_flag=True, help="deploy to this node only"),
        click.option("--restart", type=click.Choice(["rolling", "true", "false"]),
                     help="restart the component: one node at a time, or all at once"),
    ]  # fmt: skip
    for option in options:
        command = option(command)
    return command


@click.command("deploy")
@click.argument("source", default=".", type=click.Path(exists=True, path_type=Path))
@click.option("--project", "-p", help="component name [default: the directory's name]")
@deploy_options
@connection_options
def deploy(conn: Conn, source: Path, project: str | None, as_json: bool, **opts: Any) -> None:
    """Deploy SOURCE (a directory, packed as tar.gz, or a .tar.gz file).

    Streams the upload and the deploy's live events; exits 0 on success, 1 when the
    deploy failed, 2 on usage and connection errors.
    """
    from node.cli.api.client import Upload
    from node.deploy.pack import pack_directory
    from storage.rules import RuleError, check_project

    if project is None:
        if not source.is_dir():
            raise click.UsageError("--project is required when deploying a file")
        project = source.resolve().name
    try:
        check_project(project)
    except RuleError:
        raise click.BadParameter(
            f"{project!r} is not a valid component name (letters, digits, '.', '_', '-'; "
            "starting with a letter or digit)",
            param_hint="'--project'",
        ) from None
    fields = deploy_fields(project, **opts)
    render = Renderer(human_stream(as_json))
    packing = source.is_dir()

    async def main() -> int:
        with tempfile.TemporaryDirectory(prefix="cairn-deploy-") as tmp:
            path = source
            if packing:
                path = Path(tmp) / f"{project}.tar.gz"
                with path.open("wb") as f:
                    await asyncio.to_thread(pack_directory, source, f)
            upload = Upload(path)
            upload.on_progress = render.upload_progress(upload.size)
            if upload.size == 0:
                upload.on_progress(0)
            try:
                async with conn.client() as client:
                    events = client.deploy(fields, upload=upload)
                    return await watch_deploy(events, render, as_json, record=False)
            finally:
                render.close()

    run(main, as_json=as_json)


@click.command("tail")
@click.argument("deployment_id", metavar="ID")
@click.option("--after", type=click.IntRange(min=0), help="start after this event seq")
@click.option("--json", "as_json", is_flag=True, help="print the final record as JSON")
@connection_options
def tail(conn: Conn, deployment_id: str, after: int | None, as_json: bool) -> None:
    """Follow deployment ID (or a unique prefix of it) until it ends.

    Resumes after dropped connections. Exits 0 when the deploy succeeded and 1 when it failed.
    """
    render = Renderer(human_stream(as_json))

    async def main() -> int:
        async with conn.client() as client:
            did = await resolve_deployment_id(client, deployment_id)
            events = client.follow(did, after=after)
            return await watch_deploy(events, render, as_json, record=True)

    run(main, as_json=as_json)
