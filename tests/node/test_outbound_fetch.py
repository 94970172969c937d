"""Package URLs against a real node: the outbound policy on the address connected to.

A loopback HTTP server stands in for a metadata service (and, when allowlisted, for an
internal package server). It counts the requests it gets, so "refused" means the node
never reached it — not merely that the answer was thrown away. For every refused fetch
the test checks that no blob is stored and the payload cannot be downloaded.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import Api, component, make_config
from structlog.testing import capture_logs

from node.app import create_app
from node.appkeys import Services
from node.deploy.outbound import OutboundPolicy, PolicyConnector, PolicyResolver, Refused

SECRET = "instance-role-credentials-AKIA0000"
PACKAGE = component(v="fetched")


@dataclass
class Internal:
    port: int
    hits: list[str] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
async def internal() -> AsyncIterator[Internal]:
    """A loopback server: ``/meta`` (metadata stand-in), ``/pkg.tgz``, ``/to?u=URL``."""
    state = Internal(port=0)

    async def handle(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        state.auth.append(request.headers.get("Authorization"))
        if request.path == "/meta":
            return web.Response(text=json.dumps({"Secret": SECRET}))
        if request.path == "/pkg.tgz":
            return web.Response(body=PACKAGE, content_type="application/gzip")
        if request.path == "/to":
            raise web.HTTPFound(request.query["u"])
        if request.path == "/loop":
            raise web.HTTPFound("/loop")
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


async def _node(aiohttp_client: Any, tmp_path: Path, **deploy: Any) -> Api:
    app = create_app(make_config(tmp_path, deploy=deploy))
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    return Api(client, app)


async def _nothing_kept(api: Api, deployment_id: str) -> None:
    """No blob on disk, no hash in the row, and no bytes from get_deployment_payload."""
    services = Services(api.app)
    assert services.ctx.blobs.stats()[0] == 0
    assert not [p for p in services.ctx.blobs.root.rglob("*") if p.is_file()]
    status, row = await api.op("get_deployment", deployment_id=deployment_id)
    assert status == 200 and row["status"] == "failed", row
    assert row["payload_hash"] is None and row["payload_blob_present"] is False, row
    resp = await api.client.post(
        "/",
        json={"operation": "get_deployment_payload", "deployment_id": deployment_id},
        headers={"Authorization": api.auth},
    )
    assert resp.status == 410, await resp.text()
    assert SECRET not in await resp.text()


async def _refused(api: Api, package: str, needle: str) -> dict[str, Any]:
    status, body = await api.op("deploy_component", project="web", package=package)
    assert status == 422, body
    assert body["code"] == "package_refused", body
    assert needle in body["error"], body
    await _nothing_kept(api, body["deployment_id"])
    return body


async def test_metadata_stand_in_is_refused_directly(
    aiohttp_client: Any, tmp_path: Path, internal: Internal
) -> None:
    api = await _node(aiohttp_client, tmp_path)
    body = await _refused(
        api,
        internal.url("/meta"),
        "package URL host 127.0.0.1 is a loopback address; refused by the outbound policy",
    )
    assert str(internal.port) not in body["error"]  # no port-scanner oracle
    await _refused(api, f"http://[::ffff:127.0.0.1]:{internal.port}/meta", "a loopback address")
    await _refused(api, f"http://0.0.0.0:{internal.port}/meta", "an unspecified address")
    assert internal.hits == []


async def test_a_name_resolving_to_loopback_is_refused(
    aiohttp_client: Any, tmp_path: Path, internal: Internal
) -> None:
    api = await _node(aiohttp_client, tmp_path)
    await _refused(api, internal.url("/meta", host="localhost"), "host localhost resolves to")
    assert internal.hits == []


async def test_a_redirect_from_an_allowlisted_server_to_loopback_is_refused(
    aiohttp_client: Any, tmp_path: Path, internal: Internal
) -> None:
    api = await _node(aiohttp_client, tmp_path, package_allow_hosts=["localhost"])
    start = internal.url(f"/to?u={internal.url('/meta')}", host="localhost")
    await _refused(api, start, "package URL redirect to host 127.0.0.1 is a loopback address")
    assert internal.hits == ["/to"]  # the allowlisted hop, never /meta


async def test_an_allowlisted_internal_host_is_fetched_and_credentials_stay_out(
    aiohttp_client: Any, tmp_path: Path, internal: Internal
) -> None:
    api = await _node(aiohttp_client, tmp_path, package_allow_hosts=["localhost"])
    url = f"http://deployer:s3cr3t-pw@localhost:{internal.port}/pkg.tgz"
    with capture_logs() as logs:
        status, body = await api.op("deploy_component", project="web", package=url)
    assert status == 200, body
    assert internal.hits == ["/pkg.tgz"] and internal.auth[0] is not None  # sent to its origin
    _, row = await api.op("get_deployment", deployment_id=body["deployment_id"])
    assert row["package_identifier"] == f"http://localhost:{internal.port}/pkg.tgz"
    _, listing = await api.op("list_deployments", include_event_log=True)
    assert "s3cr3t" not in json.dumps(listing) and "s3cr3t" not in repr(logs)
    resp = await api.client.post(
        "/",
        json={"operation": "get_deployment_payload", "deployment_id": body["deployment_id"]},
        headers={"Authorization": api.auth},
    )
    assert resp.status == 200 and await resp.read() == PACKAGE


async def test_an_allowlisted_network_is_fetched_and_its_non_archives_are_not_kept(
    aiohttp_client: Any, tmp_path: Path, internal: Internal
) -> None:
    api = await _node(aiohttp_client, tmp_path, package_allow_networks=["127.0.0.0/8"])
    status, body = await api.op("deploy_component", project="web", package=internal.url("/pkg.tgz"))
    assert status == 200, body
    before = Services(api.app).ctx.blobs.stats()[0]
    status, body = await api.op("deploy_component", project="api", package=internal.url("/meta"))
    assert status == 422 and body["code"] == "bad_payload", body
    assert "is not a gzip or tar archive; nothing was kept" in body["error"]
    assert SECRET not in json.dumps(body)
    assert Services(api.app).ctx.blobs.stats()[0] == before
    status, row = await api.op("get_deployment", deployment_id=body["deployment_id"])
    assert row["payload_hash"] is None and row["payload_blob_present"] is False


async def test_fetch_failures_are_plain_words(
    aiohttp_client: Any, tmp_path: Path, internal: Internal
) -> None:
    api = await _node(
        aiohttp_client, tmp_path, package_allow_networks=["127.0.0.0/8"], package_max_redirects=3
    )
    cases = [
        (internal.url("/missing"), "answered HTTP 404"),
        (internal.url("/loop"), "took more than 3 redirects"),
        ("http://127.0.0.1:1/p.tgz", "failed: could not connect"),
        (f"http://u:pw-secret@127.0.0.1:{internal.port}/missing", "answered HTTP 404"),
    ]
    for url, needle in cases:
        status, body = await api.op("deploy_component", project="web", package=url)
        assert status == 422 and body["code"] == "package_fetch_failed", body
        assert needle in body["error"], body
        for leak in ("Error", "errno", "Connect call", "pw-secret", "("):
            assert leak not in body["error"], body
        await _nothing_kept(api, body["deployment_id"])


async def test_control_characters_in_package_are_a_400_without_a_row(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    api = await _node(aiohttp_client, tmp_path)
    for package in ("http://example.org/p\x00.tgz", "http://example.org/\r\nX-Evil: 1", "\x7f"):
        status, body = await api.op("deploy_component", project="web", package=package)
        assert status == 400 and body["field"] == "package", body
    status, listing = await api.op("list_deployments")
    assert listing["total"] == 0


async def test_the_connector_checks_the_peer_it_reached(internal: Internal) -> None:
    """Even if a resolver let a name through, the connection's peer is checked before
    a request is written on it (here the resolver allowlists what the connector does not)."""
    lenient = PolicyResolver(OutboundPolicy.from_config(["localhost"], []))
    connector = PolicyConnector(OutboundPolicy(), lenient)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(Refused, match="host localhost resolves to"):
            await session.get(internal.url("/meta", host="localhost"))
    assert internal.hits == []
