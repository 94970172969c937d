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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from aiohttp import web

from node.errors import BadRequest, CairnError
from storage.events import MARKER_SEQ
from storage.records import Event, Notice
from storage.store import Store

__all__ = ["EventStream", "last_event_id", "stream_deployment"]

log = structlog.get_logger(__name__)

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
    text = raw.strip()
    # ASCII digits only ("²".isdigit() is true) and within int64, checked before int().
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and int(text) < 1 << 63):
        raise BadRequest("Last-Event-ID must be an event seq (a non-negative integer)")
    return int(text)


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)


def _frame(name: str, data: Any, id: int | None = None) -> bytes:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {name}\ndata: {_dumps(data)}\n\n".encode()


class _Frames:
    """The encoded frames of the events of recent notices, shared by every stream.

    A notice is published once to every subscriber, all holding the same ``Event``
    objects: the first stream to send it encodes each event, the others reuse the bytes.
    An entry holds its notice, so the notice's id cannot be reused while it is cached.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._cache: dict[int, tuple[Notice, list[tuple[Event, bytes]]]] = {}

    def of(self, notice: Notice) -> list[tuple[Event, bytes]]:
        hit = self._cache.get(id(notice))
        if hit is not None and hit[0] is notice:
            return hit[1]
        frames = [(e, _frame(e.event, e.data, e.seq)) for e in notice.rows if isinstance(e, Event)]
        self._cache[id(notice)] = (notice, frames)
        if len(self._cache) > self._size:
            del self._cache[next(iter(self._cache))]  # the oldest
        return frames


_FRAMES = _Frames()


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
        await self.response.write(_frame(name, data, id))

    async def frames(self, frames: list[bytes]) -> None:
        """Send encoded event frames in one write."""
        if frames:
            await self.response.write(b"".join(frames))

    async def ping(self) -> None:
        await self._write(": ping\n\n")

    async def close(self) -> None:
        await self.response.write_eof()


def _first_tail_seq(stored: list[Event]) -> int | None:
    """The first stored seq after the ``truncated`` marker, if retention dropped any."""
    if not any(e.seq == MARKER_SEQ and e.event == "truncated" for e in stored):
        return None
    return next((e.seq for e in stored if e.seq > MARKER_SEQ), None)


class _Tail:
    """Sends a deployment's events in seq order, each at most once."""

    def __init__(self, stream: EventStream, store: Store, deployment_id: str) -> None:
        self.stream = stream
        self.store = store
        self.deployment_id = deployment_id
        self.last = 0
        self.finished = False

    async def replay(self, resume_after: int | None) -> None:
        """Send the stored log after ``resume_after`` (``reset`` and all of it if that
        point was dropped by retention)."""
        stored = await self.store.events(self.deployment_id)
        self.last = resume_after or 0
        first_tail = _first_tail_seq(stored)
        # Seqs MARKER_SEQ..first_tail-1 are gone: a client that saw up to one of them (or
        # the marker) would silently miss the rest.
        if (
            resume_after is not None
            and first_tail is not None
            and MARKER_SEQ <= resume_after < first_tail - 1
        ):
            await self.stream.event(
                "reset",
                {
                    "reason": "the resume point was truncated from the stored log",
                    "last_event_id": resume_after,
                    "dropped_events": first_tail - 1 - resume_after,
                },
            )
            self.last = 0
        await self.send(stored)

    async def send(self, events: Iterable[object]) -> None:
        await self._send((e, None) for e in events if isinstance(e, Event))

    async def _send(self, events: Iterable[tuple[Event, bytes | None]]) -> None:
        """Send the events past the last one sent, in one write."""
        out = []
        for e, frame in events:
            if e.seq > self.last:
                out.append(frame if frame is not None else _frame(e.event, e.data, e.seq))
                self.last = e.seq
            # Also when the client had it already (resumed after it): the deploy is over.
            self.finished = self.finished or e.event == "finished"
        await self.stream.frames(out)

    async def notices(self, notices: list[Notice]) -> None:
        """Send live events: encoded once for every stream (:class:`_Frames`), and
        everything this wake-up brought in one write."""
        await self._send(pair for notice in notices for pair in _FRAMES.of(notice))

    async def catch_up(self) -> None:
        """Re-read storage after the live feed lost notices (or as a last check)."""
        stored = await self.store.events(self.deployment_id)
        first_tail = _first_tail_seq(stored)
        if first_tail is not None and MARKER_SEQ <= self.last < first_tail - 1:
            await self.replay(self.last)
        else:
            await self.send(e for e in stored if e.seq > self.last)


#: ``finish`` calls in flight, by ``share`` key: streams ending together wait for one.
_FINISHING: dict[str, asyncio.Task[bytes]] = {}


async def _last_frame(finish: Finish, deployment_id: str, share: str | None) -> bytes:
    """The ``done`` (or ``error``) frame that ends a stream.

    Hundreds of streams watching one deploy all reach its end at once; each computing
    the final view (a read of the row, its results and its whole log, then JSON) would
    hold the others back from the deploy's last events. With a ``share`` key they wait
    for the one computation in flight; a stream that ends later computes afresh. The
    computation is a task of its own, so a client going away does not cancel it for the
    others.
    """
    if share is None:
        return await _final(finish, deployment_id)
    task = _FINISHING.get(share)
    if task is None:
        task = asyncio.ensure_future(_final(finish, deployment_id))
        _FINISHING[share] = task

        def forget(t: asyncio.Task[bytes], key: str = share) -> None:
            if _FINISHING.get(key) is t:
                del _FINISHING[key]

        task.add_done_callback(forget)
    return await asyncio.shield(task)


async def _final(finish: Finish, deployment_id: str) -> bytes:
    try:
        result = await finish()
    except CairnError as err:
        return _frame("error", err.body())
    except Exception:
        # A bug, but the headers are long gone: end the stream as the API would.
        log.exception("sse_finish_failed", deployment_id=deployment_id)
        return _frame("error", {"error": "internal error", "code": "internal_error"})
    return _frame("done", {"result": result})


async def stream_deployment(
    request: web.Request,
    store: Store,
    deployment_id: str,
    *,
    finish: Finish,
    done: Callable[[], bool],
    resume_after: int | None,
    ping_s: float,
    share: str | None = None,
) -> web.StreamResponse:
    """Replay and tail a deployment's events, then end with ``done`` or ``error``.

    A client that goes away ends only this stream: the subscription is released by the
    ``with`` block, and the deploy (a task the node owns) goes on.

    Args:
        finish: awaited once the ``finished`` event was sent (or once ``done()`` holds
            and no ``finished`` is coming): its dict is the ``done`` result; a CairnError
            it raises becomes the ``error`` event.
        done: whether the deploy is over without a ``finished`` event to wait for.
        resume_after: ``Last-Event-ID``, if the client sent one.
        ping_s: the longest silence before a ``: ping`` comment.
        share: streams that end at the same time with the same ``share`` key get one
            ``finish`` between them (its frame is encoded once): give it only when every
            such stream's ``finish`` answers the same.

    Returns:
        The (already finished) response.
    """

    def wanted(n: Notice) -> bool:
        return n.key == deployment_id and n.tbl in ("deployment_events", "deployments")

    with store.feed.subscribe(wanted) as sub:
        stream = await EventStream.open(request)
        try:
            tail = _Tail(stream, store, deployment_id)
            await tail.replay(resume_after)
            while not tail.finished and not done():
                notices = await sub.get(timeout_s=ping_s)
                if sub.overflowed:
                    sub.overflowed = False
                    await tail.catch_up()
                elif notices:
                    await tail.notices(notices)
                else:
                    await stream.ping()
            if not tail.finished:
                # ``done()`` can turn true while the last notices are still queued.
                await tail.notices(sub.drain())
                await tail.catch_up()
            await stream.frames([await _last_frame(finish, deployment_id, share)])
            await stream.close()
        except ConnectionResetError:
            # Gone between two writes (before aiohttp cancelled the handler): the deploy
            # goes on; nothing to answer.
            log.debug("sse_client_gone", deployment_id=deployment_id)
    return stream.response
