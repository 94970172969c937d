"""One node's steps for one deployment: blob → stage (extract, hooks) → staged.

The same code stages a release on the origin and on every peer. Nothing here touches
the active release (:mod:`node.deploy.activation` does); a failure at any step removes
the half-made release, leaves the previous release active and raises
:class:`~node.errors.DeployFailed` (an unexpected exception is left to the caller's
boundary, which records it as ``internal_error``).

A release already staged completely on this node is reused as it is; a rollback whose
source release is still on disk gets a hard-linked copy of it, without running its
hooks again.
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
from node.deploy.hooks import OutputTail, TailDict, run_hook
from node.deploy.space import extraction_estimate, insufficient
from node.errors import DeployFailed, is_disk_full
from storage.errors import BlobCorrupt, BlobMissing, StorageError
from storage.records import Deployment, NodeStatus

__all__ = ["OnLine", "OnStep", "ensure_blob", "hook_env", "is_staged", "stage"]

log = structlog.get_logger(__name__)

#: Called when the node moves to a step: ``(status, phase)``.
OnStep = Callable[[NodeStatus, str], Awaitable[None]]
#: Called for each line of hook output: ``(stream, line)``.
OnLine = Callable[[str, str], Awaitable[None]]


def hook_env(ctx: DeployContext, d: Deployment, release: Path) -> dict[str, str]:
    """What hooks and the run process learn about the release (SPEC 5)."""
    return {
        "CAIRN_NODE": ctx.node,
        "CAIRN_PROJECT": d.project,
        "CAIRN_DEPLOYMENT_ID": d.deployment_id,
        "CAIRN_RELEASE_DIR": str(release),
    }


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
        await ctx.space.admit(d.payload_size, blob_bytes=d.payload_size, phase="fetch")
        try:
            await ctx.fetcher.fetch(d.payload_hash, d.payload_size)
        except BlobMissing as e:
            raise DeployFailed(
                f"the payload {d.payload_hash[:12]} is on no reachable node",
                code="payload_gone",
                phase="fetch",
            ) from e
        except BlobCorrupt as e:
            raise DeployFailed(str(e), code="bad_payload", phase="fetch") from e
        except StorageError as e:
            if is_disk_full(e):
                ctx.blobs.drop_partial(d.payload_hash)  # a resumable fetch is no use now
                raise insufficient(f"blob fetch failed: {e}", phase="fetch") from e
            raise DeployFailed(
                f"blob fetch failed: {e}", code="replication_failed", phase="fetch"
            ) from e
    elif verify and not await ctx.blobs.verify(d.payload_hash):
        raise DeployFailed(
            f"stored blob {d.payload_hash} does not match its sha256",
            code="bad_payload",
            phase="fetch",
        )
    try:
        size = ctx.blobs.size(d.payload_hash)
    except BlobMissing as e:
        raise DeployFailed("the payload was deleted", code="payload_gone", phase="fetch") from e
    if size != d.payload_size:
        raise DeployFailed(
            "stored blob size does not match the record", code="bad_payload", phase="fetch"
        )


async def is_staged(ctx: DeployContext, project: str, deployment_id: str) -> bool:
    """Whether a complete release of ``deployment_id`` is on this node's disk."""
    if deployment_id not in await ctx.store.staged_releases(project):
        return False
    return ctx.components.release_dir(project, deployment_id).is_dir()


async def stage(
    ctx: DeployContext, d: Deployment, *, on_step: OnStep, on_line: OnLine
) -> TailDict | None:
    """Make ``d``'s release ready on disk: extract its blob and run its hooks.

    Returns:
        The hook output (the last 200 lines / 16 KiB, labelled by hook), or None when
        nothing ran (a drop, a release already staged, a reused rollback).

    Raises:
        DeployFailed: with the code and phase of the step that failed; the release
            directory is removed and the active release is untouched.
    """
    if d.kind == "drop" or await is_staged(ctx, d.project, d.deployment_id):
        return None
    assert d.payload_hash is not None
    dest = ctx.components.release_dir(d.project, d.deployment_id)
    # A release left by an interrupted earlier attempt is not trusted: start clean.
    ctx.components.discard_release(d.project, d.deployment_id)
    try:
        if d.rollback_of is not None and await is_staged(ctx, d.project, d.rollback_of):
            await on_step(NodeStatus.EXTRACTING, "extract")
            await asyncio.to_thread(
                ctx.components.clone_release, d.project, d.rollback_of, d.deployment_id
            )
            log.info("release_reused", deployment_id=d.deployment_id, source=d.rollback_of)
            output = None
        else:
            output = await _stage_fresh(ctx, d, dest, on_step, on_line)
        # Extraction and hooks write through the page cache; a release may only be
        # called staged (and then switched to) once its files would survive a power
        # loss. One sync per release is cheaper than an fsync per extracted file.
        await asyncio.to_thread(os.sync)
        await ctx.store.mark_staged(d.project, d.deployment_id, d.payload_hash)
        return output
    except BaseException:
        ctx.components.discard_release(d.project, d.deployment_id)
        raise


async def _stage_fresh(
    ctx: DeployContext, d: Deployment, dest: Path, on_step: OnStep, on_line: OnLine
) -> TailDict:
    assert d.payload_hash is not None
    await on_step(NodeStatus.EXTRACTING, "extract")
    blob = ctx.blobs.path(d.payload_hash)
    need = await asyncio.to_thread(
        extraction_estimate, blob, d.payload_size or 0, ctx.limits.max_extracted_bytes
    )
    await ctx.space.admit(need, phase="extract")
    try:
        ctx.faults.hit("deploy.extract")
        result = await asyncio.to_thread(extract_release, blob, dest, ctx.extract_limits,
                                         ctx.faults)  # fmt: skip
    except OSError as e:  # the extraction removed what it wrote
        if is_disk_full(e):
            raise insufficient(f"the disk filled up while extracting: {e}", phase="extract") from e
        raise
    log.info(
        "release_extracted", deployment_id=d.deployment_id, files=result.files, bytes=result.bytes
    )
    config = load_component_config(dest)
    env = hook_env(ctx, d, dest)
    output = OutputTail()
    for spec, name, status in (
        (config.install, "install", NodeStatus.INSTALLING),
        (config.check, "check", NodeStatus.LOADING),
    ):
        await on_step(status, name)
        if spec is not None:
            await _hook(ctx, spec, name, env, dest, on_line, output)
    return output.as_dict()


async def _hook(
    ctx: DeployContext,
    spec: HookSpec,
    name: str,
    env: dict[str, str],
    cwd: Path,
    on_line: OnLine,
    output: OutputTail,
) -> None:
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
        output.extend(tail, name)
    if result.timed_out:
        message = f"{name} hook timed out after {spec.timeout_s:g} s"
    elif result.exit_code != 0:
        message = f"{name} hook exited with status {result.exit_code}"
    else:
        return
    raise DeployFailed(message, code=f"{name}_failed", phase=name, install_output=output.as_dict())
