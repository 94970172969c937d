"""Shared parts of the benchmarks: payloads, real node processes, clusters, a client.

Nothing here is imported by the node. Every benchmark that uses it starts real
``cairn node run`` processes (a cluster is laid out by :mod:`node.cli.local.layout`,
exactly as ``cairn cluster up`` does, on free loopback ports), talks to them over
their admin API like an operator's client would, and stops them with SIGTERM.

With ``wire=True`` the nodes run through ``bench/wirenode.py``, which counts every
frame each node sends on the peer transport (a wrapping ``Transport``: see that file);
:meth:`LocalCluster.wire` reads the counters.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

MiB = 1 << 20
USER, PASSWORD = "admin", "bench-password-1"
ROOT = Path(__file__).resolve().parent.parent
WIRENODE = Path(__file__).resolve().parent / "wirenode.py"
#: Liveness tuned for loopback (peers notice each other quickly), as the tests do.
FAST_REPLICATION = "heartbeat_s = 0.5\ndead_after_s = 4.0\nreconnect_max_s = 0.5\n"


# -- statistics -----------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank (p99 of 1000 samples is the 990th)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))
    return float(s[k])


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# -- payloads -------------------------------------------------------------------------------


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


def make_payload(path: Path, size: int, *, file_bytes: int = 8 * MiB) -> Path:
    """A tar.gz of ``size`` random bytes (members of ``file_bytes``), streamed to disk.

    Random bytes do not compress: gzip level 0 writes what deflate would (stored
    blocks), only faster. Reused when it already exists with at least ``size`` bytes.
    """
    if path.exists() and path.stat().st_size >= size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with tarfile.open(tmp, "w:gz", compresslevel=0, copybufsize=MiB) as tf:
        index, left = 0, size
        while left > 0:
            n = min(left, file_bytes)
            info = tarfile.TarInfo(f"app/data-{index:04d}.bin")
            info.size, info.mode = n, 0o644
            tf.addfile(info, _Random(n))
            left -= n
            index += 1
    tmp.rename(path)
    return path


def component_payload(path: Path, files: dict[str, str], *, mode: int = 0o755) -> Path:
    """A small tar.gz holding ``files`` (name → text), e.g. a component.toml and a hook."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tf.addfile(info, io.BytesIO(data))
    return path


# -- processes ------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def proc_status(pid: int, field_name: str) -> int:
    """A ``/proc/<pid>/status`` figure in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


@dataclass
class NodeProc:
    """One node process: its name, admin URL, config and log."""

    name: str
    admin_url: str
    config: Path
    log_path: Path
    wire_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        env = {**os.environ, "CAIRN_ADMIN_PASSWORD": PASSWORD, **self.env}
        for name in ("CAIRN_CRASHPOINT", "CAIRN_FAULTS"):
            env.pop(name, None)
        if self.wire_file is not None:
            env["CAIRN_BENCH_WIRE_FILE"] = str(self.wire_file)
            cmd = [sys.executable, str(WIRENODE)]
        else:
            cmd = [sys.executable, "-m", "node"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "node", "run", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"node {self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def wire(self) -> dict[str, Any]:
        """The node's wire counters (``wirenode.py``): frames and bytes sent, by type."""
        assert self.wire_file is not None and self.proc is not None
        self.wire_file.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not self.wire_file.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.name} wrote no wire counters")
            time.sleep(0.01)
        return dict(json.loads(self.wire_file.read_text()))


def _toml_limits(max_payload: int) -> str:
    return (
        f"[limits]\nmax_payload_bytes = {max_payload}\nmax_body_bytes = {max_payload}\n"
        f"max_extracted_bytes = {max_payload * 2}\n"
    )


def lone_node(root: Path, *, max_payload: int = 2048 * MiB, extra_toml: str = "") -> NodeProc:
    """A standalone node (no cluster) under ``root``; not started."""
    root.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    config = root / "cairn.toml"
    config.write_text(
        f'[node]\nname = "lone"\ndata_dir = "{root / "data"}"\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[auth]\nbootstrap_user = "{USER}"\n' + _toml_limits(max_payload) + extra_toml
    )
    return NodeProc("lone", f"http://127.0.0.1:{port}", config, root / "node.log")


class LocalCluster:
    """``count`` clustered nodes under ``root`` (laid out like ``cairn cluster up``)."""

    def __init__(
        self,
        root: Path,
        count: int,
        *,
        wire: bool = False,
        max_payload: int = 2048 * MiB,
        extra_toml: str = "",
        replication_toml: str = "",
    ) -> None:
        from node.cli.local.layout import materialize, plan_cluster_ports

        ports = free_ports(2 * count)
        self.layout = plan_cluster_ports(root, ports[:count], ports[count:])
        extra = (
            "[replication]\n" + FAST_REPLICATION + replication_toml
            + _toml_limits(max_payload) + extra_toml
        )  # fmt: skip
        materialize(self.layout, extra_toml={n.name: extra for n in self.layout.nodes})
        self.nodes = [
            NodeProc(
                n.name,
                n.admin_url,
                n.config_path,
                n.log_path,
                wire_file=(n.root / "wire.json") if wire else None,
            )
            for n in self.layout.nodes
        ]

    def start(self) -> None:
        for n in self.nodes:
            n.start()

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            n.stop()

    def wire(self) -> dict[str, dict[str, Any]]:
        return {n.name: n.wire() for n in self.nodes}


# -- the client -----------------------------------------------------------------------------


def _auth() -> str:
    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def client(**kw: Any) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    return aiohttp.ClientSession(
        timeout=timeout, headers={"Authorization": _auth()},
        connector=aiohttp.TCPConnector(limit=0), **kw,
    )  # fmt: skip


async def op(session: aiohttp.ClientSession, url: str, operation: str, **fields: Any) -> Any:
    """One JSON operation that must answer 200; returns the body."""
    async with session.post(url + "/", json={"operation": operation, **fields}) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{url} {operation}: {resp.status} {body}")
        return body


async def wait_until(
    check: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Poll an async ``check`` until it returns something truthy (bench set-up only)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = await check()
        except (aiohttp.ClientError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def wait_healthy(session: aiohttp.ClientSession, nodes: Sequence[NodeProc]) -> None:
    async def ready(n: NodeProc) -> bool:
        n.check_alive()
        async with session.post(n.admin_url + "/", json={"operation": "list_roles"}) as resp:
            return resp.status == 200

    for n in nodes:
        await wait_until(lambda n=n: ready(n), timeout_s=60, what=f"{n.name} to serve")


async def wait_connected(session: aiohttp.ClientSession, nodes: Sequence[NodeProc]) -> None:
    names = {n.name for n in nodes}

    async def all_connected() -> bool:
        for n in nodes:
            st = await op(session, n.admin_url, "cluster_status")
            states = {p["name"]: p["state"] for p in st.get("peers", [])}
            if any(states.get(o) != "connected" for o in names - {n.name}):
                return False
        return True

    await wait_until(all_connected, timeout_s=60, what="the cluster to connect", interval_s=0.1)


async def deploy_file(
    session: aiohttp.ClientSession, url: str, project: str, path: Path, **fields: str
) -> tuple[float, dict[str, Any]]:
    """A multipart ``deploy_component`` streaming ``path`` (1 MiB reads); returns the
    seconds until the answer and the answer, which must be 200."""
    boundary = "cairn-bench-" + os.urandom(8).hex()
    parts = [("operation", "deploy_component"), ("project", project), *fields.items()]
    head = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in parts
        )
        + (
            f'--{boundary}\r\nContent-Disposition: form-data; name="payload"; '
            f'filename="{path.name}"\r\nContent-Type: application/gzip\r\n\r\n'
        ).encode()
    )
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        with path.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, MiB):
                yield chunk
        yield tail

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    started = time.perf_counter()
    async with session.post(url + "/", data=body(), headers=headers) as resp:
        answer = await resp.json()
        elapsed = time.perf_counter() - started
        if resp.status != 200:
            raise RuntimeError(f"deploy of {project} to {url}: {resp.status} {answer}")
    return elapsed, dict(answer)


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
