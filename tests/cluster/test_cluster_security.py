"""The peer channel and the admin API refuse what is not theirs, on real node processes.

Intruders talk to the nodes with their own ``ssl`` contexts and an aiohttp WebSocket
client: no cairn code is on their side but the codec that builds their frames. After
each attempt every node must hold exactly the state it held before.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from cluster_harness import ADMIN_PASSWORD, ADMIN_USER, Cluster, ClusterNode
from helpers import component

from replication.channel import PEER_PATH
from replication.codec import decode, encode
from replication.messages import (
    PROTOCOL_VERSION,
    Batch,
    Hello,
    LogRange,
    Subscribe,
    WireEntry,
)
from replication.tls import cluster_id_for_ca, init_ca, issue_node_cert

pytestmark = pytest.mark.cluster

_AUTH = "Basic " + base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()


def _snapshot(c: Cluster) -> dict[str, Any]:
    """What an intruder must not change: users, roles, members and deployments per node."""
    out = {}
    for n in c.running:
        users = n.ok("list_users")
        deployments = n.ok("list_deployments", limit=1000)
        out[n.name] = {
            "users": json.dumps(users, sort_keys=True),
            "deployments": sorted(d["deployment_id"] for d in deployments["deployments"]),
            "peers": sorted(p["name"] for p in n.status()["peers"]),
        }
    return out


def _client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca)
    ctx.check_hostname = False  # the intruder knows whom it dials; the test is the server
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _evil_changes() -> bytes:
    """A batch that would create a super user ``mallory`` if anyone applied it (sent the
    wrong way, by a dialler, and unsigned)."""
    log_id = "n1/" + "0" * 32
    body = msgpack.packb(
        [1, log_id, 1, "n1", "users", "mallory", 1 << 60, "upsert",
         {"username": "mallory", "role": "super_user", "password_hash": "x", "active": True,
          "deleted": False}, None, 1],
        use_bin_type=True,
    )  # fmt: skip
    entry = WireEntry(log_id, 1, "n1", "unsigned", body, b"")
    return encode(Batch((LogRange(log_id, 0, 1, False),), (entry,), 0, 0))


async def _intrude(
    node: ClusterNode, ctx: ssl.SSLContext, *, name: str, cluster_id: str
) -> list[str]:
    """Open the peer channel of ``node`` as ``name`` and try everything; return frame types.

    Raises:
        aiohttp.ClientError, OSError, ssl.SSLError: the channel could not be opened.
    """
    url = f"wss://127.0.0.1:{node.layout.peer_port}{PEER_PATH}"
    got: list[str] = []
    timeout = aiohttp.ClientTimeout(total=10)
    hello = encode(
        Hello(PROTOCOL_VERSION, cluster_id, name, ("changes", "blobs"), f"{name}/" + "0" * 32)
    )
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.ws_connect(url, ssl=ctx, server_hostname=node.name) as ws,
    ):
        for frame in (
            hello,
            encode(Subscribe(positions={}, scope="relay", exclude=(), credit=100)),
            _evil_changes(),
        ):
            try:
                await ws.send_bytes(frame)
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                break
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                got.append(decode(msg.data).TYPE)
    return got


@pytest.fixture(scope="module")
def pki(shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Intruders' certificates: another CA's, an expired one, and a non-member's."""
    root = tmp_path_factory.mktemp("intruders")
    ca_dir = shared_cluster.layout.ca_dir
    hosts = ("127.0.0.1",)
    init_ca(root / "other-ca")
    foreign = issue_node_cert(root / "other-ca", root / "foreign", "n2", hosts)
    past = datetime.now(UTC) - timedelta(days=1)
    expired = issue_node_cert(ca_dir, root / "expired", "n2", hosts, not_after=past)
    stranger = issue_node_cert(ca_dir, root / "stranger", "n9", hosts)
    return {
        "ca": shared_cluster.layout.ca_cert,
        "cluster_id": cluster_id_for_ca(shared_cluster.layout.ca_cert.read_bytes()),
        "foreign": foreign,
        "expired": expired,
        "stranger": stranger,
    }


@pytest.fixture
async def before_after(shared_cluster: Cluster) -> AsyncIterator[None]:
    before = _snapshot(shared_cluster)
    yield
    assert _snapshot(shared_cluster) == before
    for n in shared_cluster:
        assert "mallory" not in json.dumps(n.ok("list_users"))


@pytest.mark.parametrize(
    ("who", "logged"),
    [
        ("nobody", "peer did not return a certificate"),
        ("foreign", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
    ],
)
async def test_peers_without_a_valid_certificate_are_refused_at_tls(
    shared_cluster: Cluster, pki: dict[str, Any], before_after: None, who: str, logged: str
) -> None:
    if who == "nobody":
        ctx = _client_ctx(pki["ca"])
    else:
        files = pki[who]
        ctx = _client_ctx(pki["ca"], files.cert, files.key)
    for node in shared_cluster:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await _intrude(node, ctx, name="n2", cluster_id=pki["cluster_id"])
    for node in shared_cluster:  # each node says why, in one line
        refusals = [line for line in node.log().splitlines() if "peer_tls_refused" in line]
        assert any(logged in line for line in refusals), (node.name, refusals)


async def test_a_valid_certificate_of_a_non_member_gets_only_a_refusal(
    shared_cluster: Cluster, pki: dict[str, Any], before_after: None
) -> None:
    files = pki["stranger"]
    ctx = _client_ctx(pki["ca"], files.cert, files.key)
    for node in shared_cluster:
        try:
            got = await _intrude(node, ctx, name="n9", cluster_id=pki["cluster_id"])
        except aiohttp.WSServerHandshakeError as e:
            assert e.status == 403  # refused before the WebSocket opened
            continue
        assert got == ["refuse"], got
    for node in shared_cluster:
        assert "node 'n9' is not a member of this cluster" in node.log()


async def test_a_member_certificate_claiming_another_name_is_refused(
    shared_cluster: Cluster, pki: dict[str, Any], before_after: None
) -> None:
    """n3's certificate with a Hello that says n1: the certificate wins, nothing is sent."""
    n3 = shared_cluster["n3"].layout
    ctx = _client_ctx(pki["ca"], n3.cert, n3.key)
    got = await _intrude(shared_cluster["n2"], ctx, name="n1", cluster_id=pki["cluster_id"])
    assert got == ["refuse"], got
    assert "hello names node 'n1' but the TLS certificate is for 'n3'" in shared_cluster["n2"].log()


async def test_the_admin_port_accepts_no_replication_traffic(
    shared_cluster: Cluster, pki: dict[str, Any], before_after: None
) -> None:
    node = shared_cluster["n1"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for path in (PEER_PATH, "/"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await session.ws_connect(node.url + path, headers={"Authorization": _AUTH})
            assert err.value.status in (404, 405)
        frames = [
            encode(
                Hello(PROTOCOL_VERSION, pki["cluster_id"], "n2", ("changes",), "n2/" + "0" * 32)
            ),
            _evil_changes(),
            msgpack.packb({"operation": "apply_changes", "changes": []}),
        ]
        for frame in frames:
            async with session.post(
                node.url + "/",
                data=frame,
                headers={"Content-Type": "application/x-msgpack", "Authorization": _AUTH},
            ) as resp:
                assert resp.status == 400, await resp.text()


async def test_the_peer_port_serves_no_admin_operations(
    shared_cluster: Cluster, pki: dict[str, Any], before_after: None
) -> None:
    """Even with a member's own certificate, the peer port answers no operation."""
    n1 = shared_cluster["n1"].layout
    ctx = _client_ctx(pki["ca"], n1.cert, n1.key)
    target = shared_cluster["n2"].layout
    body = {"operation": "add_user", "username": "mallory", "password": "x" * 12,
            "role": "super_user"}  # fmt: skip
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for method, path in (("POST", "/"), ("POST", PEER_PATH), ("GET", "/health"),
                             ("GET", "/metrics")):  # fmt: skip
            async with session.request(
                method, f"https://127.0.0.1:{target.peer_port}{path}", json=body, ssl=ctx,
                server_hostname="n2", headers={"Authorization": _AUTH},
            ) as resp:  # fmt: skip
                assert resp.status == 404, (method, path, resp.status)


def _post(node: ClusterNode, body: dict[str, Any]) -> tuple[int, Any]:
    """POST a raw JSON body (``NodeProcess.op`` would take ``password`` as its own)."""
    req = urllib.request.Request(
        node.url + "/", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": _AUTH},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_reserved_fields_are_refused_on_every_node(shared_cluster: Cluster) -> None:
    before = _snapshot(shared_cluster)
    payload = base64.b64encode(component()).decode()
    for node in shared_cluster:
        for fields in (
            {"operation": "deploy_component", "project": "evil", "payload": payload,
             "_replicated": True},
            {"operation": "deploy_component", "project": "evil", "payload": payload,
             "_origin": "n2", "_skip_record": True},
            {"operation": "add_user", "username": "mallory", "password": "x" * 12,
             "role": "super_user", "_peer": "n2"},
        ):  # fmt: skip
            code, body = _post(node, fields)
            assert code == 400 and body["code"] == "reserved_field", (node.name, body)
    assert _snapshot(shared_cluster) == before
