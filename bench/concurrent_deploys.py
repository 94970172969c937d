#!/usr/bin/env python3
"""32 concurrent 10 MiB deploys to one node, against one deploy alone.

Question: does a node keep its speed when many deploys arrive at once? A lone node gets
``--concurrent`` streamed multipart deploys of ``--mib`` MiB at the same moment, each to
its own project (so none waits for another's project lock). Every one must succeed. The
figure is the aggregate throughput: all the bytes over the time from the first request
to the last answer. The baseline, measured in the same run on the same payload, is one
deploy alone (median of ``--repeat``), as MiB/s. Goal: aggregate at least 0.8x.

    .venv/bin/python bench/concurrent_deploys.py [--concurrent 32] [--mib 10] [--repeat 3]
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
    MiB,
    clean,
    client,
    deploy_file,
    lone_node,
    make_payload,
    median,
    verdict,
    wait_healthy,
)

GOAL = 0.8


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    payload = make_payload(work / "payloads" / f"p{args.mib}.tar.gz", args.mib * MiB)
    tiny = make_payload(work / "payloads" / "tiny.tar.gz", 4096)
    node = lone_node(work / "node")
    node.start()
    try:
        async with client() as s:
            await wait_healthy(s, [node])
            await deploy_file(s, node.admin_url, "warmup", tiny)
            singles: list[float] = []
            aggregates: list[float] = []
            walls: list[float] = []
            for r in range(args.repeat):
                secs, _ = await deploy_file(s, node.admin_url, f"alone-{r}", payload)
                singles.append(secs)
                started = time.perf_counter()
                answers = await asyncio.gather(
                    *(
                        deploy_file(s, node.admin_url, f"c{r}-{i:02d}", payload)
                        for i in range(args.concurrent)
                    ),
                    return_exceptions=True,
                )
                wall = time.perf_counter() - started
                failed = [a for a in answers if isinstance(a, BaseException)]
                if failed:
                    raise RuntimeError(f"{len(failed)} of {args.concurrent} failed: {failed[0]}")
                each = sorted(a[0] for a in answers if not isinstance(a, BaseException))
                walls.append(wall)
                aggregates.append(args.concurrent * args.mib / wall)
                print(f"  run {r + 1}: one alone {secs:6.2f} s ({args.mib / secs:6.1f} MiB/s); "
                      f"{args.concurrent} at once {wall:6.2f} s ({aggregates[-1]:6.1f} MiB/s "
                      f"aggregate; each {each[0]:.2f}..{each[-1]:.2f} s), all succeeded",
                      flush=True)  # fmt: skip
    finally:
        node.stop()
    one = args.mib / median(singles)
    agg = median(aggregates)
    ratio = agg / one
    print(f"\n{args.concurrent} x {args.mib} MiB, medians of {args.repeat}:")
    print(f"  {args.concurrent} concurrent deploys: {median(walls):6.2f} s, {agg:7.1f} MiB/s "
          "aggregate, all succeeded")  # fmt: skip
    print(f"  one deploy alone:         {median(singles):6.2f} s, {one:7.1f} MiB/s (baseline)")
    print(f"  ratio aggregate / one = {ratio:.2f}  (goal >= {GOAL}: {verdict(ratio >= GOAL)})")
    return {"aggregate_mib_s": agg, "one_mib_s": one, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrent", type=int, default=32)
    p.add_argument("--mib", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="work dir (kept; payloads reused)")
    p.add_argument("--json", action="store_true", help="print a JSON summary line last")
    args = p.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="cairn-bench-"))
    try:
        out = asyncio.run(run(args, work))
    finally:
        clean(work / "node")
        if args.dir is None:
            clean(work)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
