"""``cluster-compose.yml`` parses and names a consistent set of nodes, ports and certificates.

Each node's configuration is rebuilt the way the container builds it (its environment
plus its ``[[peers]]`` file) and validated by the real config loader.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.cli.local.layout import DEFAULT_BASE_PORT
from node.config import Config, parse_config

COMPOSE = Path(__file__).resolve().parents[2] / "cluster-compose.yml"
NODES = ["n1", "n2", "n3"]
_VAR = re.compile(r"\$\{([A-Z_]+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    """The service environment as the container sees it (``${VAR:?...}`` filled in)."""
    env = service["environment"]
    assert isinstance(env, dict), "environment must be a mapping"
    return {k: _VAR.sub(lambda m: f"<{m.group(1)}>", str(v)) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Volume name → (container path, mode)."""
    out = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "rw")
    return out


def _node_config(compose: dict[str, Any], name: str) -> Config:
    service = compose["services"][name]
    [cfg] = service["configs"]
    assert service["command"][-1] == cfg["target"], "the node must read its config file"
    text = compose["configs"][cfg["source"]]["content"]
    return parse_config(tomllib.loads(text), base=Path(cfg["target"]).parent, env=_env(service))


def _issued(compose: dict[str, Any]) -> dict[str, tuple[list[str], str]]:
    """Node → (hosts, out dir) from the ``cairn cert issue`` lines of the certs service."""
    script = "\n".join(compose["services"]["certs"]["command"])
    issued = {}
    for line in script.splitlines():
        argv = shlex.split(line)
        if argv[:3] == ["cairn", "cert", "issue"]:
            opts: dict[str, list[str]] = {}
            for flag, value in zip(argv[3::2], argv[4::2], strict=True):
                opts.setdefault(flag, []).append(value)
            [node] = opts["--node"]
            [out_dir] = opts["--out-dir"]
            issued[node] = (opts["--host"], out_dir)
    return issued


def test_services_are_one_certs_job_and_three_nodes(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"certs", *NODES}
    assert compose["services"]["certs"]["restart"] == "no"
    for name in NODES:
        service = compose["services"][name]
        assert service["depends_on"] == {"certs": {"condition": "service_completed_successfully"}}
        assert service["hostname"] == name
        assert service["image"] == compose["services"]["certs"]["image"]
        assert service["command"][:3] == ["cairn", "node", "run"]


def test_every_node_config_is_valid_and_names_its_service(compose: dict[str, Any]) -> None:
    for name in NODES:
        config = _node_config(compose, name)
        assert config.node.name == name
        assert config.clustered
        assert config.auth.bootstrap_password == "<CAIRN_ADMIN_PASSWORD>"


def test_peers_point_at_the_other_services_peer_ports(compose: dict[str, Any]) -> None:
    configs = {name: _node_config(compose, name) for name in NODES}
    for name, config in configs.items():
        expected = []
        for other in NODES:
            if other != name:
                peer = configs[other].peer
                assert peer is not None
                expected.append((other, f"wss://{other}:{peer.port}"))
        assert [(p.name, p.url) for p in config.peers] == expected


def test_certificates_are_issued_where_the_nodes_read_them(compose: dict[str, Any]) -> None:
    certs = compose["services"]["certs"]
    script = "\n".join(certs["command"])
    ca_dirs = re.findall(r"cairn cert init-ca --dir (\S+)", script)
    assert len(ca_dirs) == 1
    ca_dir = ca_dirs[0]
    issued = _issued(compose)
    assert set(issued) == set(NODES)
    cert_mounts = _mounts(certs)
    vol_of = {path: vol for vol, (path, _) in cert_mounts.items()}
    assert vol_of[ca_dir] != vol_of["/certs"], "the CA key must live in its own volume"
    assert f"cp {ca_dir}/ca.pem /certs/ca.pem" in script
    for name in NODES:
        config = _node_config(compose, name)
        hosts, out_dir = issued[name]
        assert name in hosts  # the name the other nodes dial
        assert config.tls is not None
        assert config.tls.cert == Path(out_dir) / f"{name}.pem"
        assert config.tls.key == Path(out_dir) / f"{name}.key"
        assert config.tls.ca == Path("/certs/ca.pem")
        mounts = _mounts(compose["services"][name])
        assert vol_of[ca_dir] not in mounts, f"{name} must not see the CA key"
        certs_vol = vol_of[out_dir]
        assert mounts[certs_vol] == (out_dir, "ro")


def test_data_volumes_and_admin_ports_are_per_node(compose: dict[str, Any]) -> None:
    data_volumes, host_ports = [], []
    for i, name in enumerate(NODES):
        config = _node_config(compose, name)
        mounts = _mounts(compose["services"][name])
        [data_vol] = [v for v, (path, _) in mounts.items() if path == str(config.node.data_dir)]
        data_volumes.append(data_vol)
        [published] = compose["services"][name]["ports"]
        bind, host_port, container_port = published.split(":")
        assert bind == "127.0.0.1"
        assert int(container_port) == config.admin.port and config.admin.host == "0.0.0.0"
        host_ports.append(int(host_port))
        assert int(host_port) == DEFAULT_BASE_PORT + i  # as `cairn cluster up` numbers them
    assert len(set(data_volumes)) == len(NODES)
    declared = set(compose["volumes"])
    assert set(data_volumes) <= declared
    for service in compose["services"].values():
        assert set(_mounts(service)) <= declared


def test_docker_compose_accepts_it_when_available() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        timeout=60,
        env={"CAIRN_ADMIN_PASSWORD": "x", "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert result.returncode == 0, result.stderr.decode()
