"""Liveness and readiness: ``GET /health`` and ``GET /ready`` (no authentication).

``/health`` says the process serves (liveness: restart it when this fails).
``/ready`` says whether this node is fit to take work, and if not, why (readiness: route
traffic elsewhere meanwhile): every configured peer connected, no change refused or
quarantined since start, the bootstrap user present (a joining node creates it once
caught up), every project converged here, and the certificate not expiring
within the warning window (that one is reported but does not make the node unready).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from node.appkeys import ACCOUNTS, CONFIG, STORE, Services

__all__ = ["health", "readiness", "ready"]


async def readiness(app: web.Application) -> tuple[bool, list[str], list[str]]:
    """``(ready, reasons it is not, warnings)`` for this node."""
    reasons: list[str] = []
    warnings: list[str] = []
    services = Services(app)
    status: dict[str, Any] | None = None
    if services.cluster_status is not None:
        status = await services.cluster_status()
    if status is not None:
        for peer in status.get("peers", []):
            if peer.get("state") != "connected":
                reasons.append(f"peer {peer['name']} is {peer.get('state')}")
            refused = int(peer.get("quarantined") or 0) + int(peer.get("refused") or 0)
            if refused:
                reasons.append(f"{refused} change(s) from {peer['name']} were refused")
        warnings += list(status.get("warnings", []))
    config = app[CONFIG]
    accounts, name = app[ACCOUNTS], config.auth.bootstrap_user
    if not await accounts.user_known(name):
        # A node joining a cluster creates its bootstrap user only once it has caught up
        # (the cluster may have it already): until then nobody can sign in here.
        reasons.append(
            f"accounts: user {name!r} not here yet (waiting to catch up with peers before "
            "creating it)"
        )
    elif (user := await accounts.get_user(name)) is not None and (
        await accounts.get_role(user.role) is None
    ):
        # The user came from a peer and its role has not yet: it cannot sign in here.
        reasons.append(f"accounts: role {user.role!r} of user {name!r} not here yet")
    me = config.node.name
    for row in await app[STORE].components():
        if row["node"] == me and not row["converged"]:
            reasons.append(f"{row['project']}: {row['reason'] or 'not converged'}")
    return not reasons, reasons, warnings


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node": request.app[CONFIG].node.name})


async def ready(request: web.Request) -> web.Response:
    ok, reasons, warnings = await readiness(request.app)
    body: dict[str, Any] = {
        "status": "ready" if ok else "not_ready",
        "node": request.app[CONFIG].node.name,
        "reasons": reasons,
        "warnings": warnings,
    }
    return web.json_response(body, status=200 if ok else 503)
