"""How the ``cairn`` client commands show things on a terminal.

Pure formatting (no network): event lines, sizes, times, tables, and the upload progress
bar. The bar is drawn in place with a carriage return; lines printed while it is shown
(the deployment id arrives while the upload is still running) appear above it. It is
hand-written rather than ``click.progressbar`` because click's bar cannot print lines
above itself without touching its private state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

__all__ = [
    "ProgressBar",
    "format_duration",
    "format_size",
    "format_table",
    "format_time",
    "render_event",
    "summary_line",
]

_CLEAR = "\r\x1b[K"


def format_size(n: int) -> str:
    """Bytes as ``205 B``, ``1.4 KiB``, ``3.0 MiB``..."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def format_time(ms: int | None) -> str:
    """Epoch milliseconds as local ``YYYY-MM-DD HH:MM:SS`` (``-`` for None)."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def format_duration(ms: int | None) -> str:
    """A duration in milliseconds as ``0.4 s``, ``12 s`` or ``3 m 05 s``."""
    if ms is None:
        return "-"
    s = ms / 1000
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    m, rest = divmod(int(s), 60)
    return f"{m} m {rest:02d} s"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(widths[i]) for i, c in enumerate(cells[:-1])]
        return "  ".join([*padded, cells[-1]]).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _error_text(err: dict[str, Any]) -> str:
    text = f"{err.get('message') or err.get('error') or 'failed'} [{err.get('code', 'error')}]"
    if err.get("phase"):
        text += f" in phase {err['phase']}"
    return text


def render_event(name: str, data: Any) -> str | None:
    """One readable line for a deployment event (None for the stream's own ends).

    Args:
        name: the SSE ``event:`` name.
        data: its decoded ``data:``.
    """
    d = data if isinstance(data, dict) else {}
    if name == "deployment":
        return f"Deployment {d.get('deployment_id')} (project {d.get('project')})"
    if name == "phase":
        return f"{'phase':<9} {d.get('phase')}: {d.get('status')}"
    if name == "install":
        mark = "! " if d.get("stream") == "stderr" else ""
        return f"{'install':<9} {mark}{d.get('line', '')}"
    if name == "peer":
        text = f"{'peer':<9} {d.get('node')} {d.get('status')}"
        if d.get("phase"):
            text += f" ({d['phase']})"
        if isinstance(d.get("error"), dict):
            text += f": {_error_text(d['error'])}"
        return text
    if name == "warning":
        return f"{'warning':<9} {d.get('message')}"
    if name == "error":
        return f"{'error':<9} {_error_text(d)}"
    if name == "truncated":
        return f"{'truncated':<9} {d.get('dropped_events')} events were dropped from the stored log"
    if name == "payload_dropped":
        return f"{'payload':<9} dropped, {format_size(int(d.get('freed_bytes') or 0))} freed"
    if name == "finished":
        return f"{'finished':<9} {d.get('status')}"
    if name == "reset":
        return (
            f"{'reset':<9} the resume point was truncated from the stored log; "
            f"{d.get('dropped_events', 'some')} events were missed"
        )
    if name == "done":
        return None
    return f"{name:<9} {json.dumps(data, separators=(',', ':'))}"


def summary_line(result: dict[str, Any]) -> str:
    """The last line of a successful deploy: what is active where."""
    nodes = result.get("peer_results") or []
    active = [r["node"] for r in nodes if r.get("status") == "active"]
    others = [f"{r['node']} {r.get('status')}" for r in nodes if r.get("status") != "active"]
    where = f"{len(active)}/{len(nodes)} nodes active"
    if others:
        where += f" ({', '.join(others)})"
    return f"{result.get('message', 'Done')} ({where}, deployment {result.get('deployment_id')})"


class ProgressBar:
    """An in-place upload bar: ``Uploading [#####     ]  52%  1.4/2.7 MiB``.

    Positions and the total are in the same unit (bytes of the payload file), and the
    percentage is rounded down, so it shows 100% exactly when the last byte was sent.

    Args:
        total: the size being sent.
        stream: a terminal (anything with ``write`` and ``flush``).
        min_interval_s: redraw at most this often (the final position always draws).
        clock: seconds, for the redraw throttle (a seam for tests).
    """

    def __init__(
        self,
        total: int,
        stream: TextIO,
        *,
        label: str = "Uploading",
        width: int = 30,
        min_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream
        self.label = label
        self.width = width
        self.position = 0
        self.finished = False
        self._interval = min_interval_s
        self._clock = clock
        self._drawn_at: float | None = None

    @property
    def percent(self) -> int:
        return 100 if self.total <= 0 else min(100, self.position * 100 // self.total)

    def line(self) -> str:
        """The bar as text for the current position."""
        filled = self.width if self.total <= 0 else self.width * self.position // self.total
        bar = "#" * filled + " " * (self.width - filled)
        return (
            f"{self.label} [{bar}] {self.percent:3d}%  "
            f"{format_size(self.position)} / {format_size(self.total)}"
        )

    def _draw(self) -> None:
        self.stream.write(_CLEAR + self.line())
        self.stream.flush()
        self._drawn_at = self._clock()

    def update(self, position: int) -> None:
        """Move to ``position`` (a running total); draws 100% at once when reached."""
        if self.finished:
            return
        self.position = position
        if position >= self.total:
            self.finish()
            return
        now = self._clock()
        if self._drawn_at is None or now - self._drawn_at >= self._interval:
            self._draw()

    def println(self, text: str) -> None:
        """Print a line above the bar (or plainly once the bar is finished)."""
        if self.finished or self._drawn_at is None:
            self.stream.write(text + "\n")
            self.stream.flush()
            return
        self.stream.write(_CLEAR + text + "\n")
        self._draw()

    def abandon(self) -> None:
        """Clear an unfinished bar from its line (the upload did not complete)."""
        if not self.finished and self._drawn_at is not None:
            self.stream.write(_CLEAR)
            self.stream.flush()
        self.finished = True

    def finish(self) -> None:
        """Draw the final position and end the line."""
        if self.finished:
            return
        self._draw()
        self.stream.write("\n")
        self.stream.flush()
        self.finished = True
