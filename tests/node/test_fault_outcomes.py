"""Errors at deploy steps of one node, in process: each is an outcome (issue 7 item 1).

Regression tests for defects the crash-point suite (tests/cluster/test_crashpoints.py)
found: an error after the switch left the node on the new release while its record named
the old one; an error after the origin activated left it there while the deploy failed;
a full disk or a vanished file answered 500 ``internal_error``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Api, component, make_config

from node.app import create_app
from node.appkeys import Services
from storage.faults import FaultPlan


@pytest.fixture
async def faulty(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[tuple[Api, FaultPlan]]:
    """A single node whose fault plan the test arms once v1 is active."""
    plan = FaultPlan({})
    app = create_app(make_config(tmp_path), faults=plan)
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    yield Api(client, app), plan


def _current(api: Api) -> str | None:
    return Services(api.app).ctx.components.current("web")


async def _outcome(api: Api, plan: FaultPlan, point: str, kind: str) -> tuple[int, Any, str]:
    code, v1 = await api.deploy("web", component(v="1"))
    assert code == 200, v1
    plan.plan[point] = (kind, True)
    code, body = await api.deploy("web", component(install="echo hi", check="true", v="2"))
    assert plan.fired == [point]
    _, d = await api.op("get_deployment", deployment_id=body["deployment_id"])
    assert d["status"] == "failed" and d["error"]["code"] == body["code"], (d, body)
    assert d["event_log"][-1]["event"] == "finished"
    store = Services(api.app).store
    assert (await store.active_releases())["web"]["deployment_id"] == v1["deployment_id"]
    assert _current(api) == v1["deployment_id"], "the disk runs another release"
    return code, body, str(v1["deployment_id"])


@pytest.mark.parametrize(
    ("point", "kind", "status", "code"),
    [
        ("deploy.after_switch", "oserror", 507, "insufficient_storage"),
        ("deploy.after_switch", "error", 500, "internal_error"),
        ("deploy.after_active", "missing", 503, "storage_error"),
        ("deploy.before_success", "error", 500, "internal_error"),
        ("deploy.extract", "oserror", 507, "insufficient_storage"),
        ("hook.install.start", "missing", 503, "storage_error"),
    ],
)
async def test_an_error_at_a_step_fails_the_deploy_on_the_previous_release(
    faulty: tuple[Api, FaultPlan], point: str, kind: str, status: int, code: str
) -> None:
    api, plan = faulty
    answer, body, _v1 = await _outcome(api, plan, point, kind)
    assert (answer, body["code"]) == (status, code), body
    assert body["deployment_id"]


@pytest.mark.parametrize("kind", ["oserror", "error", "missing"])
async def test_a_payload_whose_hash_was_never_recorded_is_freed_at_once(
    faulty: tuple[Api, FaultPlan], kind: str
) -> None:
    """An error between the upload and the row naming its hash left the blob in the store,
    named by no row, until the orphan sweep of the next start."""
    api, plan = faulty
    await _outcome(api, plan, "deploy.after_receive", kind)
    blobs = Services(api.app).ctx.blobs
    store = Services(api.app).store
    named = {d.payload_hash for d in await store.deployments()}
    assert set(blobs.hashes()) == named - {None}


async def test_a_failure_while_recording_the_outcome_still_ends_the_deploy(
    faulty: tuple[Api, FaultPlan], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recording an outcome can fail too (the simulator found a row the store's rules
    refused at that point, on a resumed deploy with no request around it): the
    coordinator's own boundary still ends the deploy, failed, with a finished event."""
    from node.deploy.coordinator import Coordinator, Superseded
    from node.deploy.origin import DeployRequest
    from node.errors import DeployFailed

    async def superseded(*_args: Any, **_kwargs: Any) -> None:
        raise Superseded(None)

    async def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("recording the outcome failed")

    api, _plan = faulty
    services = Services(api.app)
    d, rec = await services.origin.create(DeployRequest(project="web", user="admin"))
    monkeypatch.setattr(Coordinator, "_run", superseded)
    monkeypatch.setattr(Coordinator, "_end_superseded", broken)
    with pytest.raises(DeployFailed) as failed:
        await Coordinator(services.ctx, rec).run(d)
    assert failed.value.code == "internal_error"
    row = await services.store.get_deployment(d.deployment_id)
    assert row is not None and str(row.status) == "failed", row
    events = await services.store.events(d.deployment_id)
    assert events[-1].event == "finished", events
