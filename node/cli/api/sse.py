"""Parsing a ``text/event-stream`` body: pure code, no I/O (tested without a network).

Follows the HTML standard's rules for the framing cairn's nodes send (SPEC section 6):
``id:``/``event:``/``data:`` fields, comments such as ``: ping``, a blank line to end a
message.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["SseComment", "SseMessage", "SseParser"]


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One dispatched SSE message: ``event`` defaults to ``message``, ``id`` may be None."""

    event: str
    data: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class SseComment:
    """A comment line (``: ping``, ``: stream open``), without the colon and one space."""

    text: str


class SseParser:
    """Incremental parser of a ``text/event-stream`` body (the HTML standard's rules).

    Feed it bytes as they arrive; it returns the messages and comments completed so far.
    Lines end with CRLF, LF or CR; ``data:`` lines accumulate (joined with LF); a blank
    line dispatches; a message with no data is not dispatched; an ``id`` with a NUL is
    ignored; unknown fields (``retry`` included) are ignored.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._saw_cr = False
        #: The last id seen (survives messages without an id, as the standard says).
        self.last_event_id: str | None = None

    def feed(self, chunk: bytes) -> list[SseMessage | SseComment]:
        text = self._decoder.decode(chunk)
        if self._saw_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across chunks
        self._saw_cr = False
        out: list[SseMessage | SseComment] = []
        buf = self._pending + text
        start = 0
        i = 0
        while i < len(buf):
            ch = buf[i]
            if ch in "\r\n":
                self._line(buf[start:i], out)
                if ch == "\r":
                    if i + 1 < len(buf):
                        if buf[i + 1] == "\n":
                            i += 1
                    else:
                        self._saw_cr = True
                start = i + 1
            i += 1
        self._pending = buf[start:]
        return out

    def _line(self, line: str, out: list[SseMessage | SseComment]) -> None:
        if line == "":
            if self._data:
                out.append(SseMessage(self._event or "message", "\n".join(self._data), self._id))
            self._event, self._data, self._id = "", [], None
            return
        if line.startswith(":"):
            out.append(SseComment(line[2:] if line.startswith(": ") else line[1:]))
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
            self.last_event_id = value
