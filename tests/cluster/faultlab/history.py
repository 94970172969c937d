"""The recorded history of a run: every client operation with its invocation, completion
and answer, every fault with when it landed and healed, and what a monitor saw of the
deployments' statuses while it all happened.

Times are seconds since the history began (monotonic). An operation with no answer
(the node was down, paused past the client's patience, or died mid-request) has
``status`` None: its outcome is unknown, and the checkers treat it as such.
"""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from typing import Any

from cluster_harness import ClusterNode

__all__ = ["TERMINAL", "FaultEvent", "History", "Monitor", "Op"]

TERMINAL = ("success", "failed", "rolled_back")


@dataclass
class Op:
    index: int
    kind: str
    node: str
    fields: dict[str, Any]
    invoked: float
    completed: float | None = None
    status: int | None = None
    answer: Any = None

    @property
    def deployment_id(self) -> str | None:
        if isinstance(self.answer, dict):
            value = self.answer.get("deployment_id")
            return value if isinstance(value, str) else None
        return None

    @property
    def acknowledged(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def line(self) -> str:
        took = f"{self.completed - self.invoked:6.1f}s" if self.completed is not None else "   ...."
        shown = {k: v for k, v in self.fields.items() if k != "payload"}
        answer = self.answer
        if isinstance(answer, dict):
            answer = {
                k: answer[k] for k in ("code", "error", "deployment_id", "message") if k in answer
            }
        return (
            f"{self.invoked:7.1f} +{took} #{self.index} {self.kind}@{self.node} {shown} "
            f"-> {self.status} {answer}"
        )


@dataclass
class FaultEvent:
    kind: str
    what: str
    at: float
    healed: float | None = None


@dataclass
class History:
    """Thread-safe record of one run."""

    seed: int
    started: float = field(default_factory=time.monotonic)
    ops: list[Op] = field(default_factory=list)
    faults: list[FaultEvent] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.started

    def call(
        self,
        node: ClusterNode,
        kind: str,
        operation: str,
        *,
        timeout_s: float,
        **fields: Any,
    ) -> Op:
        """Send one operation to ``node`` and record it (never raises for the node's
        sake: a failed connection is an operation without an answer)."""
        shown = dict(fields)
        if "password" in shown:
            shown["password"] = "***"
        if "payload" in shown:
            shown["payload"] = hashlib.sha256(str(shown["payload"]).encode()).hexdigest()[:12]
        with self._lock:
            op = Op(len(self.ops), kind, node.name, shown, self.now())
            self.ops.append(op)
        try:
            # Fields go in ``fields=``: ``password`` would otherwise be the caller's own.
            status, answer = node.op(operation, timeout_s=timeout_s, fields=fields)
        except (urllib.error.URLError, OSError, ValueError) as e:
            status, answer = None, f"{type(e).__name__}: {e}"
        op.completed, op.status, op.answer = self.now(), status, answer
        return op

    def fault(self, kind: str, what: str) -> FaultEvent:
        with self._lock:
            event = FaultEvent(kind, what, self.now())
            self.faults.append(event)
        return event

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(f"{self.now():7.1f} {text}")

    def deployments_started(self) -> list[str]:
        """Ids of deployments the history knows of (from answers), in order."""
        return [op.deployment_id for op in self.ops if op.deployment_id is not None]

    def render(self) -> str:
        lines = [f"history of seed {self.seed}:"]
        lines += [op.line() for op in self.ops]
        lines += [
            f"{f.at:7.1f} fault {f.kind}: {f.what} (healed at "
            f"{'never' if f.healed is None else f'{f.healed:.1f}'})"
            for f in self.faults
        ]
        lines += self.notes
        return "\n".join(lines)


class Monitor:
    """Polls every node's deployments during the history and records each status seen.

    A deployment's terminal status never changes, and it is the same on every node (the
    origin writes it once): a node showing one terminal status and later another, or two
    nodes showing different ones, is an anomaly.
    """

    def __init__(self, nodes: Any, history: History, *, interval_s: float = 0.5) -> None:
        self._nodes = nodes  # () -> list[ClusterNode], the members running now
        self.history = history
        self.interval_s = interval_s
        self.terminal: dict[tuple[str, str], str] = {}
        self.first_terminal: dict[str, tuple[str, str]] = {}
        self.anomalies: list[str] = []
        self.seen: set[str] = set()
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faultlab-monitor", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in self._nodes():
                self.poll(node)
            self._stop.wait(self.interval_s)

    def poll(self, node: ClusterNode) -> None:
        try:
            rows = list_all(node, timeout_s=3)
        except (urllib.error.URLError, OSError, ValueError, AssertionError):
            return
        self.polls += 1
        for d in rows:
            self.observe(node.name, d["deployment_id"], d["status"])

    def observe(self, node: str, deployment_id: str, status: str) -> None:
        self.seen.add(deployment_id)
        key = (node, deployment_id)
        before = self.terminal.get(key)
        if before is not None and status != before:
            self.anomalies.append(
                f"terminal status changed on {node}: {deployment_id} {before} -> {status} "
                f"(at {self.history.now():.1f}s)"
            )
        if status not in TERMINAL:
            return
        self.terminal.setdefault(key, status)
        first = self.first_terminal.setdefault(deployment_id, (node, status))
        if first[1] != status:
            self.anomalies.append(
                f"{deployment_id} is {first[1]} on {first[0]} but {status} on {node}"
            )


def list_all(node: ClusterNode, *, timeout_s: float = 10) -> list[dict[str, Any]]:
    """Every deployment row ``node`` lists (all pages)."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        fields: dict[str, Any] = {"limit": 1000}
        if cursor:
            fields["cursor"] = cursor
        code, body = node.op("list_deployments", timeout_s=timeout_s, **fields)
        if code != 200:
            raise AssertionError(f"{node.name} list_deployments: {code} {body}")
        out += body["deployments"]
        cursor = body.get("next_cursor")
        if not cursor:
            return out
