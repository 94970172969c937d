"""The one table mapping operation names to handlers and permissions.

A handler is a plain async function from a :class:`Call` (the validated request, the
caller and the node's services) to a JSON-able dict, or to a ``StreamResponse`` it has
already prepared (SSE, payload downloads). The permission an operation needs is its own
name: a role is granted operations by name. An operation registered with
``any_user=True`` (the caller asking about itself) needs no grant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from node.appkeys import CONFIG, Services
from node.auth import Principal
from node.body import Body
from node.config import Config
from node.validate import Fields

__all__ = ["Call", "Handler", "Operation", "Registry"]


@dataclass
class Call:
    """One operation call after authentication and body parsing."""

    request: web.Request
    principal: Principal
    body: Body
    fields: Fields

    @property
    def app(self) -> web.Application:
        return self.request.app

    @property
    def services(self) -> Services:
        return Services(self.request.app)

    @property
    def config(self) -> Config:
        return self.request.app[CONFIG]

    @property
    def wants_sse(self) -> bool:
        return "text/event-stream" in self.request.headers.get("Accept", "")


Handler = Callable[[Call], Awaitable[dict[str, Any] | list[Any] | web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Operation:
    name: str
    handler: Handler
    accepts_payload: bool = False
    #: Every authenticated caller may run it, whatever its role grants.
    any_user: bool = False


class Registry:
    """Operation name → :class:`Operation`."""

    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}

    def add(
        self, name: str, *, accepts_payload: bool = False, any_user: bool = False
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            if name in self._ops:
                raise ValueError(f"operation {name} registered twice")
            self._ops[name] = Operation(name, handler, accepts_payload, any_user)
            return handler

        return register

    def get(self, name: str) -> Operation | None:
        return self._ops.get(name)

    def names(self) -> list[str]:
        return sorted(self._ops)

    def merge(self, other: Registry) -> None:
        for name, op in other._ops.items():
            if name in self._ops:
                raise ValueError(f"operation {name} registered twice")
            self._ops[name] = op
