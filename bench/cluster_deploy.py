#!/usr/bin/env python3
"""A multipart deploy to a 3-node cluster, against the same deploy to a lone node.

Question: how much longer does a cluster deploy take than a single-node one? The
figure is the time from the first request byte of a streamed multipart
``deploy_component`` to its answer, which comes once the deploy succeeded: every
expected node staged the release (fetched the blob, verified it, extracted it) and
activated it. The baseline, measured in the same run on the same payload file, is the
same request to a lone (non-clustered) node. Runs alternate between the two so that
load from other users of the machine hits both alike. Goal: at most 1.5x.

It also prints the event timeline of the median cluster run (milliseconds from the
deploy's start, as the origin recorded them), which shows whether the peers fetch and
stage while the origin stages, and how soon activation follows the last ``staged``.

    .venv/bin/python bench/cluster_deploy.py [--sizes 20,100] [--repeat 3] [--nodes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    LocalCluster,
    MiB,
    NodeProc,
    clean,
    client,
    deploy_file,
    lone_node,
    make_payload,
    median,
    op,
    verdict,
    wait_connected,
    wait_healthy,
)

GOAL = 1.5


def timeline(d: dict[str, Any]) -> list[str]:
    """The origin's events and each node's result, in ms from the deploy's start."""
    t0 = d["started_at"]
    lines = []
    for e in d.get("event_log", []):
        data = e["data"]
        if e["event"] == "phase":
            what = f"origin {data.get('phase')} {data.get('status')}"
        elif e["event"] == "peer":
            what = f"{data.get('node')} {data.get('status')} ({data.get('phase')})"
        elif e["event"] in ("finished", "deployment", "warning", "error"):
            what = f"{e['event']} {json.dumps(data)[:80]}"
        else:
            continue
        lines.append(f"    {e['t'] - t0:7d} ms  {what}")
    for r in d.get("peer_results", []):
        lines.append(
            f"    node {r.get('node')}: started {(r.get('started_at') or t0) - t0} ms, "
            f"completed {(r.get('completed_at') or t0) - t0} ms, {r.get('status')}"
        )
    return lines


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    # Fresh bytes for every run (the lone node and the cluster get the same file): a
    # payload a node already holds would not cross the wire again.
    payloads: dict[tuple[int, int], Path] = {}
    for size in sizes:
        started = time.monotonic()
        for i in range(args.repeat):
            path = work / "payloads" / f"p{size}-{i}.tar.gz"
            payloads[(size, i)] = make_payload(path, size * MiB)
        print(f"payloads {size} MiB x{args.repeat} ready ({time.monotonic() - started:.1f} s)")
    tiny = make_payload(work / "payloads" / "tiny.tar.gz", 4096)
    cluster = LocalCluster(work / "cluster", args.nodes)
    lone: NodeProc = lone_node(work / "lone")
    cluster.start()
    lone.start()
    out: dict[str, Any] = {"sizes": {}}
    try:
        async with client() as s:
            await wait_healthy(s, [*cluster.nodes, lone])
            await wait_connected(s, cluster.nodes)
            origin = cluster.nodes[0]
            await deploy_file(s, origin.admin_url, "warmup", tiny)
            await deploy_file(s, lone.admin_url, "warmup", tiny)
            for size in sizes:
                lone_s: list[float] = []
                cl_s: list[tuple[float, str]] = []
                for i in range(args.repeat):
                    path = payloads[(size, i)]
                    order = [("lone", lone), ("cluster", origin)]
                    if i % 2:
                        order.reverse()
                    for kind, target in order:
                        secs, body = await deploy_file(s, target.admin_url, f"b{size}x{i}", path)
                        if kind == "lone":
                            lone_s.append(secs)
                        else:
                            states = {r["node"]: r["status"] for r in body["peer_results"]}
                            if sorted(states) != sorted(n.name for n in cluster.nodes) or any(
                                v != "active" for v in states.values()
                            ):
                                raise RuntimeError(f"not active everywhere: {states}")
                            cl_s.append((secs, body["deployment_id"]))
                        print(f"  {size:4d} MiB run {i + 1} {kind:7s} {secs:7.3f} s")
                lone_m = median(lone_s)
                cl_m = median([x for x, _ in cl_s])
                ratio = cl_m / lone_m
                mid = sorted(cl_s)[len(cl_s) // 2][1]
                d = await op(s, origin.admin_url, "get_deployment", deployment_id=mid)
                print(f"\n  {size} MiB, medians of {args.repeat}:")
                print(f"    cluster of {args.nodes}: {cl_m:.3f} s  ({size / cl_m:.1f} MiB/s)")
                print(f"    lone node:        {lone_m:.3f} s  ({size / lone_m:.1f} MiB/s)")
                print(f"    ratio cluster / lone = {ratio:.2f}  (goal <= {GOAL}: "
                      f"{verdict(ratio <= GOAL)})")  # fmt: skip
                print(f"  timeline of the median cluster run ({mid}):")
                print("\n".join(timeline(d)))
                out["sizes"][size] = {"cluster_s": cl_m, "lone_s": lone_m, "ratio": ratio}
    finally:
        cluster.stop()
        lone.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20,100", help="payload sizes in MiB (comma list)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="work dir (kept; payloads reused)")
    p.add_argument("--json", action="store_true", help="print a JSON summary line last")
    args = p.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="cairn-bench-"))
    try:
        out = asyncio.run(run(args, work))
    finally:
        if args.dir is None:
            clean(work)
        else:
            clean(work / "cluster")
            clean(work / "lone")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
