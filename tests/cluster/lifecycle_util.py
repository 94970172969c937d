"""Helpers for the deploy-lifecycle and replication-recovery cluster tests.

A tiny stdlib HTTP service to deploy under ``[run]`` (it answers ``/version`` with the
release it runs), a poller that samples every node's service while a deploy runs,
process-group checks for orphans, and read-only looks into a node's SQLite file (for
values the API does not show, such as a deployment's creation version).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import tar_gz

__all__ = [
    "MARKER",
    "Poller",
    "Sample",
    "db_rows",
    "group_exists",
    "group_members",
    "group_states",
    "http_json",
    "service_component",
]

#: A release's ``server.py`` in mode ``exit-where-marked`` exits at once on a node whose
#: data dir holds this file (releases live four levels below the data dir).
MARKER = "fail-run"

_SERVER = r"""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

here = os.path.dirname(os.path.abspath(__file__))
version = open(os.path.join(here, "version.txt")).read().strip()
mode = open(os.path.join(here, "mode.txt")).read().strip()
marker = os.path.join(os.environ["CAIRN_RELEASE_DIR"], "..", "..", "..", "..", "fail-run")
if mode == "exit" or (mode == "exit-where-marked" and os.path.exists(marker)):
    print("server: refusing to start (" + mode + ")", file=sys.stderr, flush=True)
    sys.exit(3)
info = {"version": version, "node": os.environ.get("CAIRN_NODE"),
        "deployment_id": os.environ.get("CAIRN_DEPLOYMENT_ID"), "pid": os.getpid()}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            status, body = (503, b"not yet\n") if mode == "never-ready" else (200, b"ok\n")
        else:
            status, body = 200, json.dumps(info).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
print("serving " + version + " on " + os.environ["PORT"], flush=True)
server.serve_forever()
"""


def service_component(
    version: str,
    *,
    mode: str = "ok",
    ready_timeout_s: float = 15,
    install: str | None = None,
) -> bytes:
    """A component whose ``[run]`` is a stdlib HTTP server on ``$PORT``.

    Args:
        version: what ``/version`` answers as ``version`` (also makes the bytes unique).
        mode: ``ok``; ``exit`` (exits at once everywhere); ``exit-where-marked`` (exits
            at once where the node's data dir holds :data:`MARKER`); ``never-ready``
            (serves, but ``/health`` answers 503 for ever).
        ready_timeout_s: the release's ``ready_timeout_s``.
        install: an optional ``[install]`` shell command.
    """
    toml = ""
    if install is not None:
        toml += f"[install]\ncommand = {json.dumps(install)}\ntimeout_s = 60\n"
    toml += (
        "[run]\n"
        'command = ["python3", "-u", "server.py"]\n'
        'ready_url = "http://127.0.0.1:${PORT}/health"\n'
        f"ready_timeout_s = {ready_timeout_s}\n"
        "stop_grace_s = 3\n"
    )
    return tar_gz(
        {"server.py": _SERVER, "version.txt": version, "mode.txt": mode, "component.toml": toml},
        top="app",
    )


def http_json(url: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """GET ``url``; the JSON body of a 200, else None (refused, error, timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            if r.status != 200:
                return None
            return dict(json.loads(r.read()))
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Sample:
    """One poll of one node's service: when it ran and what it answered."""

    node: str
    start: float
    end: float
    deployment_id: str | None  # None: not serving (refused, error, timeout)


@dataclass
class Poller:
    """Polls every node's service ``/version`` in its own thread until stopped.

    Each node has its own thread, so a slow answer from one does not delay the others.
    """

    ports: dict[str, int]
    interval_s: float = 0.02
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Poller:
        for node, port in self.ports.items():
            t = threading.Thread(target=self._poll, args=(node, port), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _poll(self, node: str, port: int) -> None:
        url = f"http://127.0.0.1:{port}/version"
        while not self._stop.is_set():
            start = time.monotonic()
            body = http_json(url, timeout_s=2.0)
            sample = Sample(node, start, time.monotonic(), body and body.get("deployment_id"))
            with self._lock:
                self.samples.append(sample)
            self._stop.wait(self.interval_s)

    def of(self, node: str) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.node == node]

    def outages_overlapping(self) -> list[tuple[Sample, Sample]]:
        """Pairs of failed polls of two different nodes whose time windows overlap:
        evidence that both were not serving at (nearly) the same moment."""
        with self._lock:
            failed = sorted((s for s in self.samples if s.deployment_id is None),
                            key=lambda s: s.start)  # fmt: skip
        pairs = []
        for i, a in enumerate(failed):
            for b in failed[i + 1 :]:
                if b.start > a.end:
                    break
                if b.node != a.node:
                    pairs.append((a, b))
        return pairs


def _group(pgid: int) -> dict[int, str]:
    """pid → state letter of every process in group ``pgid`` (from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:
            out[int(entry.name)] = fields[0]
    return out


def group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are alive (zombies do not count: where
    PID 1 does not reap, a killed orphan lingers as one)."""
    return sorted(pid for pid, state in _group(pgid).items() if state != "Z")


def group_states(pgid: int) -> set[str]:
    """The state letters of the processes in group ``pgid`` (``Z`` for a zombie)."""
    return set(_group(pgid).values())


def group_exists(pgid: int) -> bool:
    """Whether ``os.killpg(pgid, 0)`` finds the group (zombies included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def db_rows(data_dir: Path, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """Rows from a node's database, opened read-only (the node may be running)."""
    conn = sqlite3.connect(f"file:{data_dir / 'cairn.db'}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, tuple(params))]
    finally:
        conn.close()
