"""Every node's loop: do what deployment rows ask of this node, and converge.

It reacts to rows, never to calls: a deployment in ``replicating`` that expects this node
gets staged here; one in ``activating`` that names this node gets activated; a ``failed``
one has its staged release discarded. For each project, the node's active release is
brought to the cluster's desired one — the newest ``success`` deployment that applies
to this node — which is how a node that was down catches up: it jumps to the desired
state instead of replaying every deploy it missed, and writes its (late) result row.

Deployments this node originated are driven by their coordinator, not here.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import structlog

from node.deploy import pipeline
from node.deploy.context import DeployContext
from node.errors import DeployFailed
from node.tasks import TaskSet
from storage.records import Deployment, DeploymentStatus, NodeStatus, Notice
from storage.tables import DEPLOYMENTS, MEMBERS, PAYLOAD_DROPS

__all__ = ["Reconciler"]

log = structlog.get_logger(__name__)

_IN_PROGRESS = {
    NodeStatus.PENDING,
    NodeStatus.FETCHING,
    NodeStatus.EXTRACTING,
    NodeStatus.INSTALLING,
    NodeStatus.LOADING,
    NodeStatus.ACTIVATING,
}
_WANTS_STAGE = {DeploymentStatus.REPLICATING, DeploymentStatus.ACTIVATING}


class Reconciler:
    """Keeps this node in line with the deployment rows it sees."""

    def __init__(self, ctx: DeployContext, *, rescan_s: float = 5.0) -> None:
        self.ctx = ctx
        self.rescan_s = rescan_s
        self._work = TaskSet("reconciler")
        self._running: dict[str, asyncio.Task[None]] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._kick = asyncio.Event()
        # Version of the row each finished job started from: the re-check after a job
        # only acts on a row that changed meanwhile (else it would loop forever).
        self._started_from: dict[str, int] = {}

    def kick(self) -> None:
        """Ask for a full rescan soon (after a reconnect, say)."""
        self._kick.set()

    async def run(self) -> None:
        """Run until cancelled: a full scan at start, then react to changes."""
        want = {DEPLOYMENTS.name, MEMBERS.name, PAYLOAD_DROPS.name, "active_releases"}
        try:
            with self.ctx.store.feed.subscribe(lambda n: n.tbl in want) as sub:
                await self.scan()
                while True:
                    getter = asyncio.ensure_future(sub.get(timeout_s=self.rescan_s))
                    kicked = asyncio.ensure_future(self._kick.wait())
                    try:
                        await asyncio.wait({getter, kicked}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for f in (getter, kicked):
                            f.cancel()
                    notices: list[Notice] = (
                        getter.result() if getter.done() and not getter.cancelled() else []
                    )
                    if self._kick.is_set() or not notices:
                        self._kick.clear()
                        await self.scan()
                        continue
                    for notice in notices:
                        if notice.tbl == PAYLOAD_DROPS.name:
                            await self.reclaim(notice.key)
                        elif notice.tbl == DEPLOYMENTS.name:
                            rows = [r for r in notice.rows if isinstance(r, Deployment)]
                            if not rows:
                                fresh = await self.ctx.store.get_deployment(notice.key)
                                started = self._started_from.pop(notice.key, None)
                                changed = fresh is not None and fresh.version != started
                                rows = [fresh] if fresh is not None and changed else []
                            for row in rows:
                                await self.consider(row)
        finally:
            await self._work.close()

    async def scan(self) -> None:
        """Look at every deployment that may still need something from this node."""
        store = self.ctx.store
        for d in await store.deployments(terminal=False):
            await self.consider(d)
        for d in await store.latest_success_per_project():
            await self.consider(d)
        unfinished = [NodeStatus.STAGED, *_IN_PROGRESS]
        for r in await store.results_of_node(self.ctx.node, statuses=unfinished):
            left = await store.get_deployment(r.deployment_id)
            if left is not None and left.terminal:
                await self.consider(left)

    async def reclaim(self, deployment_id: str) -> int:
        """Free the local blob of a dropped payload once no live deployment uses it."""
        d = await self.ctx.store.get_deployment(deployment_id)
        if d is None or d.payload_hash is None or not self.ctx.blobs.has(d.payload_hash):
            return 0
        if await self.ctx.store.live_references(d.payload_hash):
            return 0
        freed = await self.ctx.blobs.delete(d.payload_hash)
        log.info("payload_reclaimed", deployment_id=deployment_id, freed_bytes=freed)
        return freed

    async def consider(self, d: Deployment) -> None:
        """Start whatever ``d`` asks of this node (at most one task per deployment)."""
        if d.deployment_id in self._running:
            return
        # A notice carries the row as that change wrote it; a node catching up applies
        # many versions of a row in one batch, so act on what is stored now, never on an
        # intermediate state (which would stage a deploy that has long since finished).
        fresh = await self.ctx.store.get_deployment(d.deployment_id)
        if fresh is None:
            return
        d = fresh
        job = await self._job(d)
        if job is None:
            return
        task = self._work.spawn(job, name=f"reconcile-{d.deployment_id}")
        self._running[d.deployment_id] = task
        self._started_from[d.deployment_id] = d.version
        key = d.deployment_id

        def forget(_task: asyncio.Task[None]) -> None:
            self._running.pop(key, None)
            # The row may have moved on while the job ran (and its notice was skipped
            # because the job was still registered): look at it again.
            self.ctx.store.feed.publish([Notice(DEPLOYMENTS.name, key)])

        task.add_done_callback(forget)

    async def _job(self, d: Deployment) -> Any:
        me = self.ctx.node
        mine = {r.node: r for r in await self.ctx.store.results(d.deployment_id)}.get(me)
        mine_status = mine.status if mine else None
        if d.status is DeploymentStatus.SUCCESS:
            return self._converge(d.project)
        if d.origin_node == me or me not in d.expected_nodes:
            return None
        if d.status is DeploymentStatus.FAILED:
            if mine_status in (NodeStatus.STAGED, *_IN_PROGRESS):
                return self._discard(d)
            return None
        if d.status not in _WANTS_STAGE:
            return None
        past_deadline = d.deadline_at is not None and self.ctx.store.clock.now_ms() > d.deadline_at
        if d.status is DeploymentStatus.REPLICATING and past_deadline:
            return None  # the origin fails it; staging now would only be thrown away
        if mine_status is None or mine_status in _IN_PROGRESS - {NodeStatus.ACTIVATING}:
            return self._stage(d)
        if (
            d.status is DeploymentStatus.ACTIVATING
            and me in d.activate_nodes
            and mine_status
            in (
                NodeStatus.STAGED,
                NodeStatus.ACTIVATING,
            )
        ):
            return self._activate(d)
        return None

    # -- jobs -------------------------------------------------------------------------

    async def _result(self, d: Deployment, status: NodeStatus, phase: str, **fields: Any) -> None:
        now = self.ctx.store.clock.now_ms()
        if status in (
            NodeStatus.STAGED,
            NodeStatus.ACTIVE,
            NodeStatus.FAILED,
            NodeStatus.DISCARDED,
        ):
            fields.setdefault("completed_at", now)
        if status is NodeStatus.FETCHING:
            fields.setdefault("started_at", now)
            fields.setdefault("completed_at", None)
            fields.setdefault("error", None)
        await self.ctx.store.put_result(d.deployment_id, status=status, phase=phase, **fields)

    # Each job holds its project's lock from decision to last write, so two jobs of one
    # project (a stage and a convergence, say) never interleave on the release dirs.

    async def _stage(self, d: Deployment) -> None:
        async with self._locks[d.project]:
            await self._do_stage(d, late=False)

    async def _activate(self, d: Deployment) -> None:
        async with self._locks[d.project]:
            await self._do_activate(d, late=False)

    async def _discard(self, d: Deployment) -> None:
        async with self._locks[d.project]:
            if self.ctx.components.current(d.project) != d.deployment_id:
                self.ctx.components.discard_release(d.project, d.deployment_id)
            await self._result(d, NodeStatus.DISCARDED, "discard")

    async def _converge(self, project: str) -> None:
        async with self._locks[project]:
            await self._do_converge(project)

    async def _do_stage(self, d: Deployment, *, late: bool) -> bool:
        async def on_step(status: NodeStatus, phase: str) -> None:
            await self._result(d, status, phase, late=late)

        async def on_line(_stream: str, _line: str) -> None:
            return None

        try:
            await self._result(d, NodeStatus.FETCHING, "fetch", late=late)
            await pipeline.ensure_blob(self.ctx, d, verify=True)
            await pipeline.stage(self.ctx, d, on_step=on_step, on_line=on_line)
            await self._result(d, NodeStatus.STAGED, "stage", late=late)
        except DeployFailed as e:
            error = {"message": e.message, "code": e.code, "phase": e.phase}
            await self._result(
                d,
                NodeStatus.FAILED,
                e.phase,
                error=error,
                late=late,
                install_output=e.extra.get("install_output"),
            )
            log.warning("stage_failed", deployment_id=d.deployment_id, code=e.code, error=e.message)
            return False
        log.info("release_staged", deployment_id=d.deployment_id, project=d.project)
        return True

    async def _do_activate(self, d: Deployment, *, late: bool) -> None:
        await self._result(d, NodeStatus.ACTIVATING, "activate", late=late)
        await pipeline.activate(self.ctx, d)
        await self._result(d, NodeStatus.ACTIVE, "activate", late=late)

    async def _do_converge(self, project: str) -> None:
        """Bring ``project`` on this node to the newest success that applies here."""
        me = self.ctx.node
        candidates = [
            d
            for d in await self.ctx.store.deployments(
                statuses=[DeploymentStatus.SUCCESS], project=project
            )
            if d.replicated or d.origin_node == me
        ]
        if not candidates:
            return
        activating = await self.ctx.store.deployments(
            project=project, statuses=[DeploymentStatus.ACTIVATING, DeploymentStatus.RESTARTING]
        )
        if activating:
            # A deploy of this project is switching nodes right now (perhaps resumed by
            # its origin after a restart); converging meanwhile would race it. Its
            # terminal row triggers convergence again.
            return
        desired = candidates[-1]
        active = (await self.ctx.store.active_releases()).get(project)
        active_id = active["deployment_id"] if active else None
        results = {r.node: r for r in await self.ctx.store.results(desired.deployment_id)}
        mine = results.get(me)
        if desired.kind == "drop":
            if active_id is not None or (mine is None or mine.status is not NodeStatus.ACTIVE):
                await self._do_activate(desired, late=True)
            return
        if active_id == desired.deployment_id:
            if mine is None or mine.status is not NodeStatus.ACTIVE:
                await self._result(desired, NodeStatus.ACTIVE, "activate", late=True)
            return
        log.info(
            "converging", project=project, deployment_id=desired.deployment_id, active=active_id
        )
        staged = mine is not None and mine.status is NodeStatus.STAGED
        if staged or await self._do_stage(desired, late=True):
            await self._do_activate(desired, late=True)
