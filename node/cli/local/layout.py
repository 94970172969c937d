"""The layout of a local cluster: names, ports, file paths, certificates and node configs.

``cairn cluster up`` and the multi-process tests lay a cluster out the same way::

    DIR/
      admin-password          generated admin password (mode 0600), unless given by env
      ca/ca.pem, ca/ca.key    the cluster CA (its key is never copied anywhere else)
      n1/cairn.toml           node config; paths in it are relative to n1/
      n1/certs/n1.pem, .key   node certificate (name and hosts as SANs) and key (0600)
      n1/data/                the node's data directory
      n1/node.log             the node's output
      n2/ ...

Ports: node ``i`` (1-based) has admin port ``base + i - 1`` and peer port
``base + 100 + i - 1``; with the default base 9925, n1 is 9925/10025, n2 9926/10026.

Planning and rendering are pure; :func:`materialize` writes the files, reusing what is
already there (the CA, certificates that are still good, configs that still fit).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.config import Config, ConfigError, load_config

__all__ = [
    "APP_PORT_OFFSET",
    "CONFIG_NAME",
    "DEFAULT_BASE_PORT",
    "LOOPBACK",
    "MAX_NODES",
    "PASSWORD_FILE",
    "PEER_PORT_OFFSET",
    "ClusterLayout",
    "NodeLayout",
    "admin_password",
    "config_fits",
    "materialize",
    "node_names",
    "plan_cluster",
    "plan_cluster_ports",
    "render_node_config",
]

DEFAULT_BASE_PORT = 9925
PEER_PORT_OFFSET = 100
APP_PORT_OFFSET = 200
#: Admin ports ``base .. base+98`` never reach the peer ports ``base+100 ..``.
MAX_NODES = 99
LOOPBACK = "127.0.0.1"
CONFIG_NAME = "cairn.toml"
PASSWORD_FILE = "admin-password"
ADMIN_USER = "admin"
#: Hosts every local node certificate names besides its own host and node name.
_EXTRA_HOSTS = ("localhost",)


@dataclass(frozen=True, slots=True)
class NodeLayout:
    """Where one node of a local cluster listens and keeps its files."""

    name: str
    host: str
    admin_port: int
    peer_port: int
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def certs_dir(self) -> Path:
        return self.root / "certs"

    @property
    def cert(self) -> Path:
        return self.certs_dir / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.certs_dir / f"{self.name}.key"

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    @property
    def peer_url(self) -> str:
        return f"wss://{self.host}:{self.peer_port}"

    @property
    def app_port(self) -> int:
        """The port this node's components serve on (``HELLO_PORT`` in their
        environment): admin port + 200, so nodes on one machine never collide."""
        return self.admin_port + APP_PORT_OFFSET

    @property
    def app_url(self) -> str:
        return f"http://{self.host}:{self.app_port}"

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts its certificate names (the node name is added by the issuer)."""
        return (self.host, *(h for h in _EXTRA_HOSTS if h != self.host))


@dataclass(frozen=True, slots=True)
class ClusterLayout:
    """A whole local cluster under one directory."""

    root: Path
    nodes: tuple[NodeLayout, ...]

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.pem"

    @property
    def password_file(self) -> Path:
        return self.root / PASSWORD_FILE

    def node(self, name: str) -> NodeLayout:
        """The node called ``name``.

        Raises:
            KeyError: no such node.
        """
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def peers_of(self, name: str) -> tuple[NodeLayout, ...]:
        """Every node but ``name``."""
        return tuple(n for n in self.nodes if n.name != name)


def node_names(count: int) -> list[str]:
    """``["n1", ..., "n<count>"]``."""
    return [f"n{i}" for i in range(1, count + 1)]


def plan_cluster(
    root: Path, count: int, *, base_port: int = DEFAULT_BASE_PORT, host: str = LOOPBACK
) -> ClusterLayout:
    """Lay out ``count`` nodes under ``root`` with ports counted from ``base_port``.

    Args:
        root: the cluster directory.
        count: number of nodes, 1 to :data:`MAX_NODES`.
        base_port: n1's admin port; peer ports start at ``base_port + 100``.
        host: the address every node listens on.

    Returns:
        The layout (nothing is written).

    Raises:
        ValueError: ``count`` or ``base_port`` out of range.
    """
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"--nodes must be between 1 and {MAX_NODES}, not {count}")
    top = base_port + PEER_PORT_OFFSET + count - 1
    if base_port < 1024 or top > 65535:
        raise ValueError(
            f"--base-port {base_port} puts ports outside 1024-65535 "
            f"(the last peer port would be {top})"
        )
    admin = [base_port + i for i in range(count)]
    peer = [base_port + PEER_PORT_OFFSET + i for i in range(count)]
    return plan_cluster_ports(root, admin, peer, host=host)


def plan_cluster_ports(
    root: Path, admin_ports: Sequence[int], peer_ports: Sequence[int], *, host: str = LOOPBACK
) -> ClusterLayout:
    """Lay out one node per (admin, peer) port pair (tests pass free ports).

    Raises:
        ValueError: the port lists differ in length, are empty, or repeat a port.
    """
    if len(admin_ports) != len(peer_ports) or not admin_ports:
        raise ValueError("one admin and one peer port per node are needed")
    ports = [*admin_ports, *peer_ports]
    if len(set(ports)) != len(ports):
        raise ValueError(f"ports must all differ: {ports}")
    root = Path(root)
    nodes = tuple(
        NodeLayout(name, host, a, p, root / name)
        for name, a, p in zip(node_names(len(admin_ports)), admin_ports, peer_ports, strict=True)
    )
    return ClusterLayout(root, nodes)


def _q(value: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML for the strings used here)."""
    return json.dumps(value)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def render_node_config(layout: ClusterLayout, name: str, *, extra_toml: str = "") -> str:
    """The TOML config of node ``name``, with the other nodes as ``[[peers]]``.

    Paths are relative to the node's directory, so the cluster directory can move.

    Args:
        layout: the cluster.
        name: which node.
        extra_toml: more tables appended verbatim (tests tune ``[replication]`` etc.).

    Raises:
        KeyError: no such node.
    """
    n = layout.node(name)
    lines = [
        f"# cairn node {n.name}: generated by `cairn cluster up`.",
        "# Kept across runs while its name, ports, certificates and peers fit the cluster;",
        "# rewritten otherwise. Other keys you add here are kept.",
        "",
        "[node]",
        f"name = {_q(n.name)}",
        f"data_dir = {_q(_rel(n.data_dir, n.root))}",
        "",
        "[admin]",
        f"host = {_q(n.host)}",
        f"port = {n.admin_port}",
        "",
        "[peer]",
        f"host = {_q(n.host)}",
        f"port = {n.peer_port}",
        "",
        "[tls]",
        f"ca = {_q(_rel(layout.ca_cert, n.root))}",
        f"cert = {_q(_rel(n.cert, n.root))}",
        f"key = {_q(_rel(n.key, n.root))}",
        "",
        "[auth]",
        f"bootstrap_user = {_q(ADMIN_USER)}",
    ]
    for p in layout.peers_of(name):
        lines += ["", "[[peers]]", f"name = {_q(p.name)}", f"url = {_q(p.peer_url)}"]
    text = "\n".join(lines) + "\n"
    if extra_toml.strip():
        text += "\n" + extra_toml.strip() + "\n"
    return text


def config_fits(config: Config, layout: ClusterLayout, name: str) -> bool:
    """Whether an existing node config still matches the layout (so it can be kept).

    Compared: node name and data dir, admin and peer addresses, TLS file paths and the
    set of peers. Anything else (limits, log level, ...) is the operator's to change.
    """
    n = layout.node(name)
    want_peers = {(p.name, p.peer_url) for p in layout.peers_of(name)}
    tls = config.tls
    return (
        config.node.name == n.name
        and config.node.data_dir.resolve() == n.data_dir.resolve()
        and (config.admin.host, config.admin.port) == (n.host, n.admin_port)
        and config.peer is not None
        and (config.peer.host, config.peer.port) == (n.host, n.peer_port)
        and tls is not None
        and tls.ca.resolve() == layout.ca_cert.resolve()
        and tls.cert.resolve() == n.cert.resolve()
        and tls.key.resolve() == n.key.resolve()
        and {(p.name, p.url) for p in config.peers} == want_peers
    )


def materialize(
    layout: ClusterLayout, *, cert_days: int = 30, extra_toml: Mapping[str, str] | None = None
) -> list[str]:
    """Create (or reuse) the CA, each node's certificate and config, and data dirs.

    Args:
        layout: the cluster.
        cert_days: validity of newly issued node certificates.
        extra_toml: per node name, TOML appended to a newly written config.

    Returns:
        One line per thing done, for the operator ("created CA ...", "reused ...").

    Raises:
        CertificateError: the CA or a certificate cannot be made or read.
    """
    from replication.tls import init_ca, issue_node_cert

    done: list[str] = []
    had_ca = layout.ca_cert.exists()
    init_ca(layout.ca_dir)
    done.append(f"{'reused' if had_ca else 'created'} cluster CA {layout.ca_cert}")
    for n in layout.nodes:
        before = _mtime(n.cert)
        issue_node_cert(layout.ca_dir, n.certs_dir, n.name, n.hosts, days=cert_days)
        verb = "reused" if before is not None and before == _mtime(n.cert) else "issued"
        done.append(f"{verb} certificate {n.cert}")
        n.data_dir.mkdir(parents=True, exist_ok=True)
        extra = (extra_toml or {}).get(n.name, "")
        if n.config_path.exists():
            try:
                keep = config_fits(load_config(n.config_path, env={}), layout, n.name)
            except ConfigError:
                keep = False
            if keep:
                done.append(f"reused config {n.config_path}")
                continue
            verb = "rewrote"
        else:
            verb = "wrote"
        n.config_path.write_text(render_node_config(layout, n.name, extra_toml=extra))
        done.append(f"{verb} config {n.config_path}")
    return done


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def admin_password(layout: ClusterLayout, env: Mapping[str, str]) -> tuple[str, str]:
    """The cluster's admin password and where it came from.

    ``CAIRN_ADMIN_PASSWORD`` wins; otherwise the password stored in ``DIR/admin-password``
    (mode 0600), generated and stored on first use. The nodes take it only when they
    create their bootstrap user, on their first start.

    Returns:
        ``(password, source)``, source being ``"CAIRN_ADMIN_PASSWORD"`` or the file path.
    """
    given = env.get("CAIRN_ADMIN_PASSWORD")
    if given:
        return given, "CAIRN_ADMIN_PASSWORD"
    path = layout.password_file
    if path.exists():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored, str(path)
    password = secrets.token_urlsafe(18)
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(password + "\n")
    return password, str(path)
