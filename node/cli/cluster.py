"""``cairn cluster`` and ``cairn demo``: local clusters and a cluster's state.

The layout of a local cluster (files, ports) is :mod:`node.cli.local.layout`; running its
processes is :mod:`node.cli.local.processes`; the live deploy is
:mod:`node.cli.local.live_deploy`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from node.cli.local.layout import (
    ADMIN_USER,
    DEFAULT_BASE_PORT,
    ClusterLayout,
    admin_password,
    materialize,
    plan_cluster,
)
from node.cli.local.live_deploy import deploy_with_progress
from node.cli.local.processes import ClusterError, LocalCluster, admin_op, ports_in_use
from node.cli.render import summary_line
from node.cli.status import render_status, status_targets

__all__ = ["cluster", "demo"]

DEMO_DIR = Path("cairn-demo")
DEMO_PROJECT = "hello"
_PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"cairn: {message}", err=True)
    sys.exit(code)


# -- cairn cluster --------------------------------------------------------------------


@click.group()
def cluster() -> None:
    """Run a local cluster and look at a cluster's state."""


class _Stop(Exception):
    """A stop signal arrived (SIGINT or SIGTERM)."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@contextmanager
def _stop_signals() -> Iterator[None]:
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _example_dir() -> Path:
    """The bundled example component (``node/examples/hello``) as a directory.

    Package data is installed as plain files (see ``[tool.setuptools.package-data]``),
    so the example is a real directory in the ``node`` package. (Not ``importlib.resources``:
    a ``node`` directory earlier on ``sys.path`` can shadow the package name there.)
    """
    path = Path(__file__).resolve().parent.parent / "examples" / DEMO_PROJECT
    if not (path / "component.toml").is_file():
        _fail(f"the bundled example is missing from {path}; reinstall cairn")
    return path


def _run_cluster(
    layout: ClusterLayout,
    *,
    deploy: Path | None,
    project: str | None,
    exit_after_deploy: bool,
    timeout_s: float,
) -> NoReturn:
    """Lay out, start, wait, show, optionally deploy, then serve until a stop signal."""
    busy = ports_in_use(layout)
    if busy:
        more = f" (and {len(busy) - 1} more)" if len(busy) > 1 else ""
        _fail(f"port {busy[0]}{more}; stop what uses it or pick another --base-port", 2)
    from replication.errors import CertificateError

    try:
        actions = materialize(layout)
    except (CertificateError, OSError) as e:
        _fail(f"cannot prepare {layout.root}: {e}")
    created = sum(not a.startswith("reused") for a in actions)
    click.echo(
        f"cluster directory {layout.root}: {len(layout.nodes)} nodes, "
        f"{created} file(s) created, {len(actions) - created} reused"
    )
    password, source = admin_password(layout, os.environ)
    nodes = LocalCluster(layout, password=password)
    code = 0
    with _stop_signals():
        try:
            click.echo(f"starting {len(layout.nodes)} nodes ...")
            nodes.start()
            nodes.wait_ready(timeout_s, progress=click.echo)
            _show_ready(layout, password, source)
            if deploy is not None:
                code = _deploy(layout, nodes, deploy, project)
                if exit_after_deploy:
                    raise _Stop("deploy done")
            code = _watch(nodes)
        except ClusterError as e:
            click.echo(f"cairn: {e}", err=True)
            code = e.exit_code
        except _Stop as e:
            click.echo(f"{e}: stopping {len(layout.nodes)} nodes ...")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ends = nodes.stop()
            if ends:
                click.echo("; ".join(e.describe() for e in ends))
            if any(e.returncode not in (0, -signal.SIGTERM) for e in ends) and code == 0:
                code = 1
    sys.exit(code)


def _show_ready(layout: ClusterLayout, password: str, source: str) -> None:
    click.echo(f"cluster ready: {len(layout.nodes)} nodes, all connected")
    for n in layout.nodes:
        click.echo(f"  {n.name}  {n.admin_url}  (peer {n.peer_url}, log {n.log_path})")
    click.echo(f"admin user: {ADMIN_USER}")
    if source == "CAIRN_ADMIN_PASSWORD":
        click.echo("admin password: the value of CAIRN_ADMIN_PASSWORD")
    else:
        click.echo(f"admin password: {password}  (stored in {source})")
    click.echo(f"status: cairn cluster status --dir {layout.root}")
    click.echo("Ctrl-C stops every node.")


def _deploy(layout: ClusterLayout, nodes: LocalCluster, path: Path, project: str | None) -> int:
    name = project or path.name.removesuffix(".tar.gz").removesuffix(".tgz")
    if not _PROJECT_RE.match(name):
        raise ClusterError(f"{name!r} is not a valid project name; pass --project", exit_code=2)
    target = layout.nodes[0]
    click.echo(f"deploying {path} as {name} through {target.name} ...")
    try:
        outcome = deploy_with_progress(
            target.admin_url, name, path, user=nodes.user, password=nodes.password,
            echo=click.echo,
        )  # fmt: skip
    except OSError as e:
        raise ClusterError(f"deploy of {path} failed: {e}") from None
    if outcome.ok:
        click.echo(summary_line(outcome.result))
        return 0
    err = outcome.result
    failed = err.get("failed_nodes")
    click.echo(
        f"cairn: deploy of {name} failed: {err.get('error')} ({err.get('code')})"
        + (f", failed nodes: {', '.join(failed)}" if failed else ""),
        err=True,
    )
    return 1


def _watch(nodes: LocalCluster) -> int:
    """Stay in the foreground, reporting nodes that exit, until a stop signal."""
    reported: set[str] = set()
    while True:
        for gone in nodes.exited():
            if gone.name not in reported:
                reported.add(gone.name)
                log = nodes.layout.node(gone.name).log_path
                click.echo(f"cairn: node {gone.describe()} (log: {log})", err=True)
        if len(reported) == len(nodes.procs):
            click.echo("cairn: every node has exited", err=True)
            return 1
        time.sleep(0.5)  # a watch interval, not synchronisation: signals interrupt it


@cluster.command("up")
@click.option("--nodes", "count", default=3, show_default=True, type=click.IntRange(1, 99))
@click.option("--dir", "root", required=True, type=click.Path(path_type=Path))
@click.option("--base-port", default=DEFAULT_BASE_PORT, show_default=True, type=int,
              help="n1's admin port; node i uses base+i-1, its peer port base+100+i-1")  # fmt: skip
@click.option("--deploy", type=click.Path(exists=True, path_type=Path), help="deploy this")
@click.option("--project", help="project name for --deploy (default: its directory name)")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, type=float,
              help="seconds to wait for every node to connect")  # fmt: skip
def cluster_up(
    count: int,
    root: Path,
    base_port: int,
    deploy: Path | None,
    project: str | None,
    timeout_s: float,
) -> None:
    """Create (or reuse) a CA, certificates and configs under DIR and run N nodes here.

    Waits until every node is connected to every other, prints the admin URLs and
    credentials, optionally deploys --deploy, and stays in the foreground: Ctrl-C or
    SIGTERM stops every node cleanly.
    """
    try:
        layout = plan_cluster(root.absolute(), count, base_port=base_port)
    except ValueError as e:
        _fail(str(e), 2)
    _run_cluster(
        layout, deploy=deploy, project=project, exit_after_deploy=False, timeout_s=timeout_s
    )


@cluster.command("status")
@click.option("--target", "targets", multiple=True, help="node admin URL (repeat; CAIRN_TARGET)")
@click.option("--dir", "root", type=click.Path(path_type=Path), help="a `cluster up` directory")
@click.option("--user", envvar="CAIRN_USER", default=ADMIN_USER, show_default=True)
@click.option("--password", envvar="CAIRN_PASSWORD", help="or CAIRN_PASSWORD")
@click.option("--json", "as_json", is_flag=True, help="print cluster_status as JSON")
def cluster_status(
    targets: tuple[str, ...], root: Path | None, user: str, password: str | None, as_json: bool
) -> None:
    """Show each node's peers: state, last seen, lag, transfers, last error."""
    try:
        urls, stored = status_targets(targets, root, os.environ)
    except (OSError, ValueError) as e:
        _fail(str(e), 2)
    password = password or stored
    if not password:
        _fail("no password: pass --password, set CAIRN_PASSWORD, or use --dir", 2)
    answers: list[Any] = []
    failed = False
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    for url in urls:
        try:
            code, body = admin_op(url, "cluster_status", user=user, password=password)
        except OSError as e:
            failed = True
            click.echo(f"cairn: {url} cannot be reached: {e}", err=True)
            continue
        if code != 200 or not isinstance(body, dict):
            failed = True
            msg = body.get("error") if isinstance(body, dict) else body
            click.echo(f"cairn: {url} answered {code}: {msg}", err=True)
            continue
        answers.append(body)
        if not as_json:
            click.echo(render_status(url, body, now_ms=now_ms))
    if as_json:
        click.echo(json.dumps(answers[0] if len(urls) == 1 and answers else answers, indent=2))
    sys.exit(1 if failed else 0)


# -- cairn demo -----------------------------------------------------------------------


@click.command("demo")
@click.option("--dir", "root", default=DEMO_DIR, show_default=True, type=click.Path(path_type=Path))
@click.option("--base-port", default=DEFAULT_BASE_PORT, show_default=True, type=int)
@click.option("--exit-after-deploy", is_flag=True, help="stop the cluster once the deploy is over")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, type=float)
def demo(root: Path, base_port: int, exit_after_deploy: bool, timeout_s: float) -> None:
    """Run a 3-node cluster and deploy the bundled example component to it, live."""
    try:
        layout = plan_cluster(root.absolute(), 3, base_port=base_port)
    except ValueError as e:
        _fail(str(e), 2)
    _run_cluster(
        layout,
        deploy=_example_dir(),
        project=DEMO_PROJECT,
        exit_after_deploy=exit_after_deploy,
        timeout_s=timeout_s,
    )
