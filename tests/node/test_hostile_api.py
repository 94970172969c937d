"""Hostile input through the real app: tarballs, forged markers, fuzzed bodies, error codes.

Every test here talks to a started node (real SQLite, real blob store, real components
tree) through aiohttp's test client, and checks both the answer and what the node left
on disk: no row or blob for a refused call, nothing outside the release for a hostile
payload, never a 500 for anything a client can send.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import os
import random
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import hostile
import msgpack
import pytest
from helpers import ADMIN, Api, basic, component, make_config, until_users_here

from node.app import ClusterHooks, create_app, registry
from node.appkeys import CONFIG, Services
from node.config import Config, PeerEntry
from node.deploy.extract import ExtractLimits
from replication.tls import check_node_credentials, init_ca, issue_node_cert
from storage.errors import BlobMissing

AUTH = {"Authorization": basic(*ADMIN)}
GOOD = component(install="echo base ready", **{"data.txt": "base release\n"})


# -- helpers ------------------------------------------------------------------------------


async def _app_api(aiohttp_client: Any, config: Config, **kwargs: Any) -> Api:
    app = create_app(config, **kwargs)
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    return Api(client, app)


def _services(api: Api) -> Services:
    return Services(api.app)


async def _rows(api: Api) -> dict[str, int]:
    """Row counts of every replicated table, plus stored blobs."""
    db = _services(api).store.db
    counts = {}
    for table in ("deployments", "deployment_events", "node_results", "payload_drops",
                  "users", "roles", "members", "changelog"):  # fmt: skip
        row = await db.fetchone(f"SELECT COUNT(*) AS n FROM {table}")
        counts[table] = row["n"]
    counts["blobs"] = _services(api).ctx.blobs.stats()[0]
    return counts


def _tree(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Every entry under ``root``: kind, mode and content (file bytes or link target)."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def _names(root: Path) -> set[str]:
    return {name for _, dirs, files in os.walk(root) for name in dirs + files}


def _exists(path: str) -> bool:
    return os.path.lexists(path)


def _multipart(fields: dict[str, str], payload: bytes | None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    if payload is not None:
        form.add_field(
            "payload", io.BytesIO(payload), filename="p.tar.gz", content_type="application/gzip"
        )
    return form


async def _post_multipart(
    api: Api, fields: dict[str, str], payload: bytes | None
) -> tuple[int, Any]:
    resp = await api.client.post("/", data=_multipart(fields, payload), headers=AUTH)
    return resp.status, await resp.json()


async def _broken_upload(api: Api, project: str) -> None:
    """Start a multipart deploy on a raw socket, send part of the payload, hang up."""
    boundary = "cairnbroken"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="operation"\r\n\r\n'
        f"deploy_component\r\n--{boundary}\r\n"
        f'Content-Disposition: form-data; name="project"\r\n\r\n{project}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="payload"; filename="p.tgz"\r\n'
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    body_len = len(head) + (1 << 20)  # promise 1 MiB of payload, send 64 KiB
    server = api.client.server
    _, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        f"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {body_len}\r\n\r\n".encode()
        + head
        + b"\x1f\x8b"
        + os.urandom(64 << 10)
    )
    await writer.drain()
    store = _services(api).store
    deadline = asyncio.get_running_loop().time() + 10
    while not [d for d in await store.deployments() if str(d.status) == "pending"]:
        assert asyncio.get_running_loop().time() < deadline, "the deploy never started"
        await asyncio.sleep(0.01)
    writer.close()
    await writer.wait_closed()


# -- the hostile tarball corpus ----------------------------------------------------------

# Each distinct extraction limit of the corpus becomes a node config [limits].
_GROUPS: dict[str, Callable[[ExtractLimits], bool]] = {
    "default": lambda lim: lim == hostile.DEFAULT_LIMITS,
    "members": lambda lim: lim.max_members != hostile.DEFAULT_LIMITS.max_members,
    "bytes": lambda lim: lim.max_total_bytes != hostile.DEFAULT_LIMITS.max_total_bytes,
    "ratio": lambda lim: lim.max_ratio != hostile.DEFAULT_LIMITS.max_ratio,
}


def _config_limits(lim: ExtractLimits) -> dict[str, Any]:
    return {
        "max_members": lim.max_members,
        "max_extracted_bytes": lim.max_total_bytes,
        "max_compression_ratio": lim.max_ratio,
        "compression_ratio_floor_bytes": lim.ratio_floor_bytes,
        "max_path_length": lim.max_path_len,
    }


@pytest.mark.parametrize("group", sorted(_GROUPS))
async def test_hostile_corpus_fails_safely_and_keeps_active_release(
    aiohttp_client: Any, tmp_path: Path, group: str
) -> None:
    outside = tmp_path / "canary"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"do not touch\n")
    cases = [
        c for c in hostile.build_corpus(tmp_path / "corpus", outside) if _GROUPS[group](c.limits)
    ]
    assert cases, group
    limits = {c.limits for c in cases}
    assert len(limits) == 1, limits
    api = await _app_api(aiohttp_client, make_config(tmp_path, limits=_config_limits(*limits)))
    # The base release must fit every limit group (at most 10 members, 1000 bytes).
    status, base = await api.deploy("web", GOOD)
    assert status == 200, base
    base_id = base["deployment_id"]
    components = _services(api).ctx.components
    project_dir = components.root / "web"
    beside = project_dir / "canary"  # next to releases/: where "../../canary" would land
    beside.mkdir()
    (beside / "secret.txt").write_bytes(b"beside the releases\n")
    before_outside = _tree(outside)
    before_components = _tree(components.root)
    tmp_evil = _exists("/tmp/evil")

    for i, case in enumerate(cases):
        payload = case.path.read_bytes()
        if i % 2:
            status, body = await _post_multipart(
                api, {"operation": "deploy_component", "project": "web"}, payload
            )
        else:
            status, body = await api.deploy("web", payload)
        assert status == 422, (case.name, body)
        assert body["code"] == case.code, (case.name, body)
        if case.needle is not None:
            assert case.needle in body["error"], (case.name, body)
        did = body["deployment_id"]
        _, rec = await api.op("get_deployment", deployment_id=did)
        assert rec["status"] == "failed" and rec["error"]["code"] == case.code, case.name
        assert rec["payload_hash"] == hashlib.sha256(payload).hexdigest(), case.name
        assert components.current("web") == base_id, case.name
        assert _tree(components.root) == before_components, case.name
        assert _tree(outside) == before_outside, case.name

    names = _names(tmp_path)
    assert not {n for n in names if "evil" in n or n == "pwned"}, "a member escaped"
    assert _exists("/tmp/evil") == tmp_evil
    assert not {n for n in names if n.startswith(".tmp-")}
    status, listing = await api.op("list_deployments", project="web", status="failed")
    assert listing["total"] == len(cases)
    release = components.release_dir("web", base_id)
    assert (release / "data.txt").read_text() == "base release\n"


# -- forged replication markers ------------------------------------------------------------


async def test_forged_markers_are_refused_in_every_encoding(api: Api) -> None:
    payload = component()
    fields = ["_deploymentId", "_replicated", "_origin", "_", "__proto__", "_user"]
    for name in fields:
        body = {"operation": "deploy_component", "project": "web", name: "forged"}
        encoded = [
            (
                "application/json",
                json.dumps({**body, "payload": base64.b64encode(payload).decode()}),
            ),
            ("application/cbor", cbor2.dumps({**body, "payload": payload})),
            ("application/x-msgpack", msgpack.packb({**body, "payload": payload})),
        ]
        for ctype, raw in encoded:
            resp = await api.client.post("/", data=raw, headers={**AUTH, "Content-Type": ctype})
            answer = await resp.json()
            assert resp.status == 400, (name, ctype, answer)
            assert answer["code"] == "reserved_field" and answer["field"] == name
        status, answer = await _post_multipart(
            api, {"operation": "deploy_component", "project": "web", name: "forged"}, payload
        )
        assert status == 400 and answer["code"] == "reserved_field", (name, answer)
        # ... also when the marker comes first, before the operation is even known.
        status, answer = await _post_multipart(
            api, {name: "1", "operation": "deploy_component", "project": "web"}, payload
        )
        assert status == 400 and answer["code"] == "reserved_field", (name, answer)
    # Markers on other operations, and a marker value that is an object.
    for op in ("list_deployments", "add_user", "delete_deployment_payload"):
        status, answer = await api.op(op, _deploymentId={"id": str(uuid.uuid4())})
        assert status == 400 and answer["code"] == "reserved_field"
    counts = await _rows(api)
    assert counts["deployments"] == 0 and counts["deployment_events"] == 0
    assert counts["blobs"] == 0
    assert not list((_services(api).ctx.blobs.root).rglob("*.tmp"))


async def test_every_accepted_deploy_leaves_exactly_one_row(api: Api) -> None:
    payload = component(install="echo hi")
    ids: list[str] = []

    async def raw(ctype: str, data: bytes) -> None:
        resp = await api.client.post("/", data=data, headers={**AUTH, "Content-Type": ctype})
        body = await resp.json()
        ids.append(body["deployment_id"])

    base = {"operation": "deploy_component", "project": "web"}
    await raw(
        "application/json",
        json.dumps({**base, "payload": base64.b64encode(payload).decode()}).encode(),
    )
    await raw("application/cbor", cbor2.dumps({**base, "payload": payload}))
    await raw("application/x-msgpack", msgpack.packb({**base, "payload": b"not a tarball"}))
    _, body = await _post_multipart(
        api, {"operation": "deploy_component", "project": "web"}, payload
    )
    ids.append(body["deployment_id"])

    # An upload that breaks off mid-stream still leaves its one row, failed.
    await _broken_upload(api, "web")
    store = _services(api).store

    async def all_terminal() -> list[Any]:
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            rows = await store.deployments()
            if len(rows) == 5 and all(d.terminal for d in rows):
                return rows
            assert asyncio.get_running_loop().time() < deadline, rows
            await asyncio.sleep(0.02)

    rows = await all_terminal()
    assert len({d.deployment_id for d in rows}) == 5
    assert set(ids) < {d.deployment_id for d in rows}
    (broke,) = [d for d in rows if d.deployment_id not in ids]
    assert str(broke.status) == "failed" and broke.error is not None
    assert broke.error["code"] == "upload_failed"
    assert [str(d.status) for d in rows if d.deployment_id in ids].count("success") == 3
    assert not list((_services(api).ctx.blobs.root / "tmp").glob("*"))


# -- every error status of SPEC section 4 ---------------------------------------------------


class _UnconnectedCluster(ClusterHooks):
    """The cluster seam for a node whose configured peers are all unreachable."""

    def __init__(self, config: Config) -> None:
        self.view = self
        self.fetcher = self
        self._members = sorted([config.node.name, *(p.name for p in config.peers)])

    def members(self) -> list[str]:
        return self._members

    def connected(self) -> set[str]:
        return set()

    async def fetch(self, payload_hash: str, size: int) -> None:
        raise BlobMissing(payload_hash)


async def _unconnected(app: Any) -> AsyncIterator[ClusterHooks]:
    yield _UnconnectedCluster(app[CONFIG])


def _clustered_config(tmp_path: Path) -> Config:
    init_ca(tmp_path / "ca")
    files = issue_node_cert(tmp_path / "ca", tmp_path / "certs", "n1", ["127.0.0.1"])
    config = make_config(
        tmp_path,
        peer={"host": "127.0.0.1", "port": 1},
        tls={"ca": str(tmp_path / "ca" / "ca.pem"), "cert": str(files.cert), "key": str(files.key)},
    )
    config = dataclasses.replace(config, peers=(PeerEntry("n2", "wss://127.0.0.1:9"),))
    assert config.tls is not None  # the CLI checks these before it starts a node
    check_node_credentials(config.tls.cert, config.tls.key, config.tls.ca, "n1")
    return config


async def test_every_error_status_of_the_contract(aiohttp_client: Any, tmp_path: Path) -> None:
    api = await _app_api(
        aiohttp_client, make_config(tmp_path / "solo", limits={"max_body_bytes": 64 << 10})
    )
    seen: dict[int, str] = {}

    def saw(status: int, body: Any, code: str | None = None) -> None:
        assert isinstance(body, dict) and "error" in body and "code" in body, body
        if code is not None:
            assert body["code"] == code, body
        seen[status] = body["code"]

    status, body = await api.op("list_deployments", limit="ten")
    assert status == 400 and body["field"] == "limit"
    saw(status, body, "invalid_input")
    resp = await api.client.post("/", json={"operation": "list_deployments"})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
    saw(resp.status, await resp.json(), "unauthorized")
    await api.op("add_role", role="nothing", permission={"operations": []})
    await api.op("add_user", username="nobody", password="nobody-password", role="nothing")
    status, body = await api.op("list_deployments", auth=basic("nobody", "nobody-password"))
    saw(status, body, "forbidden")
    missing = str(uuid.uuid4())
    status, body = await api.op("get_deployment", deployment_id=missing)
    assert missing in body["error"]
    saw(status, body, "not_found")
    status, body = await api.op("drop_role", role="nothing")
    saw(status, body)
    assert status == 409
    _, first = await api.deploy("web", component(v="1"))
    await api.deploy("web", component(v="2"))  # so that first is not the active deploy
    await api.op("delete_deployment_payload", deployment_id=first["deployment_id"])
    status, body = await api.op("get_deployment_payload", deployment_id=first["deployment_id"])
    saw(status, body, "payload_gone")
    status, body = await api.deploy("web", os.urandom(100 << 10))
    saw(status, body, "too_large")
    status, body = await api.deploy("web", b"plain text, not an archive")
    saw(status, body, "bad_payload")
    assert sorted(seen) == [400, 401, 403, 404, 409, 410, 413, 422]

    # 503: a node with a configured peer that is not connected refuses a cluster deploy.
    clustered = _clustered_config(tmp_path / "cluster")
    capi = await _app_api(aiohttp_client, clustered, cluster_factory=_unconnected)
    await until_users_here(capi)  # a node with peers creates its bootstrap user in the background
    before = await _rows(capi)
    status, body = await capi.deploy("web", component())
    assert status == 503, body
    assert body["code"] == "replication_failed" and body["failed_nodes"] == ["n2"]
    _, rec = await capi.op("get_deployment", deployment_id=body["deployment_id"])
    assert rec["status"] == "failed" and rec["expected_nodes"] == ["n1", "n2"]
    assert (await _rows(capi))["deployments"] == before["deployments"] + 1
    assert (await _rows(capi))["blobs"] == 0  # it failed before reading the payload
    # ... while a deploy that asks not to replicate still works on this node alone.
    status, body = await capi.deploy("web", component(), replicated=False)
    assert status == 200, body


# -- fuzz: never a 500 ---------------------------------------------------------------------

_FIELDS = [
    "project", "payload", "package", "rollback_from", "restart", "replicated",
    "deployment_timeout", "ignore_replication_errors", "status", "user", "since", "until",
    "limit", "offset", "cursor", "include_event_log", "deployment_id", "dry_run", "name",
    "url", "username", "password", "role", "active", "permission", "table", "key",
]  # fmt: skip


# The fields each operation reads, so plausible bodies get past "'x' is required".
_OP_FIELDS: dict[str, tuple[str, ...]] = {
    "deploy_component": ("project", "payload", "restart", "replicated"),
    "get_deployment": ("deployment_id",),
    "get_deployment_payload": ("deployment_id",),
    "delete_deployment_payload": ("deployment_id",),
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


def _strings(rng: random.Random) -> str:
    pool = [
        "", "web", "a" * 200, "x" * 5000, "../../etc/passwd", "/etc", "\x00", "\u202e",
        "é✓", "\ud800", "http://[::1", "http://127.0.0.1:1/p.tar.gz", "file:///etc/hosts",
        "wss://h:99999", "wss://127.0.0.1:1", "wss://[::1", "rolling", "immediate", "true",
        "0", "-1", "99999999999999999999999", "NaN", str(uuid.uuid4()),
        "00000000-0000-0000-0000-000000000000", "bob", "reader", "deployments", "users",
        "hdb_deployment", "success", "failed", "pending", "Basic", "%%%", "aGVsbG8=",
    ]  # fmt: skip
    if rng.random() < 0.2:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(1, 20)))
    return rng.choice(pool)


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 2 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 7, 100, 1001, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e308, 1.0, 3.0e9])
    if kind in (4, 5, 6):
        return _strings(rng)
    if kind == 7:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 8:
        return rng.randrange(-5, 2000)
    if kind == 9:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind == 10:
        return {"super_user": _value(rng, depth + 1), "operations": _value(rng, depth + 1)}
    return {_strings(rng): _value(rng, depth + 1) for _ in range(rng.randrange(0, 3))}


def _plausible(name: str, rng: random.Random, ids: list[str]) -> Any:
    """A value of the right type for ``name`` (so the fuzz also reaches the handlers)."""
    table: dict[str, Callable[[], Any]] = {
        "project": lambda: rng.choice(["web", "api", "a.b_c-d"]),
        "payload": lambda: rng.choice([component(), rng.randbytes(rng.randrange(0, 200))]),
        "rollback_from": lambda: rng.choice(ids),
        "deployment_id": lambda: rng.choice(ids),
        "restart": lambda: rng.choice([True, False, "rolling"]),
        "status": lambda: rng.choice(["success", "failed", "pending"]),
        "username": lambda: rng.choice(["bob", "carol"]),
        "password": lambda: rng.choice(["long-enough-password", "short"]),
        "role": lambda: rng.choice(["reader", "deployer", "missing"]),
        "permission": lambda: {"super_user": False, "operations": ["list_deployments"]},
        "table": lambda: rng.choice(["hdb_deployment", "users", "roles", "nope"]),
        "name": lambda: rng.choice(["n2", "n1"]),
        "url": lambda: rng.choice(["wss://127.0.0.1:9", "https://x"]),
    }
    if name in table:
        return table[name]()
    return rng.choice([True, False, 0, 1, 5, 1000, "x"])


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _scrub(value: Any, *, ints: bool = False) -> Any:
    """CBOR and MessagePack cannot carry lone surrogates (nor MessagePack huge ints)."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    if ints and isinstance(value, int) and not isinstance(value, bool):
        return max(-(2**63), min(value, 2**64 - 1))
    if isinstance(value, list):
        return [_scrub(v, ints=ints) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v, ints=ints) for k, v in value.items()}
    return value


def _raw_multipart(parts: list[tuple[str, bytes, bool]], rng: random.Random) -> tuple[str, bytes]:
    """A multipart/form-data body written by hand, so names and bytes can be anything."""
    boundary = "b" + rng.randbytes(8).hex()
    out = io.BytesIO()
    for name, data, is_file in parts:
        quoted = name.replace('"', "%22").encode("utf-8", "surrogatepass")
        out.write(f"--{boundary}\r\n".encode())
        out.write(b'Content-Disposition: form-data; name="' + quoted + b'"')
        out.write(b'; filename="x.tgz"\r\n' if is_file else b"\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    if rng.random() < 0.9:
        out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


def _encode(rng: random.Random, body: dict[str, Any]) -> tuple[str, bytes]:
    kind = rng.choice(["json", "json", "cbor", "msgpack", "multipart"])
    if kind == "json":
        text = json.dumps(_json_safe(body))
        if rng.random() < 0.05:
            text = text.replace("0.5", "NaN")
        if rng.random() < 0.05:
            text = text[: rng.randrange(len(text) + 1)]  # truncated
        return "application/json", text.encode("utf-8", "surrogatepass")
    if kind == "cbor":
        return "application/cbor", cbor2.dumps(_scrub(body))
    if kind == "msgpack":
        return "application/x-msgpack", msgpack.packb(_scrub(body, ints=True))
    payload = body.pop("payload", None)
    parts: list[tuple[str, bytes, bool]] = []
    for name, value in body.items():
        text = value if isinstance(value, str) else json.dumps(_json_safe(value))
        raw = text.encode("utf-8", "surrogatepass")
        parts.append((str(name), raw if rng.random() < 0.9 else raw + b"\xff", False))
    if payload is not None or rng.random() < 0.3:
        data = payload if isinstance(payload, bytes) else rng.randbytes(rng.randrange(0, 300))
        parts.append(("payload", data, True))
    return _raw_multipart(parts, rng)


async def test_fuzzed_bodies_never_get_a_500(aiohttp_client: Any, tmp_path: Path) -> None:
    """400 seeded bodies over every operation and encoding; ``FUZZ_SEED=n`` explores more."""
    api = await _app_api(aiohttp_client, make_config(tmp_path, limits={"max_body_bytes": 1 << 20}))
    _, good = await api.deploy("web", component())
    assert good["deployment_id"]
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "20240613")))
    names = registry().names()
    statuses: dict[int, int] = {}
    covered: set[str] = set()
    for i in range(400):
        # Every operation in turn; every tenth body has a nonsense operation instead.
        op: Any = names[i % len(names)] if i % 10 != 9 else _value(rng)
        covered.add(op if isinstance(op, str) else "")
        body: dict[str, Any] = {"operation": op}
        ids = [good["deployment_id"], str(uuid.uuid4())]
        plausible = rng.random() < 0.5
        fields = list(_OP_FIELDS.get(op, ())) if plausible and isinstance(op, str) else []
        fields += rng.sample(_FIELDS, rng.randrange(0, 4))
        for name in fields:
            body[name] = _plausible(name, rng, ids) if plausible else _value(rng)
        if rng.random() < 0.1:
            body[_strings(rng) or "x"] = _value(rng)
        ctype, data = _encode(rng, body)
        headers = {**AUTH, "Content-Type": ctype}
        resp = await api.client.post("/", data=data, headers=headers)
        raw = await resp.read()
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        assert resp.status < 500, (i, body, resp.status, raw[:300])
        if resp.status != 200 or resp.content_type == "application/json":
            assert resp.content_type == "application/json", (i, body, resp.status, raw[:300])
            json.loads(raw)
    # The admin is still there and still super: the fuzz never locked the node.
    status, _ = await api.op("list_users")
    assert status == 200
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 100, statuses
    assert set(names) <= covered


async def test_a_client_gone_while_its_row_is_written_still_ends_the_deploy(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client hangs up (its request is cancelled) just after the row exists and
    # before the deploy has a job to run it: the row must still end, failed.
    store = _services(api).store
    gate = asyncio.Event()
    real = store.create_deployment

    async def held(fields: dict[str, Any]) -> Any:
        d = await real(fields)
        await gate.wait()
        return d

    monkeypatch.setattr(store, "create_deployment", held)
    request = asyncio.ensure_future(
        _post_multipart(api, {"operation": "deploy_component", "project": "web"}, component())
    )
    deadline = asyncio.get_running_loop().time() + 10
    while not await store.deployments():
        assert asyncio.get_running_loop().time() < deadline, "no row was written"
        await asyncio.sleep(0.01)
    request.cancel()
    await asyncio.sleep(0.2)  # the server notices the hang-up and cancels the handler
    gate.set()
    while True:
        (row,) = await store.deployments()
        if row.terminal:
            break
        assert asyncio.get_running_loop().time() < deadline, row
        await asyncio.sleep(0.02)
    assert str(row.status) == "failed"
    assert row.error is not None and row.error["code"] == "upload_failed"
