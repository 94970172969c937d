"""``component.toml``: the hooks and the run command a release declares.

Read once per release, after extraction and before any hook runs. The file is optional;
when present it must be small, valid UTF-8 TOML with only the known tables and keys, so a
typo fails the deploy instead of being ignored.
"""

from __future__ import annotations

import math
import os
import re
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
_MAX_READY_TIMEOUT_S = 3600
_MAX_STOP_GRACE_S = 600
_MAX_URL_LENGTH = 2048
#: A loopback http URL; the port may be ``${NAME}`` or ``${NAME:-default}``, expanded from
#: the run environment when the probe runs (see node/deploy/readiness.py).
_READY_URL = re.compile(
    r"http://(?:127\.0\.0\.1|localhost|\[::1\])"
    r"(?::(?:[0-9]{1,5}|\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[0-9]{1,5})?\}))?"
    r"(?:/[!-~]*)?"
)


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
    """The supervised process (``[run]``); run by :mod:`node.deploy.supervisor`.

    Attributes:
        command: what to run, in the release directory.
        ready_command: ready once this exits 0 (tried repeatedly); or
        ready_url: ready once a GET of this loopback URL answers 2xx. With neither, the
            process is ready once it is still running after the node's settle time.
        ready_timeout_s: how long the process has to become ready.
        stop_grace_s: SIGTERM → SIGKILL delay; None means the node's default.
    """

    command: Command
    ready_command: Command | None = None
    ready_url: str | None = None
    ready_timeout_s: float = 60.0
    stop_grace_s: float | None = None

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
    "run": (
        "command",
        "timeout_s",  # the older spelling of ready_timeout_s
        "ready_command",
        "ready_url",
        "ready_timeout_s",
        "stop_grace_s",
    ),
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
        run=_run_spec(run) if run else None,
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
    if "ready_url" in raw:
        out["ready_url"] = _ready_url(raw["ready_url"], f"{name}.ready_url")
    if "ready_command" in out and "ready_url" in out:
        raise _config_error(f"set {name}.ready_command or {name}.ready_url, not both", name)
    for key, limit in (
        ("ready_timeout_s", _MAX_READY_TIMEOUT_S),
        ("stop_grace_s", _MAX_STOP_GRACE_S),
    ):
        if key in raw:
            out[key] = _timeout(raw[key], f"{name}.{key}", limit)
    return out


def _run_spec(table: dict[str, Any]) -> RunSpec:
    # ``[run] timeout_s`` predates ready_timeout_s and means the same; the newer wins.
    ready_timeout_s = table.get("ready_timeout_s", min(table["timeout_s"], _MAX_READY_TIMEOUT_S))
    return RunSpec(
        command=table["command"],
        ready_command=table.get("ready_command"),
        ready_url=table.get("ready_url"),
        ready_timeout_s=ready_timeout_s,
        stop_grace_s=table.get("stop_grace_s"),
    )


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


def _timeout(value: object, key: str, limit: float = _MAX_TIMEOUT_S) -> float:
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= limit
    ):
        return float(value)
    raise _config_error(f"{key} must be a number of seconds in (0, {limit:g}]", key)


def _ready_url(value: object, key: str) -> str:
    if (
        isinstance(value, str)
        and len(value) <= _MAX_URL_LENGTH
        and _READY_URL.fullmatch(value)
        and _port_ok(value)
    ):
        return value
    raise _config_error(
        f"{key} must be an http:// URL on 127.0.0.1, localhost or [::1] (loopback only), "
        "with an optional port (a number or ${NAME}) and path, e.g. "
        "http://127.0.0.1:8080/health",
        key,
    )


def _port_ok(url: str) -> bool:
    """Every literal port in ``url`` (the port itself or a ``${NAME:-default}``) is 1-65535."""
    authority = url.removeprefix("http://").split("/", 1)[0]
    literals = re.findall(r"(?::|:-)([0-9]+)\}?$", authority)
    return all(1 <= int(p) <= 65535 for p in literals)
