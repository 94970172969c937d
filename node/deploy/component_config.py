"""``component.toml``: the hooks and the run command a release declares.

Read once per release, after extraction and before any hook runs. The file is optional;
when present it must be small, valid UTF-8 TOML with only the known tables and keys, so a
typo fails the deploy instead of being ignored.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import DeployFailed

__all__ = [
    "COMPONENT_FILE",
    "Command",
    "ComponentConfig",
    "HookSpec",
    "RunSpec",
    "load_component_config",
]

COMPONENT_FILE = "component.toml"
Command = str | tuple[str, ...]

_MAX_CONFIG_BYTES = 1 << 20
_MAX_TIMEOUT_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class HookSpec:
    """One hook: an argv tuple, or a string run with ``sh -c``."""

    command: Command
    timeout_s: float

    @property
    def argv(self) -> tuple[str, ...]:
        return _argv(self.command)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """The supervised process; parsed and kept here, run by the supervisor."""

    command: Command
    timeout_s: float = 60.0
    ready_command: Command | None = None
    ready_timeout_s: float = 60.0

    @property
    def argv(self) -> tuple[str, ...]:
        return _argv(self.command)


@dataclass(frozen=True, slots=True)
class ComponentConfig:
    install: HookSpec | None = None
    check: HookSpec | None = None
    run: RunSpec | None = None


def _argv(command: Command) -> tuple[str, ...]:
    return ("sh", "-c", command) if isinstance(command, str) else command


def _config_error(message: str, key: str | None = None) -> DeployFailed:
    extra = {"key": key} if key is not None else {}
    return DeployFailed(
        f"{COMPONENT_FILE}: {message}", code="bad_payload", phase="install", **extra
    )


_TABLES: dict[str, tuple[str, ...]] = {
    "install": ("command", "timeout_s"),
    "check": ("command", "timeout_s"),
    "run": ("command", "timeout_s", "ready_command", "ready_timeout_s"),
}
_DEFAULT_TIMEOUT_S = {"install": 300.0, "check": 60.0, "run": 60.0}


def load_component_config(release_dir: Path) -> ComponentConfig:
    """Read ``component.toml`` from a release directory, if there is one.

    Args:
        release_dir: the extracted release.

    Returns:
        The hooks it declares; an empty config when the file is absent.

    Raises:
        DeployFailed: ``bad_payload`` (phase ``install``) when the file is not valid TOML,
            has unknown tables or keys, or a value of the wrong type; the message and the
            ``key`` extra name the offending key.
    """
    path = release_dir / COMPONENT_FILE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ComponentConfig()
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_CONFIG_BYTES:
        raise _config_error(f"must be a regular file under {_MAX_CONFIG_BYTES} bytes")
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _config_error("is not UTF-8") from e
    except tomllib.TOMLDecodeError as e:
        raise _config_error(f"invalid TOML: {e}") from e
    for key in doc:
        if key not in _TABLES:
            raise _config_error(f"unknown key {key!r} (expected [install], [check], [run])", key)
    tables = {name: _table(doc, name) for name in _TABLES}
    install, check, run = (tables[n] for n in ("install", "check", "run"))
    return ComponentConfig(
        install=HookSpec(install["command"], install["timeout_s"]) if install else None,
        check=HookSpec(check["command"], check["timeout_s"]) if check else None,
        run=RunSpec(**run) if run else None,
    )


def _table(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    raw = doc.get(name)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _config_error(f"[{name}] must be a table", name)
    for key in raw:
        if key not in _TABLES[name]:
            raise _config_error(f"unknown key {name}.{key}", f"{name}.{key}")
    if "command" not in raw:
        raise _config_error(f"missing {name}.command", f"{name}.command")
    out: dict[str, Any] = {"command": _command(raw["command"], f"{name}.command")}
    out["timeout_s"] = _timeout(raw.get("timeout_s", _DEFAULT_TIMEOUT_S[name]), f"{name}.timeout_s")
    if "ready_command" in raw:
        out["ready_command"] = _command(raw["ready_command"], f"{name}.ready_command")
    if "ready_timeout_s" in raw:
        out["ready_timeout_s"] = _timeout(raw["ready_timeout_s"], f"{name}.ready_timeout_s")
    return out


def _command(value: object, key: str) -> Command:
    if isinstance(value, str) and value.strip() and "\0" not in value:
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(a, str) and "\0" not in a for a in value)
        and value[0]
    ):
        return tuple(value)
    raise _config_error(f"{key} must be a non-empty string or a list of strings", key)


def _timeout(value: object, key: str) -> float:
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= _MAX_TIMEOUT_S
    ):
        return float(value)
    raise _config_error(f"{key} must be a number of seconds in (0, {_MAX_TIMEOUT_S}]", key)
