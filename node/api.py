"""The admin API's HTTP surface: ``POST /`` operations, ``/health``, ``/metrics``.

Order of checks on ``POST /``: failure limiting (429) → credentials (401) → body and
operation (400/413) → permission (403) → the handler. Every 403 is logged with the
user, source address and operation (401 and 429 by the authenticator). Nothing is
written before the permission check passes, so a refused call has no side effect.
:func:`error_middleware` turns every :class:`CairnError` into its JSON body; anything
else is a logged 500.
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from aiohttp import web

from node.appkeys import AUTH, CONFIG, METRICS, Services
from node.auth import Principal
from node.body import read_body
from node.errors import BadRequest, CairnError, Forbidden
from node.health import health, ready
from node.metrics import CONTENT_TYPE
from node.operations.registry import Call, Registry
from node.ui import ui_routes
from node.validate import Fields

__all__ = ["OPERATIONS", "error_middleware", "routes"]

log = structlog.get_logger(__name__)

OPERATIONS: web.AppKey[Registry] = web.AppKey("operations")
OPERATION_NAME: web.RequestKey[str] = web.RequestKey("operation")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except CairnError as e:
        status = e.status
        return _json(e.status, e.body(), e.headers)
    except web.HTTPException as e:
        status = e.status
        if e.status == 404:
            return _json(
                404, {"error": "not found: use POST / for operations", "code": "not_found"}
            )
        if e.status == 405:
            return _json(
                405,
                {
                    "error": f"method {request.method} is not allowed here",
                    "code": "method_not_allowed",
                },
            )
        raise
    except Exception:
        log.exception("request_failed", path=request.path)
        return _json(500, {"error": "internal error", "code": "internal_error"})
    finally:
        op = request.get(OPERATION_NAME, request.path)
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.requests.labels(operation=str(op), status=str(status)).observe(
                time.perf_counter() - started
            )


async def operations(request: web.Request) -> web.StreamResponse:
    app = request.app
    source = request.remote or "unknown"
    principal = await app[AUTH].authenticate(request.headers.get("Authorization"), source)
    try:
        return await _run(request, principal)
    except CairnError as e:
        if e.status == 403:  # 401 and 429 are logged by the authenticator
            log.warning(
                "operation_forbidden",
                user=principal.username,
                source=source,
                operation=request.get(OPERATION_NAME),
                code=e.code,
            )
        raise


async def _run(request: web.Request, principal: Principal) -> web.StreamResponse:
    app = request.app
    config = app[CONFIG]
    body = await read_body(
        request,
        max_body_bytes=config.limits.max_body_bytes,
        idle_s=config.limits.body_idle_timeout_s,
        min_bytes_per_s=config.limits.min_body_bytes_per_s,
    )
    name = body.operation
    request[OPERATION_NAME] = name
    op = app[OPERATIONS].get(name)
    if op is None:
        raise BadRequest(f"unknown operation {name!r}", field="operation", code="unknown_operation")
    if not (op.any_user or principal.may(name)):
        raise Forbidden(f"user {principal.username} may not run {name}", operation=name)
    if (
        body.payload_bytes is not None or body.payload_stream is not None
    ) and not op.accepts_payload:
        raise BadRequest(f"operation {name} takes no payload", field="payload")
    structlog.contextvars.bind_contextvars(operation=name, user=principal.username)
    try:
        result = await op.handler(
            Call(request, principal, body, Fields(body.fields, form=body.form))
        )
    finally:
        structlog.contextvars.unbind_contextvars("operation", "user")
    if isinstance(result, web.StreamResponse):
        return result
    return _json(200, result)


async def metrics(request: web.Request) -> web.Response:
    services = Services(request.app)
    status = await services.cluster_status() if services.cluster_status else None
    text = await request.app[METRICS].render(
        services.ctx.store, services.ctx.blobs, status, storage=services.ctx.space.status()
    )
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})


async def root(request: web.Request) -> web.Response:
    """Send a browser asking for ``/`` to the web view; anything else gets the 405."""
    if "text/html" in request.headers.get("Accept", ""):
        raise web.HTTPFound("/ui/")
    raise web.HTTPMethodNotAllowed(request.method, ["POST"])


def routes() -> list[web.RouteDef]:
    return [
        web.post("/", operations),
        web.get("/", root),
        *ui_routes(),
        web.get("/health", health),
        web.get("/ready", ready),
        web.get("/metrics", metrics),
    ]
