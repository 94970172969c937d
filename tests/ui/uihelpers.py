"""What the browser tests share: CLI deploys, signing in, reading the page, leak checks."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cdp import Page
from cluster_harness import ADMIN_PASSWORD, ADMIN_USER, ClusterNode

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
#: A user whose role may read everything the view shows and change nothing.
VIEWER = ("viewer", "viewer-password-1")
VIEWER_OPERATIONS = ["list_deployments", "get_deployment", "cluster_status", "get_components"]

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
NODE_STATUSES = (
    "[...document.querySelectorAll('#nodes article')].map(a => [a.dataset.node, a.dataset.status])"
)
SEQS = "[...document.querySelectorAll('#timeline li')].map(l => +l.dataset.seq)"


def write_component(root: Path, *, install: str | None = None, check: str | None = None) -> Path:
    """A component directory (what an operator runs ``cairn deploy`` on)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text("<p>hello</p>\n")
    toml = ""
    if install is not None:
        toml += f"[install]\ncommand = {json.dumps(install)}\ntimeout_s = 60\n"
    if check is not None:
        toml += f"[check]\ncommand = {json.dumps(check)}\ntimeout_s = 60\n"
    (root / "component.toml").write_text(toml)
    return root


class CliDeploy:
    """A running ``cairn deploy`` process and the deployment id it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, deployment_id: str, out: list[str]):
        self.proc = proc
        self.deployment_id = deployment_id
        self.out = out

    @classmethod
    async def start(cls, node: ClusterNode, source: Path, project: str) -> CliDeploy:
        env = {
            **os.environ,
            "CAIRN_USER": ADMIN_USER,
            "CAIRN_PASSWORD": ADMIN_PASSWORD,
            "PYTHONUNBUFFERED": "1",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node", "deploy", str(source),
            "--target", node.url, "--project", project,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        out: list[str] = []
        try:
            while line := await asyncio.wait_for(proc.stdout.readline(), 60):
                out.append(line.decode(errors="replace").rstrip())
                if m := UUID.search(out[-1]):
                    return cls(proc, m.group(0), out)
        except BaseException:
            await cls(proc, "", out).stop()
            raise
        await cls(proc, "", out).stop()
        raise AssertionError("cairn deploy printed no deployment id:\n" + "\n".join(out))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.communicate()

    async def finish(self) -> int:
        rest, _ = await asyncio.wait_for(self.proc.communicate(), 120)
        self.out += rest.decode(errors="replace").splitlines()
        assert self.proc.returncode is not None
        return self.proc.returncode


CliStart = Callable[[ClusterNode, Path, str], Awaitable[CliDeploy]]


async def sign_in(page: Page, node: ClusterNode | str, user: str, password: str) -> None:
    """Sign in on the view served by ``node`` (or at a base URL)."""
    await page.goto((node if isinstance(node, str) else node.url) + "/ui/")
    await page.fill("#username", user)
    await page.fill("#password", password)
    await page.eval("document.querySelector('#signin').requestSubmit()")
    await page.wait(f"document.querySelector('#who .user')?.dataset.user === {json.dumps(user)}")


async def open_deployment(page: Page, deployment_id: str) -> None:
    await page.goto(page_origin(page) + f"/ui/#/deployments/{deployment_id}")
    await page.wait(
        f"document.querySelector('#deployment-id')?.textContent === {json.dumps(deployment_id)}"
    )


def page_origin(page: Page) -> str:
    urls = [r.url for r in page.requests.values() if r.url.endswith("/ui/")]
    assert urls, "the page has not loaded the shell yet"
    return urls[-1][: -len("/ui/")]


async def node_statuses(page: Page) -> dict[str, str]:
    return dict(await page.eval(NODE_STATUSES))


def operation_requests(page: Page, origin: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """(body, headers) of every operations call the page sent to ``origin``."""
    out = []
    for r in page.requests.values():
        if r.method == "POST" and r.url == origin + "/" and r.post_data:
            out.append((json.loads(r.post_data), {**r.headers, **r.wire_headers}))
    return out


async def assert_no_credentials_leak(page: Page, user: str, password: str) -> None:
    """Credentials travel only in Authorization headers: not in URLs, cookies or storage."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert page.requests, "the page sent nothing"
    for r in page.requests.values():
        if not r.url:
            continue
        assert password not in r.url and token not in r.url, r.url
        parts = urlsplit(r.url)
        assert parts.username is None and parts.password is None, r.url
        assert f"{user}:" not in r.url, r.url
        assert "authorization" not in r.url.lower() and "password" not in r.url.lower(), r.url
    ops = [
        headers
        for r in page.requests.values()
        if r.method == "POST" and r.post_data
        for headers in [{k.lower(): v for k, v in {**r.headers, **r.wire_headers}.items()}]
    ]
    assert ops and all(h.get("authorization", "").startswith("Basic ") for h in ops)
    assert await page.eval("document.cookie") == ""
    assert await page.eval("localStorage.length") == 0
    assert page.page_problems() == [], page.page_problems()


def same(value: Any) -> str:
    """A JS string literal of ``value`` as JSON.stringify writes it (to compare in the page)."""
    return json.dumps(json.dumps(value, separators=(",", ":")))


async def shot(page: Page, name: str) -> None:
    await page.screenshot(ARTIFACTS / f"{name}.png")
