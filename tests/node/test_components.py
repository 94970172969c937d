"""Releases and the atomic ``current`` switch."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from node.deploy.components import Components

A, B, C = (str(uuid.uuid4()) for _ in range(3))


def _stage(comp: Components, project: str, deployment_id: str) -> Path:
    release = comp.release_dir(project, deployment_id)
    release.mkdir()
    (release / "marker").write_text(deployment_id)
    return release


@pytest.fixture
def comp(tmp_path: Path) -> Components:
    return Components(tmp_path / "components")


def test_release_dir_layout(comp: Components) -> None:
    release = comp.release_dir("app", A)
    assert release == comp.root / "app" / "releases" / A
    assert release.parent.is_dir() and not release.exists()
    assert comp.releases_dir("app") == release.parent


def test_activate_switches_and_returns_previous(comp: Components) -> None:
    _stage(comp, "app", A)
    _stage(comp, "app", B)
    assert comp.current("app") is None

    assert comp.activate("app", A) is None
    assert comp.current("app") == A
    assert os.readlink(comp.root / "app" / "current") == f"releases/{A}"  # relative
    assert (comp.root / "app" / "current" / "marker").read_text() == A

    assert comp.activate("app", B) == A
    assert comp.current("app") == B
    assert comp.activate("app", B) == B  # re-activating is harmless
    assert sorted(os.listdir(comp.root / "app")) == ["current", "releases"]  # no temp link


def test_current_survives_a_new_instance(comp: Components) -> None:
    _stage(comp, "app", A)
    comp.activate("app", A)
    assert Components(comp.root).current("app") == A


def test_activate_requires_a_staged_release(comp: Components) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        comp.activate("app", A)
    (comp.releases_dir("app") / B).write_text("a file, not a release")
    with pytest.raises(ValueError):
        comp.activate("app", B)
    assert comp.current("app") is None


def test_discard_refuses_the_current_release(comp: Components) -> None:
    _stage(comp, "app", A)
    _stage(comp, "app", B)
    comp.activate("app", A)

    assert comp.discard_release("app", A) is False
    assert (comp.release_dir("app", A) / "marker").exists()
    assert comp.discard_release("app", B) is True
    assert comp.releases("app") == [A]
    assert comp.discard_release("app", C) is False  # nothing there


def test_deactivate_keeps_releases(comp: Components) -> None:
    _stage(comp, "app", A)
    comp.activate("app", A)

    assert comp.deactivate("app") == A
    assert comp.current("app") is None
    assert comp.releases("app") == [A]
    assert comp.deactivate("app") is None
    assert comp.discard_release("app", A) is True


def test_listing_ignores_foreign_entries(comp: Components) -> None:
    for project, deployment_id in (("web", A), ("api", B), ("api", C)):
        _stage(comp, project, deployment_id)
    (comp.releases_dir("api") / "not-a-uuid").mkdir()
    (comp.releases_dir("api") / ".tmp-x-123").mkdir()
    (comp.root / ".hidden").mkdir()
    (comp.root / "stray-file").write_text("x")

    assert comp.projects() == ["api", "web"]
    assert comp.releases("api") == sorted([B, C])
    assert comp.releases("nothing") == []
    assert Components(comp.root / "missing").projects() == []


def test_sweep_removes_crash_leftovers_only(comp: Components) -> None:
    _stage(comp, "app", A)
    comp.activate("app", A)
    project = comp.root / "app"
    os.symlink(f"releases/{A}", project / ".tmp-current-deadbeef")
    (comp.releases_dir("app") / f".tmp-{B}-abc" / "sub").mkdir(parents=True)
    (comp.releases_dir("app") / f".tmp-discard-{C}-1234").mkdir()

    removed = comp.sweep()

    assert sorted(p.name for p in removed) == sorted(
        [".tmp-current-deadbeef", f".tmp-{B}-abc", f".tmp-discard-{C}-1234"]
    )
    assert sorted(os.listdir(project)) == ["current", "releases"]
    assert os.listdir(comp.releases_dir("app")) == [A]
    assert comp.current("app") == A


class _Boom(Exception):
    pass


class _FailAt:
    def __init__(self, name: str) -> None:
        self.name = name

    def hit(self, name: str) -> None:
        if name == self.name:
            raise _Boom(name)


def test_failure_before_switch_keeps_the_old_release(tmp_path: Path) -> None:
    comp = Components(tmp_path, faults=_FailAt("components.before_switch"))
    _stage(comp, "app", A)
    _stage(comp, "app", B)
    Components(tmp_path).activate("app", A)

    with pytest.raises(_Boom):
        comp.activate("app", B)

    assert comp.current("app") == A
    assert sorted(os.listdir(tmp_path / "app")) == ["current", "releases"]


def test_crash_before_switch_leaves_old_release_and_sweepable_link(tmp_path: Path) -> None:
    comp = Components(tmp_path)
    _stage(comp, "app", A)
    _stage(comp, "app", B)
    comp.activate("app", A)
    script = (
        "import sys; from pathlib import Path;"
        "from node.deploy.components import Components;"
        "from storage.faults import CrashPoints;"
        "Components(Path(sys.argv[1]), CrashPoints(frozenset({'components.before_switch'})))"
        ".activate('app', sys.argv[2])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), B],
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )

    assert proc.returncode == -9
    assert comp.current("app") == A
    leftovers = [n for n in os.listdir(tmp_path / "app") if n.startswith(".tmp-")]
    assert len(leftovers) == 1
    assert [p.name for p in comp.sweep()] == leftovers
    assert comp.current("app") == A


@pytest.mark.parametrize(
    "project", ["", ".hidden", "..", "a/b", "-x", "x" * 129, "app\n", "ünï", "a b"]
)
def test_project_names_are_validated(comp: Components, project: str) -> None:
    for call in (
        lambda: comp.release_dir(project, A),
        lambda: comp.current(project),
        lambda: comp.activate(project, A),
        lambda: comp.discard_release(project, A),
        lambda: comp.deactivate(project),
    ):
        with pytest.raises(ValueError, match="project"):
            call()
    assert not comp.root.exists()


@pytest.mark.parametrize("deployment_id", ["", "../x", "not-a-uuid", A.upper(), "{" + A + "}"])
def test_deployment_ids_are_validated(comp: Components, deployment_id: str) -> None:
    with pytest.raises(ValueError, match="deployment id"):
        comp.release_dir("app", deployment_id)
    with pytest.raises(ValueError, match="deployment id"):
        comp.activate("app", deployment_id)


def test_valid_edge_names_are_accepted(comp: Components) -> None:
    for project in ("a", "A.b_c-d", "9" + "x" * 127):
        _stage(comp, project, A)
        comp.activate(project, A)
        assert comp.current(project) == A
