"""Deployment operations: deploy, list, get (with SSE), payloads, components."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from aiohttp import web

from node.appkeys import METRICS
from node.deploy.origin import DeployRequest
from node.deploy.results import peer_results
from node.deploy.sources import bytes_source, package_source
from node.errors import BadRequest, DeployFailed, NotFound
from node.operations.registry import Call, Registry
from node.sse import last_event_id, stream_deployment
from node.views import deployment_views
from storage.listing import DeploymentFilter
from storage.records import Deployment, DeploymentStatus

__all__ = ["registry"]

registry = Registry()

_STATUSES = tuple(str(s) for s in DeploymentStatus)


async def _get(call: Call, deployment_id: str) -> Deployment:
    d = await call.services.store.get_deployment(deployment_id)
    if d is None:
        raise NotFound(f"deployment {deployment_id} not found", deployment_id=deployment_id)
    return d


def _success_body(d: Deployment, peer_results: list[dict[str, Any]]) -> dict[str, Any]:
    verb = "dropped" if d.kind == "drop" else "deployed"
    return {
        "message": f"Successfully {verb}: {d.project}",
        "deployment_id": d.deployment_id,
        "peer_results": peer_results,
    }


async def _view(call: Call, d: Deployment, *, events: bool) -> dict[str, Any]:
    return (await deployment_views(call.services.ctx, [d], include_event_log=events))[0]


def _payload_source(
    call: Call, req: DeployRequest
) -> tuple[AsyncIterator[bytes] | None, str | None]:
    """The payload stream of a deploy request, and the package identifier if any."""
    f, body = call.fields, call.body
    package = f.string("package")
    given = [
        n
        for n, present in (
            ("payload", body.payload_bytes is not None or body.payload_stream is not None),
            ("package", package is not None),
            ("rollback_from", f.has("rollback_from")),
        )
        if present
    ]
    if len(given) != 1:
        raise BadRequest(
            "give exactly one of 'payload', 'package' or 'rollback_from'"
            + (f" (got {', '.join(given)})" if given else ""),
            field="payload",
        )
    if body.payload_stream is not None:
        return body.payload_stream, None
    if body.payload_bytes is not None:
        return bytes_source(body.payload_bytes), None
    if package is not None:
        return package_source(package, call.config)
    return None, None


@registry.add("deploy_component", accepts_payload=True)
async def deploy_component(call: Call) -> dict[str, Any] | web.StreamResponse:
    f = call.fields
    config = call.config
    project = f.project()
    assert project is not None
    rollback_from = f.deployment_id("rollback_from", required=False)
    req = DeployRequest(
        project=project,
        user=call.principal.username,
        # ``restart`` defaults to true: a [run] process is restarted on activation.
        restart_mode=f.restart() if f.has("restart") else "immediate",
        replicated=f.boolean("replicated", default=True),
        timeout_ms=f.integer(
            "deployment_timeout",
            default=config.limits.deployment_timeout_ms,
            minimum=100,
            maximum=86_400_000,
        )
        or config.limits.deployment_timeout_ms,
        ignore_replication_errors=f.boolean("ignore_replication_errors", default=False),
        rollback_of=rollback_from,
        size_hint=call.request.content_length,
    )
    source, package = _payload_source(call, req)
    rollback_source: Deployment | None = None
    if rollback_from is not None:
        rollback_source = await _get(call, rollback_from)
        if rollback_source.project != project or rollback_source.kind != "deploy":
            raise BadRequest(
                f"deployment {rollback_from} is not a deploy of project {project}",
                field="rollback_from",
            )
        # The new row names the source's blob from the start, so a delete racing this
        # rollback either sees the reference or has already removed the blob (410).
        req = replace(
            req,
            payload_hash=rollback_source.payload_hash,
            payload_size=rollback_source.payload_size,
        )
    if package is not None:
        req = replace(req, package_identifier=package)
    origin = call.services.origin
    d, rec = await origin.create(req)

    receiving = source is not None

    async def job() -> dict[str, Any]:
        nonlocal d, receiving
        await origin.check_reachable(d, rec)
        if rollback_source is not None:
            d = await origin.reuse_blob(d, rec, rollback_source)
        else:
            assert source is not None
            d = await origin.receive(d, rec, source)
            call.app[METRICS].received_bytes.inc(d.payload_size or 0)
        receiving = False
        final = await origin.launch(d, rec)
        results = await call.services.store.results(final.deployment_id)
        return _success_body(final, peer_results(final, results))

    task = call.services.tasks.spawn(
        origin.guard(d, rec, job()), name=f"deploy-request-{d.deployment_id}"
    )

    async def finish() -> dict[str, Any]:
        try:
            return await asyncio.shield(task)
        except DeployFailed as e:
            await _enrich_failure(call, e, d.deployment_id)
            raise
        except asyncio.CancelledError:
            # The client went away. Once the payload is in, the deploy goes on without
            # it; an upload still streaming in can no longer complete: end it now
            # (failed, upload_failed) rather than when the body deadline passes.
            if receiving:
                task.cancel()
            raise

    if call.wants_sse:
        return await stream_deployment(
            call.request,
            call.services.store,
            d.deployment_id,
            finish=finish,
            done=task.done,
            resume_after=None,
            ping_s=config.admin.sse_ping_s,
        )
    return await finish()


async def _enrich_failure(call: Call, e: DeployFailed, deployment_id: str) -> None:
    e.extra.setdefault("deployment_id", deployment_id)
    e.extra.setdefault("phase", e.phase)
    d = await call.services.store.get_deployment(deployment_id)
    if d is not None:
        results = await call.services.store.results(deployment_id)
        failed = [r.node for r in results if str(r.status) == "failed"]
        e.extra.setdefault("failed_nodes", failed)


@registry.add("list_deployments")
async def list_deployments(call: Call) -> dict[str, Any]:
    f = call.fields
    filt = DeploymentFilter(
        project=f.project(required=False),
        status=f.choice("status", _STATUSES),
        user=f.string("user"),
        since=f.integer("since", minimum=0),
        until=f.integer("until", minimum=0),
    )
    limit = f.integer("limit", default=100, minimum=1, maximum=1000) or 100
    offset = f.integer("offset", default=0, minimum=0) or 0
    cursor = f.string("cursor", max_len=512)
    try:
        page = await call.services.store.list_deployments(
            filt, limit=limit, offset=offset, cursor=cursor
        )
    except ValueError as e:
        raise BadRequest(str(e), field="cursor") from None
    views = await deployment_views(
        call.services.ctx,
        page.deployments,
        include_event_log=f.boolean("include_event_log", default=False),
    )
    return {"deployments": views, "total": page.total, "next_cursor": page.next_cursor}


@registry.add("get_deployment")
async def get_deployment(call: Call) -> dict[str, Any] | web.StreamResponse:
    deployment_id = call.fields.deployment_id()
    assert deployment_id is not None
    d = await _get(call, deployment_id)
    if not call.wants_sse:
        return await _view(call, d, events=True)
    resume = last_event_id(call.request)
    store = call.services.store

    async def finish() -> dict[str, Any]:
        fresh = await _get(call, deployment_id)
        return await _view(call, fresh, events=True)

    return await stream_deployment(
        call.request,
        store,
        deployment_id,
        finish=finish,
        done=lambda: False,
        resume_after=resume,
        ping_s=call.config.admin.sse_ping_s,
        share=f"get_deployment {deployment_id}",  # every watcher ends on the same view
    )


@registry.add("get_components")
async def get_components(call: Call) -> dict[str, Any]:
    """Per project: what this node runs, and what every node reports it runs (its
    process, and whether it could converge)."""
    store = call.services.store
    me = call.config.node.name
    active = await store.active_releases()
    desired = await store.desired_releases()
    projects: dict[str, dict[str, Any]] = {}

    def entry(project: str) -> dict[str, Any]:
        if project not in projects:
            row = active.get(project)
            want = desired.get(project)
            projects[project] = {
                "project": project,
                "deployment_id": row["deployment_id"] if row else None,
                "payload_hash": row["payload_hash"] if row else None,
                "activated_at": row["activated_at"] if row else None,
                "desired_deployment_id": want[0] if want and want[2] != "drop" else None,
                "nodes": [],
            }
        return projects[project]

    rows = await store.components()
    # A project is listed while this node or any other still runs it (a drop removes it).
    for project in {*active, *(r["project"] for r in rows if r["deployment_id"] is not None)}:
        entry(project)
    for row in rows:
        if row["project"] not in projects:
            continue
        entry(row["project"])["nodes"].append(
            {
                "node": row["node"],
                "deployment_id": row["deployment_id"],
                "payload_hash": row["payload_hash"],
                "activated_at": row["activated_at"],
                "process": row["process"],
                "converged": row["converged"],
                "reason": row["reason"],
            }
        )
    return {"node": me, "components": sorted(projects.values(), key=lambda p: p["project"])}


@registry.add("drop_component")
async def drop_component(call: Call) -> dict[str, Any]:
    project = call.fields.project()
    assert project is not None
    store = call.services.store
    desired = await store.desired(project)
    if desired is None or desired.kind == "drop":
        raise NotFound(f"project {project} is not deployed", project=project)
    origin = call.services.origin
    req = DeployRequest(
        project=project,
        user=call.principal.username,
        kind="drop",
        replicated=call.fields.boolean("replicated", default=True),
        timeout_ms=call.config.limits.deployment_timeout_ms,
        ignore_replication_errors=call.fields.boolean("ignore_replication_errors", default=False),
    )
    d, rec = await origin.create(req)

    async def job() -> dict[str, Any]:
        nonlocal d
        await origin.check_reachable(d, rec)
        d, _ = await rec.write(None, ("phase", {"phase": "receive", "status": "done"}))
        final = await origin.launch(d, rec)
        return _success_body(final, peer_results(final, await store.results(final.deployment_id)))

    task = call.services.tasks.spawn(origin.guard(d, rec, job()), name=f"drop-{d.deployment_id}")
    try:
        return await asyncio.shield(task)
    except DeployFailed as e:
        await _enrich_failure(call, e, d.deployment_id)
        raise
