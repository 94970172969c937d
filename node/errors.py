"""Errors that can reach an admin API client.

Every error a client can see is a :class:`CairnError` carrying its HTTP status and a
machine ``code``; the error middleware turns it into ``{"error", "code", ...extra}``.
Anything else that escapes a handler is a bug and becomes a logged 500.

    CairnError
    ├── BadRequest           400  invalid input (names the field)
    │   └── ReservedField    400  reserved_field
    ├── Unauthorized         401  (sends WWW-Authenticate)
    ├── Forbidden            403
    ├── NotFound             404
    ├── Conflict             409
    ├── Gone                 410  payload_gone
    ├── TooLarge             413
    ├── TooManyRequests      429  too_many_requests (sends Retry-After)
    ├── DeployFailed         status and code of the cause (422 bad_payload, unsafe_payload,
    │                        install_failed, check_failed; 503 replication_failed,
    │                        storage_error; 504 deployment_timeout; 507
    │                        insufficient_storage; 410 payload_gone; interrupted)
    └── Unavailable          503  cluster not reachable
"""

from __future__ import annotations

import errno
from typing import Any

__all__ = [
    "BadRequest",
    "CairnError",
    "Conflict",
    "DeployFailed",
    "Forbidden",
    "Gone",
    "NotFound",
    "ReservedField",
    "TooLarge",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "is_disk_full",
    "step_failure",
]


class CairnError(Exception):
    """Base of every client-visible error."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = headers or {}
        self.extra: dict[str, Any] = extra

    def body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": message, "code": code, **extra}``."""
        return {"error": self.message, "code": self.code, **self.extra}


class BadRequest(CairnError):
    status = 400
    code = "invalid_input"


class ReservedField(BadRequest):
    code = "reserved_field"


class Unauthorized(CairnError):
    status = 401
    code = "unauthorized"


class Forbidden(CairnError):
    status = 403
    code = "forbidden"


class NotFound(CairnError):
    status = 404
    code = "not_found"


class Conflict(CairnError):
    status = 409
    code = "conflict"


class Gone(CairnError):
    status = 410
    code = "payload_gone"


class TooLarge(CairnError):
    status = 413
    code = "too_large"


class TooManyRequests(CairnError):
    status = 429
    code = "too_many_requests"


class Unavailable(CairnError):
    status = 503
    code = "cluster_unavailable"


_DEPLOY_STATUS = {
    "bad_payload": 422,
    "unsafe_payload": 422,
    "install_failed": 422,
    "check_failed": 422,
    "payload_gone": 410,
    "replication_failed": 503,
    "deployment_timeout": 504,
    "interrupted": 500,
    "internal_error": 500,
    "origin_lost": 503,
    "superseded": 409,
    "not_ready": 422,
    "activation_failed": 422,
    "too_large": 413,
    "upload_failed": 400,
    "package_fetch_failed": 422,
    "storage_error": 503,
    "insufficient_storage": 507,
}

#: errnos that mean the node's disk (or the user's quota on it) is full.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from, says the disk is full (ENOSPC,
    EDQUOT, or SQLite's "database or disk is full")."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _NO_SPACE:
            return True
        if "database or disk is full" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def step_failure(e: Exception, *, phase: str) -> DeployFailed:
    """The outcome of an exception no deploy step expected (SPEC 4).

    A full disk is ``insufficient_storage`` (507) and any other I/O error (a file that
    vanished, a failing device) ``storage_error`` (503): the node's storage failed, not
    the payload and not the code. Anything else is a bug: ``internal_error`` (500).
    """
    text = f"{type(e).__name__}: {e}"
    if is_disk_full(e):
        return DeployFailed(f"no space left on the node's disk: {text}"[:2000],
                            code="insufficient_storage", phase=phase)  # fmt: skip
    if isinstance(e, OSError):
        return DeployFailed(f"storage error: {text}"[:2000], code="storage_error", phase=phase)
    return DeployFailed(f"internal error: {text}"[:2000], code="internal_error", phase=phase)


class DeployFailed(CairnError):
    """A deploy ended in ``failed``; the status and code are those of the cause.

    ``phase`` names the phase that failed; ``extra`` may carry ``install_output`` and
    ``failed_nodes``. The deployment id is added by the operation that answers.
    """

    status = 422
    code = "deploy_failed"

    def __init__(self, message: str, *, code: str, phase: str, **extra: Any) -> None:
        super().__init__(message, code=code, **extra)
        self.phase = phase
        self.status = _DEPLOY_STATUS.get(code, 422)
