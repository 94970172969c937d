"""``[run]`` in component.toml, the ``[components]`` node config, and ready_url expansion."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_config

from node.config import ComponentsConfig, ConfigError
from node.deploy.component_config import RunSpec, load_component_config
from node.deploy.readiness import expand_ready_url
from node.errors import DeployFailed


def _run(tmp_path: Path, body: str) -> RunSpec | None:
    (tmp_path / "component.toml").write_text("[run]\n" + body)
    return load_component_config(tmp_path).run


def test_run_defaults(tmp_path: Path) -> None:
    assert _run(tmp_path, 'command = "./serve"\n') == RunSpec(
        "./serve", ready_command=None, ready_url=None, ready_timeout_s=60.0, stop_grace_s=None
    )


def test_every_run_key(tmp_path: Path) -> None:
    spec = _run(
        tmp_path,
        'command = ["python3", "server.py"]\n'
        'ready_url = "http://127.0.0.1:${HELLO_PORT:-8080}/health"\n'
        "ready_timeout_s = 20\nstop_grace_s = 3\n",
    )
    assert spec == RunSpec(
        ("python3", "server.py"),
        ready_url="http://127.0.0.1:${HELLO_PORT:-8080}/health",
        ready_timeout_s=20.0,
        stop_grace_s=3.0,
    )
    assert spec.argv == ("python3", "server.py")


def test_timeout_s_is_the_older_spelling_of_ready_timeout_s(tmp_path: Path) -> None:
    spec = _run(tmp_path, 'command = "x"\ntimeout_s = 7\n')
    assert spec is not None and spec.ready_timeout_s == 7.0
    spec = _run(tmp_path, 'command = "x"\ntimeout_s = 7\nready_timeout_s = 9\n')
    assert spec is not None and spec.ready_timeout_s == 9.0


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost",
        "http://[::1]:8080/health?full=1",
        "http://127.0.0.1:${PORT}/",
        "http://localhost:${PORT:-65535}/ready",
    ],
)
def test_loopback_ready_urls_are_accepted(tmp_path: Path, url: str) -> None:
    spec = _run(tmp_path, f'command = "x"\nready_url = "{url}"\n')
    assert spec is not None and spec.ready_url == url


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('ready_url = "https://127.0.0.1/"', "run.ready_url"),
        ('ready_url = "http://example.com/"', "run.ready_url"),
        ('ready_url = "http://10.0.0.1/"', "run.ready_url"),
        ('ready_url = "http://127.0.0.2/"', "run.ready_url"),
        ('ready_url = "http://user@127.0.0.1/"', "run.ready_url"),
        ('ready_url = "http://127.0.0.1.nip.io/"', "run.ready_url"),
        ('ready_url = "http://localhost:0/"', "run.ready_url"),
        ('ready_url = "http://localhost:70000/"', "run.ready_url"),
        ('ready_url = "http://localhost:${P:-70000}/"', "run.ready_url"),
        ('ready_url = "http://localhost:${P-1}/"', "run.ready_url"),
        ('ready_url = "http://localhost/a b"', "run.ready_url"),
        ('ready_url = "http://localhost/\\n"', "run.ready_url"),
        ("ready_url = 8080", "run.ready_url"),
        ('ready_url = "http://localhost/"\nready_command = "true"', "run"),
        ("ready_timeout_s = 0", "run.ready_timeout_s"),
        ("ready_timeout_s = 3601", "run.ready_timeout_s"),
        ("ready_timeout_s = nan", "run.ready_timeout_s"),
        ("stop_grace_s = -1", "run.stop_grace_s"),
        ("stop_grace_s = 601", "run.stop_grace_s"),
        ('stop_grace_s = "5"', "run.stop_grace_s"),
        ('restart = "always"', "run.restart"),
    ],
)
def test_bad_run_values_are_bad_payload(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(DeployFailed) as info:
        _run(tmp_path, f'command = "x"\n{body}\n')
    err = info.value
    assert (err.code, err.phase, err.status) == ("bad_payload", "install", 422)
    assert err.extra["key"] == key and key in err.message


def test_expand_ready_url() -> None:
    url = "http://127.0.0.1:${PORT:-8080}/health"
    assert expand_ready_url(url, {}) == "http://127.0.0.1:8080/health"
    assert expand_ready_url(url, {"PORT": "9001"}) == "http://127.0.0.1:9001/health"
    assert expand_ready_url("http://localhost/", {}) == "http://localhost/"
    with pytest.raises(ValueError, match=r"\$\{PORT\}, which is not set"):
        expand_ready_url("http://localhost:${PORT}/", {})
    with pytest.raises(ValueError, match="not a port number"):
        expand_ready_url("http://localhost:${PORT}/", {"PORT": "80; rm"})
    with pytest.raises(ValueError, match="not a port number"):
        expand_ready_url("http://localhost:${PORT}/", {"PORT": "0"})


def test_components_config_section(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        components={"log_max_bytes": 4096, "stop_grace_s": 2, "env": ["HELLO_PORT=8701", "A=b=c"]},
    )
    c = config.components
    assert (c.log_max_bytes, c.stop_grace_s, c.log_backups) == (4096, 2.0, 3)
    assert c.environment == {"HELLO_PORT": "8701", "A": "b=c"}
    assert make_config(tmp_path).components == ComponentsConfig()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"env": ["NOEQUALS"]}, "must be NAME=value"),
        ({"env": ["1BAD=x"]}, "must be NAME=value"),
        ({"env": ["CAIRN_NODE=x"]}, "reserved"),
        ({"log_max_bytes": 10}, "log_max_bytes"),
        ({"restart_min_s": 5, "restart_max_s": 1}, "restart_min_s"),
        ({"stop_grace_s": 0}, "stop_grace_s"),
        ({"restart_every": 1}, "unknown key [components] restart_every"),
    ],
)
def test_bad_components_config(tmp_path: Path, section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_config(tmp_path, components=section)
