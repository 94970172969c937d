"""Where a deploy's payload bytes come from: the request, a URL, or a local path."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from node.deploy.pack import pack_directory
from node.errors import DeployFailed, Forbidden

__all__ = ["bytes_source", "file_source", "local_package", "url_source"]

_CHUNK = 1 << 20


async def bytes_source(data: bytes) -> AsyncIterator[bytes]:
    """A payload that arrived whole in the body (CBOR/MessagePack bytes or base64)."""
    view = memoryview(data)
    for i in range(0, len(view), _CHUNK):
        yield bytes(view[i : i + _CHUNK])


async def file_source(path: Path, *, delete: bool = False) -> AsyncIterator[bytes]:
    """The bytes of a local file, read in a worker thread."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, _CHUNK):
            yield chunk
    finally:
        f.close()
        if delete:
            await asyncio.to_thread(path.unlink, missing_ok=True)


async def url_source(url: str, *, timeout_s: float) -> AsyncIterator[bytes]:
    """Stream a package from an http(s) URL.

    Raises:
        DeployFailed: ``package_fetch_failed`` on a non-200 answer or a network error.
    """
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=min(timeout_s, 60))
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            if resp.status != 200:
                raise DeployFailed(
                    f"fetching {url} answered HTTP {resp.status}",
                    code="package_fetch_failed",
                    phase="receive",
                )
            async for chunk in resp.content.iter_chunked(_CHUNK):
                yield chunk
    except (aiohttp.ClientError, TimeoutError) as e:
        raise DeployFailed(
            f"fetching {url} failed: {e!r}", code="package_fetch_failed", phase="receive"
        ) from e


def local_package(path_text: str, allowed: tuple[Path, ...], tmp_dir: Path) -> tuple[Path, bool]:
    """Resolve a local package path under an allowed directory.

    A directory is packed into a temporary tar.gz (returned with ``True``: delete it
    after ingest); a file is used as it is.

    Raises:
        Forbidden: the path is not under ``[deploy] allowed_package_dirs``.
        DeployFailed: the path does not exist.
    """
    path = Path(path_text).resolve()
    if not any(path == root.resolve() or root.resolve() in path.parents for root in allowed):
        raise Forbidden(
            f"package path {path_text} is not under an allowed directory "
            "([deploy] allowed_package_dirs)",
            code="package_not_allowed",
        )
    if path.is_dir():
        tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=tmp_dir, suffix=".tar.gz", delete=False) as f:
            pack_directory(path, f)
        return Path(f.name), True
    if path.is_file():
        return path, False
    raise DeployFailed(
        f"package path {path_text} does not exist", code="package_fetch_failed", phase="receive"
    )
