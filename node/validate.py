"""Validation of request fields, naming the field in every error.

Values from JSON, CBOR and MessagePack keep their types and must match exactly (a
boolean is not a number). Values from multipart form fields arrive as text, so for
those the usual spellings are accepted (``true``/``false``, decimal integers).

Names, ids and hashes are checked by :mod:`storage.rules`, the validator replication
apply uses too, always against the whole string (``"site\n"`` is not a project name).
A deployment id that is a string but names no record (whatever its shape) is a 404
naming it, not a 400: only a wrong type is bad input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from node.errors import BadRequest, NotFound
from storage import rules

__all__ = ["PROJECT_RE", "Fields", "not_found_id"]

PROJECT_RE = rules.PROJECT_RE
_MISSING = object()
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class Fields:
    """Typed, validated access to a request body's fields."""

    def __init__(self, raw: Mapping[str, Any], *, form: bool = False) -> None:
        self.raw = raw
        self.form = form

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def _get(self, name: str, required: bool) -> Any:
        value = self.raw.get(name, _MISSING)
        if value is _MISSING or value is None:
            if required:
                raise BadRequest(f"'{name}' is required", field=name)
            return _MISSING
        return value

    def string(self, name: str, *, required: bool = False, max_len: int = 4096) -> str | None:
        value = self._get(name, required)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string", field=name)
        if len(value) > max_len:
            raise BadRequest(f"'{name}' is longer than {max_len} characters", field=name)
        return value

    def req_str(self, name: str, *, max_len: int = 4096) -> str:
        value = self.string(name, required=True, max_len=max_len)
        assert value is not None
        return value

    def project(self, name: str = "project", *, required: bool = True) -> str | None:
        value = self._get(name, required)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string", field=name)
        return _rule(rules.check_project, value, name)

    def username(self, name: str = "username") -> str:
        """A required user name (``storage.rules.USERNAME_RE``, the whole string)."""
        return _rule(rules.check_username, self.req_str(name, max_len=128), name)

    def role_name(self, name: str = "role") -> str:
        """A required role name (the same alphabet as user names)."""
        return _rule(rules.check_role_name, self.req_str(name, max_len=128), name)

    def deployment_id(self, name: str = "deployment_id", *, required: bool = True) -> str | None:
        """A deployment id in canonical form (hex digits may be given in upper case).

        Raises:
            BadRequest: missing (when required) or not a string.
            NotFound: a string that cannot name any deployment.
        """
        value = self._get(name, required)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string", field=name)
        canonical = value.lower()
        if not rules.is_deployment_id(canonical):
            raise not_found_id(value, name)
        return canonical

    def integer(
        self,
        name: str,
        *,
        default: int | None = None,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        value = self._get(name, False)
        if value is _MISSING:
            return default
        if self.form and isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
            value = int(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"'{name}' must be an integer", field=name)
        if not _INT64_MIN <= value <= _INT64_MAX:  # SQLite integers are 64-bit
            raise BadRequest(f"'{name}' is out of range", field=name)
        if minimum is not None and value < minimum:
            raise BadRequest(f"'{name}' must be at least {minimum}", field=name)
        if maximum is not None and value > maximum:
            raise BadRequest(f"'{name}' must be at most {maximum}", field=name)
        return value

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self._get(name, False)
        if value is _MISSING:
            return default
        if self.form and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise BadRequest(f"'{name}' must be true or false", field=name)
        return value

    def restart(self, name: str = "restart") -> str | None:
        """``false`` → None, ``true`` → ``immediate``, ``"rolling"`` → ``rolling``."""
        value = self._get(name, False)
        if value is _MISSING:
            return None
        if self.form and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if value is False:
            return None
        if value is True or value == "immediate":
            return "immediate"
        if value == "rolling":
            return "rolling"
        raise BadRequest(f"'{name}' must be false, true or \"rolling\"", field=name)

    def obj(self, name: str, *, required: bool = False) -> dict[str, Any] | None:
        value = self._get(name, required)
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            raise BadRequest(f"'{name}' must be an object", field=name)
        return value

    def choice(self, name: str, choices: tuple[str, ...], *, required: bool = False) -> str | None:
        value = self.string(name, required=required)
        if value is not None and value not in choices:
            raise BadRequest(f"'{name}' must be one of {', '.join(choices)}", field=name)
        return value


def not_found_id(value: str, field: str = "deployment_id") -> NotFound:
    """The 404 for a deployment id that names no record (the id shown, bounded)."""
    shown = value if len(value) <= 200 else value[:200] + "..."
    text = shown if shown.isprintable() else repr(shown)
    return NotFound(f"deployment {text} not found", field=field, deployment_id=shown)


def _rule(check: Any, value: str, name: str, **kwargs: Any) -> str:
    """Run a ``storage.rules`` check and turn its :class:`RuleError` into a 400."""
    try:
        result: str = check(value, name, **kwargs)
    except rules.RuleError as e:
        raise BadRequest(e.message, field=e.field) from None
    return result
