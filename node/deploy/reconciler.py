"""Every node's loop: do what deployment rows ask of this node, and converge.

It reacts to rows, never to calls. For a deploy another node originated that expects
this node: once its payload hash is recorded, stage it here (fetch, verify, extract,
hooks) and write the result; once it is ``activating`` and names this node, switch to it
and write ``active`` (or ``failed`` with the reason, back on the previous release); once
it has failed, discard the staged release. A node never activates a release it has not
staged and verified itself, and never one older than a deploy it already serves
(``superseded``).

Per project, the node's active release is brought to the desired one
(:mod:`node.deploy.convergence`), coalesced: at most one convergence per project runs,
and notices arriving meanwhile make it run once more afterwards. It waits until the
node has caught up with the cluster (``wait_ready``), so a returning node stages only the
release it will activate.

An origin that vanished never blocks convergence: once a deploy it left unfinished has
not changed for its timeout (plus a grace period) while its origin is unreachable, this
node treats it as failed (``origin_lost``): it discards the release, or switches back if
it had activated it, and writes its own result. When the origin returns it records the
terminal status itself.

Every job is a boundary: whatever it raises ends in a result row (``internal_error``
for the unexpected), never a silently dead task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from node.deploy import pipeline
from node.deploy.activation import ActivationFailed, activate_here, restart_wanted
from node.deploy.backfill import backfill_payloads
from node.deploy.context import DeployContext
from node.deploy.convergence import converge, report_component
from node.errors import DeployFailed, step_failure
from node.tasks import TaskSet
from storage.records import Deployment, DeploymentStatus, NodeResult, NodeStatus, Notice
from storage.tables import DEPLOYMENTS, MEMBERS, PAYLOAD_DROPS

__all__ = ["Reconciler"]

log = structlog.get_logger(__name__)

_STAGING = {
    DeploymentStatus.PENDING, DeploymentStatus.EXTRACTING, DeploymentStatus.INSTALLING,
    DeploymentStatus.LOADING, DeploymentStatus.STAGING, DeploymentStatus.REPLICATING,
}  # fmt: skip
_ACTIVATING = {DeploymentStatus.ACTIVATING, DeploymentStatus.RESTARTING}
_IN_PROGRESS = {
    NodeStatus.PENDING, NodeStatus.FETCHING, NodeStatus.EXTRACTING, NodeStatus.INSTALLING,
    NodeStatus.LOADING,
}  # fmt: skip
_GONE = (DeploymentStatus.FAILED, DeploymentStatus.ROLLED_BACK)

#: Returns once this node has caught up with the cluster (convergence waits for it).
WaitReady = Callable[[], Awaitable[None]]


async def _ready_now() -> None:
    return None


class Reconciler:
    """Keeps this node in line with the deployment rows it sees.

    Args:
        ctx: the node's deploy context.
        rescan_s: how often to look at everything again when nothing happens.
        lost_grace_s: how long past a deploy's timeout its unreachable origin is waited for.
        wait_ready: returns once this node has caught up with the cluster.
    """

    def __init__(
        self,
        ctx: DeployContext,
        *,
        rescan_s: float = 5.0,
        lost_grace_s: float = 10.0,
        wait_ready: WaitReady = _ready_now,
    ) -> None:
        self.ctx = ctx
        self.rescan_s = rescan_s
        self.lost_grace_s = lost_grace_s
        self.wait_ready = wait_ready
        self.tasks = TaskSet("reconciler")
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._converging: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._kick = asyncio.Event()
        #: deployment id → (version seen, local time it was first seen at that version).
        self._changed: dict[str, tuple[int, float]] = {}
        self._lost: set[str] = set()
        self._backfilling: asyncio.Task[None] | None = None
        self._backfill_again = False

    def kick(self) -> None:
        """Ask for a full rescan soon (after a reconnect, say), and for the payloads the
        cluster keeps that this node lacks (at start its peers may not have been
        connected yet: a rebuilt node would then never fetch them)."""
        self._kick.set()
        self._backfill_again = True
        self._start_backfill()

    def _start_backfill(self) -> None:
        if self._backfilling is None or self._backfilling.done():
            self._backfilling = self.tasks.spawn(self._backfill(), name="backfill-payloads")

    async def run(self) -> None:
        """Run until cancelled: a full scan at start, then react to changes."""
        want = {DEPLOYMENTS.name, MEMBERS.name, PAYLOAD_DROPS.name}
        try:
            with self.ctx.store.feed.subscribe(lambda n: n.tbl in want, maxsize=10_000) as sub:
                await self.scan()
                self._start_backfill()
                while True:
                    notices = await self._next(sub)
                    if notices is None or sub.overflowed:
                        sub.overflowed = False  # notices were lost: look at everything
                        self._kick.clear()
                        await self.scan()
                        continue
                    await self._react(notices)
        finally:
            await self.tasks.close()

    async def _next(self, sub: Any) -> list[Notice] | None:
        """Notices, or None when it is time for a full scan."""
        getter = asyncio.ensure_future(sub.get(timeout_s=self.rescan_s))
        kicked = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({getter, kicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (getter, kicked):
                f.cancel()
        if self._kick.is_set():
            return None
        notices: list[Notice] = getter.result() if getter.done() and not getter.cancelled() else []
        return notices or None

    async def _react(self, notices: list[Notice]) -> None:
        seen: set[str] = set()
        for notice in notices:
            if notice.tbl == PAYLOAD_DROPS.name:
                await self._on_drop(notice.key)
            elif notice.tbl == DEPLOYMENTS.name and notice.key not in seen:
                seen.add(notice.key)
                d = await self.ctx.store.get_deployment(notice.key)
                if d is not None:
                    await self.consider(d)
            elif notice.tbl == MEMBERS.name:
                self._kick.set()

    async def scan(self) -> None:
        """Look at everything that may still need something from this node: running
        deploys, and each project's desired release (no history is read)."""
        store = self.ctx.store
        for d in await store.deployments(terminal=False):
            await self.consider(d)
        for project in await store.desired_releases():
            self.converge_soon(project)
        mine = await store.results_of_node(self.ctx.node,
                                           statuses=[NodeStatus.STAGED, *_IN_PROGRESS])  # fmt: skip
        for r in mine:
            left = await store.get_deployment(r.deployment_id)
            if left is not None and left.terminal:
                await self.consider(left)
        for h in self.ctx.blobs.deferred():  # payload drops that found the blob in use
            await self._free_if_unused(h)

    async def _free_if_unused(self, payload_hash: str) -> int:
        async def unused() -> bool:
            return await self.ctx.store.live_references(payload_hash) == 0

        return await self.ctx.blobs.delete_unused(payload_hash, unused)

    # -- deciding -------------------------------------------------------------------------

    async def consider(self, d: Deployment) -> None:
        """Start whatever ``d`` asks of this node (at most one job per deployment)."""
        if d.status is DeploymentStatus.SUCCESS:
            self.converge_soon(d.project)
        if d.deployment_id in self._jobs:
            return
        job = await self._job(d)
        if job is not None:
            self._spawn_job(d, job)

    async def _job(self, d: Deployment) -> Coroutine[Any, Any, None] | None:
        me = self.ctx.node
        if d.origin_node == me or me not in d.expected_nodes:
            return None
        mine = await self._mine(d)
        status = mine.status if mine else None
        if d.terminal:
            self._changed.pop(d.deployment_id, None)
            self._lost.discard(d.deployment_id)
            if d.status in _GONE:
                active = (await self.ctx.store.active_releases()).get(d.project)
                if active is not None and active["deployment_id"] == d.deployment_id:
                    self.converge_soon(d.project)  # switch back
                elif status in (NodeStatus.STAGED, *_IN_PROGRESS):
                    return self._discard(d)
            elif status in (NodeStatus.STAGED, *_IN_PROGRESS) and d.status is (
                DeploymentStatus.SUCCESS
            ):
                self.converge_soon(d.project)
            return None
        if self._origin_lost(d):
            # Given up already: nothing to do until the row changes. (A job that did
            # nothing would end, announce the row again, and be started again at once.)
            return None if d.deployment_id in self._lost else self._give_up(d, mine)
        has_payload = d.payload_hash is not None or d.kind == "drop"
        if d.status in _STAGING and has_payload and (status is None or status in _IN_PROGRESS):
            return self._stage(d)
        if d.status in _ACTIVATING and me in d.activate_nodes and status in (
            NodeStatus.STAGED, NodeStatus.ACTIVATING
        ):  # fmt: skip
            return self._activate(d)
        if d.status in _ACTIVATING and me not in d.activate_nodes and status in (
            NodeStatus.ACTIVE, NodeStatus.ACTIVATING
        ):  # fmt: skip
            self.converge_soon(d.project)  # revoked: the deploy is being rolled back
        return None

    def _origin_lost(self, d: Deployment) -> bool:
        """Has ``d`` sat unchanged past its timeout while its origin is out of reach?"""
        loop = asyncio.get_running_loop()
        seen = self._changed.get(d.deployment_id)
        if seen is None or seen[0] != d.version:
            self._changed[d.deployment_id] = (d.version, loop.time())
            return False
        if d.origin_node in self.ctx.cluster.connected():
            self._changed[d.deployment_id] = (d.version, loop.time())
            return False
        return loop.time() - seen[1] > d.timeout_ms / 1000 + self.lost_grace_s

    def _spawn_job(self, d: Deployment, job: Coroutine[Any, Any, None]) -> None:
        key = d.deployment_id
        task = self.tasks.spawn(self._guard(d, job), name=f"reconcile-{key}")
        self._jobs[key] = task

        def done(_task: asyncio.Task[None]) -> None:
            self._jobs.pop(key, None)
            # The row may have moved on while the job ran: look at it again.
            self.ctx.store.feed.publish([Notice(DEPLOYMENTS.name, key)])

        task.add_done_callback(done)

    async def _guard(self, d: Deployment, job: Coroutine[Any, Any, None]) -> None:
        """The boundary of a job: whatever it raises becomes this node's result."""
        try:
            await job
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("reconcile_job_crashed", deployment_id=d.deployment_id)
            failure = step_failure(e, phase=d.phase or "stage")
            error = {"message": failure.message, "code": failure.code, "phase": failure.phase}
            try:
                await self._result(d, NodeStatus.FAILED, error["phase"], error=error)
            except Exception:
                log.exception("reconcile_result_failed", deployment_id=d.deployment_id)
        # A drop that arrived while this job held the blob could not free it; the hold
        # is released now, so look again (or the bytes stay until the next start).
        if await self.ctx.store.dropped([d.deployment_id]):
            await self._on_drop(d.deployment_id)

    def converge_soon(self, project: str) -> None:
        """Converge ``project`` (once more, if a convergence is running)."""
        if self.tasks.closed:
            return
        if project in self._converging:
            self._again.add(project)
            return
        task = self.tasks.spawn(self._converge(project), name=f"converge-{project}")
        self._converging[project] = task

        def done(_task: asyncio.Task[None]) -> None:
            self._converging.pop(project, None)
            if project in self._again and not self.tasks.closed:
                self._again.discard(project)
                self.converge_soon(project)

        task.add_done_callback(done)

    async def _converge(self, project: str) -> None:
        ctx = self.ctx
        await self.wait_ready()
        try:
            async with ctx.locks(project):
                await converge(ctx, project)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("convergence_crashed", project=project)
            await report_component(ctx, project, converged=False,
                                   reason=f"internal error: {type(e).__name__}: {e}")  # fmt: skip

    # -- jobs -------------------------------------------------------------------------

    async def _mine(self, d: Deployment) -> NodeResult | None:
        for r in await self.ctx.store.results(d.deployment_id):
            if r.node == self.ctx.node:
                return r
        return None

    async def _result(self, d: Deployment, status: NodeStatus, phase: str, **fields: Any) -> None:
        now = self.ctx.store.clock.now_ms()
        if status in (
            NodeStatus.STAGED,
            NodeStatus.ACTIVE,
            NodeStatus.FAILED,
            NodeStatus.DISCARDED,
            NodeStatus.SUPERSEDED,
            NodeStatus.ROLLED_BACK,
        ):
            fields.setdefault("completed_at", now)  # fmt: skip
        if status is NodeStatus.FETCHING:
            fields.setdefault("started_at", now)
            fields.setdefault("completed_at", None)
            fields.setdefault("error", None)
        await self.ctx.store.put_result(d.deployment_id, status=status, phase=phase, **fields)

    async def _stage(self, d: Deployment) -> None:
        ctx = self.ctx

        async def on_step(status: NodeStatus, phase: str) -> None:
            await self._result(d, status, phase)

        async def on_line(_stream: str, _line: str) -> None:
            return None

        if d.kind == "drop":  # nothing to fetch or extract: ready to remove it
            await self._result(d, NodeStatus.STAGED, "stage")
            return
        assert d.payload_hash is not None
        async with ctx.locks(d.project):
            try:
                await self._result(d, NodeStatus.FETCHING, "fetch")
                with ctx.blobs.holding(d.payload_hash):
                    await pipeline.ensure_blob(ctx, d, verify=True)
                    output = await pipeline.stage(ctx, d, on_step=on_step, on_line=on_line)
            except DeployFailed as e:
                error = {"message": e.message[:4000], "code": e.code, "phase": e.phase}
                await self._result(d, NodeStatus.FAILED, e.phase, error=error,
                                   install_output=e.extra.get("install_output"))  # fmt: skip
                log.warning("stage_failed", deployment_id=d.deployment_id, code=e.code,
                            error=e.message)  # fmt: skip
                return
            await self._result(d, NodeStatus.STAGED, "stage", install_output=output)
            ctx.faults.hit("reconcile.after_staged")
        log.info("release_staged", deployment_id=d.deployment_id, project=d.project)

    async def _activate(self, d: Deployment) -> None:
        ctx = self.ctx
        async with ctx.locks(d.project):
            newer = await self._serving_newer(d)
            if newer is not None:
                await self._result(
                    d, NodeStatus.SUPERSEDED, "activate",
                    error={"message": f"this node already serves the newer deploy {newer}",
                           "code": "superseded", "phase": "activate"},
                )  # fmt: skip
                return
            await self._result(d, NodeStatus.ACTIVATING, "activate")
            try:
                await activate_here(ctx, d, restart=restart_wanted(d))
            except ActivationFailed as e:
                await self._result(d, NodeStatus.FAILED, "activate",
                                   error={"message": e.message[:4000], "code": e.code,
                                          "phase": "activate", "node": ctx.node})  # fmt: skip
                await report_component(ctx, d.project)
                return
            await self._result(d, NodeStatus.ACTIVE, "activate")
            ctx.faults.hit("reconcile.after_active")
            await report_component(ctx, d.project)

    async def _serving_newer(self, d: Deployment) -> str | None:
        active = (await self.ctx.store.active_releases()).get(d.project)
        if active is None or active["deployment_id"] == d.deployment_id:
            return None
        current = await self.ctx.store.get_deployment(active["deployment_id"])
        if current is None or current.status in _GONE:
            return None
        return current.deployment_id if current.order > d.order else None

    async def _discard(self, d: Deployment) -> None:
        ctx = self.ctx
        async with ctx.locks(d.project):
            if ctx.components.current(d.project) != d.deployment_id:
                ctx.components.discard_release(d.project, d.deployment_id)
                await ctx.store.mark_staged(d.project, d.deployment_id, None, staged=False)
            ctx.faults.hit("reconcile.before_discarded")
            await self._result(d, NodeStatus.DISCARDED, "discard")

    async def _give_up(self, d: Deployment, mine: NodeResult | None) -> None:
        """The origin of ``d`` is gone past its deadline: treat ``d`` as failed here."""
        if d.deployment_id in self._lost:
            return
        self._lost.add(d.deployment_id)
        log.warning("origin_lost", deployment_id=d.deployment_id, origin=d.origin_node)
        ctx = self.ctx
        error = {"message": f"origin {d.origin_node} is unreachable past the deploy's deadline",
                 "code": "origin_lost", "phase": d.phase or "stage"}  # fmt: skip
        async with ctx.locks(d.project):
            active = (await ctx.store.active_releases()).get(d.project)
            if active is None or active["deployment_id"] != d.deployment_id:
                ctx.components.discard_release(d.project, d.deployment_id)
                await ctx.store.mark_staged(d.project, d.deployment_id, None, staged=False)
                await self._result(d, NodeStatus.FAILED, error["phase"], error=error)
                return
        await self._result(d, NodeStatus.ROLLED_BACK, "activate", error=error)
        self.converge_soon(d.project)

    async def _backfill(self) -> None:
        # Again as long as a reconnect asked for it meanwhile.
        self._backfill_again = True
        while self._backfill_again:
            self._backfill_again = False
            await self.wait_ready()
            await backfill_payloads(self.ctx, on_dropped=self._on_drop)

    def is_lost(self, deployment_id: str) -> bool:
        """Whether this node treats the deploy as failed because its origin is lost."""
        return deployment_id in self._lost

    async def _on_drop(self, deployment_id: str) -> None:
        """A payload was dropped somewhere: free the blob here once nothing uses it, and
        (on the deploy's origin) say so in its event log."""
        ctx = self.ctx
        d = await ctx.store.get_deployment(deployment_id)
        if d is None or d.payload_hash is None:
            return
        h = d.payload_hash

        async def unused() -> bool:
            return await ctx.store.live_references(h) == 0

        freed = await ctx.blobs.delete_unused(h, unused)
        if freed:
            log.info("payload_reclaimed", deployment_id=deployment_id, freed_bytes=freed)
        # The origin says so in the deploy's log (it alone writes it), once, when the
        # drop came from another node (a drop made here wrote its own event).
        if (
            d.origin_node == ctx.node
            and d.terminal
            and ctx.node not in await ctx.store.dropped_by(deployment_id)
        ):
            events = await ctx.store.events(deployment_id)
            if not any(e.event == "payload_dropped" for e in events):
                await ctx.store.write_deployment(
                    deployment_id, None, [("payload_dropped", {"freed_bytes": freed})]
                )
