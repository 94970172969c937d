"""``docs/configuration.md``, generated from the config dataclasses of :mod:`node.config`.

    python -m node.cli.configdoc                     # print it
    python -m node.cli.configdoc --write docs/configuration.md

Keys, types, defaults and environment names come from the dataclasses themselves and
from :func:`node.config.config_env_names`; only the one-line meanings live here, in
:data:`MEANINGS`. ``tests/node/test_configdoc.py`` regenerates the page and fails when the
file differs, or when a key has no meaning written down, so the page cannot drift.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from node.config import OTHER_ENV, TEST_ENV_PREFIXES, Config, config_env_names

__all__ = ["MEANINGS", "SECTIONS", "config_keys", "main", "render"]

#: What each section is for (``peers`` is the ``[[peers]]`` list).
SECTIONS: dict[str, str] = {
    "node": "Who this node is and where it keeps its data. Required.",
    "admin": "The operations API (HTTP, or HTTPS with `tls_cert`/`tls_key`).",
    "peer": "The replication port (always mutual TLS). Optional: without `[peer]` and "
    "`[tls]` the node runs alone; they go together.",
    "tls": "The cluster CA and this node's certificate and key, for the peer channel. "
    "Optional, with `[peer]`; every path is required when the section is present.",
    "peers": "The other nodes, one `[[peers]]` table each (a list of tables: TOML only, "
    "no environment variable). Needs `[peer]` and `[tls]`. Nodes added at run time with "
    "`cairn nodes add` are replicated and need no entry here.",
    "auth": "The bootstrap user, created on the first start of an empty data directory.",
    "limits": "Limits on requests and payloads (see [operations.md](operations.md)).",
    "deploy": "Deploys from a `package` (URL or local directory).",
    "replication": "The peer protocol's timing and flow control (see "
    "[replication.md](replication.md)).",
    "retention": "Which payloads `prune_deployment_payloads` keeps (records are kept forever).",
    "components": "Supervised `[run]` processes of deployed components (see "
    "[components.md](components.md)).",
    "storage": "Disk pressure on the data directory (see [operations.md](operations.md#disk-"
    "pressure)): the watermark is the larger of `min_free_bytes` and `min_free_ratio` of the "
    "filesystem's size.",
    "": "Top-level keys.",
}

#: One line per key: what it does. Keyed ``section.key`` (``.log_level`` at top level).
MEANINGS: dict[str, str] = {
    "node.name": "unique in the cluster; must match the node certificate's name",
    "node.data_dir": "SQLite database, blob store, releases; created if missing",
    "admin.host": "address the operations API listens on",
    "admin.port": "port of the operations API",
    "admin.tls_cert": "certificate to serve the API over HTTPS (with `tls_key`)",
    "admin.tls_key": "key of `tls_cert`",
    "admin.sse_ping_s": "interval of `: ping` comments on idle event streams",
    "peer.host": "address the replication port listens on",
    "peer.port": "replication port; peers dial `wss://HOST:PORT`",
    "tls.ca": "the cluster CA certificate (`cairn cert init-ca`)",
    "tls.cert": "this node's certificate (`cairn cert issue`)",
    "tls.key": "this node's private key (mode 0600)",
    "peers.name": "the peer's node name (as in its certificate)",
    "peers.url": "the peer's replication URL, `wss://HOST:PORT`",
    "auth.bootstrap_user": "the super user created on first start",
    "auth.bootstrap_password": "its password; without one (and without "
    "`CAIRN_ADMIN_PASSWORD`) a random one is written to `<data_dir>/admin-password`",
    "limits.max_payload_bytes": "largest payload accepted (413 `too_large`)",
    "limits.max_body_bytes": "largest JSON/CBOR/MessagePack body (send bigger payloads as "
    "multipart)",
    "limits.max_members": "most tar members per payload",
    "limits.max_extracted_bytes": "most bytes a payload may extract to",
    "limits.max_compression_ratio": "most decompressed bytes per compressed byte",
    "limits.compression_ratio_floor_bytes": "decompressed bytes after which the ratio is checked",
    "limits.max_path_length": "longest member path in a payload",
    "limits.header_timeout_s": "time a client has to finish its request headers",
    "limits.body_idle_timeout_s": "longest stall while a body arrives",
    "limits.deployment_timeout_ms": "default of a deploy's `deployment_timeout`",
    "deploy.allowed_package_dirs": "local directories a `package` path may name (none: "
    "local packages are refused)",
    "deploy.package_fetch_timeout_s": "time allowed to fetch a `package` URL",
    "replication.heartbeat_s": "ping interval on a peer channel",
    "replication.dead_after_s": "silence after which a peer counts as gone",
    "replication.reconnect_min_s": "first reconnect delay",
    "replication.reconnect_max_s": "longest reconnect delay",
    "replication.batch_changes": "change-log entries per batch at most",
    "replication.credit_batches": "batches in flight per channel",
    "replication.chunk_bytes": "blob bytes per chunk",
    "replication.chunk_credit": "chunks in flight per channel",
    "retention.keep_successful": "successful deploys per project whose payloads are kept "
    "(pinned and active ones are always kept)",
    "retention.failed_grace_s": "how long a failed deploy's payload is kept",
    "storage.min_free_bytes": "free bytes the data directory keeps: below them the node "
    "reclaims, and refuses deploys it cannot fit (507 `insufficient_storage`)",
    "storage.min_free_ratio": "the same as a fraction of the filesystem's size (0: unused)",
    "storage.max_blob_bytes": "largest size of the blob store (0: no cap)",
    "storage.check_s": "how often free space is checked when no deploy asks",
    ".log_level": "`debug`, `info`, `warning` or `error`",
    "tls.expiry_warning_days": "warn (log, metrics, `cluster_status`) this many days before "
    "the node certificate ends",
    "tls.reload_check_s": "how often the certificate files are checked for a renewal "
    "(picked up without a restart)",
    "auth.bootstrap_wait_s": "how long a clustered node waits to catch up with a peer before "
    "it creates the bootstrap user (never one the cluster has or had)",
    "auth.max_failures_per_source": "failed sign-ins per source address per window before "
    "429 (0: no limit)",
    "auth.max_failures_per_user": "failed sign-ins per user name per window before 429 "
    "(0: no limit)",
    "auth.failure_window_s": "the window failed sign-ins are counted in",
    "auth.failure_table_size": "most sources and user names each failure table holds",
    "limits.min_body_bytes_per_s": "the whole-body deadline: `body_idle_timeout_s` plus one "
    "second per this many bytes received (0: off)",
    "deploy.package_allow_hosts": "host names or addresses a `package` URL may reach although "
    "they are not public",
    "deploy.package_allow_networks": "CIDR networks a `package` URL may reach although they "
    "are not public",
    "deploy.package_max_redirects": "redirects a `package` fetch follows at most",
    "replication.max_clock_offset_s": "a change whose version is further ahead of this node's "
    "clock is parked",
    "replication.log_max_age_s": "longest a change-log entry every member has is kept",
    "replication.log_max_entries": "most change-log entries kept in all (older ones go first)",
    "replication.audit_max_entries": "lines of the audit log kept",
    "replication.maintain_s": "how often the change log is trimmed and parked changes retried",
    "retention.keep_releases": "release directories kept per project besides the active one "
    "(fast rollback)",
    "components.log_max_bytes": "size of a run process's `output.log` before it rotates",
    "components.log_backups": "rotated output logs kept",
    "components.stop_grace_s": "SIGTERM to SIGKILL, when `[run] stop_grace_s` is not set",
    "components.restart_min_s": "first restart delay after an exit (doubles per exit)",
    "components.restart_max_s": "longest restart delay",
    "components.restart_reset_s": "up this long, the next exit restarts after `restart_min_s`",
    "components.settle_s": "without a readiness probe: ready once still running after this",
    "components.ready_interval_s": "time between readiness probes",
    "components.ready_try_timeout_s": "time one `ready_url` request may take",
    "components.env": "`NAME=value` entries added to every run process's environment "
    "(`CAIRN_*` names are reserved)",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """One config key as the page shows it."""

    section: str
    name: str
    type: str
    default: str
    env: tuple[str, ...]

    @property
    def ident(self) -> str:
        return f"{self.section}.{self.name}"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{_type_name(inner[0])} (optional)"
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}s"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "`[]`" if not value else f"`{list(value)}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, int) and f.name.endswith("_bytes") and value >= 1024:
        return f"`{value}` ({_size(value)})"
    return f"`{value}`"


def _section_class(hint: Any) -> type[Any] | None:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    cls = args[0]
    if typing.get_origin(hint) is tuple:
        cls = typing.get_args(hint)[0]
    return cls if dataclasses.is_dataclass(cls) and isinstance(cls, type) else None


def config_keys() -> list[Key]:
    """Every key of :class:`node.config.Config`, in the dataclasses' order."""
    env_of: dict[tuple[str, str], list[str]] = {}
    for name, where in config_env_names().items():
        env_of.setdefault(where, []).append(name)
    env_of.setdefault(("auth", "bootstrap_password"), []).append("CAIRN_ADMIN_PASSWORD")
    keys = []
    hints = typing.get_type_hints(Config)
    for top in dataclasses.fields(Config):
        cls = _section_class(hints[top.name])
        if cls is None:
            keys.append(Key("", top.name, _type_name(hints[top.name]), _default(top), ()))
            continue
        inner = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            names = tuple(env_of.get((top.name, f.name), ()))
            keys.append(Key(top.name, f.name, _type_name(inner[f.name]), _default(f), names))
    return keys


def _heading(section: str) -> str:
    if section == "":
        return "## Top level"
    return "## `[[peers]]`" if section == "peers" else f"## `[{section}]`"


def render() -> str:
    """The whole page, as Markdown.

    Raises:
        KeyError: a key or section has no entry in :data:`MEANINGS` / :data:`SECTIONS`.
    """
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m node.cli.configdoc --write docs/configuration.md` from",
        "     node/config.py; tests/node/test_configdoc.py fails when this file differs. -->",
        "",
        "`cairn node run --config FILE` reads one TOML file. Relative paths in it are resolved",
        "against the file's directory. Every key of a section can also be set by the",
        "environment variable named in the table (`CAIRN_<SECTION>_<KEY>`), which wins over",
        "the file; list values are comma-separated there. An unknown key or section, a wrong",
        "type or a missing required key stops the node at start with one line naming it. An",
        "unknown `CAIRN_*` environment variable does not stop it, but is reported at start in",
        "one `unknown_env_variables` warning that names the key it probably meant.",
        "",
        "An example of a clustered node (`cairn cluster up` writes files like it):",
        "",
        "```toml",
        "[node]",
        'name = "n1"',
        'data_dir = "data"',
        "",
        "[admin]",
        'host = "127.0.0.1"',
        "port = 9925",
        "",
        "[peer]",
        'host = "127.0.0.1"',
        "port = 10025",
        "",
        "[tls]",
        'ca = "../ca/ca.pem"',
        'cert = "certs/n1.pem"',
        'key = "certs/n1.key"',
        "",
        "[[peers]]",
        'name = "n2"',
        'url = "wss://127.0.0.1:10026"',
        "```",
    ]
    section = None
    for key in config_keys():
        if key.section != section:
            section = key.section
            lines += ["", _heading(section), "", SECTIONS[section], ""]
            lines += ["| key | type | default | environment | meaning |", "|---|---|---|---|---|"]
        names = ", ".join(f"`{e}`" for e in key.env) or "—"
        meaning = MEANINGS[key.ident]
        lines.append(f"| `{key.name}` | {key.type} | {key.default} | {names} | {meaning} |")
    lines += [
        "",
        "## Other environment variables",
        "",
        "Not config keys, and never reported as unknown:",
        "",
        "| variable | meaning |",
        "|---|---|",
        *(f"| `{name}` | {meaning} |" for name, meaning in OTHER_ENV.items()),
        "",
        "Names starting with " + ", ".join(f"`{p}`" for p in TEST_ENV_PREFIXES) + " are left to",
        "test suites, soak runs and benchmarks.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the page, or write it with ``--write PATH``."""
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if not args:
        sys.stdout.write(text)
        return 0
    if len(args) == 2 and args[0] == "--write":
        Path(args[1]).write_text(text, encoding="utf-8")
        return 0
    sys.stderr.write("usage: python -m node.cli.configdoc [--write PATH]\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
