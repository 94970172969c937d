"""Switching a node to a release, and back when the release does not come up.

Activation on one node: point ``current`` at the new release (an atomic symlink
switch), then have the runner start the release's ``[run]`` process (stopping the old
one) and wait until it is ready. If the switch fails or the process is not ready, the
node switches back to the release it had before and restarts that one, then raises
:class:`ActivationFailed`: nothing is ever left half-activated. The active release is
recorded (``active_releases``) only once it is serving.

Callers hold the project's lock (:class:`~node.deploy.context.ProjectLocks`).
"""

from __future__ import annotations

from pathlib import Path

import structlog

from node.deploy.component_config import RunSpec, load_component_config
from node.deploy.context import DeployContext
from node.errors import DeployFailed
from storage.records import Deployment

__all__ = ["ActivationFailed", "activate_here", "deactivate_here", "restart_wanted"]

log = structlog.get_logger(__name__)


class ActivationFailed(Exception):
    """The release could not be switched to or did not become ready; this node is back on
    the release it had before."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def restart_wanted(d: Deployment) -> bool:
    """``restart: false`` switches files only; otherwise the process is restarted."""
    return d.restart_mode is not None


def _run_spec(release: Path) -> RunSpec | None:
    try:
        return load_component_config(release).run
    except DeployFailed:
        return None  # checked when the release was staged; a damaged file runs nothing


async def activate_here(ctx: DeployContext, d: Deployment, *, restart: bool) -> str | None:
    """Make ``d``'s staged release the active one on this node and wait until it serves.

    Returns:
        The deployment id that was active before.

    Raises:
        ActivationFailed: ``activation_failed`` (the switch failed) or ``not_ready``
            (the process exited or was not ready in time); the previous release is
            active and running again. Any other exception also leaves the previous
            release active and running.
    """
    if d.kind == "drop":
        return await deactivate_here(ctx, d.project)
    project = d.project
    previous = ctx.components.current(project)
    release = ctx.components.release_dir(project, d.deployment_id)
    try:
        ctx.faults.hit("deploy.before_switch")
        ctx.components.activate(project, d.deployment_id)
    except Exception as e:
        log.warning("switch_failed", project=project, deployment_id=d.deployment_id, error=str(e))
        raise ActivationFailed("activation_failed", f"switching to the release failed: {e}") from e
    try:
        spec = _run_spec(release)
        # ``restart: false`` leaves a running process alone; one not running yet starts.
        running = ctx.runner.state(project).running
        result = await ctx.runner.switch(
            project, d.deployment_id, release, spec, restart=restart or not running
        )
        if not result.ok:
            log.warning("release_not_ready", project=project, deployment_id=d.deployment_id,
                        reason=result.message)  # fmt: skip
            await _switch_back(ctx, project, previous)
            raise ActivationFailed(result.code or "not_ready", result.message)
        ctx.faults.hit("deploy.after_switch")
        await ctx.store.set_active(project, d.deployment_id, d.payload_hash)
    except ActivationFailed:
        raise
    except Exception as e:
        # Anything else once switched (a full disk while recording it, a bug) must not
        # leave the node running a release its record does not name: back, then raise.
        log.warning("activation_crashed", project=project, deployment_id=d.deployment_id,
                    error=f"{type(e).__name__}: {e}")  # fmt: skip
        await _switch_back(ctx, project, previous)
        raise
    log.info("release_activated", project=project, deployment_id=d.deployment_id,
             previous=previous)  # fmt: skip
    return previous


async def _switch_back(ctx: DeployContext, project: str, previous: str | None) -> None:
    """Return to ``previous`` (or to nothing) after a failed activation."""
    if previous is None:
        await ctx.runner.stop(project)
        ctx.components.deactivate(project)
        return
    ctx.components.activate(project, previous)
    release = ctx.components.release_dir(project, previous)
    result = await ctx.runner.switch(project, previous, release, _run_spec(release), restart=True)
    if not result.ok:
        log.error("previous_release_not_ready", project=project, deployment_id=previous,
                  reason=result.message)  # fmt: skip


async def deactivate_here(ctx: DeployContext, project: str) -> str | None:
    """Stop the project's process and remove ``current`` (a drop). Returns what was
    active."""
    await ctx.runner.stop(project)
    previous = ctx.components.deactivate(project)
    await ctx.store.set_active(project, None, None)
    log.info("component_dropped", project=project, previous=previous)
    return previous
