"""The record's rules: one validator for every value a row may hold.

The admin API (``node/validate.py``) and replication apply (``storage/apply.py``) both
check values here, so a value a client cannot store through the API cannot arrive from
a peer either. Every pattern is matched against the whole string (``fullmatch``): a
trailing newline is not a valid project name.

Each ``check_*`` function returns the value it was given (or its canonical form) and
raises :class:`RuleError` naming the field and the rule it broke.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import uuid
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MAX_EVENT_SEQ",
    "MAX_PAYLOAD_SIZE",
    "NODE_NAME_RE",
    "PROJECT_RE",
    "SHA256_RE",
    "USERNAME_RE",
    "RuleError",
    "check_deployment_id",
    "check_finite",
    "check_node_name",
    "check_node_names",
    "check_password_hash",
    "check_permission",
    "check_project",
    "check_role_name",
    "check_sha256",
    "check_size",
    "check_text",
    "check_username",
    "is_deployment_id",
]

#: A component name.
PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: A node name, as in ``[node] name``, certificates and peer frames.
NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: A user or role name.
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
#: A payload hash: sha256 as 64 lowercase hex digits.
SHA256_RE = re.compile(r"[0-9a-f]{64}")

#: Highest event seq a deployment's log may reach (far beyond any real deploy).
MAX_EVENT_SEQ = 1 << 31
#: Largest payload size a record may state (1 TiB; the configured limit is lower).
MAX_PAYLOAD_SIZE = 1 << 40

# scrypt parameters a stored hash may name: enough to be a hash, bounded so that a
# forged row cannot make every login burn gigabytes of memory.
_SCRYPT_N = (1 << 10, 1 << 20)
_SCRYPT_R = (1, 32)
_SCRYPT_P = (1, 16)
_SCRYPT_MAXMEM = 256 << 20


class RuleError(ValueError):
    """A value breaks the record's rules; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _string(value: object, field: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise RuleError(field, f"'{field}' must be {what}")
    return value


def check_project(value: object, field: str = "project") -> str:
    """A component name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``, the whole string."""
    return _string(value, field, PROJECT_RE, f"a project name matching ^{PROJECT_RE.pattern}$")


def check_node_name(value: object, field: str = "node") -> str:
    """A node name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``, the whole string."""
    return _string(value, field, NODE_NAME_RE, f"a node name matching ^{NODE_NAME_RE.pattern}$")


def check_node_names(value: object, field: str, *, max_count: int = 1024) -> tuple[str, ...]:
    """A list of distinct node names (at most ``max_count``)."""
    if not isinstance(value, list | tuple) or len(value) > max_count:
        raise RuleError(field, f"'{field}' must be a list of at most {max_count} node names")
    names = tuple(check_node_name(v, field) for v in value)
    if len(set(names)) != len(names):
        raise RuleError(field, f"'{field}' names a node twice")
    return names


def check_username(value: object, field: str = "username") -> str:
    """A user name: letters, digits, ``.``, ``_``, ``@``, ``-`` (at most 128)."""
    return _string(value, field, USERNAME_RE, "letters, digits, '.', '_', '@' or '-' (at most 128)")


def check_role_name(value: object, field: str = "role") -> str:
    """A role name: the same alphabet as user names."""
    return check_username(value, field)


def is_deployment_id(value: object) -> bool:
    """True when ``value`` is a UUID in canonical form (lowercase, hyphenated)."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def check_deployment_id(value: object, field: str = "deployment_id") -> str:
    """A deployment id: a UUID in canonical form (as cairn writes them)."""
    if not is_deployment_id(value):
        raise RuleError(field, f"'{field}' must be a deployment id (a UUID)")
    assert isinstance(value, str)
    return value


def check_sha256(value: object, field: str = "payload_hash") -> str:
    """A sha256 digest as 64 lowercase hex digits."""
    return _string(value, field, SHA256_RE, "a sha256 digest (64 lowercase hex digits)")


def check_size(value: object, field: str, *, maximum: int = MAX_PAYLOAD_SIZE) -> int:
    """A non-negative integer no larger than ``maximum`` (booleans are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise RuleError(field, f"'{field}' must be an integer from 0 to {maximum}")
    return value


def check_text(value: object, field: str, *, max_len: int, allow_control: bool = False) -> str:
    """A string of at most ``max_len`` characters, with no NUL (or other control
    characters unless ``allow_control``)."""
    if not isinstance(value, str) or len(value) > max_len:
        raise RuleError(field, f"'{field}' must be a string of at most {max_len} characters")
    if "\0" in value or (not allow_control and any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise RuleError(field, f"'{field}' must not contain control characters")
    return value


def check_permission(
    value: object, field: str = "permission", *, known_operations: Iterable[str] | None = None
) -> dict[str, Any]:
    """A role's permission: ``{"super_user": bool, "operations": [names]}``.

    Returns the canonical form (operations sorted and distinct). With
    ``known_operations``, every name must be one of them (the API checks against its
    registry; replication apply only checks the shape, since a newer node may know more
    operations).
    """
    if not isinstance(value, dict):
        raise RuleError(field, f"'{field}' must be an object")
    extra = set(value) - {"super_user", "operations"}
    if extra:
        raise RuleError(field, f"'{field}' has unknown keys: {', '.join(sorted(map(str, extra)))}")
    su = value.get("super_user", False)
    if not isinstance(su, bool):
        raise RuleError(field, f"'{field}.super_user' must be true or false")
    ops = value.get("operations", [])
    if not isinstance(ops, list | tuple) or len(ops) > 256:
        raise RuleError(field, f"'{field}.operations' must be a list of operation names")
    names: set[str] = set()
    for op in ops:
        if not isinstance(op, str) or re.fullmatch(r"[a-z][a-z0-9_]{0,63}", op) is None:
            raise RuleError(field, f"'{field}.operations' must be a list of operation names")
        names.add(op)
    if known_operations is not None:
        unknown = sorted(names - set(known_operations))
        if unknown:
            raise RuleError(field, f"'{field}.operations' names unknown operations: "
                            + ", ".join(unknown))  # fmt: skip
    return {"super_user": su, "operations": sorted(names)}


def check_password_hash(value: object, field: str = "password_hash") -> str:
    """A stored password: ``scrypt$N$r$p$salt$digest`` with bounded parameters, or the
    empty string of a deleted user."""
    if value == "":
        return ""
    if not isinstance(value, str) or len(value) > 512:
        raise RuleError(field, f"'{field}' must be an scrypt hash")
    parts = value.split("$")
    try:
        scheme, n_text, r_text, p_text, salt, digest = parts
        if scheme != "scrypt" or not all(t.isascii() and t.isdigit() for t in parts[1:4]):
            raise ValueError
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt_bytes = base64.b64decode(salt, validate=True)
        digest_bytes = base64.b64decode(digest, validate=True)
    except (ValueError, binascii.Error):
        raise RuleError(field, f"'{field}' must be an scrypt hash") from None
    in_range = (
        _SCRYPT_N[0] <= n <= _SCRYPT_N[1]
        and n & (n - 1) == 0
        and _SCRYPT_R[0] <= r <= _SCRYPT_R[1]
        and _SCRYPT_P[0] <= p <= _SCRYPT_P[1]
        and 128 * r * n * p <= _SCRYPT_MAXMEM
        and 8 <= len(salt_bytes) <= 64
        and 16 <= len(digest_bytes) <= 64
    )
    if not in_range:
        raise RuleError(field, f"'{field}' names scrypt parameters out of bounds")
    return value


def check_finite(value: object, field: str) -> float:
    """A finite number (NaN and infinities are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RuleError(field, f"'{field}' must be a finite number")
    return float(value)
