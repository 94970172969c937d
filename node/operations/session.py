"""``get_session``: who the caller is and what it may do (for the web view's buttons).

Every authenticated user may ask about itself, so the operation is registered with
``any_user=True`` and no role needs to be granted it. ``operations`` is the exact list
the permission check would allow right now: for a super user every operation the node
has, for anyone else the operations its role names that exist, plus the ones open to
every user. A client hides what is not in the list; the server still checks each call.
"""

from __future__ import annotations

from typing import Any

from node.api import OPERATIONS
from node.operations.registry import Call, Registry

__all__ = ["registry"]

registry = Registry()


@registry.add("get_session", any_user=True)
async def get_session(call: Call) -> dict[str, Any]:
    principal = call.principal
    ops = call.app[OPERATIONS]
    allowed = [
        name
        for name in ops.names()
        if principal.may(name) or ((op := ops.get(name)) is not None and op.any_user)
    ]
    return {
        "username": principal.username,
        "role": principal.role,
        "super_user": principal.super_user,
        "operations": allowed,
    }
