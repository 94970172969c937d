"""Releases on disk and the atomic ``current`` switch, under ``components/<project>/``.

Layout::

    <root>/<project>/releases/<deployment_id>/   one extracted release each
    <root>/<project>/current -> releases/<id>    relative symlink to the active one

Activation writes a new symlink under a temp name and renames it over ``current``, so a
reader (or a crash) only ever sees the old or the new target. Names are validated here as
well as at the API, so nothing outside ``root`` can be addressed. Methods are synchronous
and cheap; the reconciler serialises them per project.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import uuid
from pathlib import Path

from node.deploy.extract import sweep_temp
from storage.durable import fsync_path
from storage.faults import NO_FAULTS, Faults

__all__ = ["Components", "validate_deployment_id", "validate_project"]

_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CURRENT = "current"
_RELEASES = "releases"


def validate_project(project: str) -> str:
    """Return ``project`` if it is a valid component name.

    Raises:
        ValueError: it does not match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``.
    """
    if not isinstance(project, str) or not _PROJECT.fullmatch(project):
        raise ValueError(f"invalid project name {project!r}")
    return project


def validate_deployment_id(deployment_id: str) -> str:
    """Return ``deployment_id`` if it is a UUID in canonical (lowercase, hyphenated) form.

    Raises:
        ValueError: it is not.
    """
    try:
        canonical = str(uuid.UUID(deployment_id))
    except (ValueError, TypeError, AttributeError):
        canonical = None
    if canonical != deployment_id:
        raise ValueError(f"invalid deployment id {deployment_id!r}")
    return deployment_id


class Components:
    """The component tree of this node.

    Args:
        root: the ``components`` directory (created on demand).
        faults: crash-point seam (``components.before_switch``).
    """

    def __init__(self, root: Path, faults: Faults = NO_FAULTS) -> None:
        self.root = root
        self._faults = faults

    def _project_dir(self, project: str) -> Path:
        return self.root / validate_project(project)

    def releases_dir(self, project: str) -> Path:
        """``<root>/<project>/releases``, created if missing."""
        path = self._project_dir(project) / _RELEASES
        path.mkdir(parents=True, exist_ok=True)
        return path

    def release_dir(self, project: str, deployment_id: str) -> Path:
        """Where ``deployment_id``'s release lives (its parent is created; it is not)."""
        return self.releases_dir(project) / validate_deployment_id(deployment_id)

    def current(self, project: str) -> str | None:
        """The deployment id ``current`` points to, or None if nothing is active."""
        try:
            target = os.readlink(self._project_dir(project) / _CURRENT)
        except (FileNotFoundError, NotADirectoryError):
            return None
        prefix, _, deployment_id = target.partition("/")
        try:
            return validate_deployment_id(deployment_id) if prefix == _RELEASES else None
        except ValueError:
            return None

    def activate(self, project: str, deployment_id: str) -> str | None:
        """Point ``current`` at ``deployment_id``'s release, atomically and durably.

        Args:
            project: component name.
            deployment_id: a release that exists on disk.

        Returns:
            The previously active deployment id, or None.

        Raises:
            ValueError: invalid names, or the release directory does not exist (a
                caller bug: only staged releases are activated).
        """
        release = self.release_dir(project, deployment_id)
        try:
            is_dir = stat.S_ISDIR(os.lstat(release).st_mode)
        except FileNotFoundError:
            is_dir = False
        if not is_dir:
            raise ValueError(f"release {deployment_id} of {project!r} does not exist")
        project_dir = release.parent.parent
        previous = self.current(project)
        tmp = project_dir / f".tmp-{_CURRENT}-{secrets.token_hex(8)}"
        os.symlink(f"{_RELEASES}/{deployment_id}", tmp)
        try:
            self._faults.hit("components.before_switch")
            os.replace(tmp, project_dir / _CURRENT)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(project_dir)
        return previous

    def deactivate(self, project: str) -> str | None:
        """Remove ``current`` (the component is dropped); releases stay on disk.

        Returns:
            The deployment id that was active, or None.
        """
        project_dir = self._project_dir(project)
        previous = self.current(project)
        try:
            (project_dir / _CURRENT).unlink()
        except FileNotFoundError:
            return previous
        fsync_path(project_dir)
        return previous

    def discard_release(self, project: str, deployment_id: str) -> bool:
        """Remove a release that is not active (a failed or superseded stage).

        The directory is first renamed to a ``.tmp-`` name, so a crash midway leaves
        something :meth:`sweep` removes rather than a half-deleted release.

        Returns:
            True if a release was removed; False if it is the active one (refused) or
            there was nothing to remove.
        """
        if self.current(project) == deployment_id:
            return False
        release = self.release_dir(project, deployment_id)
        doomed = release.parent / f".tmp-discard-{deployment_id}-{secrets.token_hex(4)}"
        try:
            os.rename(release, doomed)
        except FileNotFoundError:
            return False
        shutil.rmtree(doomed)
        return True

    def clone_release(self, project: str, source_id: str, deployment_id: str) -> None:
        """Make ``deployment_id``'s release a hard-linked copy of ``source_id``'s (a
        rollback to a release still on disk: no extraction, no hooks).

        Raises:
            FileNotFoundError: the source release is gone.
        """
        source = self.release_dir(project, source_id)
        dest = self.release_dir(project, deployment_id)
        tmp = dest.parent / f".tmp-clone-{deployment_id}-{secrets.token_hex(4)}"
        try:
            shutil.copytree(source, tmp, symlinks=True, copy_function=os.link)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def projects(self) -> list[str]:
        """Projects that have a directory here, sorted."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _PROJECT.fullmatch(n) and (self.root / n).is_dir())

    def releases(self, project: str) -> list[str]:
        """Deployment ids with a release directory for ``project``, sorted."""
        try:
            names = os.listdir(self._project_dir(project) / _RELEASES)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _is_deployment_id(n))

    def sweep(self) -> list[Path]:
        """Remove temp symlinks and ``.tmp-*`` directories left by crashes.

        Call at start, before anything extracts or activates.

        Returns:
            The paths removed.
        """
        removed: list[Path] = []
        for project in self.projects():
            project_dir = self.root / project
            removed += sweep_temp(project_dir)
            removed += sweep_temp(project_dir / _RELEASES)
        return removed


def _is_deployment_id(name: str) -> bool:
    try:
        validate_deployment_id(name)
    except ValueError:
        return False
    return True
