#!/usr/bin/env python3
"""One large blob fetched between two nodes, against a raw TLS copy of the same bytes.

Question: how close does a peer blob transfer come to what the wire allows? Two
processes each run a :class:`~replication.service.ReplicationService` (real store, real
blob store, the production mutual-TLS WebSocket transport, certificates from a fresh
cluster CA). Node ``a`` holds the blob; node ``b`` connects and calls ``fetch`` on it;
the figure is the time from ``fetch`` to the blob verified (sha256 and size), fsynced and
renamed into ``b``'s store: everything the deploy code waits for.

Baseline, measured in the same run between two processes on the same bytes: a raw TLS
socket (the same certificates and TLS contexts, plain blocking ``ssl`` sockets, 1 MiB
``sendall``/``recv_into``) carrying the blob file from ``a``'s disk into a buffer on
``b``: the wire's limit, with nothing written or hashed. For reference it also measures
the same copy written to a file on ``b`` (no fsync, no hash). Runs alternate. Goal: the
peer transfer at least 0.7x the raw socket's MiB/s.

    .venv/bin/python bench/blob_transfer.py [--mib 1024] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import MiB, clean, free_ports, median, verdict

GOAL = 0.7
_BUF = MiB


def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# -- the roles (each runs in its own process) ------------------------------------------------


def _contexts(root: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext, Path]:
    from replication.sslctx import client_ssl_context, server_ssl_context

    certs = root / "certs" / name
    ca = root / "ca" / "ca.pem"
    return (
        server_ssl_context(certs / f"{name}.pem", certs / f"{name}.key", ca),
        client_ssl_context(certs / f"{name}.pem", certs / f"{name}.key", ca),
        ca,
    )


async def _service(root: Path, name: str, other: str, ports: dict[str, int], run: str) -> Any:
    from replication.channel import TlsTransport
    from replication.membership import PeerAddress
    from replication.service import ReplicationService
    from replication.session import Settings
    from replication.tls import cluster_id_for_ca
    from storage.blobs import BlobStore
    from storage.store import Store

    server, client, ca = _contexts(root, name)
    node_dir = root / f"{name}-{run}"
    store = await Store.open(node_dir / "cairn.db", node=name)
    blobs = BlobStore(root / f"{name}-blobs" if name == "a" else node_dir / "blobs")
    tune = json.loads(os.environ.get("CAIRN_BENCH_SETTINGS", "{}"))  # e.g. chunk_bytes
    settings = Settings(heartbeat_s=1.0, dead_after_s=10.0, reconnect_max_s=0.5, **tune)
    transport = TlsTransport(
        host="127.0.0.1", port=ports[name], server_ssl=server, client_ssl=client,
        limits=settings.limits,
    )  # fmt: skip
    service = ReplicationService(
        node=name, store=store, blobs=blobs, cluster_id=cluster_id_for_ca(ca.read_bytes()),
        peers=[PeerAddress(other, f"wss://127.0.0.1:{ports[other]}")], transport=transport,
        settings=settings,
    )  # fmt: skip
    return store, blobs, service


async def _role_serve(root: Path, ports: dict[str, int], run: str) -> None:
    store, _blobs, service = await _service(root, "a", "b", ports, run)
    await service.start()
    print("ready", flush=True)
    cpu = time.process_time()
    await asyncio.to_thread(sys.stdin.readline)  # until the parent says stop
    print(json.dumps({"cpu": time.process_time() - cpu}), flush=True)
    await service.stop()
    await store.close()


async def _role_fetch(root: Path, ports: dict[str, int], run: str, digest: str, size: int) -> None:
    store, blobs, service = await _service(root, "b", "a", ports, run)
    up = asyncio.Event()
    service.on_connected(lambda _peer: up.set())
    await service.start()
    await up.wait()
    finishing: list[float] = []
    finish = blobs.finish_partial

    async def timed_finish(h: str, n: int) -> Any:
        t0 = time.perf_counter()
        try:
            return await finish(h, n)
        finally:
            finishing.append(time.perf_counter() - t0)

    blobs.finish_partial = timed_finish  # type: ignore[method-assign]
    started, cpu = time.perf_counter(), time.process_time()
    await service.fetch(digest, size)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert blobs.has(digest) and blobs.size(digest) == size
    print(json.dumps({"seconds": elapsed, "cpu": cpu, "finish": sum(finishing)}), flush=True)
    await service.stop()
    await store.close()
    clean(root / f"b-{run}")


def _role_raw_serve(root: Path, port: int, path: Path) -> None:
    server, _client, _ca = _contexts(root, "a")
    with socket.create_server(("127.0.0.1", port)) as ls:
        print("ready", flush=True)
        conn, _ = ls.accept()
        cpu = time.process_time()
        with server.wrap_socket(conn, server_side=True) as tls, path.open("rb") as f:
            while data := f.read(_BUF):
                tls.sendall(data)
            tls.shutdown(socket.SHUT_WR)
        print(json.dumps({"cpu": time.process_time() - cpu}), flush=True)


def _role_raw_fetch(root: Path, port: int, size: int, out: Path | None) -> None:
    _server, client, _ca = _contexts(root, "b")
    buf = bytearray(_BUF)
    view = memoryview(buf)
    started, cpu = time.perf_counter(), time.process_time()
    got = 0
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client.wrap_socket(raw, server_hostname="a") as tls,
    ):
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if out else -1
        try:
            while got < size:
                n = tls.recv_into(buf)
                if not n:
                    break
                if fd >= 0:
                    os.write(fd, view[:n])
                got += n
        finally:
            if fd >= 0:
                os.close(fd)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if out is not None:
        out.unlink()
    assert got == size, (got, size)
    print(json.dumps({"seconds": elapsed, "cpu": cpu}), flush=True)


# -- the parent ---------------------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _expect_ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"server did not start: {line!r}")


def _result(p: subprocess.Popen[str], stdin: str | None = None) -> dict[str, float]:
    out, _ = p.communicate(stdin, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"role failed with {p.returncode}")
    return dict(json.loads(out.strip().splitlines()[-1]))


@dataclass
class Run:
    seconds: float
    cpu: float  # CPU seconds of both ends (all their threads) during the transfer
    finish: float = 0.0  # of ``seconds``: the final check, fsync and rename


def run_peer(root: Path, digest: str, size: int, run: int) -> Run:
    a, b = free_ports(2)
    ports = json.dumps({"a": a, "b": b})
    server = _spawn("serve", str(root), ports, str(run))
    try:
        _expect_ready(server)
        got = _result(_spawn("fetch", str(root), ports, str(run), digest, str(size)))
    finally:
        served = _result(server, "stop\n")
    return Run(got["seconds"], got["cpu"] + served["cpu"], got["finish"])


def run_raw(root: Path, path: Path, size: int, to_file: bool) -> Run:
    (port,) = free_ports(1)
    server = _spawn("raw-serve", str(root), str(port), str(path))
    try:
        _expect_ready(server)
        out = str(root / "raw-copy.bin") if to_file else ""
        got = _result(_spawn("raw-fetch", str(root), str(port), str(size), out))
    finally:
        served = _result(server)
    return Run(got["seconds"], got["cpu"] + served["cpu"])


def setup(root: Path, mib: int) -> tuple[str, int, Path]:
    """The CA, both certificates, and the blob stored in ``a``'s blob store."""
    from replication.tls import init_ca, issue_node_cert
    from storage.blobs import BlobStore

    init_ca(root / "ca")
    for name in ("a", "b"):
        issue_node_cert(root / "ca", root / "certs" / name, name, ["127.0.0.1"])
    src = root / f"blob-{mib}MiB.bin"
    if not src.exists() or src.stat().st_size != mib * MiB:
        with src.open("wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MiB))
    h = hashlib.sha256()
    with src.open("rb") as f:
        while data := f.read(8 * MiB):
            h.update(data)
    digest = h.hexdigest()
    blobs = BlobStore(root / "a-blobs")
    if not blobs.has(digest):
        asyncio.run(blobs.ingest_file(src, max_bytes=src.stat().st_size))
    return digest, mib * MiB, blobs.path(digest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--role":
        _quiet()
        role, rest = argv[1], argv[2:]
        root = Path(rest[0])
        if role == "serve":
            asyncio.run(_role_serve(root, json.loads(rest[1]), rest[2]))
        elif role == "fetch":
            asyncio.run(_role_fetch(root, json.loads(rest[1]), rest[2], rest[3], int(rest[4])))
        elif role == "raw-serve":
            _role_raw_serve(root, int(rest[1]), Path(rest[2]))
        elif role == "raw-fetch":
            _role_raw_fetch(root, int(rest[1]), int(rest[2]), Path(rest[3]) if rest[3] else None)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=1024, help="blob size in MiB")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="work dir (kept; the blob is reused)")
    p.add_argument("--json", action="store_true", help="print a JSON summary line last")
    args = p.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="cairn-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        digest, size, path = setup(root, args.mib)
        raw: list[Run] = []
        raw_file: list[Run] = []
        peer: list[Run] = []
        for i in range(args.repeat):
            raw.append(run_raw(root, path, size, to_file=False))
            raw_file.append(run_raw(root, path, size, to_file=True))
            peer.append(run_peer(root, digest, size, i))
            print(f"  run {i + 1}: raw TLS {args.mib / raw[-1].seconds:7.1f} MiB/s, raw TLS to "
                  f"file {args.mib / raw_file[-1].seconds:7.1f} MiB/s, peer fetch "
                  f"{args.mib / peer[-1].seconds:7.1f} MiB/s", flush=True)  # fmt: skip
    finally:
        if args.dir is None:
            clean(root)
        else:
            clean(root / "raw-copy.bin")
    gib = args.mib / 1024
    secs = {k: median([x.seconds for x in v]) for k, v in
            (("raw", raw), ("file", raw_file), ("peer", peer))}  # fmt: skip
    cpu = {k: median([x.cpu for x in v]) / gib for k, v in
           (("raw", raw), ("file", raw_file), ("peer", peer))}  # fmt: skip
    r, rf, pf = (args.mib / secs[k] for k in ("raw", "file", "peer"))
    ratio = pf / r
    print(f"\n{args.mib} MiB blob, medians of {args.repeat} (CPU: both ends, all threads):")
    print(f"  peer fetch (verified, fsynced, stored)  {pf:8.1f} MiB/s  {secs['peer']:6.2f} s"
          f"  CPU {cpu['peer']:5.2f} s/GiB")  # fmt: skip
    print(f"    of which the final check, fsync and rename: "
          f"{median([x.finish for x in peer]):.2f} s")  # fmt: skip
    print(f"  raw TLS socket copy (baseline)          {r:8.1f} MiB/s  {secs['raw']:6.2f} s"
          f"  CPU {cpu['raw']:5.2f} s/GiB")  # fmt: skip
    print(f"  raw TLS copy written to a file          {rf:8.1f} MiB/s  {secs['file']:6.2f} s"
          f"  CPU {cpu['file']:5.2f} s/GiB")  # fmt: skip
    print(f"  ratio peer / raw = {ratio:.2f}  (goal >= {GOAL}: {verdict(ratio >= GOAL)});"
          f" CPU ratio peer / raw = {cpu['peer'] / cpu['raw']:.2f}")  # fmt: skip
    if args.json:
        print(json.dumps({"peer_mib_s": pf, "raw_mib_s": r, "raw_file_mib_s": rf,
                          "ratio": ratio, "cpu_s_per_gib": cpu}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
