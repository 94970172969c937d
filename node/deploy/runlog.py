"""A supervised process's output: a bounded, rotated log file per project.

Layout, under the node's ``run/components/<project>/``::

    output.log      the newest lines
    output.log.1    the file before it, ... up to output.log.<backups>

Each line is ``<time> <stream> <text>``: the time in UTC ISO 8601 with milliseconds, the
stream ``stdout``, ``stderr`` or ``cairn`` (what the supervisor itself notes: starts,
exits, restarts, stops). A file is rotated before a write would take it past
``max_bytes``, so the log holds at most ``(backups + 1) * max_bytes`` bytes (plus one
line, for a single line longer than a file). Lines are cut to
:data:`node.deploy.hooks.MAX_LINE_BYTES`.

Methods are synchronous and block on file I/O: the supervisor calls them through
``asyncio.to_thread``; a lock makes concurrent writers (stdout and stderr) safe.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["LogLine", "LogTail", "RunLog"]

LOG_NAME = "output.log"


@dataclass(frozen=True, slots=True)
class LogLine:
    """One output line: when (epoch ms, None if unreadable), which stream, the text."""

    t: int | None
    stream: str
    line: str

    def as_dict(self) -> dict[str, object]:
        return {"t": self.t, "stream": self.stream, "line": self.line}


@dataclass(frozen=True, slots=True)
class LogTail:
    """The newest lines of a log, oldest first; ``truncated`` if older ones exist."""

    lines: tuple[LogLine, ...]
    truncated: bool


def _stamp(t: int | None) -> str:
    when = datetime.fromtimestamp((t or 0) / 1000, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse(raw: str) -> LogLine:
    stamp, _, rest = raw.partition(" ")
    stream, _, text = rest.partition(" ")
    try:
        t = int(datetime.fromisoformat(stamp).timestamp() * 1000)
    except ValueError:
        # A line torn by a crash mid-write, or a file edited by hand: keep the text.
        return LogLine(None, "unknown", raw)
    return LogLine(t, stream, text)


class RunLog:
    """One project's rotated output log.

    Args:
        directory: ``run/components/<project>`` (created on the first write).
        max_bytes: rotate before a file would grow past this.
        backups: rotated files kept besides ``output.log``.
    """

    def __init__(self, directory: Path, *, max_bytes: int, backups: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.directory / LOG_NAME

    def _files(self) -> list[Path]:
        """Newest first: output.log, output.log.1, ..."""
        return [self.path] + [
            self.path.with_name(f"{LOG_NAME}.{i}") for i in range(1, 1 + self.backups)
        ]

    def exists(self) -> bool:
        """True if any file of this log is on disk."""
        return any(p.exists() for p in self._files())

    def write(self, entries: list[LogLine]) -> None:
        """Append ``entries``, rotating as needed.

        Raises:
            OSError: the directory or file cannot be written (disk full, say).
        """
        if not entries:
            return
        stamps: dict[int | None, str] = {}  # lines read together share their time
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            f = self.path.open("ab")
            try:
                size = f.tell()
                for entry in entries:
                    stamp = stamps.get(entry.t)
                    if stamp is None:
                        stamp = stamps[entry.t] = _stamp(entry.t)
                    text = f"{stamp} {entry.stream} {entry.line}\n"
                    data = text.encode("utf-8", "replace")
                    if size and size + len(data) > self.max_bytes:
                        f.close()
                        self._rotate()
                        f = self.path.open("ab")
                        size = 0
                    f.write(data)
                    size += len(data)
            finally:
                f.close()

    def _rotate(self) -> None:
        files = self._files()
        if self.backups == 0:
            files[0].unlink(missing_ok=True)
            return
        files[-1].unlink(missing_ok=True)
        for newer, older in zip(reversed(files[:-1]), reversed(files[1:]), strict=True):
            try:
                os.replace(newer, older)
            except FileNotFoundError:
                continue

    def tail(self, count: int) -> LogTail:
        """The newest ``count`` lines, oldest first.

        Returns:
            The lines, and ``truncated`` true when the log holds older lines too.
        """
        if count <= 0:
            return LogTail((), self.exists())
        with self._lock:
            collected: list[LogLine] = []
            files = self._files()
            for i, path in enumerate(files):
                try:
                    lines, more = _last_lines(path, count - len(collected))
                except FileNotFoundError:
                    continue
                collected = [_parse(line) for line in lines] + collected
                if len(collected) >= count:
                    older = more or any(p.exists() for p in files[i + 1 :])
                    return LogTail(tuple(collected), older)
            return LogTail(tuple(collected), False)


_BLOCK = 64 * 1024


def _last_lines(path: Path, count: int) -> tuple[list[str], bool]:
    """The last ``count`` lines of a file, read backwards in blocks; and whether the
    file holds more. Only "\\n" ends a line (``str.splitlines`` would also split on
    "\\r", form feeds, ...).

    Raises:
        FileNotFoundError: no such file.
    """
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos, data = end, b""
        # count + 1 newlines (or the start of the file) bound the last ``count`` lines.
        while pos > 0 and data.count(b"\n") <= count:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.decode("utf-8", "replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    if pos > 0:
        lines = lines[1:]  # the first one may be cut: the block began inside it
    return lines[-count:], pos > 0 or len(lines) > count
