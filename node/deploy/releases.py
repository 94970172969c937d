"""Which release directories a node keeps (SPEC 5: the newest N per project).

Kept: the active release, the desired one, releases of deploys still running, and the
newest ``keep_releases`` releases staged here (so a rollback to one of them reuses it
without re-running its hooks). Everything else under ``releases/`` goes, interrupted
stages included. Called after a release becomes active, holding the project's lock.
"""

from __future__ import annotations

import structlog

from node.deploy.context import DeployContext

__all__ = ["prune_releases"]

log = structlog.get_logger(__name__)


async def prune_releases(ctx: DeployContext, project: str) -> list[str]:
    """Remove the releases of ``project`` beyond what is kept. Returns the removed ids."""
    store, components = ctx.store, ctx.components
    staged = await store.staged_releases(project)
    newest = sorted(staged, key=lambda i: (staged[i]["staged_at"], i), reverse=True)
    keep = set(newest[: ctx.retention.keep_releases])
    active = (await store.active_releases()).get(project)
    if active is not None:
        keep.add(active["deployment_id"])
    desired = await store.desired(project)
    if desired is not None:
        keep.add(desired.deployment_id)
    keep.update(d.deployment_id for d in await store.deployments(project=project, terminal=False))
    current = components.current(project)
    if current is not None:
        keep.add(current)
    removed = []
    for deployment_id in components.releases(project):
        if deployment_id in keep:
            continue
        components.discard_release(project, deployment_id)
        ctx.faults.hit("releases.after_discard")
        if deployment_id in staged:
            await store.mark_staged(project, deployment_id, None, staged=False)
        removed.append(deployment_id)
    if removed:
        log.info("releases_pruned", project=project, removed=len(removed))
    return removed
