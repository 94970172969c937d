"""``cairn cluster status``: where to ask, and a readable table of the answer.

Pure formatting of a ``cluster_status`` answer (SPEC section 4): ``{node, cluster_id,
peers: [{name, url, state, last_seen, lag_changes, lag_bytes, transfers, last_error}]}``.
Fields a node does not send are shown as ``-``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from node.cli.local.layout import CONFIG_NAME, PASSWORD_FILE
from node.config import ConfigError, load_config

__all__ = ["format_age", "format_bytes", "render_status", "status_targets"]

DEFAULT_TARGET = "http://127.0.0.1:9925"
_COLUMNS = ("PEER", "STATE", "LAST SEEN", "LAG", "TRANSFERS", "LAST ERROR")


def format_bytes(n: int) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop always returns


def format_age(last_seen: Any, now_ms: int) -> str:
    """A ``last_seen`` value (epoch ms, or None) as an age like ``"1.2s ago"``."""
    if last_seen is None:
        return "never"
    if isinstance(last_seen, bool) or not isinstance(last_seen, int | float):
        return str(last_seen)
    age_s = max(0.0, (now_ms - float(last_seen)) / 1000)
    if age_s < 60:
        return f"{age_s:.1f}s ago"
    if age_s < 3600:
        return f"{age_s / 60:.0f}m ago"
    return f"{age_s / 3600:.1f}h ago"


def _lag(peer: Mapping[str, Any]) -> str:
    changes, size = peer.get("lag_changes"), peer.get("lag_bytes")
    parts = []
    if isinstance(changes, int):
        parts.append(f"{changes} change{'' if changes == 1 else 's'}")
    if isinstance(size, int):
        parts.append(format_bytes(size))
    return ", ".join(parts) or "-"


def _transfers(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple | dict):
        return str(len(value))
    return str(value)


def _error(value: Any) -> str:
    if not value:
        return "-"
    if isinstance(value, dict):
        value = value.get("message") or value.get("error") or value
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def render_status(url: str, status: Mapping[str, Any], *, now_ms: int) -> str:
    """A node's ``cluster_status`` as a header line and one row per peer."""
    head = f"{status.get('node')} at {url}"
    if status.get("cluster_id"):
        head += f"  (cluster {status['cluster_id']})"
    sent, received = status.get("blob_bytes_sent"), status.get("blob_bytes_received")
    if isinstance(sent, int) and isinstance(received, int):
        head += f"\n  blobs sent {format_bytes(sent)}, received {format_bytes(received)}"
    peers = [p for p in status.get("peers", []) if isinstance(p, Mapping)]
    if not peers:
        return head + "\n  no peers: this node runs alone\n"
    rows = [_COLUMNS] + [
        (
            str(p.get("name", "?")),
            str(p.get("state", "?")),
            format_age(p.get("last_seen"), now_ms),
            _lag(p),
            _transfers(p.get("transfers")),
            _error(p.get("last_error")),
        )
        for p in peers
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]  # fmt: skip
    return head + "\n" + "\n".join(lines) + "\n"


def status_targets(
    targets: tuple[str, ...], root: Path | None, env: Mapping[str, str]
) -> tuple[list[str], str | None]:
    """Which admin URLs to ask, and a stored password if ``root`` has one.

    Order of preference: ``--target`` options, the nodes of a ``cluster up`` directory,
    ``CAIRN_TARGET``, then ``http://127.0.0.1:9925``.

    Raises:
        ValueError: ``root`` holds no node configs, or one of them is unusable.
    """
    stored = None
    urls = list(targets)
    if root is not None:
        password_file = root / PASSWORD_FILE
        if password_file.exists():
            stored = password_file.read_text(encoding="utf-8").strip() or None
        if not urls:
            configs = sorted(root.glob(f"*/{CONFIG_NAME}"), key=_node_order)
            if not configs:
                raise ValueError(f"{root} holds no node configs (*/{CONFIG_NAME})")
            for path in configs:
                try:
                    admin = load_config(path, env={}).admin
                except ConfigError as e:
                    raise ValueError(str(e)) from None
                scheme = "https" if admin.tls_cert else "http"
                urls.append(f"{scheme}://{admin.host}:{admin.port}")
    if not urls:
        urls = [env.get("CAIRN_TARGET") or DEFAULT_TARGET]
    return urls, stored


def _node_order(path: Path) -> tuple[int, str]:
    name = path.parent.name
    digits = name.lstrip("n")
    return (int(digits), name) if name.startswith("n") and digits.isdigit() else (1 << 30, name)
