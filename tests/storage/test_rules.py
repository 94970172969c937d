"""The record's rules: whole-string matching and bounded shapes."""

from __future__ import annotations

import pytest

from node.auth import hash_password
from storage import rules
from storage.rules import RuleError


@pytest.mark.parametrize("bad", ["site\n", "", ".hidden", "a/b", "../x", "x" * 129, 5, None])
def test_project_names_match_whole_strings(bad: object) -> None:
    with pytest.raises(RuleError) as e:
        rules.check_project(bad)
    assert e.value.field == "project"


def test_good_values_pass_unchanged() -> None:
    assert rules.check_project("web.v2_x-1") == "web.v2_x-1"
    assert rules.check_node_name("n1") == "n1"
    assert rules.check_sha256("a" * 64) == "a" * 64
    ident = "0b6f0c9e-2f4c-4f51-9c1e-1f6f3b1c2d3e"
    assert rules.check_deployment_id(ident) == ident


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "a" * 64 + "\n", "g" * 64, None, 12])
def test_hashes_are_64_lowercase_hex(bad: object) -> None:
    with pytest.raises(RuleError):
        rules.check_sha256(bad)


@pytest.mark.parametrize(
    "bad",
    ["0B6F0C9E-2F4C-4F51-9C1E-1F6F3B1C2D3E", "0b6f0c9e2f4c4f519c1e1f6f3b1c2d3e", "qa701-never"],
)
def test_deployment_ids_are_canonical_uuids(bad: str) -> None:
    assert not rules.is_deployment_id(bad)


def test_permission_shapes() -> None:
    assert rules.check_permission({"operations": ["b", "a", "a"]}) == {
        "super_user": False,
        "operations": ["a", "b"],
    }
    for bad in (5, {"operations": 5}, {"super_user": "yes"}, {"x": 1}, {"operations": [1]}):
        with pytest.raises(RuleError):
            rules.check_permission(bad)
    with pytest.raises(RuleError, match="deploy_componet"):
        rules.check_permission({"operations": ["deploy_componet"]}, known_operations={"a"})


def test_password_hashes_have_bounded_parameters() -> None:
    good = hash_password("correct horse")
    assert rules.check_password_hash(good) == good
    assert rules.check_password_hash("") == ""
    _scheme, n, r, p, salt, digest = good.split("$")
    for bad in (
        "plain",
        f"scrypt${1 << 24}${r}${p}${salt}${digest}",
        f"scrypt${n}$64${p}${salt}${digest}",
        f"scrypt$1000${r}${p}${salt}${digest}",
        f"scrypt${n}${r}${p}$!!${digest}",
    ):
        with pytest.raises(RuleError):
            rules.check_password_hash(bad)


def test_sizes_and_text() -> None:
    assert rules.check_size(0, "s") == 0
    for bad in (-1, True, 1.5, rules.MAX_PAYLOAD_SIZE + 1):
        with pytest.raises(RuleError):
            rules.check_size(bad, "s")
    with pytest.raises(RuleError):
        rules.check_text("a\0b", "t", max_len=10)
    with pytest.raises(RuleError):
        rules.check_text("a\nb", "t", max_len=10)
    assert rules.check_text("a\nb", "t", max_len=10, allow_control=True) == "a\nb"
