"""A malicious member with a valid certificate, speaking the real protocol (issue 8).

Node ``a`` is a real node (the whole app, real TLS). Member ``m`` is a fake listener with a
certificate the cluster CA issued: it serves ``a`` one batch of crafted entries, each
signed with ``m``'s own key. Every forgery must be refused or quarantined, counted and
shown, with nothing of it applied; every read operation must still answer; and ``m``'s
honest entries, sent after the bad ones in the same batch, must still apply.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ADMIN, Api
from mesh import FAST, HASH, Mesh, wait_until
from procs import free_port

from node.app import create_app
from node.appkeys import Services
from node.cluster import cluster_factory, load_signer
from node.config import parse_config
from replication.channel import Channel
from replication.messages import (
    PROTOCOL_VERSION,
    Batch,
    Certs,
    Hello,
    LogRange,
    Subscribe,
    Welcome,
    WireEntry,
)
from replication.session import CAPS
from replication.signing import NodeSigner
from storage.entries import Entry, encode_body, signing_message

LOG_M = "m/" + "1" * 32
LOG_B = "b/" + "2" * 32
LOG_C = "c/" + "3" * 32


def _deployment(origin: str, **over: Any) -> dict[str, Any]:
    now = 1_796_000_000_000
    row: dict[str, Any] = {
        "deployment_id": str(uuid.uuid4()), "project": "web", "kind": "deploy",
        "package_identifier": None, "payload_hash": "ab" * 32, "payload_size": 10,
        "status": "success", "phase": "activate", "expected_nodes": ["a", origin],
        "activate_nodes": ["a", origin], "origin_node": origin, "restart_mode": "immediate",
        "replicated": True, "ignore_replication_errors": False, "timeout_ms": 1000,
        "started_at": now, "completed_at": now + 5, "user": "admin", "rollback_of": None,
        "superseded_by": None, "error": None, "created_version": now << 16,
    }  # fmt: skip
    row.update(over)
    return row


class Forger:
    """Signs entries as ``m`` (its real key), for any log and claimed writer."""

    def __init__(self, signer: NodeSigner) -> None:
        self.signer = signer
        self.version = 1_796_000_000_000 << 16

    def entry(
        self, log_id: str, oseq: int, tbl: str, key: str, data: Any, *, op: str = "upsert"
    ) -> WireEntry:
        self.version += 1
        writer = log_id.partition("/")[0]
        body = encode_body(
            Entry(log_id, oseq, writer, tbl, key, self.version, op, data, None, 1_796_000_000_000)
        )
        sig = self.signer.sign(signing_message(body))
        return WireEntry(log_id, oseq, writer, self.signer.key_id, body, sig)


def _batch(forger: Forger, good: dict[str, Any]) -> tuple[Batch, dict[str, str]]:
    """The hostile batch, and what each entry of m's log is meant to be refused for."""
    bad_b = _deployment("b")
    bad_name = _deployment("m", project="../etc")
    bad_hash = _deployment("m", payload_hash="XYZ")
    rewritten = dict(good, user="mallory", payload_hash="cd" * 32)
    user = {"username": "honest", "password_hash": HASH, "role": "reader", "active": True,
            "deleted": False}  # fmt: skip
    mine = [
        ("deployments", bad_b["deployment_id"], bad_b, "upsert", "by their origin_node (b)"),
        ("deployments", bad_name["deployment_id"], bad_name, "upsert", "project name"),
        ("deployments", bad_hash["deployment_id"], bad_hash, "upsert", "sha256"),
        ("roles", "evil", {"role": "evil", "permission": 5, "deleted": False}, "upsert",
         "must be an object"),
        ("event_batches", f"{good['deployment_id']}/{10**15}",
         {"deployment_id": good["deployment_id"], "first_seq": 10**15, "last_seq": 10**15,
          "origin_node": "m", "events": [{"seq": 10**15, "t": 1, "event": "finished",
                                          "data": {}}]}, "append", "first_seq"),
        ("deployments", good["deployment_id"], good, "upsert", ""),
        ("deployments", good["deployment_id"], rewritten, "upsert", "never changes"),
        ("peer_cursors", "a", {"peer": "a", "seq": 10**9}, "upsert", "not replicated"),
        ("users", "honest", user, "upsert", ""),
    ]  # fmt: skip
    entries = [
        forger.entry(LOG_M, i, tbl, key, data, op=op)
        for i, (tbl, key, data, op, _why) in enumerate(mine, start=1)
    ]
    reasons = {f"{LOG_M}/{i}": why for i, (*_x, why) in enumerate(mine, start=1) if why}
    # Relayed: entries of b's log, but signed with m's key (m cannot sign as b).
    admin = {"username": "mallory", "password_hash": HASH, "role": "super_user",
             "active": True, "deleted": False}  # fmt: skip
    removal = {"name": "a", "url": "wss://127.0.0.1:1", "deleted": True}
    relayed = [
        forger.entry(LOG_B, 1, "users", "mallory", admin),
        forger.entry(LOG_C, 1, "members", "a", removal),
    ]
    batch = Batch(
        (
            LogRange(LOG_M, 0, len(entries), False),
            LogRange(LOG_B, 0, 1, False),
            LogRange(LOG_C, 0, 1, False),
        ),
        (*entries, *relayed),
        lag_entries=0,
        lag_bytes=0,
    )
    return batch, reasons


@pytest.fixture
async def node_a(aiohttp_client: Any, tmp_path: Path, mesh: Mesh) -> AsyncIterator[tuple[Api, int]]:
    """Node ``a`` (the whole app), and the port its member ``m`` is expected on."""
    ports = {"a": free_port(), "m": free_port(), "b": free_port()}
    certs = mesh.issue("a")
    config = parse_config(
        {
            "node": {"name": "a", "data_dir": str(tmp_path / "a")},
            "auth": {
                "bootstrap_user": ADMIN[0],
                "bootstrap_password": ADMIN[1],
                "bootstrap_wait_s": 0.5,
            },
            "peer": {"host": "127.0.0.1", "port": ports["a"]},
            "tls": {"ca": str(mesh.ca), "cert": str(certs.cert), "key": str(certs.key)},
            "peers": [{"name": n, "url": f"wss://127.0.0.1:{ports[n]}"} for n in ("m", "b")],
            "replication": {
                "heartbeat_s": FAST.heartbeat_s,
                "dead_after_s": FAST.dead_after_s,
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.3,
            },
        },
        base=tmp_path,
        env={},
    )
    app = create_app(config, cluster_factory=cluster_factory, signer=load_signer(config))
    yield Api(await aiohttp_client(app), app), ports["m"]


async def test_forged_and_invalid_changes_are_refused_and_honest_ones_apply(
    mesh: Mesh, node_a: tuple[Api, int]
) -> None:
    api, m_port = node_a
    m_certs = mesh.issue("m")
    forger = Forger(NodeSigner.load(m_certs.cert, m_certs.key))
    good = _deployment("m")
    batch, reasons = _batch(forger, good)
    served = asyncio.Event()

    async def accept(channel: Channel) -> None:
        hello = await channel.receive()
        assert isinstance(hello, Hello)
        await channel.send(Welcome(PROTOCOL_VERSION, mesh.cluster_id, "m", CAPS, LOG_M))
        assert isinstance(await channel.receive(), Subscribe)
        if not served.is_set():
            served.set()
            await channel.send(Certs((forger.signer.cert_der,)))
            await channel.send(batch)
        else:  # a later session: nothing more to send, as an honest member says it
            await channel.send(Batch((), (), lag_entries=0, lag_bytes=0))
        await asyncio.Event().wait()  # keep the session up; answer nothing else

    transport = mesh.transport(m_certs, m_port)
    await transport.start(accept)
    services = Services(api.app)
    try:
        store = services.store

        async def applied() -> bool:
            return store.logs.head(LOG_M) == 9

        await wait_until(applied, what="m's log taken to its end")
        rows = await store.db.fetchall("SELECT * FROM quarantine ORDER BY id")
        quarantined = {f"{r['log_id']}/{r['oseq']}": r["reason"] for r in rows}
        for key, why in reasons.items():
            assert why in quarantined.get(key, ""), (key, quarantined.get(key))
        refused = [r for r in rows if r["log_id"] in (LOG_B, LOG_C)]
        assert len(refused) == 2 and all("signature" in r["reason"] for r in refused)
        # Other nodes' logs never moved on m's word: the genuine entries can still come.
        assert store.logs.head(LOG_B) == 0 and store.logs.head(LOG_C) == 0

        # Nothing forged applied; the honest entries did.
        accounts = services.accounts
        assert await accounts.get_user("mallory") is None
        assert (await accounts.get_user("honest")) is not None
        assert await accounts.get_role("evil") is None
        assert (await accounts.get_member("a")) is None
        d = await store.get_deployment(good["deployment_id"])
        assert d is not None and d.user == "admin" and d.payload_hash == "ab" * 32
        assert [x.deployment_id for x in await store.deployments()] == [good["deployment_id"]]
        assert await store.events(good["deployment_id"]) == []

        # Every read still answers; the status shows what was refused.
        async def admin_ready() -> bool:
            return (await api.op("list_roles"))[0] == 200

        await wait_until(admin_ready, what="a's admin user (created once a caught up)")
        for op, fields in [
            ("list_deployments", {}), ("get_deployment", {"deployment_id": d.deployment_id}),
            ("list_users", {}), ("list_roles", {}), ("get_components", {}),
            ("read_audit_log", {"table": "users"}),
        ]:  # fmt: skip
            status, body = await api.op(op, **fields)
            assert status == 200, (op, body)
        status, cluster = await api.op("cluster_status")
        peer = {p["name"]: p for p in cluster["peers"]}["m"]
        assert peer["quarantined"] == len(reasons) and peer["refused"] == 2
        metrics = await (await api.client.get("/metrics")).text()
        assert "cairn_replication_quarantined_total" in metrics

        # m's own "finished" deploy was never staged here: a never runs it (there is no
        # blob to verify), and says so.
        async def says_so() -> bool:
            rows = [r for r in await store.components() if r["node"] == "a"]
            return bool(rows) and rows[0]["converged"] is False

        await wait_until(says_so, timeout_s=20, what="a reporting it cannot converge")
        assert services.ctx.components.current("web") is None
    finally:
        await transport.close()
