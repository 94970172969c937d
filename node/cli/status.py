"""``cairn cluster status``: where to ask, a readable table of each answer, the command.

Formatting of a ``cluster_status`` answer (SPEC section 4) is pure: ``{node,
cluster_id, peers: [{name, url, state, last_seen, lag_changes, lag_bytes, transfers,
last_error}]}``, plus any ``warnings`` a node sends (a certificate about to expire, a
node that cannot converge). Fields a node does not send are shown as ``-``.

The command asks every target at once. Exit codes: 0 every node answered; 1 some node
could not be asked or answered an error (the others are still shown); 2 credentials
were refused, or the options are unusable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from node.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Conn,
    ask_password,
    check_target,
    fail,
    json_option,
    print_json,
    run,
)
from node.cli.local.layout import ADMIN_USER, CONFIG_NAME, PASSWORD_FILE
from node.config import ConfigError, load_config

__all__ = ["cluster_status", "format_age", "format_bytes", "render_status", "status_targets"]

DEFAULT_TARGET = "http://127.0.0.1:9925"
_COLUMNS = ("PEER", "STATE", "LAST SEEN", "LAG", "TRANSFERS", "LAST ERROR")


def format_bytes(n: int) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop always returns


def format_age(last_seen: Any, now_ms: int) -> str:
    """A ``last_seen`` value (epoch ms, or None) as an age like ``"1.2s ago"``."""
    if last_seen is None:
        return "never"
    if isinstance(last_seen, bool) or not isinstance(last_seen, int | float):
        return str(last_seen)
    age_s = max(0.0, (now_ms - float(last_seen)) / 1000)
    if age_s < 60:
        return f"{age_s:.1f}s ago"
    if age_s < 3600:
        return f"{age_s / 60:.0f}m ago"
    return f"{age_s / 3600:.1f}h ago"


def _lag(peer: Mapping[str, Any]) -> str:
    changes, size = peer.get("lag_changes"), peer.get("lag_bytes")
    parts = []
    if isinstance(changes, int):
        parts.append(f"{changes} change{'' if changes == 1 else 's'}")
    if isinstance(size, int):
        parts.append(format_bytes(size))
    return ", ".join(parts) or "-"


def _transfers(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple | dict):
        return str(len(value))
    return str(value)


def _error(value: Any) -> str:
    if not value:
        return "-"
    if isinstance(value, dict):
        value = value.get("message") or value.get("error") or value
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def render_status(url: str, status: Mapping[str, Any], *, now_ms: int) -> str:
    """A node's ``cluster_status`` as a header line and one row per peer."""
    head = f"{status.get('node')} at {url}"
    if status.get("cluster_id"):
        head += f"  (cluster {status['cluster_id']})"
    sent, received = status.get("blob_bytes_sent"), status.get("blob_bytes_received")
    if isinstance(sent, int) and isinstance(received, int):
        head += f"\n  blobs sent {format_bytes(sent)}, received {format_bytes(received)}"
    for warning in status.get("warnings") or []:
        text = warning.get("message", warning) if isinstance(warning, Mapping) else warning
        head += f"\n  warning: {text}"
    peers = [p for p in status.get("peers", []) if isinstance(p, Mapping)]
    if not peers:
        return head + "\n  no peers: this node runs alone\n"
    rows = [_COLUMNS] + [
        (
            str(p.get("name", "?")),
            str(p.get("state", "?")),
            format_age(p.get("last_seen"), now_ms),
            _lag(p),
            _transfers(p.get("transfers")),
            _error(p.get("last_error")),
        )
        for p in peers
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]  # fmt: skip
    return head + "\n" + "\n".join(lines) + "\n"


def status_targets(
    targets: tuple[str, ...], root: Path | None, env: Mapping[str, str]
) -> tuple[list[str], str | None]:
    """Which admin URLs to ask, and a stored password if ``root`` has one.

    Order of preference: ``--target`` options, the nodes of a ``cluster up`` directory,
    ``CAIRN_TARGET``, then ``http://127.0.0.1:9925``.

    Raises:
        ValueError: ``root`` holds no node configs, or one of them is unusable.
    """
    stored = None
    urls = list(targets)
    if root is not None:
        password_file = root / PASSWORD_FILE
        if password_file.exists():
            stored = password_file.read_text(encoding="utf-8").strip() or None
        if not urls:
            configs = sorted(root.glob(f"*/{CONFIG_NAME}"), key=_node_order)
            if not configs:
                raise ValueError(f"{root} holds no node configs (*/{CONFIG_NAME})")
            for path in configs:
                try:
                    admin = load_config(path, env={}).admin
                except ConfigError as e:
                    raise ValueError(str(e)) from None
                scheme = "https" if admin.tls_cert else "http"
                urls.append(f"{scheme}://{admin.host}:{admin.port}")
    if not urls:
        urls = [env.get("CAIRN_TARGET") or DEFAULT_TARGET]
    return urls, stored


def _node_order(path: Path) -> tuple[int, str]:
    name = path.parent.name
    digits = name.lstrip("n")
    return (int(digits), name) if name.startswith("n") and digits.isdigit() else (1 << 30, name)


async def _ask(conn: Conn) -> dict[str, Any]:
    async with conn.client() as client:
        answer = await client.op("cluster_status")
    return dict(answer)


@click.command("status")
@click.option("--target", "-t", "targets", multiple=True,
              help="a node's admin URL (repeat) [default: the nodes of --dir, else "
                   "CAIRN_TARGET, else http://127.0.0.1:9925]")  # fmt: skip
@click.option("--dir", "root", type=click.Path(path_type=Path),
              help="a `cairn cluster up` directory: ask each of its nodes")  # fmt: skip
@click.option("--user", "-u", envvar="CAIRN_USER",
              help=f"user to sign in as [env CAIRN_USER; {ADMIN_USER} with --dir]")  # fmt: skip
@click.option("--password", envvar="CAIRN_PASSWORD",
              help="password [env CAIRN_PASSWORD; with --dir, the one stored there]")  # fmt: skip
@click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="CAIRN_CA", help="CA bundle for https targets [env CAIRN_CA]")  # fmt: skip
@json_option
def cluster_status(
    targets: tuple[str, ...], root: Path | None, user: str | None, password: str | None,
    ca: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Each node's peers: state, last seen, replication lag, transfers, last error.

    With --json: the answer of a single node, or a list of answers for several.
    """
    from node.cli.api.errors import describe_os_error

    try:
        urls, stored = status_targets(targets, root, os.environ)
    except OSError as e:
        fail(f"cannot read {root}: {describe_os_error(e)}", EXIT_USAGE)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    for url in urls:
        check_target(url)
    if user is None and root is not None:
        user = ADMIN_USER
    password = ask_password(user, password or stored)

    async def main() -> int:
        from node.cli.api.errors import ApiError, AuthError, ClientError

        asked = await asyncio.gather(
            *(_ask(Conn(url, user, password, ca)) for url in urls), return_exceptions=True
        )
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        for got in asked:
            if isinstance(got, AuthError):
                raise got  # the same credentials go to every node: say it once
        answers, code = [], EXIT_OK
        for url, got in zip(urls, asked, strict=True):
            if isinstance(got, ApiError):
                click.echo(f"cairn: {url} answered {got.status}: {got.describe()}", err=True)
                code = EXIT_FAILED
            elif isinstance(got, ClientError):
                click.echo(f"cairn: {got}", err=True)
                code = EXIT_FAILED
            elif isinstance(got, BaseException):
                raise got
            else:
                answers.append(got)
                if not as_json:
                    click.echo(render_status(url, got, now_ms=now_ms))
        if not answers:
            raise CommandError("no node answered", code="unreachable")
        if as_json:
            print_json(answers[0] if len(urls) == 1 else answers)
        return code

    run(main, as_json=as_json)
