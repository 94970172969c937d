"""Real ``cairn node run`` processes for tests: start, wait healthy, stop, kill.

Each node gets its own data dir and free loopback ports. Output goes to a log file
in the node's directory so a failing test can show it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NodeProcess", "free_port", "wait_for"]

ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-password-1"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Any, *, timeout_s: float, interval_s: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class NodeProcess:
    """One node process with its config file under ``root``."""

    name: str
    root: Path
    admin_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    extra_toml: str = ""
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / self.name / "data"

    @property
    def config_path(self) -> Path:
        return self.root / self.name / "cairn.toml"

    @property
    def log_path(self) -> Path:
        return self.root / self.name / "node.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def write_config(self) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f'[node]\nname = "{self.name}"\ndata_dir = "{self.data_dir}"\n'
            f'[admin]\nhost = "{self.host}"\nport = {self.admin_port}\n'
            f'[auth]\nbootstrap_user = "{ADMIN_USER}"\nbootstrap_wait_s = 3\n' + self.extra_toml
        )

    def start(self, *, wait: bool = True, crashpoint: str | None = None) -> NodeProcess:
        if not self.config_path.exists():
            self.write_config()
        env = {**os.environ, "CAIRN_ADMIN_PASSWORD": ADMIN_PASSWORD, **self.env}
        env.pop("CAIRN_CRASHPOINT", None)
        if crashpoint:
            env["CAIRN_CRASHPOINT"] = crashpoint
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "node", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float = 20.0) -> None:
        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"node {self.name} exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_for(healthy, timeout_s=timeout_s, what=f"node {self.name} to be healthy")

        # A node joining a cluster creates its admin user only once it has caught up (or
        # given up waiting): until then it answers 401, and signing in again and again
        # would lock the user name out. /ready says when the user is there.
        def has_admin() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as r:
                    reasons = json.load(r)["reasons"]
            except urllib.error.HTTPError as e:  # 503: not ready, for some reason
                reasons = json.load(e)["reasons"]
            except (urllib.error.URLError, OSError):
                return False
            return not any(x.startswith("accounts:") for x in reasons)

        wait_for(has_admin, timeout_s=timeout_s, interval_s=0.1,
                 what=f"node {self.name} to have its admin user")  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def op(
        self,
        operation: str,
        *,
        user: str = ADMIN_USER,
        password: str = ADMIN_PASSWORD,
        timeout_s: float = 60.0,
        fields: dict[str, Any] | None = None,
        **more: Any,
    ) -> tuple[int, Any]:
        """One JSON operation; returns (status, parsed body).

        Body fields come as keywords, or in ``fields`` for names that clash with this
        method's own (``user``, ``password``).
        """
        body = json.dumps({"operation": operation, **(fields or {}), **more}).encode()
        req = urllib.request.Request(self.url + "/", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
