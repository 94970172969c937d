#!/usr/bin/env python3
"""A base64 ``payload`` in a JSON body against the same payload sent multipart.

Starts one real ``cairn node run`` process, warms it up, then deploys the same payload
(a tar.gz of incompressible bytes, default 20 MiB) alternately as a streamed multipart
form (the baseline) and as ``{"operation": "deploy_component", "payload": "<base64>"}``
in an ``application/json`` body, each ``--repeat`` times, and times each deploy from the
first byte sent to the answer (the client's base64 encoding is done beforehand and not
timed). It also records the node's peak RSS growth during each deploy.

Prints every run, the medians, and the ratio JSON / multipart of the median times; the
target is at most 1.5. ``--max-ratio`` turns that into an exit status.

Usage::

    .venv/bin/python bench/json_body.py                   # 20 MiB, 5 runs each
    .venv/bin/python bench/json_body.py --size-mib 64 --repeat 3 --max-ratio 1.5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upload_memory import PASSWORD, USER, MiB, Node, Sampler, deploy, make_payload


async def deploy_json(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url + "/", data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def _timed(node: Node, run: asyncio.Runner, coro: object) -> tuple[float, float]:
    baseline = node.status("VmRSS")
    sampler = Sampler(node)
    sampler.start()
    started = time.perf_counter()
    try:
        status, body = run.run(coro)  # type: ignore[arg-type]
    finally:
        peak = sampler.finish()
    seconds = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"deploy failed: {status} {body}")
    return seconds, (peak - baseline) / MiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=20, help="payload size in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="runs per encoding (medians)")
    parser.add_argument("--max-ratio", type=float, default=None, help="fail above this ratio")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cairn-bench-json-"))
    try:
        payload = make_payload(work / "payload.tar.gz", args.size_mib * MiB, 0)
        tiny = make_payload(work / "tiny.tar.gz", 4096, 0)
        raw = payload.read_bytes()
        body = json.dumps(
            {
                "operation": "deploy_component",
                "project": "bench-json",
                "payload": base64.b64encode(raw).decode(),
            }
        ).encode()
        size = len(raw)
        node = Node(work / "node", max_payload=max(4 * size, 64 * MiB))
        times: dict[str, list[float]] = {"multipart": [], "json": []}
        growth: dict[str, list[float]] = {"multipart": [], "json": []}
        try:
            with asyncio.Runner() as run:
                status, answer = run.run(deploy(node.url, "warmup", tiny))
                if status != 200:
                    raise RuntimeError(f"warm-up deploy failed: {status} {answer}")
                print(
                    f"payload {size / MiB:.1f} MiB; JSON body {len(body) / MiB:.1f} MiB; "
                    f"{args.repeat} runs each, alternating"
                )
                for i in range(args.repeat):
                    for kind in ("multipart", "json"):
                        coro = (
                            deploy(node.url, "bench-multipart", payload)
                            if kind == "multipart"
                            else deploy_json(node.url, body)
                        )
                        seconds, grew = _timed(node, run, coro)
                        times[kind].append(seconds)
                        growth[kind].append(grew)
                        print(
                            f"  run {i + 1} {kind:>9}: {seconds:6.3f} s "
                            f"({size / MiB / seconds:6.1f} MiB/s), RSS growth {grew:6.1f} MiB"
                        )
        finally:
            code = node.stop()
        if code != 0:
            raise RuntimeError(f"node exited with {code} on SIGTERM")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: statistics.median(v) for k, v in growth.items()}
    ratio = med["json"] / med["multipart"]
    print(f"\nmedians over {args.repeat} runs:")
    for kind in ("multipart", "json"):
        print(f"  {kind:>9}: {med[kind]:6.3f} s, RSS growth {mem[kind]:6.1f} MiB")
    print(f"ratio json / multipart = {ratio:.2f}  (target <= 1.5)")
    if args.max_ratio is not None and ratio > args.max_ratio:
        print(f"FAIL: ratio {ratio:.2f} > {args.max_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
