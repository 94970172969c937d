"""The architecture rule: imports flow one way, storage ← replication ← node.

``node/deploy`` must not import ``replication`` either: deploys react to rows, and the
cluster reaches them only through the seams in ``node/deploy/context.py``.

``node/cli`` is the operator's side: nothing outside it imports it (but the ``python -m
node`` shim), it imports from the server only what :data:`CLI_MAY_IMPORT` names, and its
modules form no import cycle (each imports alone in a fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
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


# -- the operator's side: node/cli -----------------------------------------------------

CLI = ROOT / "node" / "cli"
#: What node/cli may import from the server side, and why.
CLI_MAY_IMPORT = {
    "node.config": "config loading: `cairn node run`, local cluster configs",
    "node.runner": "`cairn node run` starts the server",
    "node.logs": "`cairn node run` configures logging",
    "node.deploy.pack": "packing a directory is shared with the server's package deploys",
    "node.backup": "`cairn node backup` and `cairn node restore` work on a data directory",
    "replication.tls": "`cairn cert` and local clusters make the CA and certificates",
    "replication.errors": "CertificateError from replication.tls",
    "storage.rules": "the record's value rules (project, node and user names, ids)",
}
#: Outside node/cli, only the ``python -m node`` shim may import it.
CLI_IMPORTERS_ALLOWED = {
    "node/__main__.py",
    # Benchmarks that lay out and start nodes exactly as ``cairn cluster up`` and
    # ``cairn node run`` do, so what they measure is what an operator runs.
    "bench/benchlib.py",
    "bench/wirenode.py",
}


def _full_imports(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (``from a.b import c`` gives a.b and a.b.c)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _cli_modules() -> list[str]:
    return sorted(_module_name(p) for p in CLI.rglob("*.py"))


def test_nothing_outside_node_cli_imports_it() -> None:
    offenders = []
    for package in ("node", "replication", "storage", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("node/cli/") or rel in CLI_IMPORTERS_ALLOWED:
                continue
            bad = {m for m in _full_imports(path) if m == "node.cli" or m.startswith("node.cli.")}
            if bad:
                offenders.append(f"{rel} imports {', '.join(sorted(bad))}")
    assert offenders == []


def test_node_cli_imports_from_the_server_only_what_is_named() -> None:
    modules = set(_cli_modules())
    offenders = []
    for path in CLI.rglob("*.py"):
        for name in sorted(_full_imports(path)):
            top = name.split(".")[0]
            if top not in ("node", "replication", "storage") or name.startswith("node.cli"):
                continue
            # ``from node.config import load_config`` names node.config.load_config too.
            if name in CLI_MAY_IMPORT or name.rsplit(".", 1)[0] in CLI_MAY_IMPORT:
                continue
            offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []
    assert modules, "no modules found under node/cli"


def test_node_cli_has_no_import_cycle() -> None:
    """The import graph of node/cli (every import, lazy ones included) is acyclic."""
    modules = set(_cli_modules())
    graph: dict[str, set[str]] = {}
    for path in CLI.rglob("*.py"):
        name = _module_name(path)
        graph[name] = {m for m in _full_imports(path) if m in modules and m != name}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError(
                "import cycle: " + " -> ".join([*stack[stack.index(name) :], name])
            )
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_every_cli_module_imports_alone_in_a_fresh_interpreter() -> None:
    """``python -c 'import X'`` for each module of node.cli, node.cli.api, node.cli.local."""
    modules = _cli_modules()
    assert {"node.cli", "node.cli.api", "node.cli.local"} <= set(modules)
    failures = []
    pending = list(modules)
    running: list[tuple[str, subprocess.Popen[bytes]]] = []
    while pending or running:
        while pending and len(running) < 4:
            name = pending.pop()
            proc = subprocess.Popen(
                [sys.executable, "-c", f"import {name}"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            running.append((name, proc))
        name, proc = running.pop(0)
        out, _ = proc.communicate(timeout=60)
        if proc.returncode != 0:
            failures.append(f"{name}: {out.decode(errors='replace').strip().splitlines()[-1:]}")
    assert failures == []
