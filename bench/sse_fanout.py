#!/usr/bin/env python3
"""500 Server-Sent-Event subscribers on one deploy: latency, order, memory.

Question: does live progress stay live when many clients watch one deploy? A lone node
deploys a component whose install hook waits until every subscriber is connected, then
prints ``--lines`` lines a few milliseconds apart (the node records them as ``install``
events, in batches). ``--subscribers`` clients follow the deploy with
``get_deployment`` and ``Accept: text/event-stream``. For every event a client gets,
the latency is its arrival time minus the event's ``t`` (when the node wrote it, as the
stored log says, in ms). Every client must get every event of the stored log exactly
once, in ``seq`` order, then ``done``.

Baseline, measured in the same run on the same kind of deploy: one subscriber alone.
Memory per subscriber is the node's RSS growth from before the subscribers connected to
when all of them were connected and had replayed the log, divided by their number.
Goals: every subscriber gets every event in order; p99 under 50 ms.

    .venv/bin/python bench/sse_fanout.py [--subscribers 500] [--lines 300]
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

import aiohttp
from benchlib import (
    clean,
    client,
    component_payload,
    deploy_file,
    lone_node,
    median,
    op,
    percentile,
    verdict,
    wait_healthy,
    wait_until,
)

GOAL_MS = 50.0

_HOOK = """\
import os, sys, time
go = {go!r}
while not os.path.exists(go):
    time.sleep(0.01)
for i in range({lines}):
    print(f"line {{i}} of the install hook", flush=True)
    time.sleep({gap})
"""


class Watcher:
    """One SSE subscriber. While the stream runs it only stamps and keeps each chunk
    (so the client's own parsing does not delay the arrival times of other streams);
    :meth:`parse` turns them into ``seq`` → arrival time afterwards."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.seqs: list[int] = []
        self.arrived: dict[int, float] = {}
        self.replayed = asyncio.Event()
        self.error: str | None = None
        self.done_at: float | None = None

    async def follow(self, s: aiohttp.ClientSession, url: str, deployment_id: str) -> None:
        body = {"operation": "get_deployment", "deployment_id": deployment_id}
        async with s.post(url + "/", json=body, headers={"Accept": "text/event-stream"}) as r:
            if r.status != 200:
                self.error = f"HTTP {r.status}"
                return
            async for data in r.content.iter_any():
                self.chunks.append((time.time(), data))
                if b"\nid: " in data or data.startswith(b"id: "):
                    self.replayed.set()  # the stored log is being replayed
                if b"event: done\n" in data or b"event: error\n" in data:
                    self.done_at = self.chunks[-1][0]
                    return

    def parse(self) -> None:
        buf = b""
        for now, data in self.chunks:
            buf += data
            *frames, buf = buf.split(b"\n\n")
            for frame in frames:
                self._frame(frame, now)

    def _frame(self, frame: bytes, now: float) -> None:
        seq, name = None, None
        for line in frame.split(b"\n"):
            if line.startswith(b"id: "):
                seq = int(line[4:])
            elif line.startswith(b"event: "):
                name = line[7:].decode()
        if name == "error":
            self.error = frame.decode(errors="replace")[:300]
        elif seq is not None:
            self.seqs.append(seq)
            self.arrived.setdefault(seq, now)


async def one_deploy(
    s: aiohttp.ClientSession,
    node_url: str,
    pid: int,
    work: Path,
    tag: str,
    n: int,
    lines: int,
    gap: float,
) -> dict[str, Any]:
    from benchlib import proc_status

    go = work / f"go-{tag}"
    go.unlink(missing_ok=True)
    payload = component_payload(
        work / f"sse-{tag}.tar.gz",
        {
            "component.toml": '[install]\ncommand = ["python3", "-u", "emit.py"]\n'
            "timeout_s = 600\n",
            "emit.py": _HOOK.format(go=str(go), lines=lines, gap=gap),
        },
    )
    project = f"sse-{tag}"
    deploy = asyncio.create_task(deploy_file(s, node_url, project, payload))

    async def started() -> str | None:
        page = await op(s, node_url, "list_deployments", project=project, limit=1)
        return page["deployments"][0]["deployment_id"] if page["deployments"] else None

    deployment_id = await wait_until(started, timeout_s=60, what="the deploy's row")
    before = proc_status(pid, "VmRSS")
    watchers = [Watcher() for _ in range(n)]
    tasks = [asyncio.create_task(w.follow(s, node_url, deployment_id)) for w in watchers]
    await asyncio.wait_for(asyncio.gather(*(w.replayed.wait() for w in watchers)), 120)
    after = proc_status(pid, "VmRSS")
    go_ms = time.time() * 1000
    go.write_text("go")
    await deploy
    await asyncio.wait_for(asyncio.gather(*tasks), 300)
    for w in watchers:
        w.parse()
    d = await op(s, node_url, "get_deployment", deployment_id=deployment_id)
    log = [(e["seq"], e["t"]) for e in d["event_log"]]
    want = [seq for seq, _ in log]
    emitted = dict(log)
    bad = [w for w in watchers if w.error or w.seqs != want]
    # Events written once the hook was let go are live for every subscriber (the
    # earlier ones were replayed from storage when it connected).
    latencies = [
        w.arrived[seq] * 1000 - emitted[seq]
        for w in watchers
        for seq, _ in log
        if seq in w.arrived and emitted[seq] >= go_ms
    ]
    # From the ``finished`` event's write to each stream's closing ``done`` (the final
    # view of the deploy every stream ends with).
    finished_t = next(t for seq, t in log if seq == want[-1])
    done_ms = [w.done_at * 1000 - finished_t for w in watchers if w.done_at is not None]
    return {
        "done_ms": done_ms,
        "subscribers": n,
        "events": len(want),
        "in_order_complete": len(watchers) - len(bad),
        "errors": [w.error for w in bad[:3]] + [str(w.seqs[:5]) for w in bad[:1]],
        "latencies_ms": latencies,
        "rss_per_subscriber_kib": (after - before) / n / 1024,
    }


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    node = lone_node(work / "node")
    node.start()
    try:
        async with client() as s:
            await wait_healthy(s, [node])
            base = await one_deploy(s, node.admin_url, node.pid, work, "one", 1, args.lines,
                                    args.gap)  # fmt: skip
            fan = await one_deploy(s, node.admin_url, node.pid, work, "fan", args.subscribers,
                                   args.lines, args.gap)  # fmt: skip
    finally:
        node.stop()
    print(f"{fan['events']} events per deploy ({args.lines} hook lines, {args.gap * 1000:.0f} ms "
          "apart, recorded in batches)")  # fmt: skip
    for r in (base, fan):
        lat = r["latencies_ms"]
        print(f"  {r['subscribers']:4d} subscriber(s): emit-to-receive p50 {median(lat):6.1f} ms, "
              f"p99 {percentile(lat, 0.99):6.1f} ms, max {max(lat):6.1f} ms (n={len(lat)}); "
              f"complete and in order: {r['in_order_complete']}/{r['subscribers']}")  # fmt: skip
        if r["errors"]:
            print(f"    first problems: {r['errors']}")
        print(f"    'finished' written to 'done' received: p50 {median(r['done_ms']):6.1f} ms, "
              f"p99 {percentile(r['done_ms'], 0.99):6.1f} ms")  # fmt: skip
    p99, p99_one = percentile(fan["latencies_ms"], 0.99), percentile(base["latencies_ms"], 0.99)
    ok_order = fan["in_order_complete"] == fan["subscribers"]
    print(f"  memory per subscriber: {fan['rss_per_subscriber_kib']:.1f} KiB")
    print(f"  ratio p99 {args.subscribers} / 1 = {p99 / max(p99_one, 0.1):.2f}")
    print(
        f"  every subscriber got every event in order: {verdict(ok_order)}; "
        f"p99 {p99:.1f} ms (goal < {GOAL_MS:g} ms: {verdict(p99 < GOAL_MS)})"
    )
    return {
        "p99_ms": p99, "p99_one_ms": p99_one, "p50_ms": median(fan["latencies_ms"]),
        "rss_per_subscriber_kib": fan["rss_per_subscriber_kib"], "in_order": ok_order,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=500)
    p.add_argument("--lines", type=int, default=150, help="hook output lines (events)")
    p.add_argument("--gap", type=float, default=0.005, help="seconds between hook lines")
    p.add_argument("--dir", type=Path, default=None, help="work dir (kept)")
    p.add_argument("--json", action="store_true", help="print a JSON summary line last")
    args = p.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="cairn-bench-"))
    work.mkdir(parents=True, exist_ok=True)
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
