"""Certificate renewal picked up without a restart, and the expiry warning (issue 11)."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from helpers import Api, make_config, until_users_here
from procs import free_port

from node.app import create_app
from node.certwatch import CertWatch
from node.cluster import cluster_factory, load_signer
from node.config import PeerEntry
from replication.channel import TlsTransport
from replication.signing import Keyring, NodeSigner
from replication.sslctx import client_ssl_context, server_ssl_context
from replication.tls import init_ca, issue_node_cert
from storage.store import Store


async def test_a_renewed_certificate_is_used_without_a_restart(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    soon = datetime.now(UTC) + timedelta(days=5)
    files = issue_node_cert(tmp_path / "ca", tmp_path / "certs", "n1", ["127.0.0.1"],
                            not_after=soon)  # fmt: skip
    signer = NodeSigner.load(files.cert, files.key)
    store = await Store.open(tmp_path / "n1.db", node="n1", signer=signer)
    keyring = Keyring(ca.cert.read_bytes())
    keyring.add(signer.cert_der)
    transport = TlsTransport(
        host="127.0.0.1", port=0,
        server_ssl=server_ssl_context(files.cert, files.key, ca.cert),
        client_ssl=client_ssl_context(files.cert, files.key, ca.cert),
    )  # fmt: skip
    watch = CertWatch(node="n1", cert=files.cert, key=files.key, ca=ca.cert,
                      transport=transport, store=store, keyring=keyring)  # fmt: skip
    try:
        watch.load_expiry()
        assert await watch.check() is False  # first look: nothing changed
        (warning,) = watch.status()["warnings"]
        assert "expires in 5.0 days" in warning or "expires in 4.9 days" in warning
        old_key = store.signer.key_id

        renewed = issue_node_cert(tmp_path / "ca", tmp_path / "certs", "n1", ["127.0.0.1"],
                                  days=90, force=True)  # fmt: skip
        later = os.stat(renewed.cert).st_mtime + 5
        os.utime(renewed.cert, (later, later))
        assert await watch.check() is True
        assert store.signer.key_id != old_key and store.signer.key_id in keyring
        assert watch.status()["warnings"] == []
        # What this node writes from now on is signed with the new key.
        from storage.accounts import Accounts

        await Accounts(store).put_role("r", {"super_user": False, "operations": []}, by=None)
        row = await store.db.fetchone("SELECT key_id FROM roles WHERE role = 'r'")
        assert row is not None and row["key_id"] == store.signer.key_id
        assert await store.certs()  # kept for relaying after a restart
    finally:
        await transport.close()
        await store.close()


async def test_a_broken_renewal_is_refused_and_the_old_pair_stays(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    files = issue_node_cert(tmp_path / "ca", tmp_path / "certs", "n1", ["127.0.0.1"])
    signer = NodeSigner.load(files.cert, files.key)
    store = await Store.open(tmp_path / "n1.db", node="n1", signer=signer)
    transport = TlsTransport(
        host="127.0.0.1", port=0,
        server_ssl=server_ssl_context(files.cert, files.key, ca.cert),
        client_ssl=client_ssl_context(files.cert, files.key, ca.cert),
    )  # fmt: skip
    keyring = Keyring(ca.cert.read_bytes())
    watch = CertWatch(node="n1", cert=files.cert, key=files.key, ca=ca.cert,
                      transport=transport, store=store, keyring=keyring)  # fmt: skip
    try:
        await watch.check()
        other = issue_node_cert(tmp_path / "ca", tmp_path / "other", "n2", ["127.0.0.1"])
        files.cert.write_bytes(other.cert.read_bytes())  # a certificate for another node
        later = os.stat(files.cert).st_mtime + 5
        os.utime(files.cert, (later, later))
        assert await watch.check() is False
        assert store.signer.key_id == signer.key_id
    finally:
        await transport.close()
        await store.close()


async def test_health_is_liveness_and_ready_says_why_not(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    init_ca(tmp_path / "ca")
    files = issue_node_cert(tmp_path / "ca", tmp_path / "certs", "n1", ["127.0.0.1"])
    config = make_config(
        tmp_path,
        peer={"host": "127.0.0.1", "port": 0},
        tls={"ca": str(tmp_path / "ca" / "ca.pem"), "cert": str(files.cert),
             "key": str(files.key)},
        auth={"bootstrap_wait_s": 1.0},
    )  # fmt: skip
    gone = PeerEntry("n2", f"wss://127.0.0.1:{free_port()}")
    app = create_app(
        replace(config, peers=(gone,)), cluster_factory=cluster_factory,
        signer=load_signer(config),
    )  # fmt: skip
    api = Api(await aiohttp_client(app), app)
    resp = await api.client.get("/health")  # alive, whatever its peers do
    assert resp.status == 200 and (await resp.json())["node"] == "n1"
    resp = await api.client.get("/ready")
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "not_ready"
    assert any(r.startswith("peer n2 is ") for r in body["reasons"]), body
    # No user yet: it is created once n1 gives up waiting to catch up with n2.
    assert any(r.startswith("accounts: ") for r in body["reasons"]), body
    await until_users_here(api)
    assert await _admin(api)
    status, cluster = await api.op("cluster_status")
    assert status == 200 and cluster["cert_expires_at"] > 0 and cluster["warnings"] == []
    metrics = await (await api.client.get("/metrics")).text()
    assert "cairn_certificate_expiry_timestamp_seconds" in metrics
    assert "cairn_build_info{" in metrics


async def _admin(api: Api) -> bool:
    return (await api.op("list_roles"))[0] == 200
