"""The peer port over real mutual TLS: who is refused, hostile frames, and port separation."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from helpers import make_config
from mesh import FAST, HASH, Mesh, Node, dump, wait_until
from structlog.testing import capture_logs

from node.app import create_app
from replication.channel import (
    Channel,
    ChannelClosed,
    DialError,
    TransportError,
    WebSocketChannel,
)
from replication.codec import FrameLimits, encode
from replication.handshake import client_hello
from replication.messages import (
    PROTOCOL_VERSION,
    Batch,
    Hello,
    LogRange,
    Refuse,
    Subscribe,
    Welcome,
    WireEntry,
)
from replication.session import CAPS
from replication.sslctx import client_ssl_context
from replication.tls import init_ca, issue_node_cert

# Frames up to 256 KiB here, so an oversize frame is cheap to send.
SMALL = replace(FAST, chunk_bytes=64 << 10, limits=FrameLimits(max_frame_bytes=256 << 10))


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(tmp_path, SMALL)
    try:
        yield m
    finally:
        await m.close()


@pytest.fixture
async def target(mesh: Mesh) -> Node:
    """Node ``a`` running, with ``b`` and ``c`` configured members that are not running."""
    a, _b, _c = await mesh.add("a", "b", "c")
    await mesh.start("a")
    await a.accounts.put_user("existing", password_hash=HASH, role="r", by="admin")
    return a


async def _snapshot(node: Node) -> tuple[Any, ...]:
    return (await dump(node.store), node.store.logs.positions())


def _refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] in ("peer_tls_refused", "peer_refused")]


async def _raw_dial(node: Node, ctx: ssl.SSLContext, path: str = "/cairn/peer/v1") -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{node.url}{path}", ssl=ctx, server_hostname=node.name)
        await ws.close()


# -- refused before anything is read --------------------------------------------------


async def _refused_at_tls(mesh: Mesh, target: Node, ctx: ssl.SSLContext, reason: str) -> None:
    before = await _snapshot(target)
    with capture_logs() as logs:
        with pytest.raises(aiohttp.ClientError):
            await _raw_dial(target, ctx)
        await wait_until(lambda: _refusals(logs), what="a refusal logged")
    assert reason in _refusals(logs)[0]["detail"]
    assert await _snapshot(target) == before
    assert target.svc.subscribers() == set()


async def test_client_without_certificate_is_refused(mesh: Mesh, target: Node) -> None:
    ctx = ssl.create_default_context(cafile=str(mesh.ca))
    await _refused_at_tls(mesh, target, ctx, "peer did not return a certificate")


async def test_certificate_from_another_ca_is_refused(
    mesh: Mesh, target: Node, tmp_path: Path
) -> None:
    init_ca(tmp_path / "rogue-ca")
    rogue = issue_node_cert(tmp_path / "rogue-ca", tmp_path / "rogue", "b", ["127.0.0.1"])
    ctx = client_ssl_context(rogue.cert, rogue.key, mesh.ca)
    await _refused_at_tls(mesh, target, ctx, "unable to get local issuer certificate")


async def test_expired_certificate_is_refused(mesh: Mesh, target: Node, tmp_path: Path) -> None:
    old = datetime.now(UTC) - timedelta(days=1)
    expired = issue_node_cert(mesh.ca_dir, tmp_path / "old", "b", ["127.0.0.1"], not_after=old)
    ctx = client_ssl_context(expired.cert, expired.key, mesh.ca)
    await _refused_at_tls(mesh, target, ctx, "certificate has expired")


async def _answer_to(mesh: Mesh, target: Node, name: str, hello: Hello) -> Any:
    transport = mesh.transport(mesh.issue(name))
    try:
        channel = await transport.dial(target.name, target.url)
        await channel.send(hello)
        return await channel.receive()
    finally:
        await transport.close()


@pytest.mark.parametrize(
    ("cert", "hello", "reason"),
    [
        ("n9", client_hello("n9", "{cid}", CAPS, "n9/" + "0" * 32), "'n9' is not a member"),
        ("b", client_hello("c", "{cid}", CAPS, "c/" + "0" * 32), "certificate is for 'b'"),
        (
            "b",
            client_hello("b", "0123456789abcdef", CAPS, "b/" + "0" * 32),
            "does not match this cluster",
        ),
        ("b", Hello(PROTOCOL_VERSION + 1, "{cid}", "b", CAPS, "b/" + "0" * 32), "not supported"),
    ],
    ids=["not-a-member", "hello-names-another-node", "other-cluster", "other-protocol"],
)
async def test_handshake_refusals(
    mesh: Mesh, target: Node, cert: str, hello: Hello, reason: str
) -> None:
    before = await _snapshot(target)
    hello = replace(hello, cluster_id=hello.cluster_id.replace("{cid}", mesh.cluster_id))
    with capture_logs() as logs:
        answer = await _answer_to(mesh, target, cert, hello)
    assert isinstance(answer, Refuse) and reason in answer.reason
    [line] = _refusals(logs)
    assert line["peer"] == cert and reason in line["reason"]
    assert await _snapshot(target) == before


async def test_dialler_checks_who_answers(mesh: Mesh, target: Node) -> None:
    transport = mesh.transport(mesh.issue("b"))
    try:
        with pytest.raises(DialError, match="not valid for 'c'"):
            await transport.dial("c", target.url)  # a's port, but c was meant
    finally:
        await transport.close()


# -- hostile frames -------------------------------------------------------------------


def _deep(levels: int) -> Any:
    data: Any = 1
    for _ in range(levels):
        data = [data]
    return data


HOSTILE_FROM_DIALLER = {
    "garbage": b"\xc1\xff\x00garbage",
    "oversize": b"\xc4" + b"\x00" * (300 << 10),
    "deep": msgpack.packb({"t": "credit", "batches": _deep(100)}),
    "unknown-type": msgpack.packb({"t": "exec", "cmd": "rm -rf /"}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FROM_DIALLER))
@pytest.mark.parametrize("when", ["first", "after-subscribe"])
async def test_hostile_frame_from_a_dialler_closes_the_channel(
    mesh: Mesh, target: Node, name: str, when: str
) -> None:
    before = await _snapshot(target)
    transport = mesh.transport(mesh.issue("b"))
    try:
        channel = await transport.dial("a", target.url)
        assert isinstance(channel, WebSocketChannel)
        if when == "after-subscribe":
            await channel.send(client_hello("b", mesh.cluster_id, CAPS, "b/" + "0" * 32))
            assert isinstance(await channel.receive(), Welcome)
            await channel.send(Subscribe(positions={}, scope="own", exclude=(), credit=1))
            while not isinstance(await channel.receive(), Batch):  # certificates first
                pass
        await channel.send_raw(HOSTILE_FROM_DIALLER[name])
        with pytest.raises(ChannelClosed):
            async with asyncio.timeout(5):
                while True:
                    await channel.receive()
    finally:
        await transport.close()
    await wait_until(lambda: not target.svc.subscribers(), what="session over")
    assert await _snapshot(target) == before


async def _fake_listener(
    mesh: Mesh, name: str, port: int, script: Callable[[Channel], Awaitable[None]]
) -> Any:
    """A node called ``name`` (real certificate) whose listener runs ``script``."""
    transport = mesh.transport(mesh.issue(name), port)

    async def accept(channel: Channel) -> None:
        hello = await channel.receive()
        assert isinstance(hello, Hello)
        await channel.send(
            Welcome(PROTOCOL_VERSION, mesh.cluster_id, name, CAPS, f"{name}/" + "f" * 32)
        )
        assert isinstance(await channel.receive(), Subscribe)
        await script(channel)

    await transport.start(accept)
    return transport


LOG_B = "b/" + "f" * 32
_ENTRY = WireEntry(LOG_B, 1, "b", "unsigned", b"\x9b\x01", b"")
HOSTILE_FROM_LISTENER: dict[str, bytes] = {
    # Structure the codec refuses, and batches apply refuses whole: the channel closes.
    "entry-outside-its-range": encode(Batch((LogRange(LOG_B, 5, 9, False),), (_ENTRY,), 0, 0)),
    "dense-range-missing-entries": encode(Batch((LogRange(LOG_B, 0, 3, False),), (_ENTRY,), 0, 0)),
    "garbage": b"\x92\x01",
    "deep": msgpack.packb({"t": "pong", "ts": _deep(100)}),
    "oversize": b"\xc4" + b"\x00" * (300 << 10),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FROM_LISTENER))
async def test_hostile_frame_from_a_listener_applies_nothing(
    mesh: Mesh, target: Node, name: str
) -> None:
    before = await _snapshot(target)

    async def script(channel: Channel) -> None:
        assert isinstance(channel, WebSocketChannel)
        await channel.send_raw(HOSTILE_FROM_LISTENER[name])
        with pytest.raises(ChannelClosed):
            await channel.receive()

    fake = await _fake_listener(mesh, "b", mesh.nodes["b"].port, script)
    try:

        async def refused() -> bool:
            peer = {p["name"]: p for p in (await target.svc.status())["peers"]}["b"]
            return "protocol error" in (peer["last_error"] or "")

        await wait_until(refused, what="a dropping b for a protocol error")
    finally:
        await fake.close()
    assert await target.accounts.get_user("mallory") is None
    assert await _snapshot(target) == before


async def test_silent_peer_is_disconnected(mesh: Mesh, target: Node) -> None:
    async def silent(channel: Channel) -> None:
        await asyncio.Event().wait()  # never answers a Ping

    fake = await _fake_listener(mesh, "b", mesh.nodes["b"].port, silent)
    try:
        await wait_until(lambda: "b" in target.svc.connected(), what="b connected")

        async def dropped() -> bool:
            peer = {p["name"]: p for p in (await target.svc.status())["peers"]}["b"]
            return "silent" in (peer["last_error"] or "")

        await wait_until(dropped, what="b dropped as silent")
    finally:
        await fake.close()


# -- port separation ------------------------------------------------------------------


async def test_peer_port_serves_nothing_else(mesh: Mesh, target: Node) -> None:
    certs = mesh.issue("b")
    ctx = client_ssl_context(certs.cert, certs.key, mesh.ca)
    before = await _snapshot(target)
    async with aiohttp.ClientSession() as session:
        for method, path in [("POST", "/"), ("GET", "/health"), ("GET", "/metrics"),
                             ("GET", "/cairn/peer/v1"), ("POST", "/cairn/peer/v1")]:  # fmt: skip
            async with session.request(
                method, f"{target.url.replace('wss', 'https')}{path}", ssl=ctx,
                server_hostname="a", json={"operation": "add_user"},
            ) as resp:  # fmt: skip
                assert resp.status == 404, (method, path)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await _raw_dial(target, ctx, path="/other")
    assert await _snapshot(target) == before


async def test_admin_port_has_no_websocket_route(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_config(tmp_path)))
    for path in ("/cairn/peer/v1", "/", "/health"):
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await client.ws_connect(path)
    frame = encode(client_hello("b", "0123456789abcdef", CAPS, "b/" + "0" * 32))
    resp = await client.post("/", data=frame, headers={"Content-Type": "application/x-msgpack"})
    assert resp.status in (400, 401)


async def test_peer_port_in_use_is_one_clear_error(mesh: Mesh, target: Node) -> None:
    transport = mesh.transport(mesh.issue("b"), target.port)

    async def accept(_channel: Channel) -> None:
        raise AssertionError("never accepts")

    with pytest.raises(TransportError, match=f"cannot listen on peer port 127.0.0.1:{target.port}"):
        await transport.start(accept)
    await transport.close()
