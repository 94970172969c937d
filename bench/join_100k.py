#!/usr/bin/env python3
"""A node joining a cluster that holds 100,000 deploys: what it costs, against the state.

Questions (issue 14), each answered with a baseline measured in the same run:

1. **Join.** Node ``c`` joins a running cluster of ``a`` and ``b`` that holds N deploys
   (default 100,000) and runs until converged (every record of ``a`` and ``b`` held, every
   project on its desired release). Seconds, bytes received (counted by TCP proxies in
   front of ``a`` and ``b``, which ``c`` dials) and ``c``'s peak RSS, against copying the
   current rows alone: every current row of the replicated tables read from ``a``'s
   database, msgpack-encoded and inserted into a fresh database (time and encoded bytes).
   Goal: at most 3x.
2. **Change log.** ``a``'s change log right after the deploys, and after ``b`` caught up
   and a trim pass ran, against the current rows. Goal: only the untrimmed tail.
3. **Convergence per rescan.** One idle rescan (the reconciler's scan and a convergence
   of every project, nothing to do) at 1,000, 10,000 and N rows. Goal: independent of
   the row count.

The deploys are written through the store (``Store.create_deployment``,
``write_deployment``, ``put_result``: signed entries, envelopes, audit), all originated by
``a`` over 100 projects, each with a small real payload; every node stages and activates
the desired release of each project for real. ``b`` first catches up on ``a``'s whole log
(dense: it was a member from the start, so nothing was trimmed); then the log is trimmed,
``c`` is added as a member and joins (compacted: the current rows). Data lives under
``--dir`` (default a temp dir under /dev/shm when it exists, so fsync is not what is
measured); ``--keep`` keeps it. Generating 100,000 deploys takes a while (three store
transactions each); ``--cache DIR`` keeps the generated node ``a`` and reuses it.

    .venv/bin/python bench/join_100k.py [--deploys 100000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import io
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import msgpack
import structlog

from node.config import Limits
from node.deploy.components import Components
from node.deploy.context import DeployContext, SoloCluster
from node.deploy.convergence import converge
from node.deploy.reconciler import Reconciler
from replication.signing import NodeSigner
from replication.tls import init_ca, issue_node_cert
from storage.blobs import BlobStore
from storage.store import Store
from storage.tables import REPLICATED

PROJECTS = 100
USER, PASSWORD = "admin", "bench-password-1"
NODES = ("a", "b", "c")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- generating the deploys through the store --------------------------------------------


def _component(project: str) -> bytes:
    """The same bytes every time (gzip without a timestamp): cached nodes match."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        data = f"<p>{project}</p>\n".encode()
        info = tarfile.TarInfo("app/index.html")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def _one_deploy(store: Store, project: str, blob: tuple[str, int]) -> None:
    now = store.clock.now_ms()
    d = await store.create_deployment({
        "deployment_id": str(uuid.uuid4()), "project": project, "kind": "deploy",
        "package_identifier": None, "payload_hash": blob[0], "payload_size": blob[1],
        "status": "pending", "phase": "receive", "expected_nodes": ["a"],
        "activate_nodes": [], "origin_node": "a", "restart_mode": "immediate",
        "replicated": True, "ignore_replication_errors": False, "timeout_ms": 120_000,
        "started_at": now, "completed_at": None, "user": USER, "rollback_of": None,
        "superseded_by": None, "error": None,
    })  # fmt: skip
    await store.put_result(d.deployment_id, status="active", phase="activate",
                           started_at=now, completed_at=now)  # fmt: skip
    await store.write_deployment(
        d.deployment_id,
        {"status": "success", "phase": "activate", "activate_nodes": ["a"],
         "completed_at": store.clock.now_ms()},
        [("deployment", {"deployment_id": d.deployment_id, "project": project}),
         ("phase", {"phase": "receive", "status": "start"}),
         ("phase", {"phase": "receive", "status": "done"}),
         ("phase", {"phase": "extract", "status": "start"}),
         ("phase", {"phase": "activate", "status": "done"}),
         ("finished", {"status": "success"})],
    )  # fmt: skip


class _Inline(Reconciler):
    """The reconciler's scan, with the convergences it asks for run inline (timed)."""

    def __init__(self, ctx: DeployContext) -> None:
        super().__init__(ctx)
        self.asked: list[str] = []

    def converge_soon(self, project: str) -> None:
        self.asked.append(project)


async def _rescan(ctx: DeployContext) -> float:
    started = time.perf_counter()
    r = _Inline(ctx)
    await r.scan()
    for project in dict.fromkeys(r.asked):
        async with ctx.locks(project):
            await converge(ctx, project)
    return time.perf_counter() - started


async def _open(data: Path, tls: Path) -> tuple[DeployContext, dict[str, tuple[str, int]]]:
    """Node a's store and deploy context, and a small real payload per project."""
    signer = NodeSigner.load(tls / "a.pem", tls / "a.key")
    os.makedirs(data, exist_ok=True)
    store = await Store.open(data / "cairn.db", node="a", signer=signer)
    blobs = BlobStore(data / "blobs")
    ctx = DeployContext(
        node="a", store=store, blobs=blobs, components=Components(data / "components"),
        limits=Limits(), cluster=SoloCluster("a"), fetcher=SoloCluster("a"),
    )  # fmt: skip
    payloads = {}
    for i in range(PROJECTS):
        path = data.parent / f"p{i}.tar.gz"
        path.write_bytes(_component(f"p{i}"))
        info = await blobs.ingest_file(path, max_bytes=1 << 20)
        payloads[f"p{i}"] = (info.hash, info.size)
        path.unlink()
    return ctx, payloads


async def generate(data: Path, tls: Path, count: int) -> float:
    """Write ``count`` deploys on node a's store (then converge it once); seconds taken."""
    ctx, payloads = await _open(data, tls)
    started = time.perf_counter()
    for n in range(1, count + 1):
        await _one_deploy(ctx.store, f"p{n % PROJECTS}", payloads[f"p{n % PROJECTS}"])
        if n % 5000 == 0:
            rate = n / (time.perf_counter() - started)
            print(f"  generated {n:,} deploys ({rate:.0f}/s)", file=sys.stderr)
    generated_s = time.perf_counter() - started
    await _rescan(ctx)  # converge for real once: the node is then idle
    await ctx.store.close()
    return generated_s


async def rescan_time(data: Path, tls: Path, count: int | None = None) -> float:
    """Median of 5 idle rescans of node a at ``data`` (writing ``count`` deploys there
    first when given)."""
    if count is not None:
        await generate(data, tls, count)
    ctx, _ = await _open(data, tls)
    try:
        await _rescan(ctx)
        return statistics.median([await _rescan(ctx) for _ in range(5)])
    finally:
        await ctx.store.close()


# -- measuring a database -----------------------------------------------------------------


def _ro(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA query_only=ON")
    return conn


def log_figures(db: Path) -> dict[str, int]:
    """The change log and the current rows of a database: entries, rows and bytes."""
    with _ro(db) as conn:
        entries, entry_bytes = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(entry) + LENGTH(sig)), 0) FROM changelog"
        ).fetchone()
        rows = row_bytes = 0
        for spec in REPLICATED.values():
            n, b = conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(entry) + LENGTH(sig)), 0) FROM {spec.name}"
            ).fetchone()
            rows += n
            row_bytes += b
    return {"entries": entries, "entry_bytes": entry_bytes, "rows": rows,
            "row_entry_bytes": row_bytes}  # fmt: skip


def counts(db: Path) -> dict[str, int]:
    with _ro(db) as conn:
        out = {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("deployments", "event_batches")
        }
        out["results_ab"] = conn.execute(
            "SELECT COUNT(*) FROM node_results WHERE node IN ('a', 'b')"
        ).fetchone()[0]
        out["behind"] = conn.execute(
            "SELECT COUNT(*) FROM desired_releases d LEFT JOIN active_releases a "
            "ON a.project = d.project WHERE a.deployment_id IS NOT d.deployment_id"
        ).fetchone()[0]
    return out


def copy_rows(src: Path, dst: Path) -> tuple[float, int, int]:
    """The baseline: every current row of the replicated tables, read, msgpack-encoded
    and inserted into a fresh database. Returns (seconds, encoded bytes, rows)."""
    with _ro(src) as conn:
        schemas = {
            name: sql
            for name, sql in conn.execute("SELECT name, sql FROM sqlite_master WHERE type='table'")
        }
    started = time.perf_counter()
    size = rows = 0
    with _ro(src) as source, sqlite3.connect(dst, isolation_level=None) as target:
        target.execute("PRAGMA journal_mode=WAL")
        for spec in REPLICATED.values():
            target.execute(schemas[spec.name])
            cur = source.execute(f"SELECT * FROM {spec.name}")
            marks = ", ".join("?" for _ in cur.description)
            while batch := cur.fetchmany(5000):
                packed = [msgpack.packb(list(r), use_bin_type=True) for r in batch]
                size += sum(len(p) for p in packed)
                target.execute("BEGIN")
                target.executemany(
                    f"INSERT INTO {spec.name} VALUES ({marks})",
                    [msgpack.unpackb(p, raw=False) for p in packed],
                )
                target.execute("COMMIT")
                rows += len(batch)
    return time.perf_counter() - started, size, rows


# -- node processes -----------------------------------------------------------------------


class Proxy:
    """A TCP proxy that counts the bytes flowing from its upstream to its clients."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = _port()
        self.down = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # close() ends connections
            await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await r.read(1 << 16):
                    if count:
                        self.down += len(data)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(
            pipe(reader, up_w, False), pipe(up_r, writer, True), return_exceptions=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Node:
    def __init__(self, root: Path, name: str, tls: Path) -> None:
        self.name, self.root, self.tls = name, root / name, tls
        self.admin, self.peer = _port(), _port()
        self.data = self.root / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, peers: list[tuple[str, int]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = (
            f'[node]\nname = "{self.name}"\ndata_dir = "{self.data}"\n'
            f'[admin]\nhost = "127.0.0.1"\nport = {self.admin}\n'
            f'[peer]\nhost = "127.0.0.1"\nport = {self.peer}\n'
            f'[tls]\nca = "{self.tls / "ca.pem"}"\ncert = "{self.tls / (self.name + ".pem")}"\n'
            f'key = "{self.tls / (self.name + ".key")}"\n'
            f'[auth]\nbootstrap_user = "{USER}"\nbootstrap_wait_s = 5\n'
            "[replication]\nheartbeat_s = 1\ndead_after_s = 5\nreconnect_max_s = 0.5\n"
            "maintain_s = 2\n"
            "[storage]\nmin_free_bytes = 0\n"
        )
        for name, port in peers:
            text += f'[[peers]]\nname = "{name}"\nurl = "wss://127.0.0.1:{port}"\n'
        (self.root / "cairn.toml").write_text(text)

    def start(self) -> None:
        env = {**os.environ, "CAIRN_ADMIN_PASSWORD": PASSWORD}
        log = (self.root / "node.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "node", "run", "--config",
             str(self.root / "cairn.toml")],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        log.close()

    def op(self, operation: str, **fields: Any) -> tuple[int, Any]:
        body = json.dumps({"operation": operation, **fields}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}/", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        except (urllib.error.URLError, OSError):
            return 0, None

    def peak_rss(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _until(what: str, check: Any, timeout_s: float, interval_s: float = 0.5) -> float:
    """Poll ``check`` (sync) until true; returns when it became true (perf_counter)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        if await asyncio.to_thread(check):
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(interval_s)


def _caught_up(node: Node, want: dict[str, int], *, converged: bool = True) -> bool:
    """Whether ``node`` holds every record ``want`` counts (and, with ``converged``,
    runs the desired release of every project)."""
    try:
        got = counts(node.data / "cairn.db")
    except sqlite3.Error:
        return False
    return (
        got["deployments"] == want["deployments"]
        and got["event_batches"] == want["event_batches"]
        and got["results_ab"] >= want["results_ab"]
        and (got["behind"] == 0 or not converged)
    )


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tls = work / "tls"
    cached = args.cache / f"a-{args.deploys}" if args.cache else None
    reuse = cached is not None and (cached / "cairn.db").exists()
    if reuse:
        assert cached is not None
        shutil.copytree(cached.parent / f"tls-{args.deploys}", tls)  # a's key signed its log
    init_ca(tls)
    for name in NODES:
        issue_node_cert(tls, tls, name, ["127.0.0.1"], days=30)
    a, b, c = (Node(work, n, tls) for n in NODES)
    if reuse:
        assert cached is not None
        print(f"reusing generated node a from {cached}", file=sys.stderr)
        shutil.copytree(cached, a.data, symlinks=True)
        generate_s = json.loads((cached.parent / f"gen-{args.deploys}.json").read_text())
    else:
        print(f"generating {args.deploys:,} deploys on a (through the store)", file=sys.stderr)
        generate_s = await generate(a.data, tls, args.deploys)
        if cached is not None:
            shutil.copytree(a.data, cached, symlinks=True)
            shutil.copytree(tls, cached.parent / f"tls-{args.deploys}", dirs_exist_ok=True)
            (cached.parent / f"gen-{args.deploys}.json").write_text(json.dumps(generate_s))
    log_generated = log_figures(a.data / "cairn.db")
    rescans = {args.deploys: await rescan_time(a.data, tls)}
    for n in (1000, 10_000):
        if n < args.deploys:
            rescans[n] = await rescan_time(work / f"rescan-{n}" / "data", tls, n)
            shutil.rmtree(work / f"rescan-{n}")
    for n, t in sorted(rescans.items()):
        print(f"  idle rescan at {n:,} deploys: {t * 1000:.1f} ms", file=sys.stderr)

    a.write_config([("b", b.peer)])
    b.write_config([("a", a.peer)])
    a.start()
    b.start()
    try:
        want = counts(a.data / "cairn.db")
        b_started = time.perf_counter()
        b_done = await _until("b to catch up", lambda: _caught_up(b, want), args.timeout_s)
        dense_s = b_done - b_started
        print(f"  b caught up on a's whole log in {dense_s:.1f} s", file=sys.stderr)

        def trimmed() -> bool:
            return log_figures(a.data / "cairn.db")["entries"] < log_generated["entries"] // 10

        await _until("a to trim its change log", trimmed, 120)
        log_trimmed = log_figures(a.data / "cairn.db")

        # c joins: a member now, dialling a and b through byte-counting proxies.
        pa, pb = Proxy(a.peer), Proxy(b.peer)
        await pa.start()
        await pb.start()
        code, body = a.op("add_node", name="c", url=f"wss://127.0.0.1:{c.peer}")
        assert code == 200, body
        c.write_config([("a", pa.port), ("b", pb.port)])
        want = counts(a.data / "cairn.db")
        joined_at = time.perf_counter()
        c.start()
        rows_at = await _until(
            "c to hold every record",
            lambda: _caught_up(c, want, converged=False),
            args.timeout_s,
            interval_s=0.2,
        )
        rows_s, rows_bytes = rows_at - joined_at, pa.down + pb.down
        done = await _until("c to converge", lambda: _caught_up(c, want), args.timeout_s)
        join_s = done - joined_at
        join_bytes = pa.down + pb.down
        rss = c.peak_rss()
        print(f"  c converged in {join_s:.1f} s, {join_bytes:,} bytes", file=sys.stderr)
        await pa.close()
        await pb.close()
        copy_s, copy_bytes, copy_rows_n = copy_rows(a.data / "cairn.db", work / "copy.db")
    finally:
        for n in (c, b, a):
            n.stop()
    return {
        "deploys": args.deploys,
        "generate_s": generate_s,
        "dense_catch_up_s": dense_s,
        "join_rows_s": rows_s,
        "join_rows_bytes": rows_bytes,
        "join_s": join_s,
        "join_bytes": join_bytes,
        "join_peak_rss": rss,
        "copy_rows_s": copy_s,
        "copy_rows_bytes": copy_bytes,
        "copy_rows": copy_rows_n,
        "time_ratio": join_s / copy_s,
        "bytes_ratio": join_bytes / copy_bytes,
        "changelog_after_deploys": log_generated,
        "changelog_after_trim": log_trimmed,
        "rescan_s": rescans,
    }


def report(r: dict[str, Any]) -> str:
    mib = 1 << 20
    g, t = r["changelog_after_deploys"], r["changelog_after_trim"]
    lines = [
        f"deploys: {r['deploys']:,} (generated through the store in {r['generate_s']:.0f} s)",
        f"join (c, compacted catch-up until converged): {r['join_s']:.1f} s, "
        f"{r['join_bytes'] / mib:.1f} MiB received, peak RSS {r['join_peak_rss'] / mib:.0f} MiB",
        f"  of which every record held after {r['join_rows_s']:.1f} s, "
        f"{r['join_rows_bytes'] / mib:.1f} MiB (the rest: staging each project's release)",
        f"baseline (copy the {r['copy_rows']:,} current rows alone): {r['copy_rows_s']:.1f} s, "
        f"{r['copy_rows_bytes'] / mib:.1f} MiB",
        f"ratio join / copy: time {r['time_ratio']:.2f}x, bytes {r['bytes_ratio']:.2f}x "
        "(goal: at most 3x)",
        f"for comparison, b pulling a's dense log: {r['dense_catch_up_s']:.1f} s",
        f"change log on a after the deploys: {g['entries']:,} entries, "
        f"{g['entry_bytes'] / mib:.1f} MiB; current rows {g['rows']:,}, "
        f"{g['row_entry_bytes'] / mib:.1f} MiB",
        f"change log on a after catch-up and a trim pass: {t['entries']:,} entries, "
        f"{t['entry_bytes'] / mib:.2f} MiB (goal: only the untrimmed tail)",
        "idle rescan (scan + convergence of 100 projects), median of 5: "
        + ", ".join(f"{n:,} deploys {s * 1000:.1f} ms" for n, s in sorted(r["rescan_s"].items())),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deploys", type=int, default=100_000)
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    p.add_argument("--cache", type=Path, default=None, help="keep/reuse the generated node a")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--timeout-s", type=float, default=3600)
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = p.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    base = args.dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    work = Path(tempfile.mkdtemp(prefix="cairn-join-", dir=base))
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(run(args, work))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
