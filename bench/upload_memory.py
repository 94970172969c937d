#!/usr/bin/env python3
"""Peak RSS of a real ``cairn node run`` process while multipart deploys stream payloads.

For each payload size the benchmark starts a fresh node, warms it up with one tiny
deploy, records its resident set size, resets the kernel's high-water mark
(``/proc/<pid>/clear_refs``), streams one payload of that size through a multipart
``deploy_component`` from a streaming client, and reads the node's peak RSS (``VmHWM``,
cross-checked by polling ``VmRSS`` every 10 ms). Payloads are incompressible bytes in a
tar.gz written to disk in 1 MiB steps, so neither side ever holds one whole.

Stated baseline: memory is flat. The node streams the upload to the blob store in
bounded batches and extracts in bounded chunks, so the peak for 1 GiB must be within a
small, fixed number of MiB of the peak for 64 MiB (a proportional design would grow by
about the payload size). ``--max-growth-mib`` makes the script fail when the largest
size's median peak exceeds the smallest one's by more than that.

Usage::

    .venv/bin/python bench/upload_memory.py                      # 64 MiB and 1 GiB
    .venv/bin/python bench/upload_memory.py --sizes 16,128 --repeat 3 --max-growth-mib 48
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

MiB = 1 << 20
USER, PASSWORD = "admin", "bench-password-1"
_FILE_BYTES = 64 * MiB  # payload split into members of at most this size


# -- payloads -----------------------------------------------------------------------------


class _Random(io.RawIOBase):
    """``n`` incompressible bytes, produced 1 MiB at a time."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        take = min(self.left, MiB if size < 0 else size)
        self.left -= take
        return os.urandom(take)


def make_payload(path: Path, size: int, compresslevel: int) -> Path:
    """A tar.gz of ``size`` random bytes in members of up to 64 MiB, streamed to disk.

    Random bytes do not compress: deflate stores them whatever the level, so the default
    level 0 only skips a futile search (it is several times faster to write).
    """
    if path.exists() and path.stat().st_size >= size:
        return path
    tmp = path.with_suffix(".part")
    with tarfile.open(tmp, "w:gz", compresslevel=compresslevel, copybufsize=MiB) as tf:
        index = 0
        left = size
        while left > 0:
            n = min(left, _FILE_BYTES)
            info = tarfile.TarInfo(f"app/data-{index:03d}.bin")
            info.size = n
            info.mode = 0o644
            tf.addfile(info, _Random(n))
            left -= n
            index += 1
    tmp.rename(path)
    return path


# -- the node -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One ``cairn node run`` process with its own config and data dir."""

    def __init__(self, root: Path, max_payload: int) -> None:
        self.root = root
        self.port = _free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "cairn.toml"
        self.config.write_text(
            f'[node]\nname = "bench"\ndata_dir = "{root / "data"}"\n'
            f'[admin]\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'[auth]\nbootstrap_user = "{USER}"\n'
            f"[limits]\nmax_payload_bytes = {max_payload}\n"
            f"max_extracted_bytes = {max_payload * 2}\n"
        )
        self.log = (root / "node.log").open("ab")
        env = {**os.environ, "CAIRN_ADMIN_PASSWORD": PASSWORD}
        env.pop("CAIRN_CRASHPOINT", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "node", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}; see {root}/node.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node did not become healthy; see {root}/node.log")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def status(self, field: str) -> int:
        """A ``/proc/<pid>/status`` figure in bytes (``VmRSS``, ``VmHWM``)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def reset_peak(self) -> bool:
        """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` value 5)."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


class Sampler(threading.Thread):
    """Polls the node's ``VmRSS`` until stopped; keeps the maximum."""

    def __init__(self, node: Node, interval_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.interval_s = interval_s
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.peak = max(self.peak, self.node.status("VmRSS"))
            except (OSError, KeyError):
                return
            self._done.wait(self.interval_s)

    def finish(self) -> int:
        self._done.set()
        self.join()
        return self.peak


# -- the streaming client -------------------------------------------------------------------


async def deploy(url: str, project: str, path: Path) -> tuple[int, dict[str, object]]:
    """Stream ``path`` as the ``payload`` part of a multipart deploy (chunked, 1 MiB steps)."""
    boundary = "cairn-bench-" + os.urandom(8).hex()
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="operation"\r\n\r\n'
        f"deploy_component\r\n--{boundary}\r\n"
        f'Content-Disposition: form-data; name="project"\r\n\r\n{project}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="payload"; '
        f'filename="{path.name}"\r\nContent-Type: application/gzip\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        with path.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, MiB):
                yield chunk
        yield tail

    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    headers = {
        "Authorization": f"Basic {token}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url + "/", data=body(), headers=headers) as resp,
    ):
        return resp.status, await resp.json()


# -- measurement ------------------------------------------------------------------------------


@dataclass
class Run:
    size_mib: int
    seconds: float
    baseline_mib: float
    peak_mib: float
    growth_mib: float
    hwm_reset: bool


def measure(size_mib: int, payload: Path, work: Path, tiny: Path) -> Run:
    node_dir = work / f"node-{size_mib}-{os.urandom(3).hex()}"
    node = Node(node_dir, max_payload=max(payload.stat().st_size * 2, 64 * MiB))
    try:
        status, body = asyncio.run(deploy(node.url, "warmup", tiny))
        if status != 200:
            raise RuntimeError(f"warm-up deploy failed: {status} {body}")
        baseline = node.status("VmRSS")
        reset = node.reset_peak()
        sampler = Sampler(node)
        sampler.start()
        started = time.monotonic()
        try:
            status, body = asyncio.run(deploy(node.url, "bench", payload))
        finally:
            polled = sampler.finish()
        seconds = time.monotonic() - started
        if status != 200:
            raise RuntimeError(f"deploy of {size_mib} MiB failed: {status} {body}")
        peak = max(polled, node.status("VmHWM") if reset else 0)
    finally:
        code = node.stop()
        shutil.rmtree(node_dir, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"node exited with {code} on SIGTERM")
    return Run(
        size_mib=size_mib,
        seconds=round(seconds, 2),
        baseline_mib=round(baseline / MiB, 1),
        peak_mib=round(peak / MiB, 1),
        growth_mib=round((peak - baseline) / MiB, 1),
        hwm_reset=reset,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,1024", help="payload sizes in MiB (comma list)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (medians shown)")
    parser.add_argument("--dir", type=Path, default=None, help="work dir (payloads are kept)")
    parser.add_argument("--compresslevel", type=int, default=0, help="gzip level of payloads")
    parser.add_argument(
        "--max-growth-mib",
        type=float,
        default=None,
        help="fail if the largest size's median peak exceeds the smallest's by more",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary line")
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    work = args.dir or Path(tempfile.mkdtemp(prefix="cairn-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    tiny = make_payload(work / "tiny.tar.gz", 4096, args.compresslevel)
    runs: list[Run] = []
    for size in sizes:
        started = time.monotonic()
        payload = make_payload(work / f"payload-{size}MiB.tar.gz", size * MiB, args.compresslevel)
        say(f"payload {size} MiB ready ({time.monotonic() - started:.1f} s): {payload}")
        for i in range(args.repeat):
            run = measure(size, payload, work, tiny)
            runs.append(run)
            say(
                f"  {size:>6} MiB run {i + 1}: {run.seconds:7.2f} s "
                f"({size / max(run.seconds, 1e-9):6.1f} MiB/s)"
                f"  baseline {run.baseline_mib:6.1f} MiB"
                f"  peak {run.peak_mib:6.1f} MiB  growth {run.growth_mib:6.1f} MiB"
            )
    medians = {
        size: {
            "peak_mib": statistics.median(r.peak_mib for r in runs if r.size_mib == size),
            "growth_mib": statistics.median(r.growth_mib for r in runs if r.size_mib == size),
            "seconds": statistics.median(r.seconds for r in runs if r.size_mib == size),
        }
        for size in sizes
    }
    small, large = sizes[0], sizes[-1]
    ratio = medians[large]["peak_mib"] / medians[small]["peak_mib"]
    delta = medians[large]["peak_mib"] - medians[small]["peak_mib"]
    say(f"\nmedians over {args.repeat} run(s) per size:")
    for size in sizes:
        m = medians[size]
        say(
            f"  {size:>6} MiB  peak {m['peak_mib']:6.1f} MiB  growth {m['growth_mib']:6.1f} MiB"
            f"  {m['seconds']:7.2f} s"
        )
    say(
        f"peak ratio {large} MiB / {small} MiB = {ratio:.3f}  (difference {delta:+.1f} MiB; "
        f"payload grew {large / small:.0f}x)"
    )
    say("baseline: flat memory, the difference small and bounded, not proportional")
    ok = args.max_growth_mib is None or delta <= args.max_growth_mib
    if args.max_growth_mib is not None:
        verdict = "within" if ok else "EXCEEDS"
        say(f"difference {delta:.1f} MiB {verdict} the bound of {args.max_growth_mib:g} MiB")
    if args.json:
        print(
            json.dumps(
                {
                    "runs": [asdict(r) for r in runs],
                    "medians": medians,
                    "ratio": ratio,
                    "difference_mib": delta,
                    "ok": ok,
                }
            )
        )
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
