"""Helpers for the supervisor tests: fast settings, releases on disk, process checks."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from node.config import ComponentsConfig
from node.deploy.component_config import RunSpec
from node.deploy.supervisor import Supervisor

PY = sys.executable


def fast(**overrides: object) -> ComponentsConfig:
    """Settings that keep the tests quick (backoff, grace and probe timings in tenths)."""
    values: dict[str, object] = {
        "stop_grace_s": 1.0,
        "restart_min_s": 0.05,
        "restart_max_s": 0.4,
        "restart_reset_s": 30.0,
        "settle_s": 0.3,
        "ready_interval_s": 0.05,
        "ready_try_timeout_s": 1.0,
    }
    values.update(overrides)
    return ComponentsConfig(**values)  # type: ignore[arg-type]


def supervisor(tmp_path: Path, **overrides: object) -> Supervisor:
    return Supervisor(node="n1", run_dir=tmp_path / "run", settings=fast(**overrides))


def release(tmp_path: Path, project: str = "web", **files: str) -> tuple[str, Path]:
    """A fresh release directory with ``files`` (name → text); returns (id, dir)."""
    deployment_id = str(uuid.uuid4())
    path = tmp_path / "components" / project / "releases" / deployment_id
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return deployment_id, path


def py(code: str, **spec: object) -> RunSpec:
    """A RunSpec running ``python3 -u -c code``."""
    return RunSpec((PY, "-u", "-c", code), **spec)  # type: ignore[arg-type]


def group_gone(pgid: int) -> bool:
    """True once ``os.killpg(pgid, 0)`` finds no process in the group, or finds only
    zombies: killed grandchildren are reparented to PID 1, and where PID 1 does not reap
    orphans (some container inits) their corpses stay in the group for good."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return not _live_in_group(pgid)


def _live_in_group(pgid: int) -> bool:
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def live_groups(marker: str) -> set[int]:
    """Process groups of live (non-zombie) processes whose environment contains
    ``marker`` (say ``CAIRN_RELEASE_DIR=<tmp_path>``): the processes a test started."""
    found: set[int] = set()
    needle = marker.encode()
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                environ = Path(entry.path, "environ").read_bytes()
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and any(v.startswith(needle) for v in environ.split(b"\0")):
                found.add(int(fields[2]))
    return found
