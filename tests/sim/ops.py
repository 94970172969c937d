"""Client operations of a history, done as the admin API's handlers do them.

Each function mirrors its operation in ``node/operations`` (the same deploy steps of
``Origin``, ``drop_payload``, ``prunable``, ``Accounts``) without HTTP in between, and
runs as a task of the node it is sent to: a crash of that node cuts the client off, as
it would a real connection. The answer is what a client would have seen:
``ok:<status>`` (acknowledged), ``error:<code>`` (refused or failed), and the simulator
records ``lost`` for a request cut off by a crash.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import Any

from node.deploy.origin import DeployRequest
from node.deploy.retention import prunable
from node.deploy.sources import bytes_source
from node.errors import CairnError, DeployFailed
from node.operations.payloads import drop_payload
from storage.records import Deployment

from .node import SimNode
from .payloads import make_payload

__all__ = ["PASSWORD_HASH", "Outcome", "deploy", "run_op"]

#: A stored password hash with valid scrypt parameters (never checked in a history).
PASSWORD_HASH = "scrypt$1024$8$1$" + "A" * 22 + "==$" + "B" * 43 + "="
USER = "sim"


class Outcome:
    """What the client saw, and the deployment it concerned (if any)."""

    def __init__(self, answer: str, deployment_id: str | None = None) -> None:
        self.answer = answer
        self.deployment_id = deployment_id

    @property
    def acknowledged_success(self) -> bool:
        return self.answer == "ok:success"


async def deploy(
    node: SimNode,
    project: str,
    *,
    payload: bytes | None,
    timeout_ms: int,
    restart: str | None = "immediate",
    ignore: bool = False,
    source: Deployment | None = None,
    kind: str = "deploy",
    on_created: Any = None,
) -> Outcome:
    """``deploy_component`` (or ``drop_component`` with ``kind="drop"``): the row, the
    payload or the rollback source's blob, then the coordinator; waits for the end."""
    origin = node.origin
    req = DeployRequest(
        project=project, user=USER, restart_mode=restart, replicated=True,
        timeout_ms=timeout_ms, ignore_replication_errors=ignore, kind=kind,
        rollback_of=source.deployment_id if source is not None else None,
    )  # fmt: skip
    if source is not None:
        req = replace(req, payload_hash=source.payload_hash, payload_size=source.payload_size)
    d, rec = await origin.create(req)
    if on_created is not None:
        on_created(d.deployment_id)

    async def job() -> Deployment:
        nonlocal d
        await origin.check_reachable(d, rec)
        if kind == "drop":
            d, _ = await rec.write(None, ("phase", {"phase": "receive", "status": "done"}))
        elif source is not None:
            d = await origin.reuse_blob(d, rec, source)
        else:
            assert payload is not None
            d = await origin.receive(d, rec, bytes_source(payload))
        return await origin.launch(d, rec)

    task = node.deploy_tasks.spawn(origin.guard(d, rec, job()), name=f"deploy-request-{d}")
    try:
        final = await asyncio.shield(task)
    except CairnError as e:
        return Outcome(f"error:{e.code}", d.deployment_id)
    return Outcome(f"ok:{final.status}", final.deployment_id)


async def run_op(
    node: SimNode, kind: str, args: dict[str, Any], rng: random.Random, on_created: Any
) -> Outcome:
    """Do operation ``kind`` on ``node`` (its arguments resolved with ``rng``)."""
    store = node.store
    if kind == "deploy":
        payload = make_payload(rng, args["payload"])
        return await deploy(
            node, args["project"], payload=payload, timeout_ms=int(args["timeout_s"] * 1000),
            restart=args["restart"], ignore=args["ignore"], on_created=on_created,
        )  # fmt: skip
    if kind == "rollback":
        candidates = [
            d for d in await store.deployments(project=args["project"])
            if d.kind == "deploy" and d.payload_hash is not None
        ]  # fmt: skip
        if not candidates:
            return Outcome("error:not_found")
        source = candidates[int(args["pick"] * len(candidates))]
        return await deploy(
            node, args["project"], payload=None, timeout_ms=int(args["timeout_s"] * 1000),
            source=source, on_created=on_created,
        )  # fmt: skip
    if kind == "drop":
        desired = await store.desired(args["project"])
        if desired is None or desired.kind == "drop":
            return Outcome("error:not_found")
        return await deploy(
            node, args["project"], payload=None, timeout_ms=int(args["timeout_s"] * 1000),
            kind="drop", on_created=on_created,
        )  # fmt: skip
    if kind in ("delete_payload", "pin"):
        done = [d for d in await store.deployments(terminal=True) if d.kind == "deploy"]
        if not done:
            return Outcome("error:not_found")
        d = done[int(args["pick"] * len(done))]
        if kind == "pin":
            await store.set_pin(d.deployment_id, args["pinned"], user=USER)
            return Outcome("ok:pinned", d.deployment_id)
        freed = await drop_payload(node.ctx, d, user=USER)
        return Outcome(f"ok:freed={freed}", d.deployment_id)
    if kind == "prune":
        now = store.clock.now_ms()
        victims = await prunable(node.ctx, node.ctx.retention, project=args["project"], now_ms=now)
        for d in victims:
            await drop_payload(node.ctx, d, user=USER)
        return Outcome(f"ok:dropped={len(victims)}")
    if kind == "user":
        accounts = node.accounts
        name = args["name"]
        if args["action"] == "put":
            await accounts.put_user(name, password_hash=PASSWORD_HASH, role="ops", by=USER)
        elif args["action"] == "delete":
            await accounts.delete_user(name, by=USER)
        else:
            ops = sorted(rng.sample(["list_deployments", "get_deployment", "cluster_status"], 2))
            await accounts.put_role("ops", {"super_user": False, "operations": ops}, by=USER)
        return Outcome("ok:done")
    raise ValueError(f"unknown operation {kind}")


def answer_of(exc: BaseException) -> str:
    """The answer a client sees for an exception out of an operation."""
    if isinstance(exc, DeployFailed | CairnError):
        return f"error:{exc.code}"
    return f"crash:{type(exc).__name__}"
