"""The errors :class:`node.cli.api.client.Client` raises, and plain words for OS errors.

:mod:`node.cli.api.client` translates aiohttp's (and the OS's) exceptions once, where
they enter, into this tree, with messages an operator can act on (never
``[Errno 111] ...`` or ``<urlopen error ...>``)::

    ClientError
    ├── ConnectError   the target could not be reached (refused, DNS, TLS, timeout)
    ├── ApiError       an error answer: HTTP status plus the error body
    │   └── AuthError  401: missing or wrong credentials
    └── StreamError    an event stream broke off and could not be resumed

Pure code with no aiohttp import, so the command line can catch these cheaply.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from typing import Any

__all__ = [
    "ApiError",
    "AuthError",
    "ClientError",
    "ConnectError",
    "StreamError",
    "describe_os_error",
]


class ClientError(Exception):
    """Base of every error this client raises."""


class ConnectError(ClientError):
    """The target could not be reached; the message says why and what to check."""


class ApiError(ClientError):
    """The node answered with an error.

    Attributes:
        status: the HTTP status.
        body: the JSON error body (``{"error", "code", ...}``), or a synthetic one.
        operation: the operation that was refused, when known.
    """

    def __init__(self, status: int, body: dict[str, Any], *, operation: str | None = None) -> None:
        self.status = status
        self.body = body
        self.operation = operation
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


#: errno → words, for the errors an operator meets (the rest use ``os.strerror``).
_WORDS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "the connection was reset",
    errno.EHOSTUNREACH: "no route to the host",
    errno.ENETUNREACH: "the network is unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "no such file or directory",
    errno.ENOSPC: "no space left on the device",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EROFS: "the file system is read-only",
}


def describe_os_error(e: BaseException) -> str:
    """A short lowercase phrase for an OS-level error: ``connection refused``,
    ``permission denied``, ``cannot resolve host``, ``timed out``...

    Accepts anything a socket, file or URL operation raises, including
    ``urllib.error.URLError`` (whose ``reason`` is unwrapped).
    """
    reason = getattr(e, "reason", None)
    if isinstance(reason, BaseException) and reason is not e:
        return describe_os_error(reason)
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return "cannot resolve the host name"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"the TLS certificate could not be verified ({e.verify_message})"
    if isinstance(e, ssl.SSLError):
        return f"TLS failed ({e.reason or e.strerror or 'handshake error'})"
    if isinstance(e, OSError) and e.errno:
        words = _WORDS.get(e.errno)
        return words or os.strerror(e.errno).lower()
    if isinstance(reason, str) and reason:
        return reason
    text = str(e) or type(e).__name__
    return text.splitlines()[0]
