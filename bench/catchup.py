"""How fast does a node catch up on a peer's change log, end to end?

Question: when a node returns and pulls N changes from a peer over the real peer
channel (mutual TLS, WebSocket, msgpack frames, credit flow control, one transaction per
batch), how close does it get to the speed of applying the same changes locally?

Baseline, measured in the same run on the same changes: ``storage.apply.apply_batch``
of the source's log (read with ``read_log``, 500 entries a batch) into a fresh store,
with no network at all. The ratio end-to-end / apply-only is what the channel costs.

    .venv/bin/python bench/catchup.py [--changes 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import tempfile
import time
from pathlib import Path

import structlog

from replication.channel import TlsTransport
from replication.membership import PeerAddress
from replication.service import ReplicationService
from replication.session import Settings
from replication.sslctx import client_ssl_context, server_ssl_context
from replication.tls import cluster_id_for_ca, init_ca, issue_node_cert
from storage.accounts import Accounts
from storage.apply import Range, apply_batch
from storage.blobs import BlobStore
from storage.store import Store


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _source(root: Path, count: int) -> Store:
    store = await Store.open(root / "a" / "cairn.db", node="a")
    accounts = Accounts(store)
    for i in range(count):  # user rows: replicated like any row, and they dial nobody
        await accounts.put_user(f"u{i}", password_hash="scrypt$x", role="reader", by="bench")
    return store


async def _apply_only(root: Path, source: Store, run: int) -> float:
    log_id, head = source.log_id, source.logs.own_head
    chunks = []
    after = 0
    while after < head:
        chunk = await source.read_log(log_id, after, max_entries=500, max_bytes=1 << 30)
        chunks.append(chunk)
        after = chunk.last
    target = await Store.open(root / f"apply-{run}.db", node="c")
    started = time.perf_counter()
    for c in chunks:
        await apply_batch(
            target, "a", [Range(log_id, c.after, c.last, c.compacted)], c.entries,
            verifier=None, direct_log=log_id, max_clock_offset_ms=60_000,
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert target.logs.head(log_id) == head
    await target.close()
    return elapsed


async def _end_to_end(root: Path, source: Store, run: int) -> float:
    ca_dir = root / "ca"
    init_ca(ca_dir)
    ca = ca_dir / "ca.pem"
    cluster_id = cluster_id_for_ca(ca.read_bytes())
    ports = {"a": _port(), "b": _port()}
    target = await Store.open(root / f"b-{run}" / "cairn.db", node="b")
    stores = {"a": source, "b": target}
    services = []
    for name in ("a", "b"):
        certs = issue_node_cert(ca_dir, root / "certs", name, ["127.0.0.1"])
        other = "b" if name == "a" else "a"
        transport = TlsTransport(
            host="127.0.0.1",
            port=ports[name],
            server_ssl=server_ssl_context(certs.cert, certs.key, ca),
            client_ssl=client_ssl_context(certs.cert, certs.key, ca),
            limits=Settings().limits,
        )
        services.append(
            ReplicationService(
                node=name,
                store=stores[name],
                blobs=BlobStore(root / f"{name}-{run}-blobs"),
                cluster_id=cluster_id,
                peers=[PeerAddress(other, f"wss://127.0.0.1:{ports[other]}")],
                transport=transport,
                settings=Settings(),
            )
        )
    head = source.logs.own_head
    with target.feed.subscribe() as applied:
        started = time.perf_counter()
        for service in services:
            await service.start()
        while target.logs.head(source.log_id) < head:
            await applied.get(timeout_s=1.0)  # woken by each applied batch
        elapsed = time.perf_counter() - started
    for service in services:
        await service.stop()
    await target.close()
    return elapsed


async def _main(count: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = await _source(root, count)
        apply_s = [await _apply_only(root, source, run) for run in range(repeat)]
        e2e_s = [await _end_to_end(root, source, run) for run in range(repeat)]
        await source.close()
    a, e = statistics.median(apply_s), statistics.median(e2e_s)
    print(f"{count} changes, {repeat} runs, medians:")
    print(f"  apply only (no network)     {a:6.3f} s  {count / a:9.0f} changes/s")
    print(f"  end to end over mutual TLS  {e:6.3f} s  {count / e:9.0f} changes/s")
    print(f"  ratio end-to-end / apply-only = {e / a:.2f}")


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(_main(args.changes, args.repeat))


if __name__ == "__main__":
    main()
