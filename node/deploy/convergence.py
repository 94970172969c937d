"""Bringing one project on this node to its desired release, in one step.

The desired release is the one definition of "the active deploy" (SPEC 5, kept by
:meth:`storage.store.Store.desired`): the newest ``success`` deploy of the project that
applies here, by creation version. A node that was away does not replay what it missed:
it fetches, stages and activates only that release, and writes its result for that
deployment alone (marked ``late``). It never moves back to an older release than one
it serves, unless what it serves has failed (a rolled-back or lost deploy).

What the node runs, whether it converged and, if not, why, is written to its
``node_components`` row (``get_components`` and ``cluster_status`` show it), so a node
that cannot converge (its desired payload was deleted everywhere, say) says so.
"""

from __future__ import annotations

import structlog

from node.deploy import pipeline
from node.deploy.activation import ActivationFailed, activate_here, deactivate_here
from node.deploy.context import DeployContext
from node.deploy.releases import prune_releases
from node.errors import DeployFailed
from storage.records import Deployment, DeploymentStatus, NodeStatus

__all__ = ["converge", "report_component"]

log = structlog.get_logger(__name__)

_GONE = (DeploymentStatus.FAILED, DeploymentStatus.ROLLED_BACK)
_REVOCABLE = (DeploymentStatus.ACTIVATING, DeploymentStatus.RESTARTING)
#: What a node reports of a component's process.
_PROCESS_KEYS = ("running", "pid", "restarts", "ready", "last_exit", "deployment_id", "started_at")


async def report_component(
    ctx: DeployContext, project: str, *, converged: bool = True, reason: str | None = None
) -> None:
    """Write this node's ``node_components`` row for ``project`` from what runs here."""
    active = (await ctx.store.active_releases()).get(project)
    state = ctx.runner.state(project)
    process = None
    if state.deployment_id is not None or state.running:
        process = {k: v for k, v in _as_dict(state).items() if k in _PROCESS_KEYS}
    await ctx.store.put_component(
        project,
        deployment_id=active["deployment_id"] if active else None,
        payload_hash=active["payload_hash"] if active else None,
        activated_at=active["activated_at"] if active else None,
        converged=converged,
        reason=reason[:1000] if reason else None,
        process=process,
    )


def _as_dict(state: object) -> dict[str, object]:
    if isinstance(state, dict):
        return dict(state)
    out: dict[str, object] = {}
    for name in _PROCESS_KEYS:
        if hasattr(state, name):
            value = getattr(state, name)
            out[name] = str(value) if name == "last_exit" and value is not None else value
    return out


async def converge(ctx: DeployContext, project: str) -> None:
    """Bring ``project`` on this node to its desired release (the caller holds the
    project's lock)."""
    store = ctx.store
    desired = await store.desired(project)
    active = (await store.active_releases()).get(project)
    active_id = active["deployment_id"] if active else None
    current = await store.get_deployment(active_id) if active_id else None
    gone = current is not None and _gone(ctx, current)
    if desired is None:
        if current is not None and gone:
            await deactivate_here(ctx, project)  # its only deploy was rolled back
            await _mine(ctx, current, NodeStatus.ROLLED_BACK)
            await report_component(ctx, project)
        return
    if active_id == desired.deployment_id or (desired.kind == "drop" and active_id is None):
        mine = {r.node: r for r in await store.results(desired.deployment_id)}.get(ctx.node)
        if mine is None or mine.status is not NodeStatus.ACTIVE:
            await _mine(ctx, desired, NodeStatus.ACTIVE, late=True)
        await report_component(ctx, project)
        return
    if current is not None and current.order > desired.order and not gone:
        return  # serving a newer deploy (still finishing): never move back
    log.info("converging", project=project, deployment_id=desired.deployment_id, active=active_id)
    try:
        await _bring(ctx, desired)
    except DeployFailed as e:
        log.warning("convergence_failed", project=project, deployment_id=desired.deployment_id,
                    code=e.code, error=e.message)  # fmt: skip
        await report_component(
            ctx, project, converged=False,
            reason=f"cannot converge to {desired.deployment_id}: {e.message} ({e.code})",
        )  # fmt: skip
        return
    except ActivationFailed as e:
        await report_component(
            ctx, project, converged=False,
            reason=f"{desired.deployment_id} did not start here: {e.message} ({e.code})",
        )  # fmt: skip
        return
    if current is not None and gone:
        await _mine(ctx, current, NodeStatus.ROLLED_BACK)
    await _mine(ctx, desired, NodeStatus.ACTIVE, late=True)
    ctx.faults.hit("converge.after_active")
    await report_component(ctx, project)
    await prune_releases(ctx, project)


def _gone(ctx: DeployContext, d: Deployment) -> bool:
    """Whether this node must stop running ``d``: it failed or was rolled back, or its
    origin revoked this node's permission to run it (a rollback under way)."""
    if d.status in _GONE:
        return True
    return d.status in _REVOCABLE and ctx.node not in d.activate_nodes


async def _bring(ctx: DeployContext, d: Deployment) -> None:
    if d.kind == "drop":
        await deactivate_here(ctx, d.project)
        return
    assert d.payload_hash is not None
    with ctx.blobs.holding(d.payload_hash):
        if not await pipeline.is_staged(ctx, d.project, d.deployment_id):
            await pipeline.ensure_blob(ctx, d, verify=True)

            async def on_step(_status: NodeStatus, _phase: str) -> None:
                return None

            async def on_line(_stream: str, _line: str) -> None:
                return None

            await pipeline.stage(ctx, d, on_step=on_step, on_line=on_line)
        await activate_here(ctx, d, restart=True)


async def _mine(
    ctx: DeployContext, d: Deployment, status: NodeStatus, *, late: bool = False
) -> None:
    now = ctx.store.clock.now_ms()
    await ctx.store.put_result(
        d.deployment_id, status=status, phase="activate", completed_at=now, late=late
    )
