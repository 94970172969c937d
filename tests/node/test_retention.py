"""Payload retention: pin, prune per policy, records kept (SPEC section 8)."""

from __future__ import annotations

from typing import Any

from helpers import Api, component, make_config

from node.app import create_app


async def _api(aiohttp_client: Any, tmp_path: Any, **retention: Any) -> Api:
    app = create_app(make_config(tmp_path, retention=retention))
    return Api(await aiohttp_client(app), app)


async def test_prune_keeps_newest_successes_pinned_and_active(
    aiohttp_client: Any, tmp_path: Any
) -> None:
    api = await _api(aiohttp_client, tmp_path, keep_successful=2, failed_grace_s=0)
    ids = []
    for i in range(5):
        _, body = await api.deploy("web", component(v=str(i)))
        ids.append(body["deployment_id"])
    _, failed = await api.deploy("web", component(install="exit 1", v="x"))
    status, body = await api.op("pin_deployment", deployment_id=ids[0])
    assert status == 200 and body["pinned"] is True

    status, plan = await api.op("prune_deployment_payloads", project="web", dry_run=True)
    assert status == 200
    assert set(plan["dropped"]) == {ids[1], ids[2], failed["deployment_id"]}
    assert plan["freed_bytes"] > 0
    _, rec = await api.op("get_deployment", deployment_id=ids[1])
    assert rec["payload_blob_present"] is True  # a dry run drops nothing

    status, done = await api.op("prune_deployment_payloads", project="web")
    assert set(done["dropped"]) == set(plan["dropped"])
    assert done["freed_bytes"] == plan["freed_bytes"]
    present = {}
    for did in [*ids, failed["deployment_id"]]:
        _, rec = await api.op("get_deployment", deployment_id=did)
        present[did] = rec["payload_blob_present"]
        assert rec["status"] in ("success", "failed")  # records are kept
    assert present == {
        ids[0]: True,
        ids[1]: False,
        ids[2]: False,
        ids[3]: True,
        ids[4]: True,
        failed["deployment_id"]: False,
    }
    status, again = await api.op("prune_deployment_payloads", project="web")
    assert again == {"freed_bytes": 0, "dropped": [], "dry_run": False}


async def test_failed_payloads_kept_during_grace(aiohttp_client: Any, tmp_path: Any) -> None:
    api = await _api(aiohttp_client, tmp_path, keep_successful=0, failed_grace_s=3600)
    _, ok = await api.deploy("web", component())
    _, failed = await api.deploy("web", component(install="exit 1", v="x"))
    status, done = await api.op("prune_deployment_payloads")
    assert status == 200 and done["dropped"] == []  # active kept even with keep_successful=0
    _, rec = await api.op("get_deployment", deployment_id=failed["deployment_id"])
    assert rec["payload_blob_present"] is True
    assert ok["deployment_id"]


async def test_pin_refuses_unknown(api: Api) -> None:
    status, body = await api.op(
        "pin_deployment", deployment_id="00000000-0000-4000-8000-000000000001"
    )
    assert status == 404 and body["code"] == "not_found"
