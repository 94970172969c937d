"""The production material: the Dockerfile that cluster-compose.yml builds, the systemd
unit and its example config. Checked statically everywhere; the image is also built
where a container engine answers, and the unit verified where systemd-analyze exists.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

from node.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "cluster-compose.yml"
UNIT = ROOT / "packaging" / "systemd" / "cairn-node@.service"
EXAMPLE = ROOT / "packaging" / "systemd" / "cairn-node.toml.example"


# -- Dockerfile --------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE)


def test_the_image_is_python_311_slim_with_cairn_installed(
    dockerfile: list[tuple[str, str]],
) -> None:
    assert dockerfile[0] == ("FROM", "python:3.11-slim")
    runs = [args for word, args in dockerfile if word == "RUN"]
    assert any(re.search(r"\bpip install \.(\s|$)", r) for r in runs)
    copied = [shlex.split(args)[:-1] for word, args in dockerfile if word == "COPY"]
    sources = {s for srcs in copied for s in srcs}
    assert {"pyproject.toml", "README.md", "node", "replication", "storage"} <= sources
    for s in sources:
        assert (ROOT / s).exists(), f"COPY {s}: no such file in the repository"
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ignore[ignore.index("*") :].count("*") == 1
    assert {f"!{s}" if (ROOT / s).is_file() else f"!{s}/" for s in sources} <= set(ignore)


def test_the_image_runs_the_node_as_a_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    words = [w for w, _ in dockerfile]
    users = [args for w, args in dockerfile if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    # the last USER comes after every RUN, so nothing after it runs as root
    assert len(words) - 1 - words[::-1].index("USER") > max(
        i for i, w in enumerate(words) if w == "RUN"
    )
    [cmd] = [args for w, args in dockerfile if w == "CMD"]
    argv = json.loads(cmd)  # exec form: signals reach the node, not a shell
    assert argv[:4] == ["cairn", "node", "run", "--config"]
    assert ("STOPSIGNAL", "SIGTERM") in dockerfile


def test_compose_builds_every_service_from_the_dockerfile() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    images = set()
    for name, service in compose["services"].items():
        build = service.get("build")
        assert build == {"context": ".", "dockerfile": "Dockerfile"}, name
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
        images.add(service["image"])
    assert len(images) == 1  # built once, run by every service


def test_what_the_dockerfile_copies_builds_the_whole_package(tmp_path: Path) -> None:
    """``pip install .`` in the image sees only the COPY'd files: build a wheel from
    exactly those and check that code, migrations and the bundled example are in it."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for word, args in _instructions(DOCKERFILE):
        if word == "COPY":
            *sources, _ = shlex.split(args)
            for s in sources:
                src = ROOT / s
                if src.is_dir():
                    shutil.copytree(src, ctx / s, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(src, ctx / s)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ctx)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = tmp_path.glob("cairn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"node/cli/root.py", "node/cli/api/client.py", "node/deploy/pack.py",
            "node/examples/hello/component.toml",
            "storage/migrations/0001_initial.sql"} <= names  # fmt: skip
    assert any(n.endswith("entry_points.txt") for n in names)


def _engine() -> str | None:
    docker = shutil.which("docker") or shutil.which("podman")
    if docker is None:
        return None
    probe = subprocess.run([docker, "info"], capture_output=True, timeout=30)
    return docker if probe.returncode == 0 else None


def test_the_image_builds_and_runs_where_a_container_engine_answers() -> None:
    engine = _engine()
    if engine is None:
        pytest.skip("no container engine answers here (the docker client alone is not enough)")
    tag = f"cairn-test:{uuid.uuid4().hex[:12]}"
    try:
        build = subprocess.run([engine, "build", "-t", tag, str(ROOT)], capture_output=True,
                               text=True, timeout=900)  # fmt: skip
        assert build.returncode == 0, build.stderr[-3000:]
        run = subprocess.run([engine, "run", "--rm", "--entrypoint", "sh", tag, "-c",
                              "id -u && cairn --version && cairn node run --help"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr
        uid, version = run.stdout.splitlines()[:2]
        assert uid != "0" and "cairn" in version
    finally:
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=120)


# -- systemd -----------------------------------------------------------------------------


def _unit(path: Path, instance: str) -> dict[str, dict[str, list[str]]]:
    """Section → key → every value (systemd allows repeats), with %i filled in."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip().replace("%i", instance))
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return _unit(UNIT, "n1")


def test_the_unit_runs_the_node_as_a_dedicated_user_and_restarts_it(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    s = unit["Service"]
    assert s["User"] == ["cairn"] and s["Group"] == ["cairn"]
    argv = shlex.split(s["ExecStart"][0])
    assert Path(argv[0]).name == "cairn" and argv[1:4] == ["node", "run", "--config"]
    assert s["Restart"] == ["on-failure"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_a_start_error_is_not_restarted(unit: dict[str, dict[str, list[str]]]) -> None:
    """RestartPreventExitStatus names the exit code of a node that cannot start."""
    [prevent] = unit["Service"]["RestartPreventExitStatus"]
    result = subprocess.run(
        [sys.executable, "-m", "node", "node", "run", "--config", "/nonexistent/cairn.toml"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert str(result.returncode) == prevent
    assert result.stderr.startswith("cairn: cannot read config file")


def test_the_unit_is_hardened(unit: dict[str, dict[str, list[str]]]) -> None:
    s = unit["Service"]
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
        "ProtectHome": "yes", "PrivateDevices": "yes", "RestrictSUIDSGID": "yes",
    }.items():  # fmt: skip
        assert s.get(key) == [value], key
    assert s["CapabilityBoundingSet"] == [""]
    # SIGTERM to the node only (it stops its hooks' process groups itself), SIGKILL to
    # whatever is left: never `process`, which would leave orphans behind.
    assert s["KillMode"] == ["mixed"] and s["KillSignal"] == ["SIGTERM"]


def test_the_data_dir_of_the_example_config_is_writable(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    config_path = Path(shlex.split(unit["Service"]["ExecStart"][0])[-1])
    assert config_path == Path("/etc/cairn/n1.toml")
    config = parse_config(tomllib.loads(EXAMPLE.read_text(encoding="utf-8")),
                          base=config_path.parent, env={})  # fmt: skip
    assert config.node.name == "n1" and config.clustered and len(config.peers) == 2
    writable = [Path(p) for v in unit["Service"]["ReadWritePaths"] for p in v.split()]
    assert any(config.node.data_dir.is_relative_to(w) for w in writable)
    assert unit["Service"]["StateDirectory"] == ["cairn/n1"]
    assert config.node.data_dir == Path("/var/lib") / "cairn/n1"


def test_systemd_accepts_the_unit_where_it_is_installed(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # An instance of the template, with an executable that exists here.
    text = UNIT.read_text(encoding="utf-8").replace("/opt/cairn/bin/cairn", "/bin/true")
    instance = tmp_path / "cairn-node@n1.service"
    instance.write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", "--man=no", str(instance)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines()
        if str(instance) in line or "cairn-node" in line
    ]  # fmt: skip
    assert result.returncode == 0 and complaints == [], result.stderr
