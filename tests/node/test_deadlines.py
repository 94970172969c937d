"""Slow clients are cut off by the header and body deadlines (SPEC section 7)."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

from aiohttp import web
from helpers import ADMIN, make_config

from node.app import create_app


async def _serve(tmp_path: Path, **limits: float) -> tuple[web.AppRunner, int]:
    config = make_config(tmp_path, limits=limits)
    runner = web.AppRunner(
        create_app(config),
        handler_cancellation=True,
        keepalive_timeout=config.limits.header_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_trickled_headers_are_cut_off(tmp_path: Path) -> None:
    runner, port = await _serve(tmp_path, header_timeout_s=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(40):  # one header line every 0.1 s: never completes
            await asyncio.sleep(0.1)
            try:
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            if reader.at_eof():
                closed = True
                break
        assert closed, "the server kept a connection whose headers never completed"
        assert time.monotonic() - started < 3.5
        writer.close()
    finally:
        await runner.cleanup()


async def test_stalled_body_is_cut_off_and_recorded(tmp_path: Path) -> None:
    runner, port = await _serve(tmp_path, body_idle_timeout_s=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        token = base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()
        boundary = "cairnboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="operation"\r\n\r\n'
            f"deploy_component\r\n--{boundary}\r\nContent-Disposition: form-data; "
            f'name="project"\r\n\r\nweb\r\n--{boundary}\r\nContent-Disposition: form-data; '
            f'name="payload"; filename="p.tar.gz"\r\n\r\n'
        ).encode()
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Basic {token}\r\n".encode()
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
            + f"Content-Length: {len(head) + 1_000_000}\r\n\r\n".encode()
            + head
            + b"\x1f\x8b"
            + b"x" * 200_000  # well into the payload, then silence
        )
        await writer.drain()
        response = await asyncio.wait_for(reader.read(65536), 10)
        assert b"upload_failed" in response
        writer.close()
        from node.appkeys import Services

        store = Services(runner.app).store
        (d,) = await store.deployments()
        assert d.status == "failed" and d.error is not None
        assert d.error["code"] == "upload_failed"
    finally:
        await runner.cleanup()
