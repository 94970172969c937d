"""Cluster operations: status, membership, and the audit log."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from node.errors import BadRequest, Conflict, NotFound
from node.operations.registry import Call, Registry

__all__ = ["registry"]

registry = Registry()

_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_AUDIT_TABLES = {
    "hdb_deployment": "deployments",
    "deployments": "deployments",
    "deployment_events": "deployment_events",
    "node_results": "node_results",
    "payload_drops": "payload_drops",
    "users": "users",
    "hdb_user": "users",
    "roles": "roles",
    "hdb_role": "roles",
    "members": "members",
    "hdb_nodes": "members",
}


@registry.add("cluster_status")
async def cluster_status(call: Call) -> dict[str, Any]:
    provider = call.services.cluster_status
    if provider is None:
        answer: dict[str, Any] = {"node": call.config.node.name, "cluster_id": None, "peers": []}
    else:
        answer = dict(await provider())
    answer["storage"] = call.services.ctx.space.status()  # this node's disk (pressure)
    return answer


def _node_name(call: Call) -> str:
    name = call.fields.req_str("name", max_len=64)
    if not _NODE_RE.match(name):
        raise BadRequest("'name' is not a valid node name", field="name")
    return name


@registry.add("add_node")
async def add_node(call: Call) -> dict[str, Any]:
    name = _node_name(call)
    url = call.fields.req_str("url", max_len=512)
    try:
        parsed = urlparse(url)
        port = parsed.port  # raises for a port out of range
    except ValueError:
        port = None
    if port is None or parsed.scheme != "wss" or not parsed.hostname:
        raise BadRequest("'url' must be wss://host:port (the peer's replication port)", field="url")
    if name == call.config.node.name:
        raise Conflict("a node cannot add itself", field="name")
    member = await call.services.accounts.put_member(name, url, by=call.principal.username)
    return {"message": f"node {name} added", "name": member.name, "url": member.url}


@registry.add("remove_node")
async def remove_node(call: Call) -> dict[str, Any]:
    name = _node_name(call)
    if name == call.config.node.name:
        raise Conflict("a node cannot remove itself", field="name")
    configured = {p.name for p in call.config.peers}
    removed = await call.services.accounts.delete_member(name, by=call.principal.username)
    if not removed and name not in configured:
        raise NotFound(f"node {name} is not a member", field="name")
    if name in configured:
        # A tombstone overrides the config file's [[peers]] entry on every node.
        member = await call.services.accounts.get_member(name)
        if member is None or not member.deleted:
            url = next(p.url for p in call.config.peers if p.name == name)
            await call.services.accounts.put_member(name, url, by=call.principal.username)
            await call.services.accounts.delete_member(name, by=call.principal.username)
    return {"message": f"node {name} removed"}


@registry.add("read_audit_log")
async def read_audit_log(call: Call) -> dict[str, Any]:
    f = call.fields
    table = f.req_str("table", max_len=64)
    if table not in _AUDIT_TABLES:
        raise BadRequest(
            f"'table' must be one of {', '.join(sorted(_AUDIT_TABLES))}", field="table"
        )
    entries = await call.services.store.read_audit_log(
        table=_AUDIT_TABLES[table],
        key=f.string("key", max_len=256),
        since=f.integer("since", minimum=0),
        until=f.integer("until", minimum=0),
        limit=f.integer("limit", default=100, minimum=1, maximum=1000) or 100,
    )
    return {"table": table, "entries": entries}
