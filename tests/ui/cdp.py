"""A tiny Chrome DevTools Protocol client over aiohttp websockets, for the UI tests.

It starts the distribution's Chromium headless (no browser download, no new
dependency), attaches to one page per test, and gives the tests what they need: navigate,
evaluate JavaScript, wait for a condition in the page, take screenshots, record network
requests (to prove no credentials travel in a URL) and page errors (exceptions, CSP
violations), and answer chosen requests with made-up responses (``Fetch`` domain).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from helpers import wait_until

__all__ = ["Browser", "CDPError", "Page", "find_chromium"]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--window-size=1280,900",
]
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class CDPError(Exception):
    """The browser answered a command with an error, or a page script threw."""


def find_chromium() -> str | None:
    """The browser to drive: ``$CAIRN_CHROMIUM``, else Chromium or Chrome on ``PATH``."""
    explicit = os.environ.get("CAIRN_CHROMIUM")
    if explicit:  # authoritative when set: a wrong path means "no browser", not another one
        return explicit if os.access(explicit, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


Listener = Callable[[str, dict[str, Any]], None]


class Browser:
    """One headless Chromium process and its DevTools websocket."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.stderr_tail: list[str] = []

    @classmethod
    async def launch(cls, executable: str, profile: Path, *, timeout_s: float = 30.0) -> Browser:
        self = cls()
        self.proc = await asyncio.create_subprocess_exec(
            executable,
            *FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            url = await asyncio.wait_for(self._devtools_url(), timeout_s)
            self._tasks.append(asyncio.create_task(self._drain_stderr()))
            self.http = aiohttp.ClientSession()
            self.ws = await self.http.ws_connect(url, max_msg_size=0)
            self._tasks.append(asyncio.create_task(self._read()))
        except BaseException:
            await self.close()
            raise
        return self

    async def _devtools_url(self) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                raise CDPError("the browser exited before it listened:\n" + self._tail())
            line = raw.decode(errors="replace").rstrip()
            self.stderr_tail = [*self.stderr_tail[-50:], line]
            if m := _LISTENING.search(line):
                return m.group(1)

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self.stderr_tail = [*self.stderr_tail[-50:], raw.decode(errors="replace").rstrip()]

    def _tail(self) -> str:
        return "\n".join(self.stderr_tail)

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            key = f"{data.get('sessionId', '')}:{data.get('method', '')}"
            for listener in list(self._listeners.get(key, [])):
                listener(data["method"], data.get("params", {}))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("the DevTools connection closed"))

    def on(self, session_id: str, method: str, listener: Listener) -> None:
        self._listeners.setdefault(f"{session_id}:{method}", []).append(listener)

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session_id: str | None = None
    ) -> dict[str, Any]:
        assert self.ws is not None
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        await self.ws.send_str(json.dumps(msg))
        answer = await asyncio.wait_for(fut, 60)
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        await page.start()
        return page

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.send("Browser.close")
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class Request:
    """One network request the page sent, with the headers the browser put on the wire."""

    request_id: str
    url: str
    method: str
    headers: dict[str, str]
    post_data: str | None
    wire_headers: dict[str, str] = field(default_factory=dict)


#: Answers a paused request: (status, JSON body) to fulfil it, or None to let it through.
Interceptor = Callable[[Request], Awaitable[tuple[int, Any] | None]]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class Page:
    """One tab: navigation, evaluation, waiting, screenshots and what it sent."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser = browser
        self.session_id = session_id
        self.requests: dict[str, Request] = {}
        self.errors: list[str] = []
        self.log: list[dict[str, Any]] = []
        self._loads = 0
        self._interceptor: Interceptor | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session_id=self.session_id)

    async def start(self) -> None:
        on = self.browser.on
        on(self.session_id, "Page.loadEventFired", self._loaded)
        on(self.session_id, "Network.requestWillBeSent", self._request)
        on(self.session_id, "Network.requestWillBeSentExtraInfo", self._extra)
        on(self.session_id, "Runtime.exceptionThrown", self._exception)
        on(self.session_id, "Log.entryAdded", self._entry)
        on(self.session_id, "Fetch.requestPaused", self._paused)
        for domain in ("Page", "Runtime", "Network", "Log"):
            await self.send(f"{domain}.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )

    def _loaded(self, _m: str, _p: dict[str, Any]) -> None:
        self._loads += 1

    def _request(self, _m: str, p: dict[str, Any]) -> None:
        req = p["request"]
        existing = self.requests.get(p["requestId"])
        self.requests[p["requestId"]] = Request(
            p["requestId"],
            req["url"],
            req["method"],
            dict(req.get("headers", {})),
            req.get("postData"),
            existing.wire_headers if existing else {},
        )

    def _extra(self, _m: str, p: dict[str, Any]) -> None:
        headers = dict(p.get("headers", {}))
        if p["requestId"] in self.requests:
            self.requests[p["requestId"]].wire_headers = headers
        else:
            self.requests[p["requestId"]] = Request(p["requestId"], "", "", {}, None, headers)

    def _exception(self, _m: str, p: dict[str, Any]) -> None:
        details = p.get("exceptionDetails", {})
        text = details.get("exception", {}).get("description") or details.get("text")
        self.errors.append(str(text))

    def _entry(self, _m: str, p: dict[str, Any]) -> None:
        self.log.append(p["entry"])

    def _paused(self, _m: str, p: dict[str, Any]) -> None:
        task = asyncio.create_task(self._answer(p))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, p: dict[str, Any]) -> None:
        req = p["request"]
        request = Request(
            p["requestId"], req["url"], req["method"], req.get("headers", {}), req.get("postData")
        )
        answer = await self._interceptor(request) if self._interceptor else None
        if answer is None:
            await self.send("Fetch.continueRequest", {"requestId": p["requestId"]})
            return
        status, body = answer
        await self.send(
            "Fetch.fulfillRequest",
            {
                "requestId": p["requestId"],
                "responseCode": status,
                "responseHeaders": [{"name": "Content-Type", "value": "application/json"}],
                "body": base64.b64encode(json.dumps(body).encode()).decode(),
            },
        )

    async def intercept(self, interceptor: Interceptor) -> None:
        """Pause every request the page sends and let ``interceptor`` answer it."""
        self._interceptor = interceptor
        pattern = {"urlPattern": "*", "requestStage": "Request"}
        await self.send("Fetch.enable", {"patterns": [pattern]})

    async def goto(self, url: str, *, timeout_s: float = 30.0) -> None:
        before = self._loads
        answer = await self.send("Page.navigate", {"url": url})
        if "errorText" in answer:
            raise CDPError(f"navigate to {url}: {answer['errorText']}")
        if "loaderId" not in answer:
            return  # the same document (only the #fragment changed): no load event
        await wait_until(lambda: self._loads > before, timeout_s=timeout_s, what=f"load {url}")

    async def eval(self, expression: str) -> Any:
        """Evaluate ``expression`` in the page (promises awaited); returns its JSON value."""
        answer = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in answer:
            d = answer["exceptionDetails"]
            raise CDPError(d.get("exception", {}).get("description") or d.get("text"))
        return answer.get("result", {}).get("value")

    async def wait(self, expression: str, *, timeout_s: float = 30.0, what: str = "") -> Any:
        """Re-evaluate ``expression`` until it is truthy; returns its value."""

        async def check() -> Any:
            try:
                return await self.eval(expression)
            except CDPError:
                return None  # the page is between two documents

        return await wait_until(check, timeout_s=timeout_s, what=what or expression)

    async def text(self, selector: str) -> str:
        query = f"document.querySelector({json.dumps(selector)})"
        return str(await self.eval(f"{query}?.innerText ?? ''"))

    async def click(self, selector: str) -> None:
        await self.wait(f"!!document.querySelector({json.dumps(selector)})", what=selector)
        await self.eval(f"document.querySelector({json.dumps(selector)}).click()")

    async def fill(self, selector: str, value: str) -> None:
        await self.wait(f"!!document.querySelector({json.dumps(selector)})", what=selector)
        await self.eval(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            f" el.value = {json.dumps(value)};"
            " el.dispatchEvent(new Event('input', {bubbles: true})); })()"
        )

    async def screenshot(self, path: Path) -> None:
        """A PNG of the whole page (up to 4000 px tall)."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        height = min(max(int(size["height"]), 900), 4000)
        shot = await self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1},
            },
        )
        await asyncio.to_thread(_write, path, base64.b64decode(shot["data"]))

    def page_problems(self) -> list[str]:
        """Script exceptions and security (CSP) or script errors the console reported."""
        bad = [e for e in self.log if e.get("source") in ("security", "javascript")]
        bad += [e for e in self.log if "Content Security Policy" in str(e.get("text", ""))]
        return self.errors + [f"{e.get('source')}: {e.get('text')}" for e in bad]
