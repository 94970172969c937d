"""Authentication and authorization through the real app, plus /health and /metrics.

The matrix runs every operation of the registry as four callers — a super user, a
reader (``list_deployments``/``get_deployment``), a deployer (``deploy_component``) and
a user whose role grants nothing — and checks that allowed calls are not refused and
refused calls are 403 with no side effect on any table, the blob store or the
components tree.
"""

from __future__ import annotations

import base64
import io
import os
import stat
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from helpers import ADMIN, Api, basic, component
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from node.app import registry
from node.appkeys import Services

PASSWORD = "matrix-password-1"
READER_OPS = ["list_deployments", "get_deployment"]
DEPLOYER_OPS = ["deploy_component"]
ROLES: dict[str, list[str]] = {
    "reader": READER_OPS,
    "deployer": DEPLOYER_OPS,
    "nothing": [],
    "downloader": ["get_deployment_payload"],
}
TABLES = ("deployments", "deployment_events", "node_results", "payload_drops", "users",
          "roles", "members", "changelog", "active_releases")  # fmt: skip


async def _snapshot(api: Api) -> dict[str, Any]:
    """Everything a call could change: row counts and contents, blobs, files on disk."""
    services = Services(api.app)
    db = services.store.db
    snap: dict[str, Any] = {}
    for table in TABLES:
        rows = await db.fetchall(f"SELECT * FROM {table}")
        snap[table] = sorted(tuple(r) for r in rows)
    blobs = services.ctx.blobs.root
    components = services.ctx.components.root
    snap["files"] = sorted(
        (str(p), p.lstat().st_size)
        for root in (blobs, components)
        for p in root.rglob("*")
        if not stat.S_ISDIR(p.lstat().st_mode)
    )
    return snap


async def _counts(api: Api) -> dict[str, int]:
    db = Services(api.app).store.db
    out = {}
    for table in TABLES:
        row = await db.fetchone(f"SELECT COUNT(*) AS n FROM {table}")
        out[table] = row["n"]
    out["blobs"] = Services(api.app).ctx.blobs.stats()[0]
    return out


@pytest.fixture
async def users(api: Api) -> AsyncIterator[dict[str, str]]:
    """One user per role, plus the admin; returns name → Authorization header."""
    headers = {"admin": basic(*ADMIN)}
    for role, ops in ROLES.items():
        status, body = await api.op("add_role", role=role, permission={"operations": ops})
        assert status == 200, body
        status, body = await api.op("add_user", username=f"u-{role}", password=PASSWORD, role=role)
        assert status == 200, body
        headers[role] = basic(f"u-{role}", PASSWORD)
    yield headers


class World:
    """Ids and names the matrix bodies point at (created by the admin)."""

    def __init__(self, old: str, active: str) -> None:
        self.old = old
        self.active = active


async def _world(api: Api) -> World:
    _, old = await api.deploy("web", component(v="1"))
    _, active = await api.deploy("web", component(v="2"))
    for name in ("victim", "victim-too"):
        await api.op("add_user", username=name, password=PASSWORD, role="nothing")
    for role in ("victim-role", "spare-role"):
        await api.op("add_role", role=role, permission={"operations": []})
    await api.op("add_node", name="n7", url="wss://127.0.0.1:9")
    return World(old["deployment_id"], active["deployment_id"])


def _body(op: str, who: str, w: World) -> dict[str, Any]:
    """A well-formed request for ``op`` (so an allowed call reaches its handler)."""
    bodies: dict[str, dict[str, Any]] = {
        "add_node": {"name": f"n-{who}", "url": "wss://127.0.0.1:9"},
        "remove_node": {"name": "n7"},
        "add_role": {"role": f"r-{who}", "permission": {"operations": ["list_users"]}},
        "alter_role": {"role": "victim-role", "permission": {"operations": ["list_roles"]}},
        "drop_role": {"role": "spare-role"},
        "add_user": {"username": f"new-{who}", "password": PASSWORD, "role": "nothing"},
        "alter_user": {"username": "victim", "password": "changed-password-1"},
        "drop_user": {"username": "victim-too"},
        "list_users": {},
        "list_roles": {},
        "cluster_status": {},
        "read_audit_log": {"table": "hdb_deployment"},
        "list_deployments": {"project": "web"},
        "get_deployment": {"deployment_id": w.active},
        "get_deployment_payload": {"deployment_id": w.active},
        "delete_deployment_payload": {"deployment_id": w.old},
        "pin_deployment": {"deployment_id": w.old},
        "prune_deployment_payloads": {"project": "web"},
        "get_components": {},
        "drop_component": {"project": "web"},
    }
    # An operation added later still runs through the matrix with a generic body.
    return bodies.get(op, {"deployment_id": w.old, "project": "web"})


async def _call(api: Api, op: str, auth: str, fields: dict[str, Any]) -> tuple[int, Any]:
    if op == "deploy_component":  # always the streamed multipart form
        form = aiohttp.FormData()
        form.add_field("operation", op)
        form.add_field("project", "web")
        form.add_field("payload", io.BytesIO(component(v="m")), filename="c.tar.gz")
        resp = await api.client.post("/", data=form, headers={"Authorization": auth})
    else:
        resp = await api.client.post(
            "/", json={"operation": op, **fields}, headers={"Authorization": auth}
        )
    raw = await resp.read()
    if resp.content_type == "application/json":
        return resp.status, (await resp.json())
    return resp.status, raw


async def test_authorization_matrix(api: Api, users: dict[str, str]) -> None:
    w = await _world(api)
    ops = registry()
    names = ops.names()
    assert set(READER_OPS + DEPLOYER_OPS) <= set(names)
    # Operations about the caller itself (get_session) are open to every user.
    everyone = {n for n in names if (op := ops.get(n)) is not None and op.any_user}
    allowed_for = {
        "nothing": everyone,
        "reader": set(READER_OPS) | everyone,
        "deployer": set(DEPLOYER_OPS) | everyone,
        "admin": set(names),
    }
    # The admin goes last: its allowed calls change the world the others are tried on.
    for who in ("nothing", "reader", "deployer", "admin"):
        for op in names:
            fields = _body(op, who, w)
            before = await _snapshot(api)
            status, body = await _call(api, op, users[who], fields)
            if op in allowed_for[who]:
                assert status not in (401, 403), (who, op, body)
                assert status < 500, (who, op, body)
            else:
                assert status == 403, (who, op, status, body)
                assert body["code"] == "forbidden" and op in body["error"], body
                assert await _snapshot(api) == before, (who, op)
    # The allowed calls of the limited roles did what they should.
    status, listing = await api.op("list_deployments", auth=users["reader"])
    # Two set-up deploys, the deployer's, the admin's, and the admin's drop_component.
    assert status == 200 and listing["total"] == 5
    by_user = [(d["user"], d["kind"]) for d in listing["deployments"]]
    assert by_user.count(("u-deployer", "deploy")) == 1
    assert by_user[0] == ("admin", "drop")


async def test_refused_multipart_deploy_leaves_no_row_and_no_blob(
    api: Api, users: dict[str, str]
) -> None:
    big = os.urandom(2 << 20)  # the payload part is never read
    for who in ("reader", "nothing", "downloader"):
        before = await _counts(api)
        form = aiohttp.FormData()
        form.add_field("operation", "deploy_component")
        form.add_field("project", "web")
        form.add_field("payload", io.BytesIO(big), filename="c.tar.gz")
        resp = await api.client.post("/", data=form, headers={"Authorization": users[who]})
        assert resp.status == 403, who
        assert await _counts(api) == before
    blobs = Services(api.app).ctx.blobs.root
    assert not [p for p in blobs.rglob("*") if p.is_file()]
    assert not (Services(api.app).ctx.components.root / "web").exists()


def _basic_raw(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


async def test_bad_credentials_are_401_with_challenge_and_no_side_effect(
    api: Api, users: dict[str, str]
) -> None:
    cases: dict[str, dict[str, str]] = {
        "none": {},
        "wrong password": {"Authorization": basic(ADMIN[0], "not-the-password")},
        "unknown user": {"Authorization": basic("mallory", PASSWORD)},
        "empty password": {"Authorization": basic(ADMIN[0], "")},
        "not base64": {"Authorization": "Basic !!!not-base64!!!"},
        "no colon": {"Authorization": _basic_raw(b"adminpassword")},
        "not utf-8": {"Authorization": _basic_raw(b"admin:\xff\xfe")},
        "empty basic": {"Authorization": "Basic"},
        "other scheme": {"Authorization": "Bearer abc.def.ghi"},
        "case of user": {"Authorization": basic(ADMIN[0].upper(), ADMIN[1])},
    }
    before = await _counts(api)
    for name, headers in cases.items():
        # A multipart deploy: 401 comes before the body is read, so nothing is stored.
        form = aiohttp.FormData()
        form.add_field("operation", "deploy_component")
        form.add_field("project", "web")
        form.add_field("payload", io.BytesIO(component()), filename="c.tar.gz")
        resp = await api.client.post("/", data=form, headers=headers)
        body = await resp.json()
        assert resp.status == 401, (name, body)
        assert resp.headers["WWW-Authenticate"].startswith("Basic realm="), name
        assert body["code"] == "unauthorized", name
        # ... and before the body is parsed: a forged marker is not even looked at.
        resp = await api.client.post(
            "/", json={"operation": "list_deployments", "_deploymentId": "x"}, headers=headers
        )
        assert resp.status == 401, name
    assert await _counts(api) == before

    # An inactive user is refused at once, and again allowed once re-activated.
    status, _ = await api.op("list_deployments", auth=users["reader"])
    assert status == 200
    status, body = await api.op("alter_user", username="u-reader", active=False)
    assert status == 200, body
    status, body = await api.op("list_deployments", auth=users["reader"])
    assert status == 401 and body["code"] == "unauthorized"
    status, _ = await api.op("alter_user", username="u-reader", active=True)
    status, _ = await api.op("list_deployments", auth=users["reader"])
    assert status == 200
    # A dropped user is unknown from then on.
    status, _ = await api.op("drop_user", username="u-reader")
    assert status == 200
    status, _ = await api.op("list_deployments", auth=users["reader"])
    assert status == 401


async def test_payload_bytes_only_for_callers_allowed_to_download(
    api: Api, users: dict[str, str]
) -> None:
    payload = component(**{"marker.txt": "payload-marker-" + "z" * 64})
    status, body = await api.deploy("web", payload)
    assert status == 200
    did = body["deployment_id"]
    b64 = base64.b64encode(payload).decode()
    for who in ("reader", "deployer", "nothing"):
        status, answer = await _call(
            api, "get_deployment_payload", users[who], {"deployment_id": did}
        )
        assert status == 403, who
        assert isinstance(answer, dict) and "payload-marker" not in str(answer)
    # The reader sees the record, never the bytes, in any read.
    for op, fields in (
        ("get_deployment", {"deployment_id": did}),
        ("list_deployments", {"include_event_log": True}),
    ):
        resp = await api.client.post(
            "/", json={"operation": op, **fields}, headers={"Authorization": users["reader"]}
        )
        text = await resp.text()
        assert resp.status == 200
        assert b64[:40] not in text and "payload-marker" not in text
    status, answer = await _call(
        api, "get_deployment_payload", users["downloader"], {"deployment_id": did}
    )
    assert status == 200 and answer == payload


async def test_health_needs_no_auth(api: Api) -> None:
    resp = await api.client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "node": "n1"}
    resp = await api.client.get("/nope")
    assert resp.status == 404 and (await resp.json())["code"] == "not_found"
    resp = await api.client.get("/")
    assert resp.status == 405


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_are_prometheus_text_with_deploys_bytes_and_latency(api: Api) -> None:
    first = component(v="1")
    await api.deploy("web", first)
    await api.deploy("web", component(v="2"))
    await api.deploy("web", b"not an archive")
    for _ in range(3):
        await api.op("list_deployments")
    await api.op("list_deployments", auth=basic(ADMIN[0], "wrong"))
    resp = await api.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = _samples(await resp.text())
    assert samples[("cairn_deployments", (("status", "success"),))] == 2
    assert samples[("cairn_deployments", (("status", "failed"),))] == 1
    _, size = Services(api.app).ctx.blobs.stats()
    assert samples[("cairn_payload_bytes", ())] == size > 0
    assert samples[("cairn_payload_blobs", ())] == 3
    received = samples[("cairn_payload_received_bytes_total", ())]
    assert received >= len(first) * 2
    count = (
        "cairn_request_duration_seconds_count",
        (("operation", "list_deployments"), ("status", "200")),
    )
    assert samples[count] == 3
    total = (
        "cairn_request_duration_seconds_sum",
        (("operation", "list_deployments"), ("status", "200")),
    )
    assert samples[total] > 0
    deploys = (
        "cairn_request_duration_seconds_count",
        (("operation", "deploy_component"), ("status", "200")),
    )
    assert samples[deploys] == 2
    bad = (
        "cairn_request_duration_seconds_count",
        (("operation", "deploy_component"), ("status", "422")),
    )
    assert samples[bad] == 1
    # A refused request is counted under the path (its operation was never read).
    unauth = [
        k
        for k in samples
        if k[0] == "cairn_request_duration_seconds_count" and ("status", "401") in k[1]
    ]
    assert unauth and samples[unauth[0]] == 1


SECRETS = {
    "password": "hunter2-SECRET-one",
    "apiToken": "tok-SECRET-two",
    "authorization": "Basic SECRET-three",
    "private_key": "-----BEGIN SECRET-four",
    "harperCredentials": {"secret": "SECRET-five"},
}


async def test_unknown_fields_are_ignored_and_credentials_never_logged(api: Api) -> None:
    with capture_logs() as logs:
        status, body = await api.deploy(
            "web", component(install="echo installing"), someHarperField={"x": 1}, **SECRETS
        )
        assert status == 200, body
        status, body = await api.op("list_deployments", **SECRETS)
        assert status == 200 and body["total"] == 1
        status, body = await api.op("no_such_operation", **SECRETS)
        assert status == 400
        status, body = await api.op(
            "add_user", username="logged", password="SECRET-six-password", role="super_user"
        )
        assert status == 200
        status, body = await api.op("list_deployments", auth=basic("logged", "SECRET-seven"))
        assert status == 401
        status, body = await api.deploy("web", b"garbage SECRET-eight", password="SECRET-nine")
        assert status == 422
    assert logs, "nothing was logged at all"
    text = repr(logs)
    for needle in ("SECRET", ADMIN[1], "hunter2", base64.b64encode(ADMIN[1].encode()).decode()):
        assert needle not in text, needle
    # The deploy itself was logged (so the capture did see the request).
    assert any(e["event"] == "deploy_started" for e in logs)
    _, rec = await api.op("get_deployment", deployment_id=body["deployment_id"])
    assert "SECRET" not in repr(rec)


async def test_a_role_without_operations_list_is_refused(api: Api) -> None:
    # A role whose permission names no operations and no super_user may do nothing.
    status, body = await api.op("add_role", role="empty", permission={})
    assert status == 200, body
    await api.op("add_user", username="emptyuser", password=PASSWORD, role="empty")
    ops = registry()
    for op in ops.names():
        status, body = await api.op(op, auth=basic("emptyuser", PASSWORD))
        if (found := ops.get(op)) is not None and found.any_user:
            assert status == 200, (op, body)  # get_session: the caller asking about itself
        else:
            assert status == 403, (op, body)
