#!/usr/bin/env python3
"""A deploy to 3, 5 and 9 nodes on loopback: time, and what crosses the wire.

Question: does a cluster deploy stay cheap as the cluster grows? For each size a cluster
of real node processes is started through ``bench/wirenode.py``, which counts every
frame each node sends on its peer transport (a wrapping ``Transport``: frames and bytes
by type, and the change entries inside batches). Each run streams one ``--mib`` MiB
multipart deploy to ``n1`` and measures the time to its answer (every node staged and
active), then waits until the wire is quiet (no frame but heartbeats for a second) and
takes what every node sent since before the deploy. Heartbeats (ping/pong) are left out:
they depend on time, not on the deploy.

Printed per size (medians of ``--repeat``): the deploy time, bytes and frames on the
wire per deploy (blob chunks apart from the rest), and the change entries: how many the
deploy wrote (``written``, summed over every node's own log) and how many were sent.
Every entry has to reach the N-1 other nodes, so ``sent / (written x (N-1))`` is 1.0
exactly when no change crossed a link twice (relaying would make it larger). The
baseline is the 3-node cluster in the same run. Goals: bytes and frames grow linearly
with the nodes (per receiving node, flat) with no change crossing a link twice; the
9-node time at most 2x the 3-node time.

    .venv/bin/python bench/cluster_scale.py [--sizes 3,5,9] [--mib 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchlib import (
    LocalCluster,
    MiB,
    clean,
    client,
    deploy_file,
    make_payload,
    median,
    op,
    verdict,
    wait_connected,
    wait_healthy,
)

HEARTBEAT = ("ping", "pong")
TIME_GOAL = 2.0


def totals(wire: dict[str, dict[str, Any]]) -> tuple[Counter[str], Counter[str], int]:
    """Frames and bytes by type, and entries sent, summed over every node."""
    frames: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    entries = 0
    for w in wire.values():
        frames.update(w["frames"])
        nbytes.update(w["bytes"])
        entries += int(w["entries"])
    return frames, nbytes, entries


def without_heartbeats(c: Counter[str]) -> Counter[str]:
    return Counter({k: v for k, v in c.items() if k not in HEARTBEAT})


async def heads(s: Any, cluster: LocalCluster) -> int:
    """Entries written so far, summed over every node's own log."""
    total = 0
    for n in cluster.nodes:
        total += int((await op(s, n.admin_url, "cluster_status"))["head_seq"])
    return total


async def quiet(cluster: LocalCluster, settle_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """Wire counters once nothing but heartbeats was sent for ``settle_s``."""
    last = cluster.wire()
    calm_since = time.monotonic()
    deadline = time.monotonic() + 120
    while time.monotonic() - calm_since < settle_s:
        if time.monotonic() > deadline:
            raise TimeoutError("the wire never went quiet")
        await asyncio.sleep(0.25)
        now = cluster.wire()
        if without_heartbeats(totals(now)[0]) != without_heartbeats(totals(last)[0]):
            calm_since = time.monotonic()
        last = now
    return last


async def one_size(
    n: int, args: argparse.Namespace, work: Path, payloads: list[Path]
) -> dict[str, Any]:
    tiny = make_payload(work / "payloads" / "tiny.tar.gz", 4096)
    cluster = LocalCluster(work / f"c{n}", n, wire=True)
    cluster.start()
    runs = []
    try:
        async with client() as s:
            await wait_healthy(s, cluster.nodes)
            await wait_connected(s, cluster.nodes)
            origin = cluster.nodes[0]
            await deploy_file(s, origin.admin_url, "warmup", tiny)
            for r in range(args.repeat):
                before = await quiet(cluster)
                written0 = await heads(s, cluster)
                secs, body = await deploy_file(s, origin.admin_url, f"scale-{r}", payloads[r])
                states = {x["node"]: x["status"] for x in body["peer_results"]}
                if len(states) != n or set(states.values()) != {"active"}:
                    raise RuntimeError(f"not active everywhere: {states}")
                after = await quiet(cluster)
                written = await heads(s, cluster) - written0
                f0, b0, e0 = totals(before)
                f1, b1, e1 = totals(after)
                frames = without_heartbeats(f1 - f0)
                nbytes = without_heartbeats(b1 - b0)
                sent = e1 - e0
                runs.append({
                    "seconds": secs, "frames": sum(frames.values()),
                    "bytes": sum(nbytes.values()), "blob_bytes": nbytes["chunk"],
                    "row_bytes": sum(nbytes.values()) - nbytes["chunk"],
                    "row_frames": sum(frames.values()) - frames["chunk"],
                    "written": written, "sent": sent,
                    "dup": sent / max(1, written * (n - 1)), "by_type": dict(frames),
                })  # fmt: skip
                x = runs[-1]
                print(f"  {n} nodes run {r + 1}: {secs:6.2f} s, {x['bytes'] / MiB:7.1f} MiB "
                      f"and {x['frames']} frames on the wire, {written} entries written, "
                      f"{sent} sent (x{x['dup']:.2f} of once per link)", flush=True)  # fmt: skip
    finally:
        cluster.stop()
        clean(work / f"c{n}")
    keys = ("seconds", "frames", "bytes", "blob_bytes", "row_bytes", "row_frames", "written",
            "sent", "dup")  # fmt: skip
    out = {k: median([r[k] for r in runs]) for k in keys}
    out["by_type"] = runs[len(runs) // 2]["by_type"]
    return out


async def run(args: argparse.Namespace, work: Path) -> dict[int, dict[str, Any]]:
    # Fresh bytes for every run: a blob the nodes already hold would not cross again.
    payloads = [
        make_payload(work / "payloads" / f"p{args.mib}-{r}.tar.gz", args.mib * MiB)
        for r in range(args.repeat)
    ]
    sizes = [int(x) for x in args.sizes.split(",")]
    results = {n: await one_size(n, args, work, payloads) for n in sizes}
    base_n = sizes[0]
    base = results[base_n]
    print(f"\n{args.mib} MiB deploy, medians of {args.repeat} (per receiving node = / (N-1)):")
    print("  nodes   time  x3-node   MiB/deploy  MiB/recv   frames  frames/recv  rows KiB/recv"
          "  entries written  sent  x once")  # fmt: skip
    for n, r in results.items():
        k = n - 1
        print(f"  {n:5d} {r['seconds']:6.2f} {r['seconds'] / base['seconds']:8.2f} "
              f"{r['bytes'] / MiB:11.1f} {r['bytes'] / MiB / k:9.2f} {r['frames']:8.0f} "
              f"{r['frames'] / k:12.1f} {r['row_bytes'] / 1024 / k:14.1f} "
              f"{r['written']:16.0f} {r['sent']:5.0f} {r['dup']:7.2f}")  # fmt: skip
    for n, r in results.items():
        print(f"  frames by type, {n} nodes: {r['by_type']}")
    big = results[sizes[-1]]
    t_ratio = big["seconds"] / base["seconds"]
    per_recv = (big["bytes"] / (sizes[-1] - 1)) / (base["bytes"] / (base_n - 1))
    frames_recv = (big["frames"] / (sizes[-1] - 1)) / (base["frames"] / (base_n - 1))
    once = all(abs(r["dup"] - 1.0) < 0.05 for r in results.values())
    print(f"  time {sizes[-1]} / {base_n} nodes = {t_ratio:.2f} (goal <= {TIME_GOAL}: "
          f"{verdict(t_ratio <= TIME_GOAL)})")  # fmt: skip
    print(f"  bytes per receiving node, {sizes[-1]} / {base_n} nodes = {per_recv:.2f}; frames "
          f"per receiving node = {frames_recv:.2f} (linear growth: 1.0)")  # fmt: skip
    print(f"  every change crossed each link once: {verdict(once)}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="3,5,9")
    p.add_argument("--mib", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="work dir (kept; payloads reused)")
    p.add_argument("--json", action="store_true", help="print a JSON summary line last")
    args = p.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="cairn-bench-"))
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
