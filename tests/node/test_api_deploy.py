"""deploy_component and the deployment read operations, through the real app."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import aiohttp
import cbor2
import msgpack
from helpers import Api, component

from node.appkeys import Services


async def _record(api: Api, deployment_id: str) -> dict[str, Any]:
    status, body = await api.op("get_deployment", deployment_id=deployment_id)
    assert status == 200, body
    return body


def _current(api: Api, project: str) -> str:
    cur = Services(api.app).ctx.components.current(project)
    assert cur is not None
    return cur


async def test_deploy_records_success_and_activates_release(api: Api) -> None:
    payload = component(install="echo building; echo to-stderr >&2", check="test -f index.html")
    status, body = await api.deploy("web", payload)
    assert status == 200, body
    assert body["message"] == "Successfully deployed: web"
    did = body["deployment_id"]
    assert [r["node"] for r in body["peer_results"]] == ["n1"]
    assert body["peer_results"][0]["status"] == "active"

    rec = await _record(api, did)
    assert rec["status"] == "success"
    assert rec["payload_hash"] == hashlib.sha256(payload).hexdigest()
    assert rec["payload_size"] == len(payload)
    assert rec["payload_blob_present"] is True
    assert rec["user"] == "admin" and rec["origin_node"] == "n1"
    assert rec["expected_nodes"] == ["n1"]
    assert rec["completed_at"] >= rec["started_at"]
    log = rec["event_log"]
    assert log[0]["event"] == "deployment" and log[0]["data"]["deployment_id"] == did
    assert log[-1] == {**log[-1], "event": "finished", "data": {"status": "success"}}
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    lines = [(e["data"]["stream"], e["data"]["line"]) for e in log if e["event"] == "install"]
    assert ("stdout", "building") in lines and ("stderr", "to-stderr") in lines
    phases = [
        e["data"]["phase"] for e in log if e["event"] == "phase" and e["data"]["status"] == "start"
    ]
    assert phases == ["receive", "extract", "install", "check", "stage", "activate"]

    assert _current(api, "web") == did
    release = Services(api.app).ctx.components.release_dir("web", did)
    assert (release / "index.html").read_text() == "<p>hello</p>\n"  # top dir flattened


async def test_failed_install_keeps_previous_release(api: Api) -> None:
    status, first = await api.deploy("web", component())
    assert status == 200
    status, body = await api.deploy("web", component(install="echo about to fail; exit 3"))
    assert status == 422
    assert body["code"] == "install_failed" and body["phase"] == "install"
    assert body["deployment_id"]
    lines = [entry["line"] for entry in body["install_output"]["lines"]]
    assert "about to fail" in lines
    rec = await _record(api, body["deployment_id"])
    assert rec["status"] == "failed"
    assert rec["error"]["code"] == "install_failed"
    assert rec["event_log"][-1]["data"] == {"status": "failed"}
    assert _current(api, "web") == first["deployment_id"]


async def test_failed_check_is_check_failed(api: Api) -> None:
    status, body = await api.deploy("web", component(check="exit 1"))
    assert status == 422 and body["code"] == "check_failed" and body["phase"] == "check"


async def test_garbage_payload_is_bad_payload_and_recorded(api: Api) -> None:
    status, body = await api.deploy("web", b"this is not a tarball at all" * 10)
    assert status == 422 and body["code"] == "bad_payload"
    rec = await _record(api, body["deployment_id"])
    assert rec["status"] == "failed" and rec["error"]["phase"] == "extract"


async def test_reserved_fields_refused_without_a_row(api: Api) -> None:
    for field in ("_deploymentId", "_replicated", "_origin"):
        status, body = await api.deploy("web", component(), **{field: True})
        assert status == 400 and body["code"] == "reserved_field" and body["field"] == field
    status, listing = await api.op("list_deployments")
    assert listing["total"] == 0
    assert Services(api.app).ctx.blobs.stats() == (0, 0)


async def test_each_accepted_deploy_leaves_exactly_one_row(api: Api) -> None:
    for payload in (component(), b"garbage", component(install="exit 1")):
        await api.deploy("web", payload)
    _, listing = await api.op("list_deployments")
    assert listing["total"] == 3
    assert len({d["deployment_id"] for d in listing["deployments"]}) == 3


async def test_input_errors_name_the_field(api: Api) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"project": "bad name!"}, "project"),
        ({"project": 7}, "project"),
        ({"project": "web", "restart": "sometimes"}, "restart"),
        ({"project": "web", "deployment_timeout": "soon"}, "deployment_timeout"),
        ({"project": "web", "replicated": "yes"}, "replicated"),
        ({}, "project"),
    ]
    for fields, name in cases:
        status, body = await api.op("deploy_component", payload="aGk=", **fields)
        assert status == 400, (fields, body)
        assert body.get("field") == name, (fields, body)
    status, body = await api.op("deploy_component", project="web")
    assert status == 400 and "payload" in body["error"]
    status, body = await api.op("deploy_component", project="web", payload="%%%")
    assert status == 400 and body["field"] == "payload"
    status, body = await api.op("no_such_thing")
    assert status == 400 and body["code"] == "unknown_operation"
    status, body = await api.op("get_deployment", deployment_id="not-a-uuid")
    assert status == 404 and "not-a-uuid" in body["error"], body  # names no record
    status, body = await api.op("get_deployment", deployment_id=17)
    assert status == 400 and body["field"] == "deployment_id"  # a wrong type is bad input
    status, body = await api.op(
        "get_deployment", deployment_id="00000000-0000-4000-8000-000000000000"
    )
    assert status == 404 and "00000000-0000-4000-8000-000000000000" in body["error"]


async def test_malformed_bodies_are_400_not_500(api: Api) -> None:
    auth = {"Authorization": api.auth}
    bad = [
        ("application/json", b'{"operation": "list_deployments", "limit": NaN}'),
        ("application/json", b'{"operation": "list_deployments", "limit": Infinity}'),
        ("application/json", b"[1, 2, 3]"),
        ("application/json", b"{not json"),
        ("application/cbor", b"\xff\xff\xff"),
        ("application/x-msgpack", b"\xc1"),
        ("text/plain", b"operation=list_deployments"),
        ("application/json", b'{"operation": 5}'),
    ]
    for ctype, raw in bad:
        resp = await api.client.post("/", data=raw, headers={**auth, "Content-Type": ctype})
        assert resp.status == 400, (ctype, raw, await resp.text())
        assert "error" in await resp.json()


async def test_cbor_and_msgpack_bodies_carry_payload_bytes(api: Api) -> None:
    payload = component()
    auth = {"Authorization": api.auth}
    body = {
        "operation": "deploy_component",
        "project": "web",
        "payload": payload,
        "restart": True,
        "someHarperField": {"x": 1},
    }

    async def chunked() -> Any:
        raw = cbor2.dumps(body)
        for i in range(0, len(raw), 1000):
            yield raw[i : i + 1000]

    resp = await api.client.post(
        "/", data=chunked(), headers={**auth, "Content-Type": "application/cbor"}
    )
    assert resp.status == 200, await resp.text()
    cbor_id = (await resp.json())["deployment_id"]
    resp = await api.client.post(
        "/", data=msgpack.packb(body), headers={**auth, "Content-Type": "application/x-msgpack"}
    )
    assert resp.status == 200, await resp.text()
    rec = await _record(api, cbor_id)
    assert rec["payload_hash"] == hashlib.sha256(payload).hexdigest()
    assert rec["restart_mode"] == "immediate"


async def test_multipart_streams_payload_last(api: Api) -> None:
    payload = component(install="echo multipart")
    form = aiohttp.FormData()
    form.add_field("operation", "deploy_component")
    form.add_field("project", "web")
    form.add_field("replicated", "false")
    form.add_field(
        "payload", io.BytesIO(payload), filename="web.tar.gz", content_type="application/gzip"
    )
    resp = await api.client.post("/", data=form, headers={"Authorization": api.auth})
    assert resp.status == 200, await resp.text()
    rec = await _record(api, (await resp.json())["deployment_id"])
    assert rec["payload_hash"] == hashlib.sha256(payload).hexdigest()
    assert rec["replicated"] is False


async def test_body_over_limit_is_413_with_hint(aiohttp_client: Any, tmp_path: Any) -> None:
    from helpers import Api as _Api
    from helpers import make_config

    from node.app import create_app

    app = create_app(make_config(tmp_path, limits={"max_body_bytes": 4096}))
    api = _Api(await aiohttp_client(app), app)
    status, body = await api.deploy("web", b"x" * 10_000)
    assert status == 413 and "multipart" in body["error"]


async def test_list_deployments_filters_and_pages(api: Api) -> None:
    ids = []
    for project in ("a", "b", "a", "a"):
        status, body = await api.deploy(project, component())
        ids.append(body["deployment_id"])
    await api.deploy("b", b"garbage")
    status, page = await api.op("list_deployments", project="a")
    assert page["total"] == 3
    assert [d["deployment_id"] for d in page["deployments"]] == [ids[3], ids[2], ids[0]]
    assert "event_log" not in page["deployments"][0]
    status, page = await api.op("list_deployments", status="failed")
    assert page["total"] == 1 and page["deployments"][0]["project"] == "b"
    status, page = await api.op("list_deployments", include_event_log=True, limit=1)
    assert "event_log" in page["deployments"][0]
    seen: list[str] = []
    cursor = None
    while True:
        fields: dict[str, Any] = {"limit": 2}
        if cursor:
            fields["cursor"] = cursor
        status, page = await api.op("list_deployments", **fields)
        assert page["total"] == 5
        seen += [d["deployment_id"] for d in page["deployments"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and len(set(seen)) == 5
    status, page = await api.op("list_deployments", limit=2, offset=4)
    assert len(page["deployments"]) == 1
    first = (await _record(api, ids[0]))["started_at"]
    status, page = await api.op("list_deployments", since=first, until=first)
    assert ids[0] in [d["deployment_id"] for d in page["deployments"]]
    status, page = await api.op("list_deployments", user="nobody")
    assert page["total"] == 0
    status, body = await api.op("list_deployments", limit=5000)
    assert status == 400 and body["field"] == "limit"
    status, body = await api.op("list_deployments", cursor="garbage!")
    assert status == 400 and body["field"] == "cursor"


async def test_payload_download_and_range(api: Api) -> None:
    payload = component(**{"big.txt": "y" * 50_000})
    _, body = await api.deploy("web", payload)
    did = body["deployment_id"]
    headers = {"Authorization": api.auth}
    resp = await api.client.post(
        "/", json={"operation": "get_deployment_payload", "deployment_id": did}, headers=headers
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/gzip"
    assert did in resp.headers["Content-Disposition"]
    assert await resp.read() == payload
    resp = await api.client.post(
        "/",
        json={"operation": "get_deployment_payload", "deployment_id": did},
        headers={**headers, "Range": "bytes=10-99"},
    )
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 10-99/{len(payload)}"
    assert await resp.read() == payload[10:100]
    resp = await api.client.post(
        "/",
        json={"operation": "get_deployment_payload", "deployment_id": did},
        headers={**headers, "Range": f"bytes={len(payload) + 5}-"},
    )
    assert resp.status == 416


async def test_delete_payload_is_idempotent_and_keeps_record(api: Api) -> None:
    _, first = await api.deploy("web", component(v="1"))
    await api.deploy("web", component(v="2"))
    status, body = await api.op("delete_deployment_payload", deployment_id=first["deployment_id"])
    assert status == 200 and body["freed_bytes"] > 0
    status, again = await api.op("delete_deployment_payload", deployment_id=first["deployment_id"])
    assert status == 200 and again["freed_bytes"] == 0
    rec = await _record(api, first["deployment_id"])
    assert rec["status"] == "success" and rec["payload_blob_present"] is False
    dropped = [e for e in rec["event_log"] if e["event"] == "payload_dropped"]
    assert len(dropped) == 1 and dropped[0]["data"]["freed_bytes"] == body["freed_bytes"]
    status, gone = await api.op("get_deployment_payload", deployment_id=first["deployment_id"])
    assert status == 410 and gone["code"] == "payload_gone"
    status, body = await api.op(
        "deploy_component", project="web", rollback_from=first["deployment_id"]
    )
    assert status == 410 and body["code"] == "payload_gone"


async def test_deleting_the_active_payload_warns_and_keeps_the_release_serving(api: Api) -> None:
    # Harper's qa701: the running deploy's payload may be purged; the release stays.
    _, first = await api.deploy("web", component(v="1"))
    status, body = await api.op("delete_deployment_payload", deployment_id=first["deployment_id"])
    assert status == 200 and body["freed_bytes"] > 0
    assert "can no longer converge" in body["warning"]
    assert _current(api, "web") == first["deployment_id"]
    release = Services(api.app).ctx.components.release_dir("web", first["deployment_id"])
    assert (release / "index.html").is_file()
    rec = await _record(api, first["deployment_id"])
    assert rec["status"] == "success" and rec["payload_blob_present"] is False


async def test_rollback_from_reapplies_exact_blob(api: Api) -> None:
    _, first = await api.deploy("web", component(v="1"))
    await api.deploy("web", component(v="2"))
    status, body = await api.op(
        "deploy_component", project="web", rollback_from=first["deployment_id"]
    )
    assert status == 200, body
    rec = await _record(api, body["deployment_id"])
    assert rec["rollback_of"] == first["deployment_id"]
    assert rec["payload_hash"] == (await _record(api, first["deployment_id"]))["payload_hash"]
    assert _current(api, "web") == body["deployment_id"]
    status, body = await api.op(
        "deploy_component", project="other", rollback_from=first["deployment_id"]
    )
    assert status == 400 and body["field"] == "rollback_from"


async def test_components_and_drop(api: Api) -> None:
    _, first = await api.deploy("web", component())
    status, comps = await api.op("get_components")
    assert status == 200
    (web,) = comps["components"]
    assert web["project"] == "web" and web["deployment_id"] == first["deployment_id"]
    assert web["nodes"][0]["node"] == "n1"
    status, body = await api.op("drop_component", project="web")
    assert status == 200, body
    assert Services(api.app).ctx.components.current("web") is None
    status, comps = await api.op("get_components")
    assert comps["components"] == []
    status, body = await api.op("drop_component", project="web")
    assert status == 404
    status, listing = await api.op("list_deployments", project="web")
    assert listing["deployments"][0]["kind"] == "drop"


async def test_package_from_allowed_local_dir(aiohttp_client: Any, tmp_path: Any) -> None:
    from helpers import Api as _Api
    from helpers import make_config

    from node.app import create_app

    pkg = tmp_path / "pkgs" / "site"
    (pkg / ".git").mkdir(parents=True)
    (pkg / ".git" / "HEAD").write_text("ref")
    (pkg / "index.html").write_text("hi")
    (pkg / "secret.env").write_text("x")
    (pkg / ".cairnignore").write_text("*.env\n")
    app = create_app(
        make_config(tmp_path, deploy={"allowed_package_dirs": [str(tmp_path / "pkgs")]})
    )
    api = _Api(await aiohttp_client(app), app)
    status, body = await api.op("deploy_component", project="site", package=str(pkg))
    assert status == 200, body
    rel = Services(app).ctx.components.release_dir("site", body["deployment_id"])
    assert (rel / "index.html").read_text() == "hi"
    assert not (rel / ".git").exists() and not (rel / "secret.env").exists()
    status, body = await api.op("deploy_component", project="site", package="/etc")
    assert status == 403 and body["code"] == "package_not_allowed"
