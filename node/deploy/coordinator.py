"""The origin's loop over one deploy's durable state.

After the payload is in the blob store the origin stages its own release, then (in a
cluster) moves the row to ``replicating`` so every expected node stages too, waits for
their result rows, and only when all have staged moves the row to ``activating`` — all
nodes at once, or one at a time for ``rolling`` — and finally to ``success``. A stage
failure or the deadline means no node activates and the deploy is ``failed`` naming the
nodes. Every step is a row write, so a restarted origin can tell where it was.
"""

from __future__ import annotations

from typing import Any

import structlog

from node.deploy import pipeline
from node.deploy.context import DeployContext
from node.deploy.recorder import Recorder
from node.errors import DeployFailed
from storage.records import Deployment, DeploymentStatus, NodeResult, NodeStatus, Notice
from storage.tables import NODE_RESULTS

__all__ = ["Coordinator", "fail", "peer_results"]

log = structlog.get_logger(__name__)

_STEP_STATUS = {
    NodeStatus.EXTRACTING: DeploymentStatus.EXTRACTING,
    NodeStatus.INSTALLING: DeploymentStatus.INSTALLING,
    NodeStatus.LOADING: DeploymentStatus.LOADING,
}
_ANSWERED = {NodeStatus.STAGED, NodeStatus.FAILED, NodeStatus.ACTIVE, NodeStatus.ACTIVATING}


def peer_results(d: Deployment, results: list[NodeResult]) -> list[dict[str, Any]]:
    """One entry per expected node (plus any other node that reported), in node order."""
    by_node = {r.node: r for r in results}
    out = []
    for node in sorted(set(d.expected_nodes) | set(by_node)):
        r = by_node.get(node)
        out.append(
            {
                "node": node,
                "status": "pending",
                "phase": None,
                "error": None,
                "started_at": None,
                "completed_at": None,
                "late": False,
            }
            if r is None
            else {
                "node": node,
                "status": str(r.status),
                "phase": r.phase,
                "error": r.error,
                "started_at": r.started_at,
                "completed_at": r.completed_at,
                "late": r.late,
            }
        )
    return out


async def fail(ctx: DeployContext, rec: Recorder, error: DeployFailed) -> Deployment:
    """End a deploy as ``failed`` with ``error``; the ``finished`` event comes last."""
    body = {"message": error.message, "code": error.code, "phase": error.phase}
    d, _ = await rec.write(
        {
            "status": DeploymentStatus.FAILED,
            "error": body,
            "completed_at": ctx.store.clock.now_ms(),
        },
        ("error", body),
        ("finished", {"status": "failed"}),
    )
    await rec.close()
    return d


class Coordinator:
    """Drives one deploy this node originated, from staging to a terminal status."""

    def __init__(self, ctx: DeployContext, rec: Recorder) -> None:
        self.ctx = ctx
        self.rec = rec
        self._phase: str | None = None
        self._seen: dict[str, tuple[str, str | None]] = {}
        # Newest result version forwarded per node: notices still queued in the
        # subscription repeat rows already forwarded, and must not be told twice.
        self._seen_version: dict[str, int] = {}

    async def run(self, d: Deployment) -> Deployment:
        """Stage, replicate, activate. Returns the terminal row.

        Raises:
            DeployFailed: after the row has been marked ``failed``.
        """
        ctx = self.ctx
        with ctx.store.feed.subscribe(
            lambda n: n.tbl == NODE_RESULTS.name and n.key == d.deployment_id
        ) as sub:
            try:
                if d.status is DeploymentStatus.ACTIVATING:
                    return await self._activate(d, sub)
                await self._stage_here(d)
                if len(d.expected_nodes) > 1:
                    d = await self._replicate(d, sub)
                return await self._activate(d, sub)
            except DeployFailed as e:
                await self._forward(sub.drain())
                ctx.components.discard_release(d.project, d.deployment_id)
                await self._mine(NodeStatus.FAILED, e.phase, error=_error(e))
                raise_after = await fail(ctx, self.rec, e)
                log.info("deploy_failed", deployment_id=d.deployment_id, code=e.code)
                e.extra.setdefault("deployment_id", raise_after.deployment_id)
                raise

    # -- steps ------------------------------------------------------------------------

    async def _step(self, phase: str, status: DeploymentStatus) -> None:
        if self._phase is not None:
            await self.rec.phase(self._phase, "done")
        self._phase = phase
        await self.rec.phase(phase, "start", status)

    async def _mine(self, status: NodeStatus, phase: str, **fields: Any) -> None:
        now = self.ctx.store.clock.now_ms()
        done = status in (NodeStatus.STAGED, NodeStatus.ACTIVE, NodeStatus.FAILED)
        extra: dict[str, Any] = {"completed_at": now} if done else {}
        if status is NodeStatus.EXTRACTING:
            extra["started_at"] = now
        r = await self.ctx.store.put_result(
            self.rec.deployment_id, status=status, phase=phase, **extra, **fields
        )
        await self._forward([Notice(NODE_RESULTS.name, r.deployment_id, (r,))])

    async def _forward(self, notices: list[Notice]) -> None:
        """Turn result changes into ``peer`` events (one per change of status or phase)."""
        for notice in notices:
            for r in notice.rows:
                if not isinstance(r, NodeResult):
                    continue
                key = (str(r.status), r.phase)
                if self._seen.get(r.node) == key or r.version <= self._seen_version.get(r.node, 0):
                    continue
                self._seen[r.node] = key
                self._seen_version[r.node] = r.version
                data: dict[str, Any] = {"node": r.node, "status": str(r.status), "phase": r.phase}
                if r.error:
                    data["error"] = r.error
                await self.rec.event("peer", **data)

    async def _stage_here(self, d: Deployment) -> None:
        async def on_step(status: NodeStatus, phase: str) -> None:
            await self._step(phase, _STEP_STATUS[status])
            await self._mine(status, phase)

        self.ctx.faults.hit("deploy.before_stage")
        await pipeline.stage(self.ctx, d, on_step=on_step, on_line=self.rec.line)
        await self._step("stage", DeploymentStatus.STAGING)
        await self._mine(NodeStatus.STAGED, "stage")

    async def _replicate(self, d: Deployment, sub: Any) -> Deployment:
        ctx = self.ctx
        d, _ = await self.rec.write(
            {"status": DeploymentStatus.REPLICATING, "phase": "replicate"},
            ("phase", {"phase": "stage", "status": "done"}),
            ("phase", {"phase": "replicate", "status": "start"}),
        )
        self._phase = "replicate"
        deadline = d.deadline_at or (d.started_at + d.timeout_ms)
        while True:
            results = {r.node: r for r in await ctx.store.results(d.deployment_id)}
            await self._forward(
                [Notice(NODE_RESULTS.name, d.deployment_id, tuple(results.values()))]
            )
            failed = [
                n
                for n in d.expected_nodes
                if n in results and results[n].status is NodeStatus.FAILED
            ]
            waiting = [
                n
                for n in d.expected_nodes
                if n not in results or results[n].status not in _ANSWERED
            ]
            if failed and not d.ignore_replication_errors:
                raise DeployFailed(
                    _failed_message(failed, results),
                    code="replication_failed",
                    phase="replicate",
                    failed_nodes=failed,
                )
            if d.ignore_replication_errors:
                # Unreachable nodes do not hold up a deploy that may go on without them;
                # they converge to it when they return.
                connected = ctx.cluster.connected()
                waiting = [n for n in waiting if n in connected]
            if not waiting:
                break
            remaining_s = (deadline - ctx.store.clock.now_ms()) / 1000
            if remaining_s <= 0:
                if d.ignore_replication_errors:
                    break
                raise DeployFailed(
                    f"no answer within {d.timeout_ms} ms from {', '.join(waiting)}",
                    code="deployment_timeout",
                    phase="replicate",
                    failed_nodes=waiting,
                )
            await sub.get(timeout_s=min(remaining_s, 1.0))
        skipped = [
            n
            for n in d.expected_nodes
            if results.get(n) is None or results[n].status is not NodeStatus.STAGED
        ]
        if skipped:
            await self.rec.event(
                "warning",
                message=f"going on without {', '.join(skipped)} (ignore_replication_errors)",
            )
        return d

    async def _activate(self, d: Deployment, sub: Any) -> Deployment:
        ctx = self.ctx
        results = {r.node: r for r in await ctx.store.results(d.deployment_id)}
        staged = [
            n
            for n in d.expected_nodes
            if n in results and results[n].status in _ANSWERED - {NodeStatus.FAILED}
        ]
        if d.restart_mode == "rolling":
            order = [ctx.node, *[n for n in staged if n != ctx.node]]
            waves = [order[: i + 1] for i in range(len(order))]
        else:
            waves = [[ctx.node, *[n for n in staged if n != ctx.node]]]
        if self._phase != "activate":
            await self._step("activate", DeploymentStatus.ACTIVATING)
        deadline = ctx.store.clock.now_ms() + d.timeout_ms
        late: list[str] = []
        for wave in waves:
            if tuple(wave) != d.activate_nodes:
                d, _ = await self.rec.write({"activate_nodes": wave})
            mine = results.get(ctx.node)
            if ctx.node in wave and (mine is None or mine.status is not NodeStatus.ACTIVE):
                ctx.faults.hit("deploy.before_activate")
                await pipeline.activate(ctx, d)
                await self._mine(NodeStatus.ACTIVE, "activate")
            late = await self._await_active(d, wave, deadline, sub)
            results = {r.node: r for r in await ctx.store.results(d.deployment_id)}
        if late:
            await self.rec.event(
                "warning",
                message=f"not yet active: {', '.join(late)}; they converge when they answer",
            )
        await self.rec.phase("activate", "done")
        d, _ = await self.rec.write(
            {
                "status": DeploymentStatus.SUCCESS,
                "completed_at": ctx.store.clock.now_ms(),
                "error": None,
            },
            ("finished", {"status": "success"}),
        )
        await self.rec.close()
        log.info("deploy_succeeded", deployment_id=d.deployment_id, project=d.project)
        return d

    async def _await_active(
        self, d: Deployment, nodes: list[str], deadline: int, sub: Any
    ) -> list[str]:
        while True:
            results = {r.node: r for r in await self.ctx.store.results(d.deployment_id)}
            await self._forward(
                [Notice(NODE_RESULTS.name, d.deployment_id, tuple(results.values()))]
            )
            waiting = [
                n for n in nodes if n not in results or results[n].status is not NodeStatus.ACTIVE
            ]
            if not waiting:
                return []
            remaining_s = (deadline - self.ctx.store.clock.now_ms()) / 1000
            if remaining_s <= 0:
                return waiting
            await sub.get(timeout_s=min(remaining_s, 1.0))


def _error(e: DeployFailed) -> dict[str, Any]:
    return {"message": e.message, "code": e.code, "phase": e.phase}


def _failed_message(failed: list[str], results: dict[str, NodeResult]) -> str:
    parts = []
    for node in failed:
        err = results[node].error or {}
        parts.append(f"{node}: {err.get('message', 'failed')} ({err.get('code', 'failed')})")
    return "staging failed on " + "; ".join(parts)
