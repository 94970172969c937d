"""Validation of request fields, naming the field in every error.

Values from JSON, CBOR and MessagePack keep their types and must match exactly (a
boolean is not a number). Values from multipart form fields arrive as text, so for
those the usual spellings are accepted (``true``/``false``, decimal integers).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

from node.errors import BadRequest

__all__ = ["PROJECT_RE", "Fields"]

PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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
        value = self.string(name, required=required, max_len=128)
        if value is not None and not PROJECT_RE.match(value):
            raise BadRequest(
                f"'{name}' must match {PROJECT_RE.pattern} (letters, digits, '.', '_', '-')",
                field=name,
            )
        return value

    def deployment_id(self, name: str = "deployment_id", *, required: bool = True) -> str | None:
        value = self.string(name, required=required, max_len=64)
        if value is None:
            return None
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            raise BadRequest(f"'{name}' must be a deployment id (a UUID)", field=name) from None
        return str(parsed)

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
