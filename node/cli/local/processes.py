"""Running a local cluster's node processes: start, wait until connected, stop.

Used by ``cairn cluster up`` and ``cairn demo``. Each node is a ``cairn node run``
process (the same Python interpreter) with its output appended to its ``node.log``. The
nodes run in their own process group, so a terminal's Ctrl-C reaches only the parent,
which then stops every node with SIGTERM and reports how each one ended. On Linux a node
also gets SIGTERM if the parent dies without stopping it, so nothing is left behind.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from node.cli.api.errors import ConnectError, describe_os_error
from node.cli.local.layout import ADMIN_USER, ClusterLayout, NodeLayout

__all__ = [
    "ClusterError",
    "LocalCluster",
    "NodeExit",
    "admin_op",
    "not_connected",
    "ports_in_use",
]

#: Environment prefixes that would override every node's config alike; nodes do not inherit them.
_SECTIONS = ("NODE", "ADMIN", "PEER", "TLS", "AUTH", "LIMITS", "DEPLOY", "REPLICATION", "RETENTION")
_CONFIG_ENV = tuple(f"CAIRN_{s}_" for s in _SECTIONS)


class ClusterError(Exception):
    """The local cluster cannot start or run; the message is one line for the operator."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class NodeExit:
    """How one node process ended."""

    name: str
    returncode: int

    def describe(self) -> str:
        if self.returncode == 0:
            return f"{self.name} stopped"
        if self.returncode < 0:
            return f"{self.name} ended by {signal.Signals(-self.returncode).name}"
        return f"{self.name} exited with code {self.returncode}"


def ports_in_use(layout: ClusterLayout) -> list[str]:
    """Every admin or peer port of the layout that cannot be bound now, described."""
    busy = []
    for n in layout.nodes:
        for what, port in (("admin", n.admin_port), ("peer", n.peer_port), ("app", n.app_port)):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((n.host, port))
                except OSError as e:
                    reason = "in use" if e.errno == errno.EADDRINUSE else e.strerror
                    busy.append(f"{n.host}:{port} ({n.name} {what} port) is {reason}")
    return busy


def admin_op(
    url: str,
    operation: str,
    *,
    user: str,
    password: str,
    timeout_s: float = 10.0,
    **fields: Any,
) -> tuple[int, Any]:
    """One JSON operation against a node's admin API.

    Returns:
        ``(http_status, parsed_body)``.

    Raises:
        ConnectError: the node cannot be reached, or did not answer in time (in words).
    """
    body = json.dumps({"operation": operation, **fields}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return int(r.status), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"null")
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}
    except (urllib.error.URLError, OSError) as e:
        raise ConnectError(f"cannot reach {url}: {describe_os_error(e)}") from e
    except ValueError as e:
        raise ConnectError(f"{url} answered something that is not JSON") from e


def not_connected(status: Mapping[str, Any], expected: set[str]) -> dict[str, str]:
    """Which expected peers a ``cluster_status`` answer does not show ``connected``.

    Returns:
        Peer name → a short reason (its state and last error, or "not listed").
    """
    seen = {p.get("name"): p for p in status.get("peers", []) if isinstance(p, dict)}
    missing: dict[str, str] = {}
    for name in sorted(expected):
        peer = seen.get(name)
        if peer is None:
            missing[name] = "not listed in cluster_status"
        elif peer.get("state") != "connected":
            reason = str(peer.get("state"))
            if peer.get("last_error"):
                reason += f", last error: {peer['last_error']}"
            missing[name] = reason
    return missing


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalCluster:
    """The node processes of one :class:`ClusterLayout`."""

    def __init__(
        self,
        layout: ClusterLayout,
        *,
        password: str,
        user: str = ADMIN_USER,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.layout = layout
        self.user = user
        self.password = password
        base = dict(os.environ if env is None else env)
        self._env = {k: v for k, v in base.items() if not k.startswith(_CONFIG_ENV)}
        self._env["CAIRN_ADMIN_PASSWORD"] = password
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_offsets: dict[str, int] = {}

    def start(self) -> None:
        """Start every node process (without waiting for anything)."""
        for n in self.layout.nodes:
            self.start_node(n)

    def start_node(self, n: NodeLayout) -> None:
        n.root.mkdir(parents=True, exist_ok=True)
        with n.log_path.open("ab") as log:
            self._log_offsets[n.name] = log.tell()
            # Each node's components get a port of their own (the example serves on it).
            env = {**self._env, "CAIRN_COMPONENTS_ENV": f"HELLO_PORT={n.app_port}"}
            self.procs[n.name] = subprocess.Popen(
                [sys.executable, "-m", "node", "node", "run", "--config", str(n.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
                preexec_fn=_die_with_parent,  # the CLI is single-threaded
            )

    def op(self, n: NodeLayout, operation: str, **fields: Any) -> tuple[int, Any]:
        """One operation on node ``n`` with the cluster's admin credentials."""
        return admin_op(n.admin_url, operation, user=self.user, password=self.password, **fields)

    def exited(self) -> list[NodeExit]:
        """Nodes whose process has ended."""
        return [
            NodeExit(name, rc) for name, p in self.procs.items() if (rc := p.poll()) is not None
        ]

    def _check_alive(self) -> None:
        for gone in self.exited():
            n = self.layout.node(gone.name)
            raise ClusterError(
                f"node {gone.describe()} while starting: "
                f"{_last_line(n, self._log_offsets.get(n.name, 0))} (log: {n.log_path})",
                exit_code=2 if gone.returncode == 2 else 1,
            )

    def wait_ready(
        self, timeout_s: float = 60.0, *, progress: Callable[[str], None] | None = None
    ) -> None:
        """Wait until every node is healthy and shows every other node ``connected``.

        Raises:
            ClusterError: a node exited, or did not connect in time (the message names
                the node and the peer it is missing).
        """
        deadline = time.monotonic() + timeout_s
        pending = {n.name for n in self.layout.nodes}
        while pending:
            self._check_alive()
            for name in sorted(pending):
                if _healthy(self.layout.node(name)):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                names = ", ".join(sorted(pending))
                raise ClusterError(f"node(s) {names} did not answer /health within {timeout_s:g} s")
            if pending:
                time.sleep(0.1)
        if progress is not None:
            progress("all nodes are up; waiting for them to connect")
        problems: dict[str, dict[str, str]] = {}
        while True:
            self._check_alive()
            problems = {}
            for n in self.layout.nodes:
                expected = {p.name for p in self.layout.peers_of(n.name)}
                try:
                    code, body = self.op(n, "cluster_status", timeout_s=5.0)
                except ConnectError as e:
                    problems[n.name] = {"*": str(e)}
                    continue
                if code != 200 or not isinstance(body, dict):
                    problems[n.name] = {"*": f"cluster_status answered {code}: {body}"}
                    continue
                missing = not_connected(body, expected)
                if missing:
                    problems[n.name] = missing
            if not problems:
                return
            if time.monotonic() > deadline:
                name, missing = sorted(problems.items())[0]
                what = "; ".join(f"{peer}: {why}" for peer, why in missing.items())
                raise ClusterError(
                    f"node {name} did not connect to its peers within {timeout_s:g} s ({what}); "
                    f"see {self.layout.node(name).log_path}"
                )
            time.sleep(0.2)

    def stop(self, timeout_s: float = 20.0) -> list[NodeExit]:
        """SIGTERM every running node, wait for all, SIGKILL any that outlive ``timeout_s``.

        Returns:
            How each node ended, in layout order.
        """
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        result = []
        for name, p in self.procs.items():
            try:
                rc = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            result.append(NodeExit(name, rc))
        return result


def _healthy(n: NodeLayout) -> bool:
    try:
        with urllib.request.urlopen(f"{n.admin_url}/health", timeout=1.0) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _last_line(n: NodeLayout, offset: int) -> str:
    """The node's last meaningful output line since ``offset`` (its start error, usually)."""
    try:
        with n.log_path.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "no output"
    for line in reversed(lines):
        if line.startswith("cairn: "):
            return line.removeprefix("cairn: ")
    return lines[-1].strip() if lines else "no output"
