"""The errors :class:`node.cli.api.client.Client` raises.

:mod:`node.cli.api.client` translates aiohttp's exceptions once, where they enter, into this
tree::

    ClientError
    ├── ConnectError   the target could not be reached (refused, DNS, TLS, timeout)
    ├── AuthError      401: missing or wrong credentials
    ├── ApiError       any other error answer: HTTP status plus the error body
    └── StreamError    an event stream broke off and could not be resumed

Pure code with no aiohttp import, so the command line can catch these cheaply.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "AuthError", "ClientError", "ConnectError", "StreamError"]


class ClientError(Exception):
    """Base of every error this client raises."""


class ConnectError(ClientError):
    """The target could not be reached."""


class ApiError(ClientError):
    """The node answered with an error.

    Attributes:
        status: the HTTP status.
        body: the JSON error body (``{"error", "code", ...}``), or a synthetic one.
    """

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(self.describe())

    @property
    def code(self) -> str:
        return str(self.body.get("code", "error"))

    def describe(self) -> str:
        """One line: the message and its code."""
        return f"{self.body.get('error', 'request failed')} [{self.code}]"


class AuthError(ApiError):
    """401: no credentials, or wrong ones."""


class StreamError(ClientError):
    """An event stream ended without its terminal event and could not be resumed."""
