"""How convergence time and traffic per deploy grow with the cluster (3 to 100 nodes).

For each size: a cluster of ``n`` nodes on the simulated network (no faults), connected
and idle; then deploys one after the other from ``n1`` (a 64 KiB payload, incompressible),
each measured from the request to the moment every node runs it and every node holds
the same state. Traffic is what crossed the network meanwhile, heartbeats (Ping/Pong)
counted apart since they are per link and per second, not per deploy. Entry deliveries
are counted per receiving node and entry, so the report shows whether any entry reached
a node more than once.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import checks
from .certs import Certs
from .history import History, _captured_logs, deterministic, sim_root
from .ops import deploy
from .payloads import tar_gz

__all__ = ["measure", "scale_report"]

_PAYLOAD_BYTES = 64 * 1024
_HEARTBEAT = ("ping", "pong")


class _Scale(History):
    """A history without a schedule: connect, then measured deploys."""

    def __init__(self, n: int, root: Path, certs: Certs, deploys: int) -> None:
        super().__init__(
            0, nodes=n, root=root, certs=certs, schedule=[], settle_max_s=0, kept=None,
            track_entries=True,
        )  # fmt: skip
        self.deploys = deploys
        self.rows: list[dict[str, Any]] = []

    async def main(self) -> None:
        import contextvars

        from storage.db import INLINE

        INLINE.set(True)
        self.loop_context = contextvars.copy_context()
        names = [f"n{i}" for i in range(1, self.n + 1)]
        for name in names:
            self.nodes[name] = self._node(name, names)
        for name in names:
            await self._start(self.nodes[name])
        t = self.loop.time()
        await self._until(self._all_connected, 600.0, "connected")
        connect_s = self.loop.time() - t
        await asyncio.sleep(10.0)  # idle: the first catch-up is over
        rng = random.Random("scale")
        origin = self.nodes["n1"]
        for i in range(self.deploys):
            payload = tar_gz({"app/data.bin": rng.randbytes(_PAYLOAD_BYTES)})
            before = _copy(self.net.stats)
            t = self.loop.time()
            task = origin.spawn(
                deploy(origin, "scale", payload=payload, timeout_ms=600_000), name="deploy"
            )
            outcome = await task
            acked_s = self.loop.time() - t
            deployment_id = outcome.deployment_id
            await self._converged(deployment_id)
            converged_s = self.loop.time() - t
            self.rows.append(
                _traffic(self.net.stats, before, self.n)
                | {
                    "answer": outcome.answer, "acked_s": acked_s, "converged_s": converged_s,
                    "connect_s": connect_s, "payload": len(payload), "deploy": i,
                }
            )  # fmt: skip

    def _node(self, name: str, names: list[str]) -> Any:
        from .node import SimNode

        return SimNode(self, name, names)

    async def _converged(self, deployment_id: str | None) -> None:
        while True:
            await asyncio.sleep(0.05)
            states = [await checks.read_state(n, with_digest=False) for n in self.live()]
            if not all(s.active.get("scale") == deployment_id and not s.running for s in states):
                continue
            heads = {repr(sorted(n.store.logs.positions().items())) for n in self.live()}
            if len(heads) == 1:
                return


def _copy(stats: Any) -> dict[str, Any]:
    return {
        "frames": Counter(stats.frames), "bytes": Counter(stats.bytes),
        "deliveries": Counter(stats.deliveries), "chunk_bytes": stats.chunk_bytes,
        "entries": stats.entries_sent,
    }  # fmt: skip


def _traffic(stats: Any, before: dict[str, Any], n: int) -> dict[str, Any]:
    frames = stats.frames - before["frames"]
    sent = stats.bytes - before["bytes"]
    beats = sum(sent[k] for k in _HEARTBEAT)
    deliveries = stats.deliveries - before["deliveries"]
    unique = len(deliveries)
    per_node: Counter[str] = Counter()
    for (node, _log, _oseq), count in deliveries.items():
        per_node[node] += count
    return {
        "frames": sum(frames.values()) - sum(frames[k] for k in _HEARTBEAT),
        "bytes": sum(sent.values()) - beats,
        "heartbeat_bytes": beats,
        "batch_bytes": sent["batch"],
        "chunk_bytes": stats.chunk_bytes - before["chunk_bytes"],
        "entries": stats.entries_sent - before["entries"],
        "deliveries": sum(deliveries.values()),
        "unique_deliveries": unique,
        "max_per_node": max(per_node.values(), default=0),
    }


def measure(n: int, certs: Certs, *, deploys: int = 3) -> list[dict[str, Any]]:
    """Run the scale measurement for ``n`` nodes; one row per deploy."""
    root = Path(tempfile.mkdtemp(prefix=f"cairn-scale-{n}-", dir=sim_root()))
    h = _Scale(n, root, certs, deploys)
    started = time.perf_counter()
    try:
        with deterministic(0), _captured_logs(h):
            asyncio.set_event_loop(h.loop)
            try:
                try:
                    h.loop.run_until_complete(h.main())
                finally:
                    h.stop_everything()
                    h.loop.run_until_complete(h.teardown())
            finally:
                asyncio.set_event_loop(None)
                h.loop.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for row in h.rows:
        row["real_s"] = time.perf_counter() - started
        row["anomalies"] = list(h.result.anomalies)
    return h.rows


def scale_report(sizes: list[int], certs: Certs) -> str:
    """The table of :func:`measure` over ``sizes`` (the last deploy of each size)."""
    lines = [
        "| nodes | converge (s) | ack (s) | frames/deploy | KiB/deploy | blob KiB | "
        "entries/deploy | entries per node | deliveries / unique | KiB per node |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        rows = measure(n, certs)
        r = rows[-1]
        per_node_kib = r["bytes"] / 1024 / max(1, n - 1)
        lines.append(
            f"| {n} | {r['converged_s']:.2f} | {r['acked_s']:.2f} | {r['frames']} | "
            f"{r['bytes'] / 1024:.0f} | {r['chunk_bytes'] / 1024:.0f} | {r['entries']} | "
            f"{r['unique_deliveries'] / max(1, n - 1):.0f} | "
            f"{r['deliveries']}/{r['unique_deliveries']} | {per_node_kib:.0f} |"
        )
        print(lines[-1], f"({r['answer']}, {r['real_s']:.0f} s real)", flush=True)
    return "\n".join(lines)
