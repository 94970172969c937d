"""Where a deploy's payload bytes come from: the request, a URL, or a local path.

URLs are fetched under the outbound policy of :mod:`node.deploy.outbound`; a fetched
body must start like a gzip or tar archive before a single byte of it is handed on, so
a refused fetch leaves no blob behind to download or replicate.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from node.config import Config
from node.deploy.outbound import (
    OutboundPolicy,
    PolicyConnector,
    PolicyResolver,
    Refused,
    redact_url,
)
from node.deploy.pack import pack_directory
from node.errors import BadRequest, DeployFailed, Forbidden
from storage import rules

__all__ = [
    "archive_only",
    "bytes_source",
    "file_source",
    "local_package",
    "package_source",
    "url_source",
]

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


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TAR_MAGIC_AT, _TAR_MAGIC = 257, b"ustar"
_HEAD_BYTES = _TAR_MAGIC_AT + len(_TAR_MAGIC)


def _fetch_failed(message: str) -> DeployFailed:
    return DeployFailed(message, code="package_fetch_failed", phase="receive")


def _plain(e: BaseException) -> str:
    """A network error in plain words, without the connector's details (address, port,
    errno), so a refused or failed fetch does not tell a caller what listens where."""
    if isinstance(e, TimeoutError | aiohttp.ServerTimeoutError):
        return "timed out"
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return "the host name could not be resolved"
    if isinstance(e, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "the TLS handshake or certificate check failed"
    if isinstance(e, aiohttp.ClientConnectorError):
        return "could not connect"
    if isinstance(e, aiohttp.InvalidURL):
        return "the URL is not valid"
    if isinstance(e, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return "the connection broke off"
    return "the request failed"


async def archive_only(chunks: AsyncIterator[bytes], shown: str) -> AsyncIterator[bytes]:
    """Pass ``chunks`` through once their start shows a gzip or tar archive.

    Nothing is yielded before the check, so a refused body never reaches the blob store.

    Raises:
        DeployFailed: ``bad_payload`` for an empty body or one that is neither gzip
            (``1f 8b``) nor tar (``ustar`` at byte 257).
    """
    head = b""
    async for chunk in chunks:
        head += chunk
        if len(head) >= _HEAD_BYTES:
            break
    is_gzip = head[:2] == b"\x1f\x8b"
    is_tar = head[_TAR_MAGIC_AT:_HEAD_BYTES] == _TAR_MAGIC
    if not (is_gzip or is_tar):
        what = "is empty" if not head else "is not a gzip or tar archive"
        raise DeployFailed(
            f"the package fetched from {shown} {what}; nothing was kept",
            code="bad_payload",
            phase="receive",
        )
    yield head
    async for chunk in chunks:
        yield chunk


async def url_source(
    url: str,
    *,
    policy: OutboundPolicy,
    timeout_s: float,
    max_redirects: int = 5,
    resolver: AbstractResolver | None = None,
) -> AsyncIterator[bytes]:
    """Stream a package from an http(s) URL under the outbound ``policy``.

    Redirects are followed here, at most ``max_redirects``, each hop checked like the
    first (scheme, literal address, resolved address, connected peer); credentials in
    the URL are sent to its own origin only. The body is passed through
    :func:`archive_only`, and is never decompressed on the way (the blob holds the
    bytes as served). ``resolver`` is the name-resolution seam (default: the system's).

    Raises:
        DeployFailed: ``package_refused`` (a destination the policy refuses),
            ``package_fetch_failed`` (a non-200 answer, too many redirects, a network
            error, all in plain words) or ``bad_payload`` (not an archive).
    """
    shown = redact_url(url)
    timeout = aiohttp.ClientTimeout(
        total=timeout_s, sock_connect=min(timeout_s, 30), sock_read=min(timeout_s, 60)
    )
    guard = PolicyResolver(policy, base=resolver)
    connector = PolicyConnector(policy, guard)
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
        ) as session:
            current = URL(url)
            origin = current.origin()
            for hop in range(max_redirects + 1):
                here = redact_url(str(current))
                host = current.raw_host
                if current.scheme not in ("http", "https") or not host:
                    raise _fetch_failed(f"package URL {here} is not an http(s) URL")
                if hop and current.origin() != origin:
                    current = current.with_user(None)  # credentials stay with their origin
                guard.redirect = hop > 0
                policy.check_literal(host, redirect=hop > 0)
                async with session.get(current, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS:
                        location = resp.headers.get("Location")
                        if not location:
                            raise _fetch_failed(f"fetching {here} redirected nowhere")
                        current = current.join(URL(location))
                        continue
                    if resp.status != 200:
                        raise _fetch_failed(f"fetching {here} answered HTTP {resp.status}")
                    async for chunk in archive_only(resp.content.iter_chunked(_CHUNK), shown):
                        yield chunk
                    return
            raise _fetch_failed(f"fetching {shown} took more than {max_redirects} redirects")
    except Refused as e:
        raise DeployFailed(str(e), code="package_refused", phase="receive") from None
    except DeployFailed:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        raise _fetch_failed(f"fetching {shown} failed: {_plain(e)}") from None


def package_source(package: str, config: Config) -> tuple[AsyncIterator[bytes], str]:
    """The payload stream for a ``package`` field, and the identifier to record.

    An http(s) URL is fetched under the outbound policy of ``[deploy]``; anything else
    is a local path under ``[deploy] allowed_package_dirs``. The identifier never holds
    credentials (``user:password@`` is removed).

    Raises:
        BadRequest: control characters, an unparsable URL, or another scheme.
        Forbidden: a local path outside the allowed directories.
        DeployFailed: a local path that does not exist.
    """
    try:
        rules.check_text(package, "package", max_len=4096)
    except rules.RuleError as e:
        raise BadRequest(e.message, field="package") from None
    identifier = redact_url(package)
    try:
        parsed = urlsplit(package)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise BadRequest("'package' is not a valid URL or path", field="package") from None
    deploy = config.deploy
    if parsed.scheme in ("http", "https"):
        policy = OutboundPolicy.from_config(
            deploy.package_allow_hosts, deploy.package_allow_networks
        )
        source = url_source(
            package,
            policy=policy,
            timeout_s=deploy.package_fetch_timeout_s,
            max_redirects=deploy.package_max_redirects,
        )
        return source, identifier
    if parsed.scheme not in ("", "file"):
        raise BadRequest("'package' must be an http(s) URL or a local path", field="package")
    path_text = parsed.path if parsed.scheme == "file" else package
    path, temporary = local_package(
        path_text, deploy.allowed_package_dirs, config.node.data_dir / "tmp"
    )
    return file_source(path, delete=temporary), identifier


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
