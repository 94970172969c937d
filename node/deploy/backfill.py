"""Holding again what the cluster keeps: the retained payloads a node lacks.

A node rebuilt from an empty data dir (or one that skipped deploys while it was away)
converges to each project's active release and stages nothing else, so it would hold
none of the other payloads the cluster keeps: older successful deploys' blobs, kept for
rollback and downloads. Once it has caught up, it fetches those it lacks from its
peers, one at a time, so it holds what they hold (and the cluster keeps as many copies).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from node.deploy.context import DeployContext
from storage.errors import StorageError
from storage.records import DeploymentStatus

__all__ = ["backfill_payloads"]

log = structlog.get_logger(__name__)


async def backfill_payloads(
    ctx: DeployContext, *, on_dropped: Callable[[str], Awaitable[None]]
) -> int:
    """Fetch every payload of a successful deploy that is not dropped and not here.

    Args:
        ctx: the node's deploy context.
        on_dropped: frees a deployment's blob (called for a payload dropped while it was
            on its way).

    Returns:
        How many blobs were fetched.
    """
    rows = await ctx.store.deployments(statuses=[DeploymentStatus.SUCCESS])
    dropped = await ctx.store.dropped([d.deployment_id for d in rows])
    wanted = {
        d.payload_hash: d.payload_size
        for d in rows
        if d.payload_hash and d.payload_size is not None and d.deployment_id not in dropped
    }
    fetched = 0
    for h, size in wanted.items():
        if ctx.blobs.has(h):
            continue
        with ctx.blobs.holding(h):
            try:
                await ctx.fetcher.fetch(h, size)
            except StorageError as e:  # nobody has it now: nothing to copy
                log.info("payload_backfill_skipped", payload_hash=h, error=str(e))
                continue
        fetched += 1
        users = await ctx.store.deployments(payload_hash=h)
        if users and len(await ctx.store.dropped([u.deployment_id for u in users])) == len(users):
            await on_dropped(users[0].deployment_id)  # dropped while it was on its way
    if fetched:
        log.info("payloads_backfilled", count=fetched)
    return fetched
