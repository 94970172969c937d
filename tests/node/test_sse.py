"""Live progress over SSE (SPEC section 6), read from real servers.

The ``api`` fixture's aiohttp test client talks to a real server on loopback (with
``handler_cancellation`` as the node runs it); the last tests use a real ``cairn node
run`` process. Install hooks that print many lines and wait for a gate file give a deploy
that is busy, or paused, exactly when a test needs it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import ADMIN, Api, basic, component, make_config, wait_until
from procs import NodeProcess
from relay import Relay

from node.app import create_app
from node.appkeys import Services
from node.cli.api.client import Client, Upload
from node.cli.api.sse import SseComment, SseMessage, SseParser
from node.cli.api.stream import StreamEvent
from node.deploy.recorder import Recorder
from storage.listing import DeploymentFilter
from storage.store import Store

SSE = {"Accept": "text/event-stream"}


# -- helpers --------------------------------------------------------------------------


def noisy(first: int, *, gate: Path | None = None, then: int = 0, pause_every: int = 0) -> bytes:
    """A component whose install prints ``line 0``… (``first`` lines), then waits for
    ``gate`` to exist and prints ``then`` more (pausing briefly every ``pause_every``
    lines, so the second burst spans many batches)."""
    script = f"awk 'BEGIN {{ for (i = 0; i < {first}; i++) print \"line \" i }}'"
    if gate is not None:
        script += f"; echo waiting; while [ ! -e {gate} ]; do sleep 0.01; done"
    if then:
        step = pause_every or then
        script += (
            f"; i={first}; while [ $i -lt {first + then} ]; do "
            f"awk -v s=$i 'BEGIN {{ for (j = s; j < s + {step}; j++) print \"line \" j }}'; "
            f"i=$((i + {step})); sleep 0.01; done"
        )
    return component(install=script)


def store_of(api: Api) -> Store:
    return Services(api.app).ctx.store


class Stream:
    """An SSE response read incrementally: raw text plus parsed messages and comments."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.raw = ""
        self.items: list[SseMessage | SseComment] = []
        self._parser = SseParser()
        self.eof = False

    async def pump(self, timeout_s: float = 20.0) -> bool:
        """Read one chunk; False at EOF."""
        chunk = await asyncio.wait_for(self.resp.content.readany(), timeout_s)
        if not chunk:
            self.eof = True
            return False
        self.raw += chunk.decode()
        self.items.extend(self._parser.feed(chunk))
        return True

    async def until(self, predicate: Callable[[SseMessage], bool], timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(isinstance(i, SseMessage) and predicate(i) for i in self.items):
            if not await self.pump(max(0.1, deadline - time.monotonic())):
                raise AssertionError("stream ended before the expected message")

    async def rest(self) -> Stream:
        while await self.pump():
            pass
        return self

    @property
    def messages(self) -> list[SseMessage]:
        return [i for i in self.items if isinstance(i, SseMessage)]

    @property
    def events(self) -> list[tuple[int, str, Any]]:
        """Messages with an id: ``(seq, event, data)``."""
        return [(int(m.id), m.event, json.loads(m.data)) for m in self.messages if m.id]


async def open_sse(
    api: Api, operation: str, *, last_event_id: int | str | None = None, **fields: Any
) -> Stream:
    headers = {**SSE, "Authorization": api.auth}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    resp = await api.client.post("/", json={"operation": operation, **fields}, headers=headers)
    assert resp.status == 200, await resp.text()
    return Stream(resp)


async def deploy_sse(api: Api, project: str, payload: bytes, **fields: Any) -> Stream:
    return await open_sse(
        api, "deploy_component", project=project,
        payload=base64.b64encode(payload).decode(), **fields,
    )  # fmt: skip


def check_no_gap(events: list[tuple[int, str, Any]]) -> None:
    """Ids increase by one, except across a ``truncated`` marker (seq 21), after which
    the next id is exactly the first seq the marker did not drop."""
    expected = 1
    for seq, name, data in events:
        assert seq == expected, (seq, expected, name)
        # The marker takes the seq of the first event it replaces (it counts that one).
        expected = seq + (data["dropped_events"] if name == "truncated" else 1)


def lines_of(events: list[tuple[int, str, Any]]) -> list[int]:
    return [
        int(d["line"].split()[1])
        for _, name, d in events
        if name == "install" and d["line"].startswith("line ")
    ]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def fast_ping(aiohttp_client: Any, tmp_path: Path) -> Api:
    """A node that pings every 50 ms."""
    app = create_app(make_config(tmp_path, admin={"sse_ping_s": 0.05}))
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    return Api(client, app)


# -- the SSE parser (pure) ------------------------------------------------------------


def test_parser_follows_the_event_stream_rules() -> None:
    p = SseParser()
    text = (
        b': stream open\r\n\r\nid: 1\r\nevent: phase\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
        b"data: no-event-name\n\nevent: empty\n\nid: bad\x00id\ndata:x\n\n:ping\n\n"
        b"retry: 10\nid: 7\nevent: done\ndata: {}\r\r"
    )
    # Fed one byte at a time: CRLF split across chunks, UTF-8 split across chunks.
    items = [item for i in range(len(text)) for item in p.feed(text[i : i + 1])]
    assert items == [
        SseComment("stream open"),
        SseMessage("phase", '{"a":\n1}', "1"),
        SseMessage("message", "no-event-name", None),
        SseMessage("message", "x", None),
        SseComment("ping"),
        SseMessage("done", "{}", "7"),
    ]
    assert p.last_event_id == "7"
    assert SseParser().feed("data: é\n\n".encode()) == [SseMessage("message", "é")]


# -- framing, terminal events ---------------------------------------------------------


async def test_deploy_stream_framing_is_exact(api: Api) -> None:
    s = await deploy_sse(api, "web", component(install="echo building; echo oops >&2"))
    resp = s.resp
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    # The final status is committed before ``finished`` is published: a client that
    # reads the record the moment it sees ``finished`` finds it terminal.
    await s.until(lambda m: m.event == "finished")
    status, record = await api.op("get_deployment", deployment_id=s.events[0][2]["deployment_id"])
    assert status == 200 and record["status"] == "success" and record["completed_at"]
    await s.rest()
    blocks = s.raw.split("\n\n")
    assert s.raw.endswith("\n\n") and blocks[-1] == ""
    assert blocks[0] == ": stream open"
    body = blocks[1:-2]
    log = record["event_log"]
    assert len(body) == len(log) >= 10
    for i, (block, stored) in enumerate(zip(body, log, strict=True), start=1):
        data = json.dumps(stored["data"], separators=(",", ":"))
        assert block == f"id: {i}\nevent: {stored['event']}\ndata: {data}", block
    assert log[0]["event"] == "deployment" and log[-1]["event"] == "finished"
    assert ("stderr", "oops") in [(e["data"].get("stream"), e["data"].get("line")) for e in log]
    done = blocks[-2].split("\n")
    assert done[0] == "event: done" and len(done) == 2 and done[1].startswith("data: ")
    result = json.loads(done[1][6:])["result"]
    assert result["message"] == "Successfully deployed: web"
    assert result["deployment_id"] == record["deployment_id"]

    # A finished deploy: snapshot, ``done`` with the record, close.
    again = await (
        await open_sse(api, "get_deployment", deployment_id=record["deployment_id"])
    ).rest()
    assert [m.id for m in again.messages[:-1]] == [str(i) for i in range(1, len(log) + 1)]
    assert again.messages[-1].event == "done"
    assert json.loads(again.messages[-1].data)["result"]["status"] == "success"


async def test_failed_deploy_ends_with_error_event(api: Api) -> None:
    s = await (await deploy_sse(api, "web", component(install="echo about to fail; exit 3"))).rest()
    names = [name for _, name, _ in s.events]
    assert names[-2:] == ["error", "finished"]
    _, _, err = s.events[-2]
    assert err["code"] == "install_failed" and err["phase"] == "install" and err["message"]
    assert s.events[-1][2] == {"status": "failed"}
    steps = [(d["status"], d["phase"]) for _, name, d in s.events if name == "peer"]
    assert steps[-1] == ("failed", "install") and len(steps) == len(set(steps)), steps
    check_no_gap(s.events)
    last = s.messages[-1]
    assert last.event == "error" and last.id is None
    assert s.raw.endswith(f"event: error\ndata: {last.data}\n\n")
    body = json.loads(last.data)
    assert body["code"] == "install_failed" and body["phase"] == "install"
    assert body["deployment_id"] == s.events[0][2]["deployment_id"]
    lines = [(x["stream"], x["line"], x.get("hook")) for x in body["install_output"]["lines"]]
    assert ("stdout", "about to fail", "install") in lines


async def test_errors_before_the_stream_are_plain_json(api: Api) -> None:
    async def post(body: dict[str, Any], **headers: str) -> aiohttp.ClientResponse:
        return await api.client.post("/", json=body, headers={**SSE, **headers})

    resp = await post({"operation": "get_deployment", "deployment_id": "x"})
    assert resp.status == 401 and resp.content_type == "application/json"
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert (await resp.json())["code"] == "unauthorized"
    auth = {"Authorization": api.auth}
    resp = await post(
        {"operation": "deploy_component", "project": "bad name", "payload": "AA=="}, **auth
    )
    assert resp.status == 400 and resp.content_type == "application/json"
    assert (await resp.json())["field"] == "project"
    unknown = "00000000-0000-4000-8000-000000000000"
    resp = await post({"operation": "get_deployment", "deployment_id": unknown}, **auth)
    assert resp.status == 404 and resp.content_type == "application/json"
    assert unknown in (await resp.json())["error"]
    resp = await post({"operation": "get_deployment", "deployment_id": "nope"}, **auth)
    assert resp.status == 404 and (await resp.json())["deployment_id"] == "nope"
    resp = await post({"operation": "get_deployment", "deployment_id": 7}, **auth)
    assert resp.status == 400 and (await resp.json())["field"] == "deployment_id"
    status, done = await api.deploy("web", component())
    assert status == 200
    resp = await post(
        {"operation": "get_deployment", "deployment_id": done["deployment_id"]},
        **auth, **{"Last-Event-ID": "abc"},
    )  # fmt: skip
    assert resp.status == 400 and resp.content_type == "application/json"
    # Multipart with a bad field: refused before the stream and before any row.
    form = aiohttp.FormData()
    form.add_field("operation", "deploy_component")
    form.add_field("project", "bad name")
    form.add_field("payload", b"x" * 1000, filename="p.tar.gz")
    resp = await api.client.post("/", data=form, headers={**SSE, **auth})
    assert resp.status == 400 and resp.content_type == "application/json"
    _, listing = await api.op("list_deployments")
    assert listing["total"] == 1


async def test_pings_while_a_deploy_is_quiet(fast_ping: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    s = await deploy_sse(fast_ping, "web", noisy(0, gate=gate))
    await s.until(lambda m: m.event == "install")  # "waiting": the hook sits at the gate
    while s.raw.count("\n\n: ping\n\n") < 3:
        assert await s.pump(5), "stream ended"
    gate.touch()
    await s.rest()
    assert s.messages[-1].event == "done"
    # Pings are whole comment blocks between events; they never break the framing.
    block = r"(: ping|id: \d+\nevent: \w+\ndata: [^\n]+)\n\n"
    assert re.fullmatch(rf": stream open\n\n({block})+event: done\ndata: [^\n]+\n\n", s.raw)
    check_no_gap(s.events)


# -- replay + live tail ----------------------------------------------------------------


async def test_replay_and_live_tail_have_no_gap_or_duplicate(api: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first, then = 3000, 3000
    origin = await deploy_sse(api, "web", noisy(first, gate=gate, then=then, pause_every=100))
    await origin.until(lambda m: m.data == '{"stream":"stdout","line":"waiting"}')
    did = origin.events[0][2]["deployment_id"]
    store = store_of(api)

    async def head() -> int:
        events = await store.events(did)
        return events[-1].seq

    # Attach while the second burst is being written: each client replays the stored log
    # (head, marker, tail) and then tails live events written concurrently.
    gate.touch()
    late: list[Stream] = []
    running: list[bool] = []
    top = await head()
    for step in (300, 900, 1500, 2100):
        await wait_until(lambda s=step: _ge(head(), top + s), what=f"{step} more events")
        late.append(await open_sse(api, "get_deployment", deployment_id=did))
        d = await store.get_deployment(did)
        running.append(d is not None and not d.terminal)
    assert running[0], "the deploy ended before a client attached mid-way"
    # Two resume mid-deploy: from the head (always kept), and from a seq retention has
    # dropped (``reset``, then the stored log again, then the live tail).
    from_head = await open_sse(api, "get_deployment", deployment_id=did, last_event_id=15)
    from_gone = await open_sse(api, "get_deployment", deployment_id=did, last_event_id=30)
    streams = [await s.rest() for s in (origin, *late, from_head, from_gone)]

    final = streams[0].events
    assert lines_of(final) == list(range(first + then))  # the origin's client saw every line
    assert [seq for seq, _, _ in final] == list(range(1, len(final) + 1))
    assert final[-1][1] == "finished"
    for s in streams[1:]:
        assert s.messages[-1].event == "done"
        events = s.events
        if s is streams[-2]:  # resumed after 15: 16..20, the marker, the tail
            assert [seq for seq, _, _ in events[:6]] == [16, 17, 18, 19, 20, 21]
            events = [(seq, "x", {}) for seq in range(1, 16)] + events
        if s is streams[-1]:
            assert s.messages[0].event == "reset"
            assert json.loads(s.messages[0].data)["last_event_id"] == 30
        check_no_gap(events)
        assert events[20][1] == "truncated"  # they attached after retention began
        assert events[-1] == final[-1]
        tail = lines_of(events[21:])  # after the head and the marker
        assert tail == list(range(tail[0], first + then)), "install lines skip or repeat"


async def _ge(value: Awaitable[int], bound: int) -> bool:
    return await value >= bound


async def test_noisy_install_costs_a_bounded_number_of_transactions(
    api: Api, tmp_path: Path
) -> None:
    store = store_of(api)
    before = store.logs.own_head
    status, _ = await api.deploy("quiet", noisy(0))
    assert status == 200
    quiet = store.logs.own_head - before
    before = store.logs.own_head
    status, body = await api.deploy("loud", noisy(5000))
    assert status == 200, body
    loud = store.logs.own_head - before
    events = await store.events(body["deployment_id"])
    assert events[-1].seq > 5000 and len(events) == 200  # every line got a seq
    # Each batch of lines is one transaction and one change-log entry: 5000 lines cost a
    # handful of entries (1000 lines per batch, or what 50 ms gathered), not 5000.
    assert loud - quiet <= 50, (loud, quiet)


async def test_recorder_batches_lines(api: Api) -> None:
    store = store_of(api)
    status, body = await api.deploy("web", component())
    assert status == 200
    did = body["deployment_id"]
    top = (await store.events(did))[-1].seq
    rec = Recorder(store, did, flush_interval_s=3600, max_buffered=1000)
    before = store.logs.own_head
    for i in range(5000):
        await rec.line("stdout", f"line {i}")
    assert store.logs.own_head - before == 5  # one transaction per 1000 lines
    await rec.line("stdout", "one more")
    await rec.close()
    assert store.logs.own_head - before == 6
    events = await store.events(did)
    assert events[-1].seq == top + 5001 and events[-1].data["line"] == "one more"
    assert [e.data["line"] for e in events[-179:-1]] == [f"line {i}" for i in range(4822, 5000)]


# -- resume and reset ------------------------------------------------------------------


async def test_last_event_id_resumes_after_that_seq(api: Api) -> None:
    status, body = await api.deploy("web", noisy(20))
    assert status == 200
    did = body["deployment_id"]
    _, record = await api.op("get_deployment", deployment_id=did)
    n = len(record["event_log"])
    assert 30 < n < 200
    for after in (0, 7, n - 1, n):
        s = await (
            await open_sse(api, "get_deployment", deployment_id=did, last_event_id=after)
        ).rest()
        assert [seq for seq, _, _ in s.events] == list(range(after + 1, n + 1))
        assert [m.event for m in s.messages if not m.id] == ["done"]


async def test_reset_when_the_resume_point_was_truncated(api: Api) -> None:
    status, body = await api.deploy("web", noisy(400))
    assert status == 200
    did = body["deployment_id"]
    _, record = await api.op("get_deployment", deployment_id=did)
    log = record["event_log"]
    assert len(log) == 200 and log[20]["event"] == "truncated" and log[20]["seq"] == 21
    first_tail = log[21]["seq"]
    assert first_tail == 21 + log[20]["data"]["dropped_events"]
    stored = [e["seq"] for e in log]

    async def resume(after: int) -> Stream:
        return await (
            await open_sse(api, "get_deployment", deployment_id=did, last_event_id=after)
        ).rest()

    for after in (21, 100, first_tail - 2):
        s = await resume(after)
        assert s.messages[0].event == "reset" and s.messages[0].id is None
        reset = json.loads(s.messages[0].data)
        assert reset["last_event_id"] == after
        assert reset["dropped_events"] == first_tail - 1 - after
        assert [seq for seq, _, _ in s.events] == stored  # the whole stored log again
        assert s.messages[-1].event == "done"
    for after in (10, 20, first_tail - 1, stored[-1] - 3):
        s = await resume(after)
        assert "reset" not in [m.event for m in s.messages]
        assert [seq for seq, _, _ in s.events] == [q for q in stored if q > after]


# -- disconnects leak nothing ----------------------------------------------------------


async def test_200_clients_that_disconnect_leave_nothing_behind(api: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    store = store_of(api)
    deploy = asyncio.create_task(api.deploy("web", noisy(300, gate=gate)))
    did = ""

    async def waiting() -> bool:
        nonlocal did
        page = await store.list_deployments(DeploymentFilter(), limit=1)
        if not page.deployments:
            return False
        did = page.deployments[0].deployment_id
        return any(e.data.get("line") == "waiting" for e in await store.events(did))

    await wait_until(waiting, what="the hook to wait at its gate")
    subs, tasks, fds = store.feed.subscriber_count, len(asyncio.all_tasks()), fd_count()
    url = api.client.make_url("/")
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(i: int) -> None:
            headers = {**SSE, "Authorization": api.auth}
            if i % 2:
                headers["Last-Event-ID"] = str(i)
            body = {"operation": "get_deployment", "deployment_id": did}
            resp = await session.post(url, json=body, headers=headers)
            assert resp.status == 200
            got = b""
            while b"id: " not in got:  # mid-stream: some events read, the rest not
                got += await resp.content.readany()
            resp.close()

        for batch in range(4):
            await asyncio.gather(*(client(batch * 50 + i) for i in range(50)))
    # Promptly: the handlers are cancelled when their clients go (not at the next ping).
    await wait_until(
        lambda: store.feed.subscriber_count == subs, timeout_s=5, what="subscribers released"
    )
    await wait_until(lambda: len(asyncio.all_tasks()) == tasks, timeout_s=5, what="tasks to end")
    await wait_until(lambda: fd_count() == fds, timeout_s=5, what="sockets to close")
    assert not deploy.done()  # the deploy is untouched, still waiting at its gate
    gate.touch()
    status, body = await asyncio.wait_for(deploy, 30)
    assert status == 200, body


async def test_deploy_client_that_disconnects_does_not_cancel_the_deploy(
    api: Api, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    store = store_of(api)
    subs, fds = store.feed.subscriber_count, fd_count()
    url = api.client.make_url("/")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        body = {"operation": "deploy_component", "project": "web",
                "payload": base64.b64encode(noisy(10, gate=gate)).decode()}  # fmt: skip
        resp = await session.post(url, json=body, headers={**SSE, "Authorization": api.auth})
        s = Stream(resp)
        await s.until(lambda m: m.data == '{"stream":"stdout","line":"waiting"}')
        did = s.events[0][2]["deployment_id"]
        resp.close()
    gate.touch()

    async def finished() -> bool:
        d = await store.get_deployment(did)
        return d is not None and d.terminal

    await wait_until(finished, what="the deploy to finish")
    await wait_until(lambda: store.feed.subscriber_count == subs, what="subscribers released")
    await wait_until(lambda: fd_count() == fds, what="sockets and hook pipes to close")
    _, record = await api.op("get_deployment", deployment_id=did)
    assert record["status"] == "success", record["error"]


# -- multipart in, events out, one request --------------------------------------------


async def test_multipart_upload_and_events_share_one_request(api: Api) -> None:
    payload = component(install="echo done installing", blob=os.urandom(1 << 20).hex())
    first_event = asyncio.Event()
    withheld = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal withheld
        step = 64 * 1024
        for start in range(0, len(payload), step):
            if start == 4 * step:
                # The rest is sent only once the first event came back on this same
                # request (the node's multipart reader looks a few KiB ahead).
                await asyncio.wait_for(first_event.wait(), 10)
                withheld = len(payload) - start
            yield payload[start : start + step]

    writer = aiohttp.MultipartWriter("form-data")
    for name, value in (("operation", "deploy_component"), ("project", "web")):
        writer.append(value).set_content_disposition("form-data", name=name)
    writer.append(chunks()).set_content_disposition("form-data", name="payload", filename="p")
    resp = await api.client.post("/", data=writer, headers={**SSE, "Authorization": api.auth})
    s = Stream(resp)
    await s.until(lambda m: m.event == "deployment")
    first_event.set()
    await s.rest()
    assert withheld > len(payload) // 2  # most of the upload went in after the first event came out
    assert s.messages[-1].event == "done", s.raw[-500:]
    _, record = await api.op("get_deployment", deployment_id=s.events[0][2]["deployment_id"])
    assert record["payload_hash"] == hashlib.sha256(payload).hexdigest()
    assert record["status"] == "success"


async def test_upload_that_breaks_off_fails_the_deploy_and_leaks_nothing(api: Api) -> None:
    store = store_of(api)
    subs, fds = store.feed.subscriber_count, fd_count()
    never = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield os.urandom(256 * 1024)
        await never.wait()  # the rest never comes: the client goes away instead
        yield b""

    writer = aiohttp.MultipartWriter("form-data")
    for name, value in (("operation", "deploy_component"), ("project", "web")):
        writer.append(value).set_content_disposition("form-data", name=name)
    writer.append(chunks()).set_content_disposition("form-data", name="payload", filename="p")
    url = api.client.make_url("/")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        resp = await session.post(url, data=writer, headers={**SSE, "Authorization": api.auth})
        s = Stream(resp)
        await s.until(lambda m: m.event == "deployment")
        did = s.events[0][2]["deployment_id"]
        resp.close()

    async def failed() -> bool:
        d = await store.get_deployment(did)
        return d is not None and d.terminal

    await wait_until(failed, what="the broken upload to fail the deploy")
    d = await store.get_deployment(did)
    assert d is not None and d.error is not None and d.error["code"] == "upload_failed"
    await wait_until(lambda: store.feed.subscriber_count == subs, timeout_s=5, what="subscribers")
    await wait_until(lambda: fd_count() == fds, timeout_s=5, what="sockets to close")


# -- a real node process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def node_process(tmp_path_factory: pytest.TempPathFactory) -> Any:
    node = NodeProcess("n1", tmp_path_factory.mktemp("sse-node")).start()
    yield node
    node.stop()


async def test_real_node_streams_a_multipart_deploy(
    node_process: NodeProcess, tmp_path: Path
) -> None:
    path = tmp_path / "p.tar.gz"
    path.write_bytes(noisy(300))
    sent: list[int] = []
    events: list[StreamEvent] = []
    async with Client(node_process.url, user=ADMIN[0], password=ADMIN[1]) as client:
        upload = Upload(path, on_progress=sent.append)
        async for ev in client.deploy({"project": "web", "restart": "rolling"}, upload=upload):
            events.append(ev)
    assert sent[-1] == upload.size == path.stat().st_size
    assert events[-1].event == "done" and events[-1].seq is None
    seqs = [e.seq for e in events[:-1]]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 300  # live: nothing dropped
    assert lines_of([(e.seq or 0, e.event, e.data) for e in events]) == list(range(300))
    did = events[0].data["deployment_id"]

    # Raw framing from the process, and a reset for a truncated resume point.
    auth = {"Authorization": basic(*ADMIN), **SSE}
    body = {"operation": "get_deployment", "deployment_id": did}
    async with aiohttp.ClientSession() as session:
        async with session.post(node_process.url, json=body, headers=auth) as resp:
            raw = (await resp.read()).decode()
        assert raw.startswith(": stream open\n\nid: 1\nevent: deployment\ndata: {")
        assert '\n\nid: 21\nevent: truncated\ndata: {"dropped_events":' in raw
        async with session.post(
            node_process.url, json=body, headers={**auth, "Last-Event-ID": "100"}
        ) as resp:
            raw = (await resp.read()).decode()
        assert raw.startswith(": stream open\n\nevent: reset\ndata: {")
        assert raw.endswith("\n\n") and "\nevent: done\ndata: " in raw


async def test_follow_resumes_through_a_dropped_connection(
    node_process: NodeProcess, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    host, port = node_process.host, node_process.admin_port
    async with (
        Relay(host, port) as relay,
        Client(relay.url, user=ADMIN[0], password=ADMIN[1]) as client,
    ):
        start = asyncio.create_task(
            asyncio.to_thread(
                node_process.op, "deploy_component", project="resume",
                payload=base64.b64encode(noisy(50, gate=gate, then=100)).decode(),
            )
        )  # fmt: skip

        async def newest() -> str | None:
            _, page = await asyncio.to_thread(node_process.op, "list_deployments", project="resume")
            return page["deployments"][0]["deployment_id"] if page["deployments"] else None

        await wait_until(newest, what="the deploy's row")
        did = await newest()
        assert did is not None
        seen: list[StreamEvent] = []
        async for ev in client.follow(did):
            seen.append(ev)
            if ev.data == {"stream": "stdout", "line": "waiting"} and not relay.cuts:
                relay.cut()  # the network drops mid-deploy...
                gate.touch()  # ...while the deploy goes on
        status, result = await start
        assert relay.cuts == 1 and relay.connections >= 2
    assert status == 200, result
    assert seen[-1].event == "done" and seen[-1].data["result"]["status"] == "success"
    seqs = [e.seq for e in seen[:-1]]
    assert seqs == list(range(1, len(seqs) + 1))  # no gap, no duplicate across the drop
    assert lines_of([(e.seq or 0, e.event, e.data) for e in seen]) == list(range(150))
