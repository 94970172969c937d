"""The web view's static routes and the ``get_session`` operation (no browser needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from helpers import Api, basic

from node.ui.routes import load_assets

STATIC = Path(__file__).resolve().parents[2] / "node" / "ui" / "static"


def _asset_paths(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', html)


async def test_the_shell_is_served_with_a_strict_policy_and_no_credentials(api: Api) -> None:
    resp = await api.client.get("/ui/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert "WWW-Authenticate" not in resp.headers
    html = await resp.text()
    assert "<script>" not in html and " on" not in re.sub(r"<noscript>.*?</noscript>", "", html)
    assert "style=" not in html
    paths = _asset_paths(html)
    assert any(p.endswith("/app.js") for p in paths) and any(p.endswith(".css") for p in paths)
    etag = resp.headers["ETag"]
    again = await api.client.get("/ui/", headers={"If-None-Match": etag})
    assert again.status == 304 and await again.read() == b""


async def test_assets_have_their_types_and_are_cached_by_version(api: Api) -> None:
    html = await (await api.client.get("/ui/")).text()
    version = load_assets().version
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in _asset_paths(html):
        assert f"/ui/assets/{version}/" in path
        resp = await api.client.get(path)
        assert resp.status == 200, path
        assert resp.headers["Content-Type"].startswith(types["." + path.rsplit(".", 1)[1]])
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # Every module the entry point imports, directly or not, is served too.
    for js in STATIC.glob("*.js"):
        resp = await api.client.get(f"/ui/assets/{version}/{js.name}")
        assert resp.status == 200 and await resp.read() == js.read_bytes()


async def test_unknown_old_or_escaping_asset_paths_are_404(api: Api) -> None:
    version = load_assets().version
    for path in (
        f"/ui/assets/{version}/nope.js",
        "/ui/assets/0000000000000000/app.js",
        f"/ui/assets/{version}/..%2f..%2fapi.py",
        f"/ui/assets/{version}/index.html",
        f"/ui/assets/{version}/../routes.py",
    ):
        resp = await api.client.get(path)
        assert resp.status == 404, path
        assert (await resp.json())["code"] == "not_found"


async def test_browsers_are_sent_to_the_view_and_api_clients_keep_the_405(api: Api) -> None:
    resp = await api.client.get("/", headers={"Accept": "text/html"}, allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/ui/"
    resp = await api.client.get("/ui", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/ui/"
    resp = await api.client.get("/")
    assert resp.status == 405 and (await resp.json())["code"] == "method_not_allowed"


def test_every_static_file_is_package_data() -> None:
    """pyproject ships ``ui/static/*``: the directory must stay flat and typed."""
    names = {p.name for p in STATIC.iterdir()}
    assert all(p.is_file() for p in STATIC.iterdir())
    assert set(load_assets().files) | {"index.html"} == names
    pyproject = (STATIC.parents[2] / "pyproject.toml").read_text()
    assert '"ui/static/*"' in pyproject


async def _session(api: Api, user: tuple[str, str]) -> tuple[int, Any]:
    return await api.op("get_session", auth=basic(*user))


async def test_get_session_answers_any_user_about_itself(api: Api) -> None:
    status, me = await api.op("get_session")
    assert status == 200
    assert me["username"] == "admin" and me["super_user"] is True
    assert {"deploy_component", "pin_deployment", "get_session"} <= set(me["operations"])

    granted = ["list_deployments", "get_deployment"]
    assert (await api.op("add_role", role="reader", permission={"operations": granted}))[0] == 200
    status, _ = await api.op("add_user", username="rita", password="rita-password-1", role="reader")
    assert status == 200
    status, rita = await _session(api, ("rita", "rita-password-1"))
    assert status == 200, rita
    assert rita == {
        "username": "rita",
        "role": "reader",
        "super_user": False,
        "operations": ["get_deployment", "get_session", "list_deployments"],
    }
    # Being open to everyone opens nothing else.
    status, _ = await api.op(
        "deploy_component", auth=basic("rita", "rita-password-1"), project="x", payload=""
    )
    assert status == 403
    status, body = await _session(api, ("rita", "wrong"))
    assert status == 401 and body["code"] == "unauthorized"
    status, _ = await api.op("get_session", auth=None)
    assert status == 401
