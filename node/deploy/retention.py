"""Which payloads retention may drop (SPEC 8), by the one definition of the active deploy.

Per project, kept: the active (desired) deploy's payload, the newest ``keep_successful``
successful deploys (by creation version), pinned deploys, deploys still running, and
failed ones until ``failed_grace_s`` after they ended. Everything else that still has a
payload may go. The ``prune_deployment_payloads`` operation and disk-pressure
reclamation both ask :func:`prunable`.
"""

from __future__ import annotations

from node.config import RetentionConfig
from node.deploy.context import DeployContext
from storage.records import Deployment, DeploymentStatus

__all__ = ["prunable"]


async def prunable(
    ctx: DeployContext, retention: RetentionConfig, *, project: str | None, now_ms: int
) -> list[Deployment]:
    """Terminal deploys whose payload retention allows dropping, oldest first."""
    store = ctx.store
    candidates = [
        d
        for d in await store.deployments(terminal=True, project=project)
        if d.kind == "deploy" and d.payload_hash
    ]
    ids = [d.deployment_id for d in candidates]
    dropped = await store.dropped(ids)
    pinned = await store.pinned(ids)
    desired = await store.desired_releases()
    by_project: dict[str, list[Deployment]] = {}
    for d in candidates:
        if d.deployment_id not in dropped:
            by_project.setdefault(d.project, []).append(d)
    victims: list[Deployment] = []
    for name, deploys in by_project.items():
        successes = [d for d in reversed(deploys) if d.status is DeploymentStatus.SUCCESS]
        keep = {d.deployment_id for d in successes[: retention.keep_successful]}
        if name in desired:
            keep.add(desired[name][0])  # never the active one
        for d in deploys:
            if d.deployment_id in pinned or d.deployment_id in keep:
                continue
            ended = d.completed_at or d.started_at
            if (
                d.status is DeploymentStatus.SUCCESS
                or ended + retention.failed_grace_s * 1000 <= now_ms
            ):
                victims.append(d)
    return victims
