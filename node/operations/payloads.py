"""Payload operations: download with Range, delete, retention (prune) and pinning.

Records are never removed here: dropping a payload is a replicated fact
(``payload_drops``) that lets every node free its copy once no live deploy shares it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from node.deploy.context import DeployContext
from node.errors import CairnError, Conflict, Gone, NotFound
from node.operations.registry import Call, Registry
from storage.records import Deployment, DeploymentStatus

__all__ = ["drop_payload", "registry"]

registry = Registry()


async def _get(call: Call, deployment_id: str) -> Deployment:
    d = await call.services.store.get_deployment(deployment_id)
    if d is None:
        raise NotFound(f"deployment {deployment_id} not found", deployment_id=deployment_id)
    return d


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


async def drop_payload(ctx: DeployContext, d: Deployment, *, user: str | None) -> int:
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
