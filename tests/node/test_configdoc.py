"""docs/configuration.md is generated from node/config.py and cannot drift from it; the
environment names it lists are the ones the loader reads; unknown ``CAIRN_*`` variables
are named with what they probably meant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.cli.configdoc import MEANINGS, SECTIONS, config_keys, render
from node.config import (
    OTHER_ENV,
    config_env_names,
    parse_config,
    unknown_env_variables,
    unknown_env_warning,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


def test_configuration_md_is_generated_from_the_dataclasses() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is out of date: run "
        "`python -m node.cli.configdoc --write docs/configuration.md`"
    )


def test_every_key_has_a_meaning_and_every_meaning_a_key() -> None:
    idents = {k.ident for k in config_keys()}
    assert idents == set(MEANINGS)
    assert {k.section for k in config_keys()} == set(SECTIONS)
    assert len(idents) > 30  # every section's keys, not an empty walk


def _full_config() -> dict[str, Any]:
    """Every section present, so that any single key can be overridden alone."""
    return {
        "node": {"name": "n1", "data_dir": "d"},
        "admin": {"tls_cert": "a.pem", "tls_key": "a.key"},
        "peer": {},
        "tls": {"ca": "ca.pem", "cert": "n1.pem", "key": "n1.key"},
    }


_SAMPLES: dict[str, str] = {"string": "n7", "integer": "7", "number": "7.5", "path": "/x/y"}
#: Values for the keys whose own validation refuses the samples above.
_VALUES: dict[str, str] = {
    "CAIRN_COMPONENTS_LOG_MAX_BYTES": "4096",
    "CAIRN_STORAGE_MIN_FREE_RATIO": "0.25",
    "CAIRN_DEPLOY_PACKAGE_ALLOW_HOSTS": "pkg.internal,10.1.2.3",
    "CAIRN_DEPLOY_PACKAGE_ALLOW_NETWORKS": "10.0.0.0/8,fd00::/8",
    "CAIRN_COMPONENTS_ENV": "PORT=8080,MODE=demo",
}


def test_every_documented_variable_overrides_its_key(tmp_path: Path) -> None:
    keys = {(k.section, k.name): k for k in config_keys()}
    for env, (section, name) in config_env_names().items():
        key = keys[(section, name)]
        assert env in key.env
        kind = key.type.removesuffix(" (optional)")
        default = "/a,/b" if kind.startswith("list of") else _SAMPLES[kind]
        raw = _VALUES.get(env, default)
        config = parse_config(_full_config(), base=tmp_path, env={env: raw})
        value = getattr(getattr(config, section), name)
        expected: Any = {
            "string": raw, "integer": int(raw) if kind == "integer" else None,
            "number": float(raw) if kind == "number" else None, "path": Path(raw),
            "list of paths": (Path("/a"), Path("/b")),
            "list of strings": tuple(raw.split(",")),
        }[kind]  # fmt: skip
        assert value == expected, env
    # and nothing the loader reads is missing from the page
    documented = {e for k in config_keys() for e in k.env}
    assert set(config_env_names()) <= documented


def test_the_bootstrap_password_has_two_names(tmp_path: Path) -> None:
    config = parse_config(_full_config(), base=tmp_path, env={"CAIRN_ADMIN_PASSWORD": "pw"})
    assert config.auth.bootstrap_password == "pw"
    [key] = [k for k in config_keys() if k.ident == "auth.bootstrap_password"]
    assert "CAIRN_ADMIN_PASSWORD" in key.env


def test_defaults_on_the_page_are_the_dataclass_defaults() -> None:
    from node.config import Limits

    [key] = [k for k in config_keys() if k.ident == "limits.max_payload_bytes"]
    assert key.default == f"`{Limits().max_payload_bytes}` (4 GiB)"
    required = {k.ident for k in config_keys() if k.default == "required"}
    assert required == {"node.name", "node.data_dir", "tls.ca", "tls.cert", "tls.key",
                        "peers.name", "peers.url"}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CAIRN_ADMIN_PORT": "1", "CAIRN_USER": "u", "CAIRN_TEST_X": "1", "HOME": "/"}, None),
        (
            {"CAIRN_ADMIN_PROT": "1"},
            "ignoring unknown environment variables: "
            "CAIRN_ADMIN_PROT (did you mean CAIRN_ADMIN_PORT, [admin] port?)",
        ),
        (
            {"CAIRN_PASWORD": "x", "CAIRN_ZZZ": "1"},
            "ignoring unknown environment variables: "
            "CAIRN_PASWORD (did you mean CAIRN_PASSWORD?), CAIRN_ZZZ",
        ),
    ],
)
def test_unknown_variables_are_named_with_what_they_probably_meant(
    env: dict[str, str], expected: str | None
) -> None:
    assert unknown_env_warning(env) == expected


def test_known_variables_are_never_unknown() -> None:
    env = {name: "1" for name in [*config_env_names(), *OTHER_ENV, "CAIRN_SOAK_ROUNDS"]}
    assert unknown_env_variables(env) == []
