"""``cairn nodes list|add|remove``: the cluster's membership.

``list`` is the answering node and its peers from ``cluster_status``; ``add`` and
``remove`` change the replicated membership (``add_node {name, url}``, ``remove_node
{name}``), which every node applies.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import click

from node.cli.common import Conn, connection_options, json_option, print_json, run
from node.cli.render import format_table
from node.cli.status import format_age

__all__ = ["nodes"]


@click.group("nodes")
def nodes() -> None:
    """List, add and remove the cluster's nodes."""


def node_list(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The answering node first, then its peers, from a ``cluster_status`` answer (pure)."""
    me = {"name": status.get("node"), "url": None, "state": "self", "last_seen": None}
    peers = [
        {k: p.get(k) for k in ("name", "url", "state", "last_seen")}
        for p in status.get("peers") or []
        if isinstance(p, dict)
    ]
    return [me, *sorted(peers, key=lambda p: str(p["name"]))]


def _node_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from storage.rules import RuleError, check_node_name

    try:
        return check_node_name(value)
    except RuleError:
        raise click.BadParameter(
            f"{value!r} is not a node name (letters, digits, '.', '_', '-', at most 64)"
        ) from None


def _peer_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    problem = click.BadParameter(
        f"{value!r} is not the node's peer URL: use wss://HOST:PEER_PORT "
        "(its [peer] port, not the admin port)"
    )
    try:
        parsed = urlparse(value)
        port = parsed.port  # raises for a port out of range
    except ValueError:
        raise problem from None
    if parsed.scheme != "wss" or not parsed.hostname or port is None:
        raise problem
    return value


@nodes.command("list")
@json_option
@connection_options
def list_nodes(conn: Conn, as_json: bool) -> None:
    """The target node and its peers: URL, connection state, last seen."""

    async def main() -> int:
        async with conn.client() as client:
            status = await client.op("cluster_status")
        found = node_list(status)
        if as_json:
            print_json({"node": status.get("node"), "cluster_id": status.get("cluster_id"),
                        "nodes": found})  # fmt: skip
            return 0
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        rows = [
            [str(n["name"]), n["url"] or "(this node)", str(n["state"]),
             "-" if n["state"] == "self" else format_age(n["last_seen"], now_ms)]
            for n in found
        ]  # fmt: skip
        for line in format_table(["NODE", "PEER URL", "STATE", "LAST SEEN"], rows):
            click.echo(line)
        return 0

    run(main, as_json=as_json)


@nodes.command("add")
@click.argument("name", callback=_node_name)
@click.argument("url", callback=_peer_url)
@json_option
@connection_options
def add_node(conn: Conn, name: str, url: str, as_json: bool) -> None:
    """Add node NAME, reachable at peer URL (wss://HOST:PORT), to the cluster.

    Every node learns it through replication and starts dialling it; its certificate
    must be issued by the cluster CA for NAME (`cairn cert issue`).
    """

    async def main() -> int:
        async with conn.client() as client:
            result = await client.op("add_node", name=name, url=url)
        if as_json:
            print_json(result)
        else:
            click.echo(result.get("message") or f"node {name} added")
        return 0

    run(main, as_json=as_json)


@nodes.command("remove")
@click.argument("name", callback=_node_name)
@json_option
@connection_options
def remove_node(conn: Conn, name: str, as_json: bool) -> None:
    """Remove node NAME from the cluster (every node stops replicating with it)."""

    async def main() -> int:
        async with conn.client() as client:
            result = await client.op("remove_node", name=name)
        if as_json:
            print_json(result)
        else:
            click.echo(result.get("message") or f"node {name} removed")
        return 0

    run(main, as_json=as_json)
