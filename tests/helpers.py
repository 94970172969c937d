"""Helpers shared by every test package: node configs, an API client, tarballs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import tarfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from node.config import Config, parse_config

ADMIN = ("admin", "admin-password-1")


def make_config(tmp_path: Path, name: str = "n1", **sections: dict[str, Any]) -> Config:
    """A single-node config rooted in ``tmp_path`` (sections override defaults)."""
    data: dict[str, Any] = {
        "node": {"name": name, "data_dir": str(tmp_path / name)},
        "auth": {"bootstrap_user": ADMIN[0], "bootstrap_password": ADMIN[1]},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return parse_config(data, base=tmp_path, env={})


def tar_gz(files: dict[str, bytes | str], *, top: str | None = None) -> bytes:
    """A tar.gz of ``files`` (path → content), optionally under one top directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def component(install: str | None = None, check: str | None = None, **files: str) -> bytes:
    """A component tarball with optional install/check hooks (shell strings)."""
    toml = ""
    if install is not None:
        toml += f"[install]\ncommand = {json.dumps(install)}\ntimeout_s = 30\n"
    if check is not None:
        toml += f"[check]\ncommand = {json.dumps(check)}\ntimeout_s = 30\n"
    content: dict[str, bytes | str] = {"index.html": "<p>hello</p>\n", **files}
    if toml:
        content["component.toml"] = toml
    return tar_gz(content, top="app")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Api:
    """A thin operations-API client over aiohttp's test client."""

    def __init__(self, client: TestClient[Any, Any], app: web.Application) -> None:
        self.client = client
        self.app = app
        self.auth = basic(*ADMIN)

    async def op(
        self, operation: str, *, auth: str | None = "default", **fields: Any
    ) -> tuple[int, Any]:
        headers = {}
        if auth is not None:
            headers["Authorization"] = self.auth if auth == "default" else auth
        resp = await self.client.post("/", json={"operation": operation, **fields}, headers=headers)
        return resp.status, await resp.json()

    async def deploy(self, project: str, payload: bytes, **fields: Any) -> tuple[int, Any]:
        return await self.op(
            "deploy_component",
            project=project,
            payload=base64.b64encode(payload).decode(),
            **fields,
        )


async def wait_until(
    predicate: Callable[[], Awaitable[Any] | Any], *, timeout_s: float = 15.0, what: str = ""
) -> Any:
    """Re-check ``predicate`` (sync or async) until truthy and return its value; fail
    after ``timeout_s``. Waiting on a condition with a deadline, never a bare sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def until_users_here(api: Api, timeout_s: float = 30.0) -> None:
    """Wait until a joining node has its bootstrap user (``/ready`` stops naming it),
    without signing in meanwhile: repeated 401s would lock the user name out."""

    async def here() -> bool:
        resp = await api.client.get("/ready")
        reasons = (await resp.json())["reasons"]
        return not any(r.startswith("accounts:") for r in reasons)

    await wait_until(here, timeout_s=timeout_s, what="the bootstrap user")
