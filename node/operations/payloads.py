"""Payload operations: download with Range, delete, retention (prune) and pinning.

Records are never removed here: dropping a payload is a replicated fact
(``payload_drops``) that lets every node free its copy once no live deploy shares it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from node.deploy.context import DeployContext
from node.deploy.retention import prunable
from node.errors import CairnError, Conflict, Gone, NotFound
from node.operations.registry import Call, Registry
from storage.errors import BlobMissing
from storage.records import Deployment

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
    with ctx.blobs.holding(h):
        return await _stream(call, ctx, deployment_id, h)


async def _stream(call: Call, ctx: DeployContext, deployment_id: str, h: str) -> web.StreamResponse:
    try:
        size = ctx.blobs.size(h)
    except BlobMissing:
        raise Gone(
            f"the payload of deployment {deployment_id} is not on this node",
            deployment_id=deployment_id,
        ) from None
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
    """Drop a finished deploy's payload on every node (idempotent). Allowed for the
    active deploy too: the running release is untouched, and the answer warns that nodes
    which have not staged it can no longer converge to it."""
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
    freed = await drop_payload(ctx, d, user=call.principal.username)
    answer: dict[str, Any] = {"deployment_id": deployment_id, "freed_bytes": freed}
    desired = await ctx.store.desired(d.project)
    if desired is not None and desired.deployment_id == deployment_id:
        answer["warning"] = (
            f"{deployment_id} is the active deploy of {d.project}: nodes that have not "
            "staged it can no longer converge to it (they say so in get_components)"
        )
    return answer


async def drop_payload(ctx: DeployContext, d: Deployment, *, user: str | None) -> int:
    """Mark ``d``'s payload dropped (replicated: every node frees its copy) and free the
    local blob unless another live deployment, or something in progress, uses it."""
    newly = await ctx.store.mark_payload_dropped(d.deployment_id, user=user)
    ctx.faults.hit("payload.after_drop_row")
    freed = 0
    h = d.payload_hash
    if h:

        async def unused() -> bool:
            return await ctx.store.live_references(h) == 0

        freed = await ctx.blobs.delete_unused(h, unused)
    if newly and d.origin_node == ctx.node:
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
    await call.services.store.set_pin(deployment_id, pinned, user=call.principal.username)
    return {"deployment_id": deployment_id, "pinned": pinned}


@registry.add("prune_deployment_payloads")
async def prune_deployment_payloads(call: Call) -> dict[str, Any]:
    """Drop payloads per the retention policy (SPEC section 8); records are kept."""
    project = call.fields.project(required=False)
    dry_run = call.fields.boolean("dry_run", default=False)
    ctx = call.services.ctx
    now = ctx.store.clock.now_ms()
    victims = await prunable(ctx, call.config.retention, project=project, now_ms=now)
    freed = 0
    if dry_run:
        victim_ids = {d.deployment_id for d in victims}
        for h in {d.payload_hash for d in victims if d.payload_hash}:
            users = await ctx.store.deployments(payload_hash=h)
            others = [u.deployment_id for u in users if u.deployment_id not in victim_ids]
            if ctx.blobs.has(h) and len(await ctx.store.dropped(others)) == len(others):
                freed += ctx.blobs.size(h)
    else:
        for d in victims:
            freed += await drop_payload(ctx, d, user=call.principal.username)
    return {"freed_bytes": freed, "dropped": [d.deployment_id for d in victims], "dry_run": dry_run}
