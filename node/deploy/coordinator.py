"""The origin's loop over one deploy's durable state.

Once the payload is in the blob store and its hash is in the row, every expected node
starts staging at once (they react to the row), the origin included: extract, install,
check, each a phase in the event log. The origin then waits (``replicating``) for every
expected node's result row; all ``staged`` → ``activating`` (or ``restarting``), one wave
for ``restart: true`` or ``false``, one node per wave for ``"rolling"``, each wave with a
deadline of its own and the next only once the previous one serves. All active →
``success``. A stage failure or the deadline means no node activates (``failed``, the
nodes named); an activation failure means every node the deploy reached switches back
(``rolled_back``, the node and reason named); a newer deploy of the project wins
(``superseded``). Every step is a row write, so a restarted origin can tell where it was.

Every failure path ends in a recorded outcome: :meth:`Coordinator.run` is the boundary
of the job, and an exception nobody expected ends the deploy ``failed`` with code
``internal_error`` (logged with its traceback), never a row left running.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from node.deploy import pipeline
from node.deploy.activation import (
    ActivationFailed,
    activate_here,
    deactivate_here,
    restart_wanted,
)
from node.deploy.context import DeployContext
from node.deploy.convergence import report_component
from node.deploy.recorder import Recorder
from node.deploy.releases import prune_releases
from node.errors import DeployFailed, step_failure
from storage.changelog import Subscription
from storage.records import Deployment, DeploymentStatus, NodeResult, NodeStatus, Notice
from storage.tables import DEPLOYMENTS, NODE_RESULTS

__all__ = ["Coordinator", "fail"]

log = structlog.get_logger(__name__)

_STEP_STATUS = {
    NodeStatus.EXTRACTING: DeploymentStatus.EXTRACTING,
    NodeStatus.INSTALLING: DeploymentStatus.INSTALLING,
    NodeStatus.LOADING: DeploymentStatus.LOADING,
}
_STAGE_ANSWERS = {NodeStatus.STAGED, NodeStatus.FAILED, NodeStatus.ACTIVE, NodeStatus.ACTIVATING}
_LOST = {DeploymentStatus.FAILED, DeploymentStatus.ROLLED_BACK}
#: A node whose result says this still runs (or is switching to) the release.
_ON_IT = {NodeStatus.ACTIVE, NodeStatus.ACTIVATING}
#: Hook output lines of one peer's result turned into live events, at most.
_PEER_LINES = 50


class RolledBack(Exception):
    """Activation failed somewhere: every node the deploy reached goes back."""

    def __init__(self, node: str, code: str, message: str) -> None:
        super().__init__(message)
        self.node, self.code, self.message = node, code, message


class Superseded(Exception):
    """A newer deploy of the same project won (``newer``, when known)."""

    def __init__(self, newer: str | None) -> None:
        super().__init__(newer)
        self.newer = newer


def _error(e: DeployFailed) -> dict[str, Any]:
    body = {"message": e.message[:4000], "code": e.code, "phase": e.phase}
    if isinstance(e.extra.get("node"), str):
        body["node"] = e.extra["node"]
    return body


async def fail(ctx: DeployContext, rec: Recorder, error: DeployFailed) -> Deployment:
    """End a deploy as ``failed`` with ``error``; the ``finished`` event comes last."""
    body = _error(error)
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
        # Last (status, phase) and version forwarded per node as a ``peer`` event.
        self._seen: dict[str, tuple[str, str | None]] = {}
        self._seen_version: dict[str, int] = {}
        self._output_seen: set[str] = set()

    async def run(self, d: Deployment) -> Deployment:
        """Stage, replicate, activate. Returns the terminal row.

        Raises:
            DeployFailed: after the row has been marked ``failed`` or ``rolled_back``.
        """
        ctx = self.ctx
        watch = {NODE_RESULTS.name, DEPLOYMENTS.name}
        with ctx.store.feed.subscribe(
            lambda n: n.tbl in watch and (n.key == d.deployment_id or n.tbl == DEPLOYMENTS.name)
        ) as sub:
            try:
                return await self._run_to_outcome(d, sub)
            except (DeployFailed, asyncio.CancelledError):
                raise
            except Exception as e:
                # Recording the outcome itself failed: the row still ends, failed.
                log.exception("deploy_end_crashed", deployment_id=d.deployment_id)
                err = step_failure(e, phase=self._phase or d.phase or "receive")
                current = await ctx.store.get_deployment(d.deployment_id)
                if current is not None and not current.terminal:
                    await fail(ctx, self.rec, err)
                err.extra.setdefault("deployment_id", d.deployment_id)
                raise err from e

    async def _run_to_outcome(self, d: Deployment, sub: Subscription) -> Deployment:
        """:meth:`_run`, and whatever it raises turned into the recorded outcome."""
        try:
            return await self._run(d, sub)
        except DeployFailed as e:
            await self._end_failed(d, e, sub)
            raise
        except RolledBack as e:
            raise await self._end_rolled_back(d, e, sub) from None
        except Superseded as e:
            outcome = await self._end_superseded(d, e.newer, sub)
            if isinstance(outcome, Deployment):
                return outcome
            raise outcome from None
        except asyncio.CancelledError:
            raise  # the node is stopping: recovery at start records the outcome
        except Exception as e:
            log.exception("deploy_crashed", deployment_id=d.deployment_id)
            err = step_failure(e, phase=self._phase or d.phase or "receive")
            await self._end_failed(d, err, sub)
            raise err from e

    async def _run(self, d: Deployment, sub: Subscription) -> Deployment:
        if d.status in (DeploymentStatus.ACTIVATING, DeploymentStatus.RESTARTING):
            await self._seed_seen(d)
            self._phase = "activate"
            return await self._activate(d, sub, resumed=True)
        await self._stage_here(d)
        if len(d.expected_nodes) > 1:
            d = await self._replicate(d, sub)
        return await self._activate(d, sub, resumed=False)

    # -- outcomes ---------------------------------------------------------------------

    async def _end_failed(self, d: Deployment, e: DeployFailed, sub: Subscription) -> None:
        ctx = self.ctx
        await self._forward(sub.drain())
        mine = await self._my_result(d)
        if mine is not None and mine.status is NodeStatus.ACTIVE:
            # Failed after this node switched (an error past its activation): back to
            # the desired release, as the peers that switched do when they see it fail.
            await self._revert_here(d)
        else:
            async with ctx.locks(d.project):
                ctx.components.discard_release(d.project, d.deployment_id)
                await ctx.store.mark_staged(d.project, d.deployment_id, None, staged=False)
            failed_nodes = e.extra.get("failed_nodes") or []
            if failed_nodes and ctx.node not in failed_nodes:
                # Another node's failure: this node did its part and throws it away.
                await self._mine(NodeStatus.DISCARDED, "discard")
            else:
                await self._mine(NodeStatus.FAILED, e.phase, error=_error(e),
                                 install_output=e.extra.get("install_output"))  # fmt: skip
        final = await fail(ctx, self.rec, e)
        log.info("deploy_failed", deployment_id=d.deployment_id, code=e.code)
        e.extra.setdefault("deployment_id", final.deployment_id)

    async def _end_rolled_back(
        self, d: Deployment, e: RolledBack, sub: Subscription
    ) -> DeployFailed:
        ctx = self.ctx
        await self._forward(sub.drain())
        mine = await self._my_result(d)
        if mine is not None and mine.status is NodeStatus.ACTIVE:
            await self._revert_here(d)
        body = {"message": e.message[:4000], "code": e.code, "phase": "activate", "node": e.node}
        # Every node the deploy reached switches back before the deploy ends: revoking
        # their permission to run it (an empty activate_nodes) is what they act on.
        d, _ = await self.rec.write(
            {"activate_nodes": []},
            ("warning", {"message": f"rolling back: {e.node}: {e.message}"[:2000]}),
        )
        await self._await_reverted(d, sub)
        final, _ = await self.rec.write(
            {
                "status": DeploymentStatus.ROLLED_BACK,
                "error": body,
                "completed_at": ctx.store.clock.now_ms(),
            },
            ("error", body),
            ("finished", {"status": "rolled_back"}),
        )
        await self.rec.close()
        log.warning("deploy_rolled_back", deployment_id=d.deployment_id, node=e.node,
                    code=e.code, reason=e.message)  # fmt: skip
        await self._await_reverted(final, sub)
        err = DeployFailed(f"{e.node}: {e.message}", code=e.code, phase="activate", node=e.node,
                           rolled_back=True)  # fmt: skip
        err.status = 422
        err.extra["deployment_id"] = final.deployment_id
        return err

    async def _await_reverted(self, d: Deployment, sub: Subscription) -> None:
        """Wait (within the deploy's timeout) until every other node that ran ``d`` and is
        connected has switched back; a node that does not answer converges back when it
        returns (the revoked ``activate_nodes`` is what it acts on)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + d.timeout_ms / 1000
        while True:
            results = await self.ctx.store.results(d.deployment_id)
            await self._forward([Notice(NODE_RESULTS.name, d.deployment_id, tuple(results))])
            connected = set(self.ctx.cluster.connected())
            serving = [
                r.node for r in results
                if r.node != self.ctx.node and r.status in _ON_IT and r.node in connected
            ]  # fmt: skip
            remaining_s = deadline - loop.time()
            if not serving or remaining_s <= 0:
                if serving:
                    log.warning("rollback_unconfirmed", deployment_id=d.deployment_id,
                                nodes=serving)  # fmt: skip
                    await self.rec.event(
                        "warning",
                        message=f"not yet switched back: {', '.join(serving)}; they do "
                        "when they answer",
                    )
                return
            await sub.get(timeout_s=min(remaining_s, 1.0))

    async def _revert_here(self, d: Deployment) -> None:
        """Put this node back on the project's desired release (the one before ``d``)."""
        ctx = self.ctx
        async with ctx.locks(d.project):
            desired = await ctx.store.desired(d.project)
            if (
                desired is not None
                and desired.deployment_id != d.deployment_id
                and (
                    await pipeline.is_staged(ctx, d.project, desired.deployment_id)
                    or desired.kind == "drop"
                )
            ):
                try:
                    await activate_here(ctx, desired, restart=True)
                except ActivationFailed as e:
                    log.error("revert_failed", project=d.project, error=e.message)
            elif desired is None:
                await deactivate_here(ctx, d.project)
            await report_component(ctx, d.project)
        await self._mine(NodeStatus.ROLLED_BACK, "activate")

    async def _end_superseded(
        self, d: Deployment, newer: str | None, sub: Subscription
    ) -> Deployment | DeployFailed:
        ctx = self.ctx
        which = f"the newer deploy {newer}" if newer else "a newer deploy"
        await self._forward(sub.drain())
        results = {r.node: r for r in await ctx.store.results(d.deployment_id)}
        if any(r.status is NodeStatus.ACTIVE for r in results.values()):
            # Already serving somewhere: it succeeded, and the newer deploy replaces it.
            final, _ = await self.rec.write(
                {"status": DeploymentStatus.SUCCESS, "superseded_by": newer,
                 "completed_at": ctx.store.clock.now_ms()},
                ("warning", {"message": f"superseded by {which}"}),
                ("finished", {"status": "success"}),
            )  # fmt: skip
            await self.rec.close()
            log.info("deploy_superseded", deployment_id=d.deployment_id, newer=newer)
            return final
        err = DeployFailed(
            f"{which} of {d.project} replaced this one before it activated",
            code="superseded",
            phase="activate",
            superseded_by=newer,
        )
        await self._end_failed(d, err, sub)
        return err

    # -- steps ------------------------------------------------------------------------

    async def _step(self, phase: str, status: DeploymentStatus) -> None:
        # One transaction for the end of a phase and the start of the next.
        events = [("phase", {"phase": self._phase, "status": "done"})] if self._phase else []
        self._phase = phase
        events.append(("phase", {"phase": phase, "status": "start"}))
        await self.rec.write({"phase": phase, "status": status}, *events)

    async def _my_result(self, d: Deployment) -> NodeResult | None:
        for r in await self.ctx.store.results(d.deployment_id):
            if r.node == self.ctx.node:
                return r
        return None

    async def _mine(self, status: NodeStatus, phase: str, **fields: Any) -> None:
        now = self.ctx.store.clock.now_ms()
        done = status in (NodeStatus.STAGED, NodeStatus.ACTIVE, NodeStatus.FAILED,
                          NodeStatus.ROLLED_BACK)  # fmt: skip
        extra: dict[str, Any] = {"completed_at": now} if done else {}
        if status is NodeStatus.EXTRACTING:
            extra["started_at"] = now
        r = await self.ctx.store.put_result(
            self.rec.deployment_id, status=status, phase=phase, **extra, **fields
        )
        await self._forward([Notice(NODE_RESULTS.name, r.deployment_id, (r,))])

    async def _seed_seen(self, d: Deployment) -> None:
        """After a restart, what the log already says about each node is not news."""
        for e in await self.ctx.store.events(d.deployment_id):
            if e.event == "peer" and isinstance(e.data.get("node"), str):
                self._seen[e.data["node"]] = (str(e.data.get("status")), e.data.get("phase"))

    async def _forward(self, notices: list[Notice]) -> None:
        """Turn result changes into ``peer`` events (one per change of status or phase),
        and a peer's hook output into ``install`` events labelled with the node; what
        one wake-up brings is written in one transaction (with many nodes, one per
        event cost a commit, and a replicated entry, each)."""
        events: list[tuple[str, dict[str, Any]]] = []
        for notice in notices:
            for r in notice.rows:
                if not isinstance(r, NodeResult) or r.deployment_id != self.rec.deployment_id:
                    continue
                key = (str(r.status), r.phase)
                if self._seen.get(r.node) == key or r.version <= self._seen_version.get(r.node, 0):
                    continue
                self._seen[r.node] = key
                self._seen_version[r.node] = r.version
                events += self._peer_output(r)
                data: dict[str, Any] = {"node": r.node, "status": str(r.status), "phase": r.phase}
                if r.error:
                    data["error"] = r.error
                events.append(("peer", data))
        if events:
            await self.rec.write(None, *events)

    def _peer_output(self, r: NodeResult) -> list[tuple[str, dict[str, Any]]]:
        if r.node == self.ctx.node or not r.install_output or r.node in self._output_seen:
            return []
        self._output_seen.add(r.node)
        lines = r.install_output.get("lines") or []
        return [
            ("install", {"node": r.node, "hook": x.get("hook", "install"),
                         "stream": x.get("stream"), "line": x.get("line")})
            for x in lines[-_PEER_LINES:]
        ]  # fmt: skip

    async def _stage_here(self, d: Deployment) -> None:
        ctx = self.ctx

        async def on_step(status: NodeStatus, phase: str) -> None:
            await self._step(phase, _STEP_STATUS[status])
            await self._mine(status, phase)

        ctx.faults.hit("deploy.before_stage")
        assert d.payload_hash is not None or d.kind == "drop"
        async with ctx.locks(d.project):
            if d.kind == "drop":
                output = None
            else:
                assert d.payload_hash is not None
                with ctx.blobs.holding(d.payload_hash):
                    await pipeline.ensure_blob(ctx, d, verify=False)
                    output = await pipeline.stage(ctx, d, on_step=on_step, on_line=self.rec.line)
        await self.rec.flush()
        await self._step("stage", DeploymentStatus.STAGING)
        await self._mine(NodeStatus.STAGED, "stage", install_output=output)
        ctx.faults.hit("deploy.after_staged")

    async def _replicate(self, d: Deployment, sub: Subscription) -> Deployment:
        ctx = self.ctx
        d, _ = await self.rec.write(
            {"status": DeploymentStatus.REPLICATING, "phase": "replicate"},
            ("phase", {"phase": "stage", "status": "done"}),
            ("phase", {"phase": "replicate", "status": "start"}),
        )
        self._phase = "replicate"
        peers = [n for n in d.expected_nodes if n != ctx.node]
        away = sorted(set(peers) - ctx.cluster.connected())
        if away:
            hint = (
                ""
                if d.ignore_replication_errors
                else " (ignore_replication_errors goes on without them)"
            )
            await self.rec.event(
                "warning", message=f"not connected to {', '.join(away)}; waiting for them{hint}"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + d.timeout_ms / 1000
        while True:
            results = {r.node: r for r in await ctx.store.results(d.deployment_id)}
            await self._forward([Notice(NODE_RESULTS.name, d.deployment_id,
                                        tuple(results.values()))])  # fmt: skip
            failed = [n for n in peers if n in results and results[n].status is NodeStatus.FAILED]
            waiting = [
                n for n in peers if n not in results or results[n].status not in _STAGE_ANSWERS
            ]
            if failed and not d.ignore_replication_errors:
                raise DeployFailed(
                    _failed_message(failed, results), code=_failed_code(failed, results),
                    phase="replicate", failed_nodes=failed,
                    **({"node": failed[0]} if len(failed) == 1 else {}),
                )  # fmt: skip
            if d.ignore_replication_errors:
                # Unreachable nodes do not hold up a deploy that may go on without them;
                # they converge to it when they return.
                waiting = [n for n in waiting if n in ctx.cluster.connected()]
            if not waiting:
                break
            remaining_s = deadline - loop.time()
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
        staged = [n for n in peers if n in results and results[n].status is NodeStatus.STAGED]
        if not staged:
            raise DeployFailed(
                f"no peer staged the release (expected {', '.join(peers)}): a cluster deploy "
                "needs at least one peer",
                code="replication_failed",
                phase="replicate",
                failed_nodes=peers,
            )
        skipped = [n for n in peers if n not in staged]
        if skipped:
            await self.rec.event(
                "warning",
                message=f"going on without {', '.join(skipped)} (ignore_replication_errors); "
                "they converge when they return",
            )
        return d

    async def _check_superseded(self, d: Deployment) -> None:
        # ``newer_than`` is strict on the version alone: include ties, then order fully.
        newer = await self.ctx.store.deployments(
            project=d.project, newer_than=d.created_version - 1
        )
        for other in newer:
            if other.status not in _LOST and other.order > d.order:
                raise Superseded(other.deployment_id)

    async def _activate(self, d: Deployment, sub: Subscription, *, resumed: bool) -> Deployment:
        ctx = self.ctx
        await self._check_superseded(d)
        results = {r.node: r for r in await ctx.store.results(d.deployment_id)}
        ready = [n for n in d.expected_nodes
                 if n in results and results[n].status in (NodeStatus.STAGED,
                                                           NodeStatus.ACTIVATING,
                                                           NodeStatus.ACTIVE)]  # fmt: skip
        order = [ctx.node, *sorted(n for n in ready if n != ctx.node)]
        waves = [[n] for n in order] if d.restart_mode == "rolling" else [order]
        status = DeploymentStatus.RESTARTING if restart_wanted(d) else DeploymentStatus.ACTIVATING
        if not resumed:
            await self._step("activate", status)
        allowed = list(d.activate_nodes)
        for wave in waves:
            todo = [n for n in wave if results.get(n) is None
                    or results[n].status is not NodeStatus.ACTIVE]  # fmt: skip
            if not todo:
                continue
            allowed += [n for n in wave if n not in allowed]
            if tuple(allowed) != d.activate_nodes:
                d, _ = await self.rec.write({"activate_nodes": allowed})
            if ctx.node in todo:
                await self._activate_here(d)
            await self._await_wave(d, todo, sub)
            results = {r.node: r for r in await ctx.store.results(d.deployment_id)}
        await self.rec.phase("activate", "done")
        ctx.faults.hit("deploy.before_success")
        d, _ = await self.rec.write(
            {"status": DeploymentStatus.SUCCESS, "completed_at": ctx.store.clock.now_ms(),
             "error": None},
            ("finished", {"status": "success"}),
        )  # fmt: skip
        await self.rec.close()
        log.info("deploy_succeeded", deployment_id=d.deployment_id, project=d.project)
        return d

    async def _activate_here(self, d: Deployment) -> None:
        ctx = self.ctx
        async with ctx.locks(d.project):
            ctx.faults.hit("deploy.before_activate")
            await self._mine(NodeStatus.ACTIVATING, "activate")
            try:
                await activate_here(ctx, d, restart=restart_wanted(d))
            except ActivationFailed as e:
                await self._mine(NodeStatus.FAILED, "activate",
                                 error={"message": e.message[:4000], "code": e.code,
                                        "phase": "activate"})  # fmt: skip
                raise RolledBack(ctx.node, e.code, e.message) from e
            await self._mine(NodeStatus.ACTIVE, "activate")
            ctx.faults.hit("deploy.after_active")
            await report_component(ctx, d.project)
            await prune_releases(ctx, d.project)

    async def _await_wave(self, d: Deployment, nodes: list[str], sub: Subscription) -> None:
        """Wait until every node of a wave serves ``d``; its own deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + d.timeout_ms / 1000
        while True:
            results = {r.node: r for r in await self.ctx.store.results(d.deployment_id)}
            await self._forward([Notice(NODE_RESULTS.name, d.deployment_id,
                                        tuple(results.values()))])  # fmt: skip
            for n in nodes:
                r = results.get(n)
                if r is None:
                    continue
                if r.status is NodeStatus.SUPERSEDED:
                    # That node serves a newer deploy of the project: the desired one.
                    desired = await self.ctx.store.desired(d.project)
                    newer = desired.deployment_id if desired is not None else None
                    raise Superseded(newer if newer != d.deployment_id else None)
                if r.status in (NodeStatus.FAILED, NodeStatus.ROLLED_BACK):
                    err = r.error or {}
                    raise RolledBack(n, str(err.get("code", "activation_failed")),
                                     str(err.get("message", "activation failed")))  # fmt: skip
            waiting = [n for n in nodes if n not in results
                       or results[n].status is not NodeStatus.ACTIVE]  # fmt: skip
            if not waiting:
                return
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                raise RolledBack(
                    waiting[0], "not_ready",
                    f"not active within {d.timeout_ms} ms ({', '.join(waiting)})",
                )  # fmt: skip
            await sub.get(timeout_s=min(remaining_s, 1.0))


def _failed_code(failed: list[str], results: dict[str, NodeResult]) -> str:
    codes = {(results[n].error or {}).get("code") for n in failed}
    if len(codes) == 1:
        (code,) = codes
        if code in ("install_failed", "check_failed", "bad_payload", "unsafe_payload",
                    "payload_gone", "insufficient_storage"):  # fmt: skip
            return str(code)
    return "replication_failed"


def _failed_message(failed: list[str], results: dict[str, NodeResult]) -> str:
    parts = []
    for node in failed:
        err = results[node].error or {}
        parts.append(f"{node}: {err.get('message', 'failed')} ({err.get('code', 'failed')})")
    return "staging failed on " + "; ".join(parts)
