"""What a node puts right at start, before anything runs: leftovers of a crash.

- temp files and half-written blobs, packing temp files, hook process groups a killed
  node left running;
- blobs no deployment refers to (a crash between storing a blob and recording its hash);
- release directories that were never staged completely (an interrupted stage);
- the ``current`` switch of each project, made to agree with the release this node
  recorded as active (a crash between the switch and the record).
"""

from __future__ import annotations

from pathlib import Path

import structlog

from node.deploy.components import Components
from node.deploy.hooks import HookGroups
from storage.blobs import BlobStore
from storage.store import Store

__all__ = ["align_releases", "sweep_storage"]

log = structlog.get_logger(__name__)


def _sweep_tmp(tmp: Path) -> list[Path]:
    """Remove packing temp files a crash left in the node's ``tmp`` directory."""
    removed = []
    if tmp.is_dir():
        for entry in tmp.iterdir():
            if entry.is_file() or entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


async def sweep_storage(
    store: Store, blobs: BlobStore, components: Components, hook_groups: HookGroups, tmp: Path
) -> None:
    """Remove what a crash left behind (see the module docstring)."""
    if killed := hook_groups.kill_leftovers():
        log.warning("leftover_hooks_killed", process_groups=killed)
    swept = blobs.sweep() + components.sweep() + _sweep_tmp(tmp)
    if swept:
        log.info("temp_files_swept", count=len(swept))
    orphans = [h for h in blobs.hashes() if await store.live_references(h) == 0]
    freed = sum([await blobs.delete(h) for h in orphans])
    if orphans:
        log.info("orphan_blobs_swept", count=len(orphans), freed_bytes=freed)
    staged = await store.staged_releases()
    for project in components.projects():
        current = components.current(project)
        for deployment_id in components.releases(project):
            if deployment_id not in staged and deployment_id != current:
                components.discard_release(project, deployment_id)
                log.info("partial_release_removed", project=project, deployment_id=deployment_id)


async def align_releases(store: Store, components: Components) -> None:
    """Point each project's ``current`` at the release recorded as active here."""
    active = await store.active_releases()
    for project in components.projects():
        recorded = active.get(project)
        current = components.current(project)
        want = recorded["deployment_id"] if recorded else None
        if current == want:
            continue
        if want is not None and components.release_dir(project, want).is_dir():
            components.activate(project, want)
        elif want is None and current is not None:
            components.deactivate(project)
        log.warning("release_switch_realigned", project=project, was=current, now=want)
