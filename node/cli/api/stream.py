"""Deployment event streams as :class:`node.cli.api.client.Client` reads them, without HTTP.

:class:`StreamEvent` is one decoded message. :func:`follow_events` tails a deployment
and resumes with ``Last-Event-ID`` after a dropped connection; :func:`deploy_events`
falls back to it when a deploy's own stream breaks off once the deployment id is known.
Both are handed the requests to make (callables that open one stream), so the resume
logic is independent of HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from node.cli.api.errors import ConnectError, StreamError
from node.cli.api.sse import SseComment, SseMessage

__all__ = [
    "DeployFollow",
    "OpenStream",
    "StreamEvent",
    "decode_event",
    "deploy_events",
    "deploy_result_from_record",
    "follow_events",
]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A message of a deployment stream with its JSON data decoded.

    ``seq`` is the event's ``id:``: None for the stream's own ``reset``, ``done`` and
    ``error``. A deploy also logs events named ``error`` (with a seq); only one without
    a seq ends the stream.
    """

    event: str
    data: Any
    seq: int | None = None

    @property
    def terminal(self) -> bool:
        return self.seq is None and self.event in ("done", "error")


def decode_event(msg: SseMessage) -> StreamEvent:
    """Decode a parsed SSE message's JSON data and seq.

    Raises:
        StreamError: the data is not JSON.
    """
    try:
        data = json.loads(msg.data)
    except ValueError:
        raise StreamError(f"event {msg.event!r} carries data that is not JSON") from None
    seq = int(msg.id) if msg.id is not None and msg.id.isdigit() else None
    return StreamEvent(msg.event, data, seq)


def deploy_result_from_record(record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Shape a terminal deployment record like ``deploy_component``'s own answer.

    Used when the deploy's stream broke off and the end was read from
    ``get_deployment`` instead.

    Returns:
        ``(succeeded, body)``: the success body, or an error body with
        ``deployment_id``, ``phase`` and ``failed_nodes``.
    """
    did = record.get("deployment_id")
    results = record.get("peer_results") or []
    if record.get("status") == "success":
        verb = "dropped" if record.get("kind") == "drop" else "deployed"
        return True, {
            "message": f"Successfully {verb}: {record.get('project')}",
            "deployment_id": did,
            "peer_results": results,
        }
    err = record.get("error") or {}
    return False, {
        "error": err.get("message", f"deploy ended {record.get('status')}"),
        "code": err.get("code", str(record.get("status"))),
        "deployment_id": did,
        "phase": err.get("phase", record.get("phase")),
        "failed_nodes": [r["node"] for r in results if r.get("status") == "failed"],
    }


#: Opens one request of a deployment's stream, with ``Last-Event-ID`` set to the given
#: seq (None: the whole stored log).
OpenStream = Callable[[int | None], AsyncIterator[StreamEvent | SseComment]]

#: Follows a deployment (its id) after a seq, as :func:`follow_events` does.
DeployFollow = Callable[[str, int | None], AsyncIterator[StreamEvent]]


async def follow_events(
    open_stream: OpenStream, *, after: int | None = None, resume_for_s: float = 60.0
) -> AsyncIterator[StreamEvent]:
    """Tail a deployment until its ``done`` or ``error``, resuming after drops.

    A dropped connection (or one that closed without a terminal event) is reopened
    with ``Last-Event-ID`` set to the last seq seen; events are de-duplicated by seq,
    so the caller sees each at most once. ``reset`` is passed on (the events between
    the resume point and the stored tail were dropped by retention).

    Args:
        open_stream: makes one request of the deployment's stream.
        after: start after this seq (None replays the whole stored log).
        resume_for_s: give up when no connection could be made for this long.

    Raises:
        AuthError, ApiError: the node refused the request (also on a reconnect).
        StreamError: no connection could be re-established in time.
    """
    last = after
    backoff = 0.1
    down_since: float | None = None
    connected = False
    while True:
        try:
            async for item in open_stream(last):
                connected, down_since, backoff = True, None, 0.1
                assert isinstance(item, StreamEvent)
                if item.seq is not None:
                    if last is not None and item.seq <= last:
                        continue
                    last = item.seq
                yield item
                if item.terminal:
                    return
        except (StreamError, ConnectError) as e:
            if not connected:
                raise  # never reached it: nothing to resume
            reason: Exception = e
        else:
            reason = StreamError("the event stream closed before its end")
        now = time.monotonic()
        down_since = down_since or now
        if now - down_since > resume_for_s:
            raise StreamError(f"{reason}; gave up resuming after {resume_for_s:.0f} s")
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 2.0)


async def deploy_events(
    events: AsyncIterator[StreamEvent | SseComment], follow: DeployFollow
) -> AsyncIterator[StreamEvent]:
    """A deploy's own stream, ending in ``done`` or ``error`` even if it breaks off.

    If ``events`` breaks off once the deployment id is known, the rest is read with
    ``follow``; its ``done`` (a record) is reshaped as the deploy's own answer, or as an
    ``error`` when the deploy failed.

    Args:
        events: the ``deploy_component`` request's stream.
        follow: tails the deployment after a seq (see :func:`follow_events`).

    Raises:
        ConnectError, AuthError, ApiError: before the deploy was accepted.
        StreamError: the stream broke off before the deployment id was known.
    """
    deployment_id: str | None = None
    last: int | None = None
    try:
        async for item in events:
            assert isinstance(item, StreamEvent)
            if item.event == "deployment" and isinstance(item.data, dict):
                deployment_id = item.data.get("deployment_id")
            last = item.seq if item.seq is not None else last
            yield item
            if item.terminal:
                return
    except StreamError:
        if deployment_id is None:
            raise
    if deployment_id is None:
        raise StreamError("the deploy's event stream closed before its end")
    async for item in follow(deployment_id, last):
        if item.event == "done":
            ok, body = deploy_result_from_record(item.data.get("result") or {})
            yield StreamEvent("done", {"result": body}) if ok else StreamEvent("error", body)
            return
        yield item
