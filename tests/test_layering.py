"""The architecture rule: imports flow one way, storage ← replication ← node.

``node/deploy`` must not import ``replication`` either: deploys react to rows, and the
cluster reaches them only through the seams in ``node/deploy/context.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "storage": ("replication", "node"),
    "replication": ("node",),
    "node/deploy": ("replication",),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_imports_flow_one_way() -> None:
    violations = []
    for package, banned in FORBIDDEN.items():
        files = list((ROOT / package).rglob("*.py"))
        assert files, f"no modules found under {package}"
        for path in files:
            bad = _imports(path) & set(banned)
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(bad))}")
    assert violations == []


def test_only_the_channel_touches_websockets() -> None:
    markers = ("WebSocketResponse", "ws_connect", "ClientWebSocketResponse", "WSMsgType")
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "replication").rglob("*.py")
        if p.name != "channel.py" and any(m in p.read_text(encoding="utf-8") for m in markers)
    ]
    assert offenders == []
