"""Property: no request a client can send gets a 5xx, and a refusal changes nothing.

Hypothesis generates requests over every operation of the registry (and some that do
not exist) in every body encoding — JSON, CBOR, MessagePack, multipart — with plausible
values (so calls reach the handlers) and hostile ones: wrong types, NaN and Infinity,
huge numbers, lone surrogates, reserved ``_`` fields and unknown fields, bad UTF-8,
truncated and oversized bodies, and Content-Length headers that lie (sent on a raw
socket). Each request runs against one real node (real SQLite, blob store and
components tree, served on loopback by aiohttp). After each:

- the status is below 500, and every error is a JSON body;
- a refusal (4xx without a ``deployment_id``: nothing was accepted) left every table,
  the change log and the blob store exactly as they were.

The number of examples is ``CAIRN_FUZZ_EXAMPLES`` (default 300, about 30 s here); the
soak runs 10,000 or more (see docs/operations.md, "Fuzzing the admin API").
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import cbor2
import msgpack
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import ADMIN, basic, component, make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.app import create_app, registry
from node.appkeys import Services

EXAMPLES = int(os.environ.get("CAIRN_FUZZ_EXAMPLES", "300"))
MAX_BODY = 64 * 1024
AUTH = basic(*ADMIN)
TABLES = ("deployments", "deployment_events", "node_results", "payload_drops", "users",
          "roles", "members", "changelog")  # fmt: skip
OPERATIONS = registry().names()
FIELDS = [
    "project", "payload", "package", "rollback_from", "restart", "replicated",
    "deployment_timeout", "ignore_replication_errors", "status", "user", "since", "until",
    "limit", "offset", "cursor", "include_event_log", "deployment_id", "dry_run", "name",
    "url", "username", "password", "role", "active", "permission", "table", "key",
]  # fmt: skip
GOOD = component()
KNOWN_ID = "00000000-0000-4000-8000-000000000000"  # replaced by a real id at start

# -- values ---------------------------------------------------------------------------------

HOSTILE_TEXT = st.sampled_from([
    "", "web", "site\n", "a" * 200, "../../etc/passwd", "\x00", "\u202e", "é✓", "\ud800",
    "http://[::1", "http://127.0.0.1:1/p.tar.gz", "http://u:pw@10.0.0.1/p.tgz",
    "file:///etc/hosts", "wss://h:99999", "wss://[::1", "rolling", "true", "0", "-1",
    "99999999999999999999999", "NaN", "qa701-never-existed", KNOWN_ID, "super_user",
    "deploy_componet", "%%%", "aGVsbG8=", "²", "١٢", "x" * 5000,
])  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: huge numbers too
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    st.text(max_size=40),
    HOSTILE_TEXT,
    st.binary(max_size=64),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=10), HOSTILE_TEXT), inner, max_size=4),
        st.fixed_dictionaries({"super_user": inner, "operations": inner}),
    ),
    max_leaves=8,
)


def plausible(name: str) -> st.SearchStrategy[Any]:
    """A value of the right type for ``name``, so calls get past validation."""
    table: dict[str, st.SearchStrategy[Any]] = {
        "project": st.sampled_from(["web", "api", "a.b_c-d"]),
        "payload": st.one_of(st.just(GOOD), st.binary(max_size=300)),
        "package": st.sampled_from(["http://127.0.0.1:1/p.tgz", "http://[::1]:1/p.tgz",
                                    "http://169.254.169.254/latest", "/etc/passwd"]),
        "rollback_from": st.sampled_from([KNOWN_ID, str(uuid.UUID(int=7))]),
        "deployment_id": st.sampled_from([KNOWN_ID, str(uuid.UUID(int=7))]),
        "restart": st.sampled_from([True, False, "rolling"]),
        "status": st.sampled_from(["success", "failed", "pending"]),
        "username": st.sampled_from(["bob", "carol"]),
        "password": st.sampled_from(["long-enough-password", "short"]),
        "role": st.sampled_from(["reader", "deployer", "missing"]),
        "permission": st.fixed_dictionaries({
            "super_user": st.just(False),
            "operations": st.lists(st.sampled_from([*OPERATIONS[:5], "deploy_componet"]),
                                   max_size=3),
        }),
        "table": st.sampled_from(["hdb_deployment", "users", "roles", "nope"]),
        "name": st.sampled_from(["n2", "n3"]),
        "url": st.sampled_from(["wss://127.0.0.1:9", "https://x"]),
    }  # fmt: skip
    return table.get(name, st.sampled_from([True, False, 0, 1, 5, 1000, "x"]))


# The fields each operation reads, so plausible bodies get past "'x' is required".
OP_FIELDS: dict[str, tuple[str, ...]] = {
    "deploy_component": ("project", "payload", "restart", "replicated"),
    "get_deployment": ("deployment_id",),
    "get_deployment_payload": ("deployment_id",),
    "delete_deployment_payload": ("deployment_id",),
    "pin_deployment": ("deployment_id",),
    "unpin_deployment": ("deployment_id",),
    "list_deployments": ("project", "status", "limit", "include_event_log"),
    "drop_component": ("project",),
    "prune_deployment_payloads": ("project", "dry_run"),
    "add_user": ("username", "password", "role", "active"),
    "alter_user": ("username", "password", "role"),
    "drop_user": ("username",),
    "add_role": ("role", "permission"),
    "alter_role": ("role", "permission"),
    "drop_role": ("role",),
    "add_node": ("name", "url"),
    "remove_node": ("name",),
    "read_audit_log": ("table", "key", "limit"),
}


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    op: Any = draw(VALUES) if draw(st.integers(0, 9)) == 0 else draw(st.sampled_from(OPERATIONS))
    body: dict[str, Any] = {"operation": op}
    good = draw(st.integers(0, 3)) > 0
    names = list(OP_FIELDS.get(op, ())) if good and isinstance(op, str) else []
    names += draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True))
    for name in dict.fromkeys(names):
        hostile = not good or draw(st.integers(0, 4)) == 0
        body[name] = draw(VALUES if hostile else plausible(name))
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.sampled_from(["_deploymentId", "_replicated", "_x", "__proto__"]))] = True
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=12))] = draw(VALUES)
    return body


# -- encodings ------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _binary_safe(value: Any, *, msgpack_ints: bool = False) -> Any:
    """CBOR and MessagePack cannot carry lone surrogates (nor MessagePack huge ints)."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    if msgpack_ints and isinstance(value, int) and not isinstance(value, bool):
        return max(-(2**63), min(value, 2**64 - 1))
    if isinstance(value, list):
        return [_binary_safe(v, msgpack_ints=msgpack_ints) for v in value]
    if isinstance(value, dict):
        return {
            _binary_safe(k): _binary_safe(v, msgpack_ints=msgpack_ints) for k, v in value.items()
        }
    return value


def _multipart(body: dict[str, Any], bad_utf8: bool, close: bool) -> tuple[str, bytes]:
    boundary = "fuzz" + uuid.uuid4().hex
    out = io.BytesIO()
    payload = body.pop("payload", None)
    parts = [(str(k), v) for k, v in body.items()]
    if payload is not None:
        parts.append(("payload", payload))
    for name, value in parts:
        if isinstance(value, bytes):
            data = value
        else:
            text = value if isinstance(value, str) else json.dumps(_json_safe(value))
            data = text.encode("utf-8", "surrogatepass") + (b"\xff\xfe" if bad_utf8 else b"")
        quoted = name.replace('"', "%22").encode("utf-8", "surrogatepass")
        out.write(f"--{boundary}\r\n".encode())
        out.write(b'Content-Disposition: form-data; name="' + quoted + b'"')
        out.write(b'; filename="p.tgz"\r\n' if name == "payload" else b"\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    if close:
        out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, str]:
    """(content type, encoding name, body bytes, how to send it)."""
    body = draw(bodies())
    kind = draw(st.sampled_from(["json", "cbor", "msgpack", "multipart"]))
    if kind == "json":
        ctype = "application/json"
        data = json.dumps(_json_safe(body)).encode("utf-8", "surrogatepass")
        if draw(st.integers(0, 19)) == 0:
            data = data.replace(b": 0", b": NaN", 1).replace(b": true", b": Infinity", 1)
    elif kind == "cbor":
        ctype, data = "application/cbor", cbor2.dumps(_binary_safe(body))
    elif kind == "msgpack":
        ctype = "application/x-msgpack"
        data = msgpack.packb(_binary_safe(body, msgpack_ints=True))
    else:
        ctype, data = _multipart(body, draw(st.integers(0, 9)) == 0, draw(st.integers(0, 9)) > 0)
    damages = ["truncate", "trailing", "bad_utf8", "oversized", "lie_long", "lie_short"]
    damage = draw(st.sampled_from(["none"] * 18 + damages))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "trailing":
        data += draw(st.binary(min_size=1, max_size=8))
    elif damage == "bad_utf8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xc3\x28\xff" + data[at:]
    elif damage == "oversized":
        data += b" " * (MAX_BODY + 1)
    how = damage if damage in ("lie_long", "lie_short") else "client"
    return ctype, kind, data, how


# -- the node -------------------------------------------------------------------------------


async def _state(app: web.Application) -> dict[str, Any]:
    services = Services(app)
    out: dict[str, Any] = {}
    for table in TABLES:
        rows = await services.store.db.fetchall(f"SELECT * FROM {table}")
        out[table] = sorted(map(repr, map(tuple, rows)))
    out["blobs"] = sorted(services.ctx.blobs.hashes())
    return out


async def _raw(port: int, ctype: str, data: bytes, how: str) -> tuple[int, bytes]:
    """Send with a Content-Length that lies (longer or shorter than the body)."""
    length = len(data) + 17 if how == "lie_long" else max(0, len(data) // 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST / HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n"
            + f"Authorization: {AUTH}\r\nContent-Type: {ctype}\r\n".encode("latin-1", "replace")
            + f"Content-Length: {length}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1 << 20), 10)
    except ConnectionError:
        return 0, b""
    finally:
        writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
    return status, rest


def test_no_request_gets_a_5xx_or_changes_state_when_refused(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        limits={"max_body_bytes": MAX_BODY, "body_idle_timeout_s": 0.3},
        deploy={"allowed_package_dirs": [str(tmp_path / "pkgs")]},
    )
    seen: dict[str, set[int]] = {}

    async def start() -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(
            TestServer(create_app(config), handler_cancellation=True)
        )
        await client.start_server()
        return client

    with asyncio.Runner() as runner:
        client = runner.run(start())
        try:
            app = client.server.app
            assert app is not None
            resp = runner.run(
                client.post(
                    "/",
                    json={"operation": "deploy_component", "project": "web",
                          "payload": base64.b64encode(GOOD).decode()},
                    headers={"Authorization": AUTH},
                )
            )  # fmt: skip
            known = runner.run(resp.json())["deployment_id"]
            for role in ("reader", "deployer"):
                runner.run(
                    client.post(
                        "/",
                        json={"operation": "add_role", "role": role,
                              "permission": {"operations": ["list_deployments"]}},
                        headers={"Authorization": AUTH},
                    )
                )  # fmt: skip

            async def one(ctype: str, kind: str, data: bytes, how: str) -> None:
                data = data.replace(KNOWN_ID.encode(), known.encode())
                before = await _state(app)
                if how == "client":
                    r = await client.post(
                        "/",
                        data=io.BytesIO(data),
                        headers={"Authorization": AUTH, "Content-Type": ctype},
                    )
                    status, raw, rtype = r.status, await r.read(), r.content_type
                else:
                    status, raw = await _raw(client.server.port or 0, ctype, data, how)
                    rtype = "application/json" if raw.startswith(b"{") else ""
                seen.setdefault(kind, set()).add(status)
                assert status < 500, (kind, how, status, raw[:300], data[:300])
                if status >= 400 and rtype == "application/json":
                    answer = json.loads(raw)
                    assert "error" in answer and "code" in answer, answer
                    if "deployment_id" not in answer:  # refused: nothing accepted
                        assert await _state(app) == before, (kind, how, status, answer)

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,  # the same requests every run: a failure replays
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(requests())
            def prop(request: tuple[str, str, bytes, str]) -> None:
                runner.run(one(*request))

            prop()
            # The admin is still there and still super: the fuzz never locked the node.
            resp = runner.run(
                client.post("/", json={"operation": "list_users"}, headers={"Authorization": AUTH})
            )
            assert resp.status == 200
            resp.release()
        finally:
            runner.run(client.close())
    assert set(seen) == {"json", "cbor", "msgpack", "multipart"}, seen
    assert all(any(s < 400 for s in statuses) for statuses in seen.values()) or EXAMPLES < 100, seen
