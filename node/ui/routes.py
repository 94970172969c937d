"""The operator web view's HTTP surface: a static shell and its assets under ``/ui/``.

The shell and its assets hold no data and need no credentials: every piece of data the
page shows comes from ``POST /`` operations that the page's JavaScript sends with an
``Authorization`` header (docs/ui.md explains why the shell is public, and why nothing
here ever asks the browser for Basic credentials).

Assets are read from the package once, when the routes are built, and served from a
content-versioned path, ``/ui/assets/<version>/<file>``: the version is a digest of every
asset, so an upgraded node serves a new path and the assets can be cached for a year
(``immutable``), while the shell itself is revalidated on every load (``no-cache`` with
an ``ETag``). Every response carries a strict Content-Security-Policy (scripts, styles and
connections from this origin only, no inline script or style, no framing) and
``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

__all__ = ["SECURITY_HEADERS", "Assets", "load_assets", "ui_routes"]

#: Content types by file suffix; an asset with any other suffix is not served.
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_SHELL_CACHE = "no-cache"
_ASSET_CACHE = "public, max-age=31536000, immutable"
_VERSION_MARK = "{{ASSET_VERSION}}"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


@dataclass(frozen=True, slots=True)
class Assets:
    """The shell and the versioned assets, ready to serve."""

    version: str
    shell: Asset
    files: dict[str, Asset]


def _asset(body: bytes, content_type: str) -> Asset:
    return Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def load_assets(package: str = "node.ui") -> Assets:
    """Read ``static/`` from ``package`` (flat: no subdirectories).

    Raises:
        FileNotFoundError: the package ships no ``static/index.html``.
    """
    root = resources.files(package).joinpath("static")
    raw: dict[str, bytes] = {}
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _TYPES:
            raw[entry.name] = entry.read_bytes()
    if "index.html" not in raw:
        raise FileNotFoundError(f"{package} ships no static/index.html")
    digest = hashlib.sha256()
    for name in sorted(raw):
        if name != "index.html":
            digest.update(name.encode() + b"\0" + raw[name] + b"\0")
    version = digest.hexdigest()[:16]
    shell = raw.pop("index.html").replace(_VERSION_MARK.encode(), version.encode())
    files = {
        name: _asset(body, _TYPES["." + name.rsplit(".", 1)[-1]]) for name, body in raw.items()
    }
    return Assets(version, _asset(shell, _TYPES[".html"]), files)


def _serve(request: web.Request, asset: Asset, cache: str) -> web.Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": cache, "ETag": asset.etag}
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


def _not_found(what: str) -> web.Response:
    return web.json_response(
        {"error": f"no such UI file: {what}", "code": "not_found"},
        status=404,
        headers=SECURITY_HEADERS,
    )


def ui_routes(assets: Assets | None = None) -> list[web.RouteDef]:
    """``GET /ui`` (redirect), ``GET /ui/`` (the shell), ``GET /ui/assets/<v>/<file>``."""
    loaded = assets or load_assets()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/", headers=SECURITY_HEADERS)

    async def shell(request: web.Request) -> web.Response:
        return _serve(request, loaded.shell, _SHELL_CACHE)

    async def asset(request: web.Request) -> web.Response:
        version, name = request.match_info["version"], request.match_info["name"]
        found = loaded.files.get(name)
        # An old version's path (a page loaded before an upgrade) is not this content:
        # a 404 makes the page reload rather than mix old and new modules.
        if found is None or version != loaded.version:
            return _not_found(f"{version}/{name}")
        return _serve(request, found, _ASSET_CACHE)

    return [
        web.get("/ui", redirect),
        web.get("/ui/", shell),
        web.get("/ui/assets/{version}/{name}", asset),
    ]
