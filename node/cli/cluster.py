"""``cairn cluster`` and ``cairn demo``: local clusters and a cluster's state.

The layout of a local cluster (files, ports) is :mod:`node.cli.local.layout`; running its
processes is :mod:`node.cli.local.processes`; the live deploy is
:mod:`node.cli.local.live_deploy`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from node.cli.local.processes import ClusterError, LocalCluster, ports_in_use
from node.cli.render import summary_line
from node.cli.status import cluster_status
from storage.rules import PROJECT_RE

__all__ = ["cluster", "demo"]

DEMO_DIR = Path("cairn-demo")
DEMO_PROJECT = "hello"
#: Prints one human line (to stdout, or to stderr under ``--json``).
Echo = Callable[[str], None]


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


def _example_dir(name: str = DEMO_PROJECT) -> Path:
    """A bundled example component (``node/examples/<name>``) as a directory.

    Package data is installed as plain files (see ``[tool.setuptools.package-data]``),
    so the example is a real directory in the ``node`` package. (Not ``importlib.resources``:
    a ``node`` directory earlier on ``sys.path`` can shadow the package name there.)
    """
    path = Path(__file__).resolve().parent.parent / "examples" / name
    if not (path / "component.toml").is_file():
        _fail(f"the bundled example is missing from {path}; reinstall cairn")
    return path


#: The demo's story: (example directory, what it shows, deploy fields, it should succeed).
_STORY: tuple[tuple[str, str, dict[str, str], bool], ...] = (
    ("hello", "v1", {}, True),
    ("hello-v2", "v2 with a rolling restart", {"restart": "rolling"}, True),
    ("hello-broken", "v3, broken on purpose: its process exits at once", {}, False),
)


def _demo_story(
    layout: ClusterLayout, nodes: LocalCluster, say: Echo
) -> tuple[int, dict[str, Any]]:
    """Deploy v1, then v2 rolling, then a broken v3 that is rolled back; show where each
    node's service answers and which version it serves."""
    from node.cli.api.errors import ConnectError

    target = layout.nodes[0]
    steps = []
    code = 0
    for dirname, label, fields, should_succeed in _STORY:
        say("")
        say(f"== {label}: deploying {dirname} as {DEMO_PROJECT} through {target.name}")
        try:
            outcome = deploy_with_progress(
                target.admin_url, DEMO_PROJECT, _example_dir(dirname), user=nodes.user,
                password=nodes.password, echo=say, fields=fields,
            )  # fmt: skip
        except ConnectError as e:
            raise ClusterError(f"deploy of {dirname} failed: {e}") from None
        result = outcome.result
        if outcome.ok:
            say(summary_line(result))
        else:
            say(f"{result.get('code')}: {result.get('error')}")
        if outcome.ok != should_succeed:
            code = 1
            say(f"cairn: {label} {'failed' if should_succeed else 'succeeded'} unexpectedly")
        elif not should_succeed:
            say("rolled back as expected: every node serves v2 again")
        steps.append({"label": label, "ok": outcome.ok, "result": result})
    say("")
    say("where the service answers:")
    serving = {}
    for n in layout.nodes:
        version = _served_version(n.app_url)
        serving[n.name] = version
        say(f"  {n.name}  {n.app_url}/  (serving {version or 'nothing'})")
    return code, {"ok": code == 0, "steps": steps, "serving": serving}


def _served_version(url: str) -> str | None:
    """What the example's service at ``url`` says it is (None if it does not answer)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/version", timeout=3) as resp:
            return str(json.loads(resp.read()).get("version"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _run_cluster(
    layout: ClusterLayout,
    *,
    deploy: Path | None,
    project: str | None,
    exit_after_deploy: bool,
    timeout_s: float,
    as_json: bool,
    story: bool = False,
) -> NoReturn:
    """Lay out, start, wait, show, optionally deploy, then serve until a stop signal.

    Under ``as_json`` the human lines go to stderr and one JSON line (the nodes, the
    admin user, the deploy's outcome) to stdout once the cluster is ready (and deployed).
    """
    from node.cli.api.errors import describe_os_error
    from replication.errors import CertificateError

    say = functools.partial(click.echo, err=as_json)
    busy = ports_in_use(layout)
    if busy:
        more = f" (and {len(busy) - 1} more)" if len(busy) > 1 else ""
        _fail(f"port {busy[0]}{more}; stop what uses it or pick another --base-port", 2)
    try:
        actions = materialize(layout)
    except CertificateError as e:
        _fail(f"cannot prepare {layout.root}: {e}")
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        _fail(f"cannot prepare {layout.root}:{where} {describe_os_error(e)}", 2)
    created = sum(not a.startswith("reused") for a in actions)
    say(
        f"cluster directory {layout.root}: {len(layout.nodes)} nodes, "
        f"{created} file(s) created, {len(actions) - created} reused"
    )
    password, source = admin_password(layout, os.environ)
    nodes = LocalCluster(layout, password=password)
    code = 0
    with _stop_signals():
        try:
            say(f"starting {len(layout.nodes)} nodes ...")
            nodes.start()
            nodes.wait_ready(timeout_s, progress=say)
            _show_ready(layout, password, source, say)
            doc = _ready_document(layout, source)
            if story:
                code, doc["deploy"] = _demo_story(layout, nodes, say)
            elif deploy is not None:
                code, doc["deploy"] = _deploy(layout, nodes, deploy, project, say)
            if as_json:
                click.echo(json.dumps(doc))
            if (deploy is not None or story) and exit_after_deploy:
                raise _Stop("deploy done")
            code = _watch(nodes) or code
        except ClusterError as e:
            click.echo(f"cairn: {e}", err=True)
            code = e.exit_code
        except _Stop as e:
            say(f"{e}: stopping {len(layout.nodes)} nodes ...")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ends = nodes.stop()
            if ends:
                say("; ".join(e.describe() for e in ends))
            if any(e.returncode not in (0, -signal.SIGTERM) for e in ends) and code == 0:
                code = 1
    sys.exit(code)


def _show_ready(layout: ClusterLayout, password: str, source: str, say: Echo) -> None:
    say(f"cluster ready: {len(layout.nodes)} nodes, all connected")
    for n in layout.nodes:
        say(f"  {n.name}  {n.admin_url}  (peer {n.peer_url}, log {n.log_path})")
    say(f"admin user: {ADMIN_USER}")
    if source == "CAIRN_ADMIN_PASSWORD":
        say("admin password: the value of CAIRN_ADMIN_PASSWORD")
    else:
        say(f"admin password: {password}  (stored in {source})")
    say(f"status: cairn cluster status --dir {layout.root}")
    say("Ctrl-C stops every node.")


def _ready_document(layout: ClusterLayout, source: str) -> dict[str, Any]:
    """What ``--json`` prints once the cluster is ready (never the password itself)."""
    return {
        "cluster_dir": str(layout.root),
        "nodes": [
            {
                "name": n.name,
                "admin_url": n.admin_url,
                "peer_url": n.peer_url,
                "log": str(n.log_path),
            }
            for n in layout.nodes
        ],
        "admin_user": ADMIN_USER,
        "admin_password_from": source,
    }


def _deploy(
    layout: ClusterLayout, nodes: LocalCluster, path: Path, project: str | None, say: Echo
) -> tuple[int, dict[str, Any]]:
    """Deploy ``path`` through n1; returns the exit code and the outcome for ``--json``."""
    from node.cli.api.errors import ConnectError, describe_os_error

    name = project or path.name.removesuffix(".tar.gz").removesuffix(".tgz")
    if not PROJECT_RE.fullmatch(name):
        raise ClusterError(f"{name!r} is not a valid project name; pass --project", exit_code=2)
    target = layout.nodes[0]
    say(f"deploying {path} as {name} through {target.name} ...")
    try:
        outcome = deploy_with_progress(
            target.admin_url, name, path, user=nodes.user, password=nodes.password, echo=say,
        )  # fmt: skip
    except ConnectError as e:
        raise ClusterError(f"deploy of {path} failed: {e}") from None
    except OSError as e:
        raise ClusterError(f"cannot read {path}: {describe_os_error(e)}", exit_code=2) from None
    if outcome.ok:
        say(summary_line(outcome.result))
        return 0, {"ok": True, "result": outcome.result}
    err = outcome.result
    failed = err.get("failed_nodes")
    click.echo(
        f"cairn: deploy of {name} failed: {err.get('error')} ({err.get('code')})"
        + (f", failed nodes: {', '.join(failed)}" if failed else ""),
        err=True,
    )
    return 1, {"ok": False, "result": err}


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
@click.option("--json", "as_json", is_flag=True,
              help="once ready, print one JSON line (nodes, admin user, deploy outcome) on "
                   "stdout; progress goes to stderr")  # fmt: skip
def cluster_up(
    count: int,
    root: Path,
    base_port: int,
    deploy: Path | None,
    project: str | None,
    timeout_s: float,
    as_json: bool,
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
        layout, deploy=deploy, project=project, exit_after_deploy=False, timeout_s=timeout_s,
        as_json=as_json,
    )  # fmt: skip


# -- cairn demo -----------------------------------------------------------------------


@click.command("demo")
@click.option("--dir", "root", default=DEMO_DIR, show_default=True, type=click.Path(path_type=Path))
@click.option("--base-port", default=DEFAULT_BASE_PORT, show_default=True, type=int)
@click.option("--exit-after-deploy", is_flag=True, help="stop the cluster once the deploy is over")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, type=float)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="print one JSON line (nodes, deploy outcome) on stdout; progress to stderr",
)
def demo(
    root: Path, base_port: int, exit_after_deploy: bool, timeout_s: float, as_json: bool
) -> None:
    """Run a 3-node cluster and tell the deploy story of the bundled example, live:
    v1, then v2 with a rolling restart, then a broken v3 that is rolled back by itself."""
    try:
        layout = plan_cluster(root.absolute(), 3, base_port=base_port)
    except ValueError as e:
        _fail(str(e), 2)
    _run_cluster(
        layout,
        deploy=None,
        project=DEMO_PROJECT,
        exit_after_deploy=exit_after_deploy,
        timeout_s=timeout_s,
        as_json=as_json,
        story=True,
    )


cluster.add_command(cluster_status)
