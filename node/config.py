"""Node configuration: TOML file plus ``CAIRN_<SECTION>_<KEY>`` environment overrides.

Loaded and validated once at start into frozen dataclasses and passed down. Relative
paths are resolved against the config file's directory. Any problem raises
:class:`ConfigError` with one line naming it, which ``cairn node run`` prints before
exiting non-zero.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from replication.session import Settings

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DeployConfig",
    "Limits",
    "NodeConfig",
    "PeerConfig",
    "PeerEntry",
    "ReplicationConfig",
    "RetentionConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GiB = 1 << 30
MiB = 1 << 20


class ConfigError(Exception):
    """The configuration is unusable; the message is one line naming the problem."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    data_dir: Path


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9925
    tls_cert: Path | None = None
    tls_key: Path | None = None
    sse_ping_s: float = 15.0


@dataclass(frozen=True, slots=True)
class PeerConfig:
    host: str = "127.0.0.1"
    port: int = 9933


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class PeerEntry:
    name: str
    url: str


@dataclass(frozen=True, slots=True)
class AuthConfig:
    bootstrap_user: str = "admin"
    bootstrap_password: str | None = None
    # Basic-auth failure limiting (node/auth.py): failures counted per source address
    # and per user name in a fixed window; past the limit, 429 with Retry-After until
    # the window ends. 0 turns a limit off. Each table holds at most this many entries.
    max_failures_per_source: int = 50
    max_failures_per_user: int = 10
    failure_window_s: float = 60.0
    failure_table_size: int = 10_000


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 4 * GiB
    max_body_bytes: int = 256 * MiB
    max_members: int = 100_000
    max_extracted_bytes: int = 16 * GiB
    max_compression_ratio: int = 200
    # The ratio guard starts once this much has been decompressed (small archives of
    # highly compressible text are fine).
    compression_ratio_floor_bytes: int = 64 * MiB
    max_path_length: int = 4096
    header_timeout_s: float = 30.0
    body_idle_timeout_s: float = 60.0
    # The total body deadline: body_idle_timeout_s plus one second per this many bytes
    # received (node/body.py); 0 turns it off.
    min_body_bytes_per_s: float = 16_384.0
    deployment_timeout_ms: int = 120_000


@dataclass(frozen=True, slots=True)
class DeployConfig:
    allowed_package_dirs: tuple[Path, ...] = ()
    package_fetch_timeout_s: float = 300.0
    # The outbound policy for package URLs (node/deploy/outbound.py): host names or
    # literal addresses, and CIDR networks, that may be fetched from although they are
    # not public; and how many redirects a fetch follows.
    package_allow_hosts: tuple[str, ...] = ()
    package_allow_networks: tuple[str, ...] = ()
    package_max_redirects: int = 5

    def __post_init__(self) -> None:
        for text in self.package_allow_networks:
            try:
                ipaddress.ip_network(text.strip(), strict=False)
            except ValueError:
                raise ConfigError(
                    f"[deploy] package_allow_networks: {text!r} is not a network (CIDR)"
                ) from None


_REPLICATION = Settings()  # the replication service's defaults are the config's defaults


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    heartbeat_s: float = _REPLICATION.heartbeat_s
    dead_after_s: float = _REPLICATION.dead_after_s
    reconnect_min_s: float = _REPLICATION.reconnect_min_s
    reconnect_max_s: float = _REPLICATION.reconnect_max_s
    batch_changes: int = _REPLICATION.batch_changes
    credit_batches: int = _REPLICATION.credit_batches
    chunk_bytes: int = _REPLICATION.chunk_bytes
    chunk_credit: int = _REPLICATION.chunk_credit


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    keep_successful: int = 3
    failed_grace_s: float = 86_400.0


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig
    admin: AdminConfig = field(default_factory=AdminConfig)
    peer: PeerConfig | None = None
    tls: TlsConfig | None = None
    peers: tuple[PeerEntry, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: Limits = field(default_factory=Limits)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    log_level: str = "info"

    @property
    def clustered(self) -> bool:
        """True when this node has a peer channel (it may still have no peers yet)."""
        return self.peer is not None and self.tls is not None


_SECTIONS: dict[str, type[Any]] = {
    "node": NodeConfig,
    "admin": AdminConfig,
    "peer": PeerConfig,
    "tls": TlsConfig,
    "auth": AuthConfig,
    "limits": Limits,
    "deploy": DeployConfig,
    "replication": ReplicationConfig,
    "retention": RetentionConfig,
}


def _coerce(section: str, key: str, value: Any, hint: Any, base: Path) -> Any:
    where = f"[{section}] {key}"
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(section, key, value, args[0], base)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where} must be a list")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(section, key, v, inner, base) for v in items if v != "")
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = hint(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, not {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number")
        if value < 0:
            raise ConfigError(f"{where} must not be negative")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        return value
    raise ConfigError(f"{where} has an unsupported type")  # pragma: no cover


def _build(section: str, cls: type[Any], raw: Mapping[str, Any], base: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key [{section}] {key}")
    kwargs = {k: _coerce(section, k, v, hints[k], base) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs]
        raise ConfigError(f"[{section}] is missing {', '.join(missing)}") from None


def _env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            value = env.get(f"CAIRN_{section.upper()}_{f.name.upper()}")
            if value is not None:
                data.setdefault(section, {})[f.name] = value
    password = env.get("CAIRN_ADMIN_PASSWORD")
    if password:
        data.setdefault("auth", {})["bootstrap_password"] = password


def parse_config(
    data: dict[str, Any], *, base: Path, env: Mapping[str, str] | None = None
) -> Config:
    """Build a :class:`Config` from parsed TOML and the environment.

    Raises:
        ConfigError: unknown keys, wrong types, missing required keys, bad names.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    _env_overrides(data, os.environ if env is None else env)
    for key in data:
        if key not in _SECTIONS and key not in ("peers", "log_level"):
            raise ConfigError(f"unknown section [{key}]")
    if "node" not in data:
        raise ConfigError("[node] section is missing (it needs name and data_dir)")
    sections = {
        name: _build(name, cls, data[name], base) for name, cls in _SECTIONS.items() if name in data
    }
    node: NodeConfig = sections["node"]
    if not NAME_RE.match(node.name):
        raise ConfigError(f"[node] name {node.name!r} is not a valid node name")
    peers: list[PeerEntry] = []
    for i, entry in enumerate(data.get("peers", [])):
        if not isinstance(entry, dict):
            raise ConfigError(f"[[peers]] entry {i + 1} must be a table")
        peer = _build("peers", PeerEntry, entry, base)
        if not NAME_RE.match(peer.name) or peer.name == node.name:
            raise ConfigError(f"[[peers]] entry {i + 1} has a bad name {peer.name!r}")
        if urlparse(peer.url).scheme != "wss":
            raise ConfigError(f"[[peers]] {peer.name} url must be wss://host:port")
        peers.append(peer)
    if peers and ("tls" not in sections or "peer" not in sections):
        raise ConfigError("[[peers]] needs [peer] and [tls] sections")
    if ("tls" in sections) != ("peer" in sections):
        raise ConfigError("[peer] and [tls] go together: set both or neither")
    admin: AdminConfig = sections.get("admin", AdminConfig())
    if (admin.tls_cert is None) != (admin.tls_key is None):
        raise ConfigError("[admin] tls_cert and tls_key go together")
    log_level = data.get("log_level", "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level {log_level!r} is not one of debug, info, warning, error")
    return Config(
        node=node,
        admin=admin,
        peer=sections.get("peer"),
        tls=sections.get("tls"),
        peers=tuple(peers),
        auth=sections.get("auth", AuthConfig()),
        limits=sections.get("limits", Limits()),
        deploy=sections.get("deploy", DeployConfig()),
        replication=sections.get("replication", ReplicationConfig()),
        retention=sections.get("retention", RetentionConfig()),
        log_level=log_level,
    )


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at ``path``.

    Raises:
        ConfigError: the file is missing, is not TOML, or does not validate.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return parse_config(data, base=path.resolve().parent, env=env)
