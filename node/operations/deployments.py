"""Deployment operations: deploy, list, get (with SSE), payloads, components."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

from aiohttp import web

from node.appkeys import METRICS
from node.deploy.coordinator import peer_results
from node.deploy.origin import DeployRequest
from node.deploy.sources import bytes_source, file_source, local_package, url_source
from node.errors import BadRequest, CairnError, Conflict, DeployFailed, Gone, NotFound
from node.operations.registry import Call, Registry
from node.sse import last_event_id, stream_deployment
from node.views import deployment_views
from storage.records import Deployment, DeploymentStatus
from storage.store import DeploymentFilter

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
        config = call.config
        try:
            parsed = urlparse(package)
        except ValueError:  # e.g. an unclosed IPv6 bracket
            raise BadRequest("'package' is not a valid URL or path", field="package") from None
        scheme = parsed.scheme
        if scheme in ("http", "https"):
            return url_source(package, timeout_s=config.deploy.package_fetch_timeout_s), package
        if scheme not in ("", "file"):
            raise BadRequest("'package' must be an http(s) URL or a local path", field="package")
        path_text = parsed.path if scheme == "file" else package
        path, temporary = local_package(
            path_text, config.deploy.allowed_package_dirs, config.node.data_dir / "tmp"
        )
        return file_source(path, delete=temporary), package
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
        restart_mode=f.restart(),
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
    if package is not None:
        req = replace(req, package_identifier=package)
    origin = call.services.origin
    d, rec = await origin.create(req)

    async def job() -> dict[str, Any]:
        nonlocal d
        await origin.check_reachable(d, rec)
        if rollback_source is not None:
            d = await origin.reuse_blob(d, rec, rollback_source)
        else:
            assert source is not None
            d = await origin.receive(d, rec, source)
            call.app[METRICS].received_bytes.inc(d.payload_size or 0)
        final = await origin.launch(d, rec)
        results = await call.services.store.results(final.deployment_id)
        return _success_body(final, peer_results(final, results))

    task = call.services.tasks.spawn(job(), name=f"deploy-request-{d.deployment_id}")

    async def finish() -> dict[str, Any]:
        try:
            return await asyncio.shield(task)
        except DeployFailed as e:
            await _enrich_failure(call, e, d.deployment_id)
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
    )


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """``bytes=a-b`` → ``(start, end_exclusive)``; raises CairnError(416) if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise _RangeError(size)
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise _RangeError(size)
            return max(size - n, 0), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        raise _RangeError(size) from None
    if start >= size or end <= start:
        raise _RangeError(size)
    return start, min(end, size)


class _RangeError(CairnError):
    status = 416
    code = "range_not_satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(
            "requested range is not satisfiable", headers={"Content-Range": f"bytes */{size}"}
        )


@registry.add("get_deployment_payload")
async def get_deployment_payload(call: Call) -> web.StreamResponse:
    deployment_id = call.fields.deployment_id()
    assert deployment_id is not None
    d = await _get(call, deployment_id)
    ctx = call.services.ctx
    h = d.payload_hash
    if h is None or await ctx.store.dropped([deployment_id]) or not ctx.blobs.has(h):
        raise Gone(
            f"the payload of deployment {deployment_id} is not on this node",
            deployment_id=deployment_id,
        )
    size = ctx.blobs.size(h)
    start, end, status = 0, size, 200
    if "Range" in call.request.headers:
        start, end = _parse_range(call.request.headers["Range"], size)
        status = 206
    head = b""
    async for chunk in ctx.blobs.read(h, 0, min(2, size)):
        head += chunk
    gz = head.startswith(b"\x1f\x8b")
    resp = web.StreamResponse(status=status)
    resp.content_type = "application/gzip" if gz else "application/x-tar"
    resp.headers["Content-Disposition"] = (
        f'attachment; filename="{deployment_id}.{"tar.gz" if gz else "tar"}"'
    )
    resp.headers["Accept-Ranges"] = "bytes"
    resp.headers["X-Payload-Sha256"] = h
    if status == 206:
        resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp.content_length = end - start
    await resp.prepare(call.request)
    async for chunk in ctx.blobs.read(h, start, end):
        await resp.write(chunk)
    await resp.write_eof()
    return resp


@registry.add("delete_deployment_payload")
async def delete_deployment_payload(call: Call) -> dict[str, Any]:
    deployment_id = call.fields.deployment_id()
    assert deployment_id is not None
    d = await _get(call, deployment_id)
    if not d.terminal:
        raise Conflict(
            f"deployment {deployment_id} is {d.status}; "
            "its payload can only be deleted once it is over",
            deployment_id=deployment_id,
        )
    ctx = call.services.ctx
    desired = [
        x
        for x in await ctx.store.deployments(statuses=[DeploymentStatus.SUCCESS], project=d.project)
        if x.replicated
    ]
    if desired and desired[-1].deployment_id == deployment_id and d.kind == "deploy":
        raise Conflict(
            f"deployment {deployment_id} is the active deploy of {d.project}; "
            "its payload is kept so returning nodes can converge",
            deployment_id=deployment_id,
        )
    freed = await drop_payload(ctx, d, user=call.principal.username)
    return {"deployment_id": deployment_id, "freed_bytes": freed}


async def drop_payload(ctx: Any, d: Deployment, *, user: str | None) -> int:
    """Mark ``d``'s payload dropped (replicated) and free the local blob if unused."""
    newly = await ctx.store.mark_payload_dropped(d.deployment_id, user=user)
    freed = 0
    if d.payload_hash and await ctx.store.live_references(d.payload_hash) == 0:
        freed = await ctx.blobs.delete(d.payload_hash)
    if newly:
        await ctx.store.write_deployment(
            d.deployment_id, None, [("payload_dropped", {"freed_bytes": freed})]
        )
    return int(freed)


@registry.add("get_components")
async def get_components(call: Call) -> dict[str, Any]:
    store = call.services.store
    active = await store.active_releases()
    per_node = await store.active_by_node()
    projects: dict[str, dict[str, Any]] = {}
    for project, row in active.items():
        projects[project] = {
            "project": project,
            "deployment_id": row["deployment_id"],
            "payload_hash": row["payload_hash"],
            "activated_at": row["activated_at"],
            "nodes": [],
        }
    for row in per_node:
        if row["kind"] == "drop":
            continue  # the newest thing active on that node is the removal itself
        entry = projects.setdefault(
            row["project"],
            {
                "project": row["project"],
                "deployment_id": None,
                "payload_hash": None,
                "activated_at": None,
                "nodes": [],
            },
        )
        entry["nodes"].append(
            {
                "node": row["node"],
                "deployment_id": row["deployment_id"],
                "payload_hash": row["payload_hash"],
                "activated_at": row["completed_at"],
            }
        )
    return {
        "node": call.config.node.name,
        "components": sorted(projects.values(), key=lambda p: p["project"]),
    }


@registry.add("drop_component")
async def drop_component(call: Call) -> dict[str, Any]:
    project = call.fields.project()
    assert project is not None
    store = call.services.store
    known = await store.deployments(project=project, statuses=[DeploymentStatus.SUCCESS])
    if not known or known[-1].kind == "drop":
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
        d, _ = await rec.write(
            {"deadline_at": store.clock.now_ms() + d.timeout_ms},
            ("phase", {"phase": "receive", "status": "done"}),
        )
        final = await origin.launch(d, rec)
        return _success_body(final, peer_results(final, await store.results(final.deployment_id)))

    task = call.services.tasks.spawn(job(), name=f"drop-{d.deployment_id}")
    try:
        return await asyncio.shield(task)
    except DeployFailed as e:
        await _enrich_failure(call, e, d.deployment_id)
        raise


@registry.add("pin_deployment")
async def pin_deployment(call: Call) -> dict[str, Any]:
    """Pin (or unpin) a deploy so retention never drops its payload."""
    deployment_id = call.fields.deployment_id()
    assert deployment_id is not None
    d = await _get(call, deployment_id)
    if not d.terminal:
        raise Conflict(f"deployment {deployment_id} is {d.status}; pin it once it is over")
    pinned = call.fields.boolean("pinned", default=True)
    await call.services.store.write_deployment(
        deployment_id, {"pinned": pinned}, user=call.principal.username
    )
    return {"deployment_id": deployment_id, "pinned": pinned}


@registry.add("prune_deployment_payloads")
async def prune_deployment_payloads(call: Call) -> dict[str, Any]:
    """Drop payloads per the retention policy (SPEC section 8); records are kept."""
    project = call.fields.project(required=False)
    dry_run = call.fields.boolean("dry_run", default=False)
    ctx = call.services.ctx
    retention = call.config.retention
    now = ctx.store.clock.now_ms()
    candidates = await ctx.store.deployments(terminal=True, project=project)
    dropped_already = await ctx.store.dropped([d.deployment_id for d in candidates])
    by_project: dict[str, list[Deployment]] = {}
    for d in candidates:
        if d.kind == "deploy" and d.payload_hash and d.deployment_id not in dropped_already:
            by_project.setdefault(d.project, []).append(d)
    victims: list[Deployment] = []
    for project_deploys in by_project.values():
        successes = [d for d in reversed(project_deploys) if d.status is DeploymentStatus.SUCCESS]
        keep = {d.deployment_id for d in successes[: retention.keep_successful]}
        if successes:
            keep.add(successes[0].deployment_id)  # never the active one
        for d in project_deploys:
            if d.pinned or d.deployment_id in keep:
                continue
            if (
                d.status is DeploymentStatus.SUCCESS
                or (d.completed_at or d.started_at) + retention.failed_grace_s * 1000 <= now
            ):
                victims.append(d)
    freed = 0
    if dry_run:
        victim_ids = {d.deployment_id for d in victims}
        for h in {d.payload_hash for d in victims if d.payload_hash}:
            users = await ctx.store.deployments(payload_hash=h)
            if ctx.blobs.has(h) and all(
                u.deployment_id in victim_ids or u.deployment_id in dropped_already for u in users
            ):
                freed += ctx.blobs.size(h)
    else:
        for d in victims:
            freed += await drop_payload(ctx, d, user=call.principal.username)
    return {"freed_bytes": freed, "dropped": [d.deployment_id for d in victims], "dry_run": dry_run}
