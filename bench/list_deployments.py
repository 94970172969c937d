#!/usr/bin/env python3
"""``list_deployments`` and ``get_deployment`` at 100,000 rows, against ``/health``.

Question: do the record's reads stay as cheap as the cheapest request the node answers
when the record is large? The rows are written through the store
(:meth:`storage.store.Store.put_row`: signed entries, audit lines, the same path a
deploy's row takes, a thousand to a transaction), with a result row each, spread over
``--projects`` projects, four statuses and five users, one per second of
``started_at``. Then a real node process serves that data directory, and one client
sends, interleaved: ``list_deployments`` with a project filter and ``limit=100``,
``/health``, and (for the record) ``get_deployment`` of a random row, the next page of a
list (its cursor) and a status filter. Each latency is client-side, request to parsed
answer. Goal: list p99 at most 2x ``/health`` p99 in the same run.

It also prints SQLite's ``EXPLAIN QUERY PLAN`` for the list queries (no ``SCAN`` of
the table, no temporary B-tree for the order).

    .venv/bin/python bench/list_deployments.py [--rows 100000] [--requests 1000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import (
    clean,
    client,
    lone_node,
    median,
    op,
    percentile,
    verdict,
    wait_healthy,
)

GOAL = 2.0
STATUSES = ("success", "success", "success", "failed", "rolled_back", "success")
USERS = ("admin", "alice", "bob", "carol", "deployer")


async def populate(data_dir: Path, rows: int, projects: int) -> None:
    """Write ``rows`` finished deployments (and a result each) through the store."""
    from storage.store import Store
    from storage.tables import DEPLOYMENTS, NODE_RESULTS

    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (set-up, nothing else runs)
    store = await Store.open(data_dir / "cairn.db", node="lone")
    rng = random.Random(1)
    t0 = int(time.time() * 1000) - rows * 1000
    started = time.monotonic()
    try:
        for first in range(0, rows, 1000):
            async with store.tx() as tx:
                for i in range(first, min(rows, first + 1000)):
                    did = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                    status = STATUSES[i % len(STATUSES)]
                    at = t0 + i * 1000
                    await store.put_row(
                        tx, DEPLOYMENTS,
                        {
                            "deployment_id": did, "project": f"project-{i % projects:03d}",
                            "kind": "deploy", "package_identifier": None,
                            "payload_hash": f"{rng.getrandbits(256):064x}",
                            "payload_size": 1000 + i, "status": status, "phase": "activate",
                            "expected_nodes": ["lone"], "activate_nodes": ["lone"],
                            "origin_node": "lone", "restart_mode": "immediate",
                            "replicated": True, "ignore_replication_errors": False,
                            "timeout_ms": 120_000, "started_at": at, "completed_at": at + 800,
                            "user": USERS[i % len(USERS)], "rollback_of": None,
                            "superseded_by": None,
                            "error": None if status == "success" else
                            {"message": "check hook exited with status 1", "code": "check_failed",
                             "phase": "check"},
                        },
                        user="admin", create=True,
                    )  # fmt: skip
                    await store.put_row(
                        tx, NODE_RESULTS,
                        {
                            "deployment_id": did, "node": "lone",
                            "status": "active" if status == "success" else "failed",
                            "phase": "activate", "error": None, "started_at": at,
                            "completed_at": at + 800, "late": False, "install_output": None,
                        },
                    )  # fmt: skip
            if first and first % 20_000 == 0:
                print(f"  {first} rows written ({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        await store.close()


def plans(db: Path, project: str) -> list[str]:
    """EXPLAIN QUERY PLAN of the queries list_deployments runs (as it builds them)."""
    from storage.listing import DeploymentFilter
    from storage.tables import DEPLOYMENTS

    clauses, params = DeploymentFilter(project=project).where()
    where = " AND ".join(clauses)
    cols = ", ".join(DEPLOYMENTS.cols)
    queries = {
        "count": (f"SELECT COUNT(*) AS n FROM deployments WHERE {where}", params),
        "page": (
            f"SELECT {cols} FROM deployments WHERE {where} "
            "ORDER BY started_at DESC, deployment_id DESC LIMIT ? OFFSET ?",
            [*params, 101, 0],
        ),
        "next page": (
            f"SELECT {cols} FROM deployments WHERE {where} AND "
            "(started_at, deployment_id) < (?, ?) "
            "ORDER BY started_at DESC, deployment_id DESC LIMIT ? OFFSET ?",
            [*params, 1 << 60, "z", 101, 0],
        ),
    }
    out = []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        for name, (sql, args) in queries.items():
            steps = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
            out.append(f"    {name:9s} {' | '.join(steps)}")
    return out


async def measure(url: str, ids: list[str], projects: int, n: int) -> dict[str, list[float]]:
    rng = random.Random(2)
    lat: dict[str, list[float]] = {k: [] for k in ("list", "health", "get", "next", "status")}
    async with client() as s:

        async def timed(kind: str, call: Any) -> Any:
            t = time.perf_counter()
            out = await call
            lat[kind].append(time.perf_counter() - t)
            return out

        async def health() -> None:
            async with s.get(url + "/health") as r:
                await r.read()
                assert r.status == 200

        for _ in range(20):  # warm up: connection, caches, first-use allocations
            await op(s, url, "list_deployments", project="project-000", limit=100)
            await health()
        for i in range(n):
            project = f"project-{rng.randrange(projects):03d}"
            page = await timed("list", op(s, url, "list_deployments", project=project, limit=100))
            assert len(page["deployments"]) == 100, len(page["deployments"])
            await timed("health", health())
            if i % 4 == 0:
                await timed("get", op(s, url, "get_deployment", deployment_id=rng.choice(ids)))
            elif i % 4 == 1 and page["next_cursor"]:
                await timed("next", op(s, url, "list_deployments", project=project, limit=100,
                                       cursor=page["next_cursor"]))  # fmt: skip
            elif i % 4 == 2:
                await timed("status", op(s, url, "list_deployments", status="failed", limit=100))
    return lat


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    node = lone_node(work / "node")
    data = work / "node" / "data"
    marker = work / f"rows-{args.rows}-{args.projects}.done"
    if not marker.exists():
        clean(data)
        print(f"writing {args.rows} rows through the store...", flush=True)
        started = time.monotonic()
        await populate(data, args.rows, args.projects)
        marker.write_text("ok")
        print(f"  done in {time.monotonic() - started:.0f} s")
    with sqlite3.connect(f"file:{data / 'cairn.db'}?mode=ro", uri=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT deployment_id FROM deployments")]
    node.start()
    try:
        async with client() as s:
            await wait_healthy(s, [node])
        lat = await measure(node.admin_url, ids, args.projects, args.requests)
        rss = node.rss()
    finally:
        node.stop()
    print("query plans (after the node migrated the database):")
    print("\n".join(plans(data / "cairn.db", "project-007")))
    ms = {k: (1000 * median(v), 1000 * percentile(v, 0.99)) for k, v in lat.items() if v}
    ratio = ms["list"][1] / ms["health"][1]
    print(f"\n{len(ids)} rows, {args.projects} projects, {args.requests} list requests "
          f"(node RSS {rss / (1 << 20):.0f} MiB):")  # fmt: skip
    names = {"list": "list_deployments project=, limit=100", "health": "/health (baseline)",
             "get": "get_deployment", "next": "list_deployments, next page (cursor)",
             "status": "list_deployments status=failed"}  # fmt: skip
    for k, (p50, p99) in ms.items():
        print(f"  {names[k]:40s} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  (n={len(lat[k])})")
    ok = verdict(ratio <= GOAL)
    print(f"  ratio list p99 / health p99 = {ratio:.2f}  (goal <= {GOAL}: {ok})")
    return {"ms": ms, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--projects", type=int, default=20)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--dir", type=Path, default=None, help="work dir (kept; rows reused)")
    p.add_argument("--json", action="store_true", help="print a JSON summary line last")
    args = p.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="cairn-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = asyncio.run(run(args, work))
    finally:
        if args.dir is None:
            clean(work)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
