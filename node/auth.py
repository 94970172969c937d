"""Users, passwords and permissions for the admin API.

Passwords are stored as scrypt hashes (``scrypt$n$r$p$salt$hash``, base64 parts) and
never returned. Verifying a password costs tens of milliseconds of CPU by design, so it
runs in a worker thread and a successful check is remembered (keyed by the stored hash
and a digest of the presented password) until the user row changes.

A super user may do everything; any other role may do exactly the operations its
``permission.operations`` list names.

Password guessing is bounded: failures are counted per source address and per user
name (known or not) in a window of ``[auth] failure_window_s``; past
``max_failures_per_source`` or ``max_failures_per_user`` every attempt from that source
or for that user is answered 429 with ``Retry-After`` (before any password is checked)
until the window ends. The tables live in memory and hold at most
``failure_table_size`` entries each. An unknown or inactive user costs the same scrypt
check as a wrong password (against a dummy hash), so timing does not tell whether a
user exists. Every refusal is logged with the user name and source, never a password.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from node.config import AuthConfig
from node.errors import TooManyRequests, Unauthorized
from storage.accounts import Accounts

__all__ = ["Authenticator", "FailureLimiter", "Principal", "hash_password", "verify_password"]

log = structlog.get_logger(__name__)

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


class FailureLimiter:
    """Failed attempts per key in a fixed window, in a table of bounded size.

    A key with ``max_failures`` failures in its current window is blocked until the
    window ends. When the table is full the entry touched longest ago is dropped.
    """

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_entries = max(1, max_entries)
        self.clock = clock
        self._table: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None when it is not blocked."""
        entry = self._table.get(key)
        if entry is None or self.max_failures <= 0:
            return None
        started, count = entry
        left = started + self.window_s - self.clock()
        if left <= 0:
            del self._table[key]
            return None
        return left if count >= self.max_failures else None

    def failed(self, key: str) -> None:
        now = self.clock()
        started, count = self._table.pop(key, (now, 0))
        if now - started >= self.window_s:
            started, count = now, 0
        self._table[key] = (started, count + 1)
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)

    def forget(self, key: str) -> None:
        self._table.pop(key, None)


def _user_key(username: str) -> str:
    # No user name is longer than 128 characters, so every longer one shares a bucket:
    # the table's memory stays bounded by its entry count.
    return username if len(username) <= 128 else "\0overlong"


def _shown(username: str) -> str:
    """A user name as logged: bounded, so a megabyte of header is not a log line."""
    return username if len(username) <= 128 else username[:128] + "..."


class Authenticator:
    """Checks ``Authorization: Basic`` headers against the replicated users table."""

    def __init__(self, accounts: Accounts, config: AuthConfig | None = None) -> None:
        self.accounts = accounts
        cfg = config if config is not None else AuthConfig()
        window, size = cfg.failure_window_s, cfg.failure_table_size
        self.by_source = FailureLimiter(cfg.max_failures_per_source, window, size)
        self.by_user = FailureLimiter(cfg.max_failures_per_user, window, size)
        self._verified: dict[tuple[str, str], str] = {}
        self._dummy: str | None = None

    async def _dummy_hash(self) -> str:
        # Made once, with the same parameters as real hashes, so checking a password
        # for a user that does not exist costs what a wrong password costs.
        if self._dummy is None:
            self._dummy = await asyncio.to_thread(hash_password, os.urandom(16).hex())
        return self._dummy

    def _refuse(self, message: str, reason: str, username: str | None, source: str) -> Unauthorized:
        log.warning("auth_failed", reason=reason, user=_shown(username or ""), source=source)
        return Unauthorized(message, headers=_challenge())

    def _check_blocked(self, username: str | None, source: str) -> None:
        waits = [self.by_source.retry_after(source)]
        if username is not None:
            waits.append(self.by_user.retry_after(_user_key(username)))
        wait = max((w for w in waits if w is not None), default=None)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            user = _shown(username or "")
            log.warning("auth_rate_limited", user=user, source=source, retry_after_s=seconds)
            raise TooManyRequests(
                f"too many failed sign-ins; try again in {seconds} s",
                headers={"Retry-After": str(seconds), **_challenge()},
                retry_after_s=seconds,
            )

    def _failed(self, username: str | None, source: str) -> None:
        self.by_source.failed(source)
        if username is not None:
            self.by_user.failed(_user_key(username))

    async def authenticate(self, header: str | None, source: str | None = None) -> Principal:
        """Return the caller for an ``Authorization`` header sent from ``source``.

        Raises:
            Unauthorized: no header, not Basic, unknown user, wrong password, or a user
                that is inactive or has no role.
            TooManyRequests: too many failures from this source or for this user name
                in the current window (checked before the password).
        """
        where = source or "unknown"
        if not header or not header.lower().startswith("basic "):
            self._check_blocked(None, where)
            raise self._refuse("authentication required", "no_credentials", None, where)
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
            username, password = decoded.split(":", 1)
        except (ValueError, binascii.Error):
            self._check_blocked(None, where)
            self._failed(None, where)
            raise self._refuse("malformed Basic credentials", "malformed", None, where) from None
        self._check_blocked(username, where)
        user = await self.accounts.get_user(username)
        if user is None or not user.active:
            await asyncio.to_thread(verify_password, password, await self._dummy_hash())
            self._failed(username, where)
            reason = "unknown_user" if user is None else "inactive_user"
            raise self._refuse("wrong username or password", reason, username, where)
        presented = hashlib.sha256(password.encode()).hexdigest()
        key = (username, user.password_hash)
        if self._verified.get(key) != presented:
            ok = await asyncio.to_thread(verify_password, password, user.password_hash)
            if not ok:
                self._failed(username, where)
                raise self._refuse("wrong username or password", "wrong_password", username, where)
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key] = presented
        self.by_user.forget(_user_key(username))
        role = await self.accounts.get_role(user.role)
        if role is None:
            raise self._refuse(f"user {username} has no valid role", "no_role", username, where)
        return principal_for(username, role.role, role.permission)


def principal_for(username: str, role: str, permission: dict[str, Any]) -> Principal:
    ops = permission.get("operations") or []
    return Principal(
        username=username,
        role=role,
        super_user=bool(permission.get("super_user")),
        operations=frozenset(o for o in ops if isinstance(o, str)),
    )
