"""The API shape of records: what ``list_deployments`` and ``get_deployment`` answer."""

from __future__ import annotations

from typing import Any

from node.deploy.context import DeployContext
from node.deploy.results import peer_results
from storage.records import Deployment, Event, NodeResult

__all__ = ["deployment_view", "deployment_views"]


def deployment_view(
    d: Deployment,
    results: list[NodeResult],
    *,
    blob_present: bool,
    pinned: bool = False,
    events: list[Event] | None = None,
) -> dict[str, Any]:
    """One ``hdb_deployment`` record as the API shows it (SPEC section 3)."""
    view: dict[str, Any] = {
        "deployment_id": d.deployment_id,
        "project": d.project,
        "kind": d.kind,
        "package_identifier": d.package_identifier,
        "payload_hash": d.payload_hash,
        "payload_size": d.payload_size,
        "payload_blob_present": blob_present,
        "status": str(d.status),
        "phase": d.phase,
        "peer_results": peer_results(d, results),
        "expected_nodes": list(d.expected_nodes),
        "origin_node": d.origin_node,
        "restart_mode": d.restart_mode,
        "replicated": d.replicated,
        "started_at": d.started_at,
        "completed_at": d.completed_at,
        "user": d.user,
        "rollback_of": d.rollback_of,
        "superseded_by": d.superseded_by,
        "pinned": pinned,
        "error": d.error,
    }
    if events is not None:
        view["event_log"] = [e.as_dict() for e in events]
    return view


async def deployment_views(
    ctx: DeployContext, deployments: list[Deployment], *, include_event_log: bool
) -> list[dict[str, Any]]:
    """Views of many deployments with one query for results and one for drops."""
    ids = [d.deployment_id for d in deployments]
    results = await ctx.store.results_for(ids)
    dropped = await ctx.store.dropped(ids)
    pinned = await ctx.store.pinned(ids)
    out = []
    for d in deployments:
        present = (
            d.payload_hash is not None
            and d.deployment_id not in dropped
            and ctx.blobs.has(d.payload_hash)
        )
        events = await ctx.store.events(d.deployment_id) if include_event_log else None
        out.append(
            deployment_view(
                d,
                results.get(d.deployment_id, []),
                blob_present=present,
                pinned=d.deployment_id in pinned,
                events=events,
            )
        )
    return out
