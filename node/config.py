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
    "OTHER_ENV",
    "TEST_ENV_PREFIXES",
    "AdminConfig",
    "AuthConfig",
    "ComponentsConfig",
    "Config",
    "ConfigError",
    "DeployConfig",
    "Limits",
    "NodeConfig",
    "PeerConfig",
    "PeerEntry",
    "ReplicationConfig",
    "RetentionConfig",
    "StorageConfig",
    "TlsConfig",
    "config_env_names",
    "load_config",
    "parse_config",
    "unknown_env_variables",
    "unknown_env_warning",
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
    #: Warn (log, metrics, cluster_status) this many days before the certificate ends.
    expiry_warning_days: float = 14.0
    #: How often the certificate files are checked for a renewal (picked up live).
    reload_check_s: float = 30.0


@dataclass(frozen=True, slots=True)
class PeerEntry:
    name: str
    url: str


@dataclass(frozen=True, slots=True)
class AuthConfig:
    bootstrap_user: str = "admin"
    bootstrap_password: str | None = None
    #: How long a clustered node waits to catch up with a peer before it creates the
    #: bootstrap user (it never creates one the cluster already has).
    bootstrap_wait_s: float = 30.0
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
    #: A change whose version is further ahead of this node's clock is parked.
    max_clock_offset_s: float = _REPLICATION.max_clock_offset_s
    #: The change log keeps an entry every member has for at most this long...
    log_max_age_s: float = 7 * 86_400.0
    #: ... and at most this many entries in all (older ones go first).
    log_max_entries: int = 1_000_000
    #: Lines of the audit log kept.
    audit_max_entries: int = 100_000
    #: How often the change log is trimmed and parked changes retried.
    maintain_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    keep_successful: int = 3
    failed_grace_s: float = 86_400.0
    #: Release directories kept per project besides the active one (fast rollback).
    keep_releases: int = 3


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Disk pressure on the data directory (see docs/operations.md, "Disk pressure").

    The watermark is the larger of ``min_free_bytes`` and ``min_free_ratio`` of the
    filesystem's size: below it the node reclaims, and a deploy that would take free
    space below it is refused with 507 ``insufficient_storage``.
    """

    min_free_bytes: int = 512 * MiB
    min_free_ratio: float = 0.0
    #: The blob store's largest size in bytes (0: no cap).
    max_blob_bytes: int = 0
    #: How often free space is looked at when nothing else asks.
    check_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_free_ratio < 1.0:
            raise ConfigError("[storage] min_free_ratio must be at least 0 and below 1")
        if self.check_s <= 0:
            raise ConfigError("[storage] check_s must be positive")


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class ComponentsConfig:
    """Supervised ``[run]`` processes (see docs/components.md).

    ``env`` holds ``NAME=value`` entries added to every run process's environment (and
    its ``ready_command``), and usable as ``${NAME}`` in a ``ready_url`` port: how an
    operator gives each node its own port, say. ``CAIRN_*`` names are reserved.
    """

    log_max_bytes: int = 1 * MiB  # per file; output.log plus log_backups rotated files
    log_backups: int = 3
    stop_grace_s: float = 10.0  # SIGTERM → SIGKILL, when [run] stop_grace_s is not set
    restart_min_s: float = 1.0  # first restart delay after an exit; doubles per exit
    restart_max_s: float = 60.0
    restart_reset_s: float = 60.0  # up this long → the next exit restarts after min again
    settle_s: float = 0.5  # ready without a probe: still running after this long
    ready_interval_s: float = 0.25  # between readiness probes
    ready_try_timeout_s: float = 5.0  # one ready_url request
    env: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.log_max_bytes < 1024:
            raise ConfigError("[components] log_max_bytes must be at least 1024")
        if self.restart_min_s <= 0 or self.restart_max_s < self.restart_min_s:
            raise ConfigError("[components] needs 0 < restart_min_s <= restart_max_s")
        for name in ("stop_grace_s", "ready_interval_s", "ready_try_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"[components] {name} must be positive")
        for entry in self.env:
            name, eq, _ = entry.partition("=")
            if not eq or not _ENV_NAME_RE.fullmatch(name) or "\0" in entry:
                raise ConfigError(f"[components] env entry {entry!r} must be NAME=value")
            if name.startswith("CAIRN_"):
                raise ConfigError(f"[components] env: {name} is reserved (CAIRN_*)")

    @property
    def environment(self) -> dict[str, str]:
        """``env`` as a mapping (a later entry for a name wins)."""
        pairs = (entry.partition("=") for entry in self.env)
        return {name: value for name, _, value in pairs}


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
    storage: StorageConfig = field(default_factory=StorageConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
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
    "storage": StorageConfig,
    "components": ComponentsConfig,
}


#: Environment variables cairn reads that are not config keys: client settings, the
#: bootstrap password, fault injection, and what a node sets for its hooks.
OTHER_ENV: dict[str, str] = {
    "CAIRN_ADMIN_PASSWORD": "the bootstrap admin's password, used on the node's first start",
    "CAIRN_TARGET": "client: the admin URL to talk to",
    "CAIRN_USER": "client: the user to sign in as",
    "CAIRN_PASSWORD": "client: the password to sign in with",
    "CAIRN_CA": "client: the CA bundle for an https target",
    "CAIRN_NEW_PASSWORD": "client: the password `cairn users add` and `cairn users alter` set",
    "CAIRN_CRASHPOINT": "fault tests: the named crash point to stop at",
    "CAIRN_PROJECT": "set by the node for hooks: the component",
    "CAIRN_DEPLOYMENT_ID": "set by the node for hooks: the deployment",
    "CAIRN_RELEASE_DIR": "set by the node for hooks: the release directory",
}
#: Prefixes left to test suites, soak runs and benchmarks.
TEST_ENV_PREFIXES = ("CAIRN_TEST_", "CAIRN_SOAK_", "CAIRN_BENCH_")


def config_env_names() -> dict[str, tuple[str, str]]:
    """Every ``CAIRN_<SECTION>_<KEY>`` variable that overrides a config key → (section, key)."""
    return {
        f"CAIRN_{section.upper()}_{f.name.upper()}": (section, f.name)
        for section, cls in _SECTIONS.items()
        for f in dataclasses.fields(cls)
    }


def unknown_env_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``CAIRN_*`` variables in ``env`` that cairn does not read, sorted, each with the
    known variable it most probably meant (None when none is close)."""
    import difflib

    keys = config_env_names()
    known = set(keys) | set(OTHER_ENV)
    found = []
    for name in sorted(env):
        if not name.startswith("CAIRN_") or name in known or name.startswith(TEST_ENV_PREFIXES):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        found.append((name, close[0] if close else None))
    return found


def unknown_env_warning(env: Mapping[str, str]) -> str | None:
    """One line naming every unknown ``CAIRN_*`` variable (None when there is none)."""
    keys = config_env_names()
    parts = []
    for name, meant in unknown_env_variables(env):
        if meant is None:
            parts.append(name)
        elif meant in keys:
            section, key = keys[meant]
            parts.append(f"{name} (did you mean {meant}, [{section}] {key}?)")
        else:
            parts.append(f"{name} (did you mean {meant}?)")
    if not parts:
        return None
    return "ignoring unknown environment variables: " + ", ".join(parts)


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
        storage=sections.get("storage", StorageConfig()),
        components=sections.get("components", ComponentsConfig()),
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
