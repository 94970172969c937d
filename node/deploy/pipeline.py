"""One node's steps for one deployment: verify blob → extract → hooks → staged → active.

The same code stages a release on the origin and on every peer. Nothing here touches
the active release until :func:`activate`; a failure at any step leaves the previous
release active and raises :class:`~node.errors.DeployFailed`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from node.deploy.component_config import HookSpec, load_component_config
from node.deploy.context import DeployContext
from node.deploy.extract import extract_release
from node.deploy.hooks import OutputTail, run_hook
from node.errors import DeployFailed
from storage.errors import BlobCorrupt, BlobMissing, StorageError
from storage.records import Deployment, NodeStatus

__all__ = ["OnLine", "OnStep", "activate", "ensure_blob", "stage"]

log = structlog.get_logger(__name__)

#: Called when the node moves to a step: ``(status, phase)``.
OnStep = Callable[[NodeStatus, str], Awaitable[None]]
#: Called for each line of hook output: ``(stream, line)``.
OnLine = Callable[[str, str], Awaitable[None]]


async def ensure_blob(ctx: DeployContext, d: Deployment, *, verify: bool) -> None:
    """Make sure this node holds ``d``'s payload blob, fetching it from peers if not.

    Raises:
        DeployFailed: ``payload_gone`` when nobody has it, ``bad_payload`` when the
            bytes do not match the record's sha256 and size.
    """
    if d.kind == "drop":
        return
    if d.payload_hash is None or d.payload_size is None:
        raise DeployFailed("deployment has no payload", code="bad_payload", phase="fetch")
    if not ctx.blobs.has(d.payload_hash):
        try:
            await ctx.fetcher.fetch(d.payload_hash, d.payload_size)
        except BlobMissing as e:
            raise DeployFailed(str(e), code="payload_gone", phase="fetch") from e
        except BlobCorrupt as e:
            raise DeployFailed(str(e), code="bad_payload", phase="fetch") from e
        except StorageError as e:
            raise DeployFailed(
                f"blob fetch failed: {e}", code="replication_failed", phase="fetch"
            ) from e
    elif verify and not await ctx.blobs.verify(d.payload_hash):
        raise DeployFailed(
            f"stored blob {d.payload_hash} does not match its sha256",
            code="bad_payload",
            phase="fetch",
        )
    if ctx.blobs.size(d.payload_hash) != d.payload_size:
        raise DeployFailed(
            "stored blob size does not match the record", code="bad_payload", phase="fetch"
        )


async def stage(ctx: DeployContext, d: Deployment, *, on_step: OnStep, on_line: OnLine) -> None:
    """Extract ``d``'s blob into a fresh release directory and run its hooks.

    Raises:
        DeployFailed: with the code and phase of the step that failed; the release
            directory is removed and the active release is untouched.
    """
    if d.kind == "drop":
        return
    assert d.payload_hash is not None
    if ctx.components.current(d.project) == d.deployment_id:
        return  # already the active release here: nothing to stage
    dest = ctx.components.release_dir(d.project, d.deployment_id)
    # A release left by an interrupted earlier attempt is not trusted: start clean.
    ctx.components.discard_release(d.project, d.deployment_id)
    try:
        await on_step(NodeStatus.EXTRACTING, "extract")
        result = await asyncio.to_thread(
            extract_release, ctx.blobs.path(d.payload_hash), dest, ctx.extract_limits, ctx.faults
        )
        log.info(
            "release_extracted",
            deployment_id=d.deployment_id,
            files=result.files,
            bytes=result.bytes,
        )
        config = load_component_config(dest)
        env = {
            "CAIRN_PROJECT": d.project,
            "CAIRN_DEPLOYMENT_ID": d.deployment_id,
            "CAIRN_RELEASE_DIR": str(dest),
        }
        await _hook(
            ctx, config.install, "install", NodeStatus.INSTALLING, env, dest, on_step, on_line
        )
        await _hook(ctx, config.check, "check", NodeStatus.LOADING, env, dest, on_step, on_line)
        # Extraction and hooks write through the page cache; a release may only be
        # called staged (and then switched to) once its files would survive a power
        # loss. One sync per release is cheaper than an fsync per extracted file.
        await asyncio.to_thread(os.sync)
    except BaseException:
        ctx.components.discard_release(d.project, d.deployment_id)
        raise


async def _hook(
    ctx: DeployContext,
    spec: HookSpec | None,
    name: str,
    status: NodeStatus,
    env: dict[str, str],
    cwd: Path,
    on_step: OnStep,
    on_line: OnLine,
) -> None:
    await on_step(status, name)
    if spec is None:
        return
    tail = OutputTail()
    ctx.faults.hit(f"hook.{name}.start")
    groups, spawned = ctx.hook_groups, []

    def record(pgid: int) -> None:
        spawned.append(pgid)
        if groups is not None:
            groups.add(pgid)

    try:
        result = await run_hook(
            spec, name=name, cwd=cwd, env=env, on_line=on_line, tail=tail, on_spawn=record
        )
    finally:
        if groups is not None:
            for pgid in spawned:
                groups.discard(pgid)
    if result.timed_out:
        raise DeployFailed(
            f"{name} hook timed out after {spec.timeout_s:g} s",
            code=f"{name}_failed",
            phase=name,
            install_output=tail.as_dict(),
        )
    if result.exit_code != 0:
        raise DeployFailed(
            f"{name} hook exited with status {result.exit_code}",
            code=f"{name}_failed",
            phase=name,
            install_output=tail.as_dict(),
        )


async def activate(ctx: DeployContext, d: Deployment) -> str | None:
    """Switch ``current`` to ``d``'s release (or remove it, for a drop). Returns the
    previously active deployment id."""
    if d.kind == "drop":
        previous = ctx.components.deactivate(d.project)
        await ctx.store.set_active(d.project, None, None)
        return previous
    previous = ctx.components.activate(d.project, d.deployment_id)
    await ctx.store.set_active(d.project, d.deployment_id, d.payload_hash)
    log.info(
        "release_activated", project=d.project, deployment_id=d.deployment_id, previous=previous
    )
    return previous
