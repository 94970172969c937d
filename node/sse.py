"""Live progress over Server-Sent Events (SPEC section 6).

A stream subscribes to the change feed *before* it reads the stored log, then replays
the log and tails live events, de-duplicating by ``seq``: no gap, no duplicate. Live
events come with the change-feed notice itself, so a subscriber sees every event even if
retention has since dropped it from storage. The same code serves the origin and every
other node (events replicate and are announced on the feed when applied).

Framing: ``: stream open`` first; each event as ``id:``/``event:``/``data:``; a
``: ping`` comment every ``ping_s``; the end is ``event: done`` with ``{"result": …}``
or ``event: error`` with an error body. ``Last-Event-ID`` resumes after that seq; when the
resume point was truncated away the stream sends ``event: reset`` and replays the log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from node.errors import BadRequest, CairnError
from storage.events import MARKER_SEQ
from storage.records import Event, Notice
from storage.store import Store

__all__ = ["EventStream", "last_event_id", "stream_deployment"]

#: Produces the ``done`` result, or raises a CairnError for an ``error`` event.
Finish = Callable[[], Awaitable[dict[str, Any]]]


def last_event_id(request: web.Request) -> int | None:
    """The ``Last-Event-ID`` header as a seq, or None.

    Raises:
        BadRequest: the header is not a non-negative integer.
    """
    raw = request.headers.get("Last-Event-ID")
    if raw is None or raw.strip() == "":
        return None
    if not raw.strip().isdigit():
        raise BadRequest("Last-Event-ID must be an event seq (a non-negative integer)")
    return int(raw.strip())


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)


class EventStream:
    """An open ``text/event-stream`` response."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request) -> EventStream:
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )
        await resp.prepare(request)
        stream = cls(resp)
        await stream._write(": stream open\n\n")
        return stream

    async def _write(self, text: str) -> None:
        await self.response.write(text.encode())

    async def event(self, name: str, data: Any, *, id: int | None = None) -> None:
        head = f"id: {id}\n" if id is not None else ""
        await self._write(f"{head}event: {name}\ndata: {_dumps(data)}\n\n")

    async def ping(self) -> None:
        await self._write(": ping\n\n")

    async def close(self) -> None:
        await self.response.write_eof()


def _gap(last: int, stored: list[Event]) -> bool:
    """True when events right after ``last`` were dropped by retention."""
    if not any(e.seq == MARKER_SEQ and e.event == "truncated" for e in stored):
        return False
    tail = [e.seq for e in stored if e.seq > MARKER_SEQ]
    return last > MARKER_SEQ and bool(tail) and last + 1 < tail[0]


async def stream_deployment(
    request: web.Request,
    store: Store,
    deployment_id: str,
    *,
    finish: Finish,
    done: Callable[[], bool],
    resume_after: int | None,
    ping_s: float,
) -> web.StreamResponse:
    """Replay and tail a deployment's events, then end with ``done`` or ``error``.

    Args:
        finish: awaited once the ``finished`` event was sent (or at once if ``done()``
            already holds and the log has no ``finished``): its dict is the ``done``
            result; a CairnError it raises becomes the ``error`` event.
        done: whether the deploy is over without a ``finished`` event to wait for.
        resume_after: ``Last-Event-ID``, if the client sent one.
    """

    def wanted(n: Notice) -> bool:
        return n.key == deployment_id and n.tbl in ("deployment_events", "deployments")

    with store.feed.subscribe(wanted) as sub:
        stream = await EventStream.open(request)
        try:
            last = resume_after or 0
            stored = await store.events(deployment_id)
            if resume_after is not None and _gap(resume_after, stored):
                await stream.event(
                    "reset", {"reason": "resume point was truncated", "last_event_id": resume_after}
                )
                last = 0
            finished = False
            for e in stored:
                if e.seq > last:
                    await stream.event(e.event, e.data, id=e.seq)
                    last = e.seq
                finished = finished or e.event == "finished"
            while not finished and not done():
                notices = await sub.get(timeout_s=ping_s)
                if not notices:
                    await stream.ping()
                    continue
                if sub.overflowed:
                    sub.overflowed = False
                    notices = [
                        Notice(
                            "deployment_events",
                            deployment_id,
                            tuple(await store.events(deployment_id, last)),
                        )
                    ]
                for notice in notices:
                    for e in notice.rows:
                        if isinstance(e, Event) and e.seq > last:
                            await stream.event(e.event, e.data, id=e.seq)
                            last = e.seq
                            finished = finished or e.event == "finished"
            try:
                result = await finish()
            except CairnError as err:
                await stream.event("error", err.body())
            else:
                await stream.event("done", {"result": result})
            await stream.close()
        except (ConnectionResetError, asyncio.CancelledError):
            # The client went away: the deploy goes on; the subscription is released by
            # the ``with`` block.
            raise
    return stream.response
