"""Deploys this node originates: the row first, then the payload, then the coordinator.

The row is written (``pending``) before a single payload byte is read, so every accepted
deploy leaves a row, also one whose upload breaks off. The payload is streamed into the
blob store while it is hashed, and held there until the row names its hash, so a
concurrent delete of another deploy with the same bytes cannot remove it in between; a
rollback's row names its source's hash from the start, before the blob is checked. The
rest of the deploy runs as a task owned by the node, so a client that disconnects does
not cancel it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from node.deploy.context import DeployContext
from node.deploy.coordinator import Coordinator, fail
from node.deploy.recorder import Recorder
from node.deploy.space import INSUFFICIENT_STORAGE
from node.errors import CairnError, DeployFailed, Gone, is_disk_full, step_failure
from node.tasks import TaskSet
from storage.errors import BlobTooLarge, StorageError
from storage.records import Deployment, DeploymentStatus, NodeStatus

__all__ = ["DeployRequest", "Origin"]

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DeployRequest:
    """A validated ``deploy_component`` (or ``drop_component``) request."""

    project: str
    user: str | None
    restart_mode: str | None = "immediate"
    replicated: bool = True
    timeout_ms: int = 120_000
    ignore_replication_errors: bool = False
    package_identifier: str | None = None
    rollback_of: str | None = None
    kind: str = "deploy"
    #: Known up front for a rollback (its source's payload): the row names it at once.
    payload_hash: str | None = None
    payload_size: int | None = None
    #: What the request says the payload weighs (its body's length), for the space check.
    size_hint: int | None = None


class Origin:
    """Starts and runs deploys on this node."""

    def __init__(self, ctx: DeployContext, tasks: TaskSet) -> None:
        self.ctx = ctx
        self.tasks = tasks

    def expected_nodes(self, replicated: bool) -> list[str]:
        return self.ctx.cluster.members() if replicated else [self.ctx.node]

    async def create(self, req: DeployRequest) -> tuple[Deployment, Recorder]:
        """Write the ``pending`` row and its first event. Nothing else is touched.

        Raises:
            DeployFailed: ``insufficient_storage`` (507): the payload would not fit even
                after reclaiming; no row is written.
        """
        if req.kind == "deploy" and req.rollback_of is None:
            # The payload, and about as much again for its release (checked exactly
            # before extracting, once the payload is here).
            hint = req.size_hint or 0
            await self.ctx.space.admit(2 * hint, blob_bytes=hint, phase="receive")
        # The row and its first event are written by a task of their own: a client that
        # hangs up (which cancels its request) in the middle must not leave a row
        # nobody will ever run; once written, such a row ends failed.
        creating = self.tasks.spawn(self._create(req), name="deploy-create")
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            self.tasks.spawn(self._abandon(creating), name="deploy-abandoned")
            raise

    async def _abandon(self, creating: asyncio.Task[tuple[Deployment, Recorder]]) -> None:
        try:
            d, rec = await creating
        except Exception:  # nothing was written (or the store is closing)
            return
        err = DeployFailed(
            "the client went away before the deploy began", code="upload_failed", phase="receive"
        )
        await self.fail(d, rec, err)

    async def _create(self, req: DeployRequest) -> tuple[Deployment, Recorder]:
        now = self.ctx.store.clock.now_ms()
        fields: dict[str, Any] = {
            "deployment_id": str(uuid.uuid4()),
            "project": req.project,
            "kind": req.kind,
            "package_identifier": req.package_identifier,
            "payload_hash": req.payload_hash,
            "payload_size": req.payload_size,
            "status": DeploymentStatus.PENDING,
            "phase": "receive",
            "expected_nodes": self.expected_nodes(req.replicated),
            "activate_nodes": [],
            "origin_node": self.ctx.node,
            "restart_mode": req.restart_mode,
            "replicated": req.replicated,
            "ignore_replication_errors": req.ignore_replication_errors,
            "timeout_ms": req.timeout_ms,
            "started_at": now,
            "completed_at": None,
            "user": req.user,
            "rollback_of": req.rollback_of,
            "superseded_by": None,
            "error": None,
        }
        d = await self.ctx.store.create_deployment(fields)
        rec = Recorder(self.ctx.store, d.deployment_id)
        try:
            d, _ = await rec.write(
                None,
                ("deployment", {"deployment_id": d.deployment_id, "project": d.project}),
                ("phase", {"phase": "receive", "status": "start"}),
            )
            log.info(
                "deploy_started", deployment_id=d.deployment_id, project=d.project, user=req.user
            )
            self.ctx.faults.hit("deploy.after_create")
        except Exception as e:  # the row exists: it ends with what went wrong
            err = step_failure(e, phase="receive")
            await self.fail(d, rec, err)
            raise err from e
        return d, rec

    async def check_reachable(self, d: Deployment, rec: Recorder) -> None:
        """A cluster deploy with peers but none of them connected fails at once (also
        with ``ignore_replication_errors``: zero reachable peers is never a success).

        Raises:
            DeployFailed: ``replication_failed``, after the row is marked failed.
        """
        peers = [n for n in d.expected_nodes if n != self.ctx.node]
        if not peers or self.ctx.cluster.connected() & set(peers):
            return
        err = DeployFailed(
            f"no peer is reachable (expected {', '.join(peers)})",
            code="replication_failed",
            phase="replicate",
            failed_nodes=peers,
        )
        await self.fail(d, rec, err)
        raise err

    async def receive(
        self, d: Deployment, rec: Recorder, chunks: AsyncIterable[bytes]
    ) -> Deployment:
        """Stream the payload into the blob store and record its hash and size.

        Raises:
            DeployFailed: the upload broke off or was too large (row marked failed).
        """
        limit = self.ctx.limits.max_payload_bytes
        try:
            info = await self.ctx.blobs.ingest(chunks, max_bytes=limit, hold=True)
        except BlobTooLarge as e:
            err = DeployFailed(
                f"payload is larger than {limit} bytes", code="too_large", phase="receive"
            )
            await self.fail(d, rec, err)
            raise err from e
        except DeployFailed as e:
            await self.fail(d, rec, e)
            raise
        except (Exception, asyncio.CancelledError) as e:  # the upload stream broke off
            err = DeployFailed(
                f"payload upload failed: {type(e).__name__}: {e}"[:1000],
                code=INSUFFICIENT_STORAGE if is_disk_full(e) else "upload_failed",
                phase="receive",
            )
            await asyncio.shield(self.fail(d, rec, err))
            if isinstance(e, asyncio.CancelledError):
                raise
            raise err from e
        try:
            d = await self.received(d, rec, info.hash, info.size)
        except BaseException as e:
            self.ctx.blobs.release(info.hash)
            if isinstance(e, Exception):
                # The row never named these bytes: free them now (unless another deploy
                # uses them), not at the orphan sweep of the next start.
                await self._free_unnamed(info.hash)
            raise
        self.ctx.blobs.release(info.hash)
        return d

    async def _free_unnamed(self, h: str) -> None:
        async def unused() -> bool:
            return await self.ctx.store.live_references(h) == 0

        await self.ctx.blobs.delete_unused(h, unused)

    async def received(
        self, d: Deployment, rec: Recorder, payload_hash: str, size: int
    ) -> Deployment:
        """Record the payload: from here on every expected node may start staging."""
        self.ctx.faults.hit("deploy.after_receive")
        d, _ = await rec.write(
            {"payload_hash": payload_hash, "payload_size": size},
            ("phase", {"phase": "receive", "status": "done"}),
        )
        return d

    async def reuse_blob(self, d: Deployment, rec: Recorder, source: Deployment) -> Deployment:
        """Check that a rollback's row (which already names ``source``'s blob) can use it,
        fetching the blob from a peer when this node lacks it.

        Raises:
            Gone: the blob is dropped, or neither here nor on any reachable peer (row
                marked failed).
        """
        h = source.payload_hash
        ok = False
        if h is not None and not await self.ctx.store.dropped([source.deployment_id]):
            with self.ctx.blobs.holding(h):
                try:
                    if not self.ctx.blobs.has(h) and source.payload_size is not None:
                        # Not here (this node skipped that deploy, or was rebuilt): the
                        # payload is available if a peer still holds it.
                        await self.ctx.fetcher.fetch(h, source.payload_size)
                    ok = self.ctx.blobs.has(h) and await self.ctx.blobs.verify(h)
                except StorageError:  # nobody has it, or it arrived corrupt
                    ok = False
        if not ok:
            err = DeployFailed(
                f"the payload of deployment {source.deployment_id} is not available",
                code="payload_gone",
                phase="receive",
            )
            # The row named the source's blob from the start but never had it: drop that
            # reference too, or this failed row would keep the bytes the drop that beat
            # it meant to free, on every node its row reached first.
            await self.ctx.store.mark_payload_dropped(d.deployment_id, user=d.user)
            await self.fail(d, rec, err)
            raise Gone(err.message, deployment_id=d.deployment_id, phase="receive") from None
        d, _ = await rec.write(None, ("phase", {"phase": "receive", "status": "done"}))
        return d

    async def fail(self, d: Deployment, rec: Recorder, err: DeployFailed) -> Deployment:
        await self.ctx.store.put_result(
            d.deployment_id,
            status=NodeStatus.FAILED,
            phase=err.phase,
            error={"message": err.message[:4000], "code": err.code, "phase": err.phase},
            completed_at=self.ctx.store.clock.now_ms(),
        )
        err.extra.setdefault("deployment_id", d.deployment_id)
        return await fail(self.ctx, rec, err)

    async def guard(self, d: Deployment, rec: Recorder, job: Coroutine[Any, Any, T]) -> T:
        """Run a request's part of a deploy (receive, launch) so that whatever it raises
        leaves the row terminal: an unexpected exception fails it as ``internal_error``.
        """
        try:
            return await job
        except (CairnError, asyncio.CancelledError):
            raise
        except Exception as e:
            log.exception("deploy_request_crashed", deployment_id=d.deployment_id)
            err = step_failure(e, phase=d.phase or "receive")
            current = await self.ctx.store.get_deployment(d.deployment_id)
            if current is not None and not current.terminal:
                await self.fail(current, rec, err)
            raise err from e

    def launch(self, d: Deployment, rec: Recorder) -> asyncio.Task[Deployment]:
        """Run the rest of the deploy as a task owned by the node."""
        return self.tasks.spawn(Coordinator(self.ctx, rec).run(d), name=f"deploy-{d.deployment_id}")

    async def recover(self) -> list[str]:
        """Resolve rows this node originated that were left non-terminal by a crash.

        Rows that had reached ``activating`` are resumed (some nodes may already run
        the new release); earlier ones are failed with code ``interrupted``, leaving
        every node's previous release active.

        Returns:
            The ids of the rows failed as interrupted.
        """
        failed: list[str] = []
        for d in await self.ctx.store.deployments(terminal=False):
            if d.origin_node != self.ctx.node:
                continue
            rec = Recorder(self.ctx.store, d.deployment_id)
            if d.status in (DeploymentStatus.ACTIVATING, DeploymentStatus.RESTARTING):
                log.info("deploy_resumed", deployment_id=d.deployment_id)
                self.launch(d, rec)
                continue
            self.ctx.components.discard_release(d.project, d.deployment_id)
            await self.ctx.store.mark_staged(d.project, d.deployment_id, None, staged=False)
            await self.fail(
                d,
                rec,
                DeployFailed(
                    "the node stopped while this deploy was running",
                    code="interrupted",
                    phase=d.phase or "receive",
                ),
            )
            failed.append(d.deployment_id)
            log.warning("deploy_interrupted", deployment_id=d.deployment_id, status=str(d.status))
        return failed
