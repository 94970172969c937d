"""Users, passwords and permissions for the admin API.

Passwords are stored as scrypt hashes (``scrypt$n$r$p$salt$hash``, base64 parts) and
never returned. Verifying a password costs tens of milliseconds of CPU by design, so it
runs in a worker thread and a successful check is remembered (keyed by the stored hash
and a digest of the presented password) until the user row changes.

A super user may do everything; any other role may do exactly the operations its
``permission.operations`` list names.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

from node.errors import Unauthorized
from storage.accounts import Accounts

__all__ = ["Authenticator", "Principal", "hash_password", "verify_password"]

_N, _R, _P = 1 << 14, 8, 1
SUPER_USER_ROLE = "super_user"


def hash_password(password: str, *, n: int = _N) -> str:
    """A new scrypt hash of ``password`` with a random salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a stored scrypt hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=64 << 20,
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, expected)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    username: str
    role: str
    super_user: bool
    operations: frozenset[str]

    def may(self, operation: str) -> bool:
        return self.super_user or operation in self.operations


def _challenge() -> dict[str, str]:
    return {"WWW-Authenticate": 'Basic realm="cairn", charset="UTF-8"'}


class Authenticator:
    """Checks ``Authorization: Basic`` headers against the replicated users table."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts
        self._verified: dict[tuple[str, str], str] = {}

    async def authenticate(self, header: str | None) -> Principal:
        """Return the caller for an ``Authorization`` header.

        Raises:
            Unauthorized: no header, not Basic, unknown user, wrong password, or a user
                that is inactive or has no role.
        """
        if not header or not header.lower().startswith("basic "):
            raise Unauthorized("authentication required", headers=_challenge())
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
            username, password = decoded.split(":", 1)
        except (ValueError, binascii.Error):
            raise Unauthorized("malformed Basic credentials", headers=_challenge()) from None
        user = await self.accounts.get_user(username)
        if user is None or not user.active:
            raise Unauthorized("wrong username or password", headers=_challenge())
        presented = hashlib.sha256(password.encode()).hexdigest()
        key = (username, user.password_hash)
        if self._verified.get(key) != presented:
            ok = await asyncio.to_thread(verify_password, password, user.password_hash)
            if not ok:
                raise Unauthorized("wrong username or password", headers=_challenge())
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key] = presented
        role = await self.accounts.get_role(user.role)
        if role is None:
            raise Unauthorized(f"user {username} has no valid role", headers=_challenge())
        return principal_for(username, role.role, role.permission)


def principal_for(username: str, role: str, permission: dict[str, Any]) -> Principal:
    ops = permission.get("operations") or []
    return Principal(
        username=username,
        role=role,
        super_user=bool(permission.get("super_user")),
        operations=frozenset(o for o in ops if isinstance(o, str)),
    )
