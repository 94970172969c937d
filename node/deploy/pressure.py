"""Disk pressure: watch the data directory's free space and the blob store's size,
reclaim in a fixed order, and refuse what cannot fit (SPEC 8).

The **watermark** is the larger of ``[storage] min_free_bytes`` and ``min_free_ratio``
of the filesystem's size. The node is **under pressure** while free space is below it,
or while the blob store is larger than ``max_blob_bytes`` (when set). Then it reclaims,
in this order, and stops as soon as it is out of pressure (or the room asked for fits):

1. ``orphan``: blobs no live deployment refers to;
2. ``retention``: payloads retention would drop anyway (:func:`~node.deploy.retention.
   prunable`), largest first, then oldest;
3. ``releases``: release directories beyond the newest ``keep_releases`` per project
   (:func:`~node.deploy.releases.prune_releases`), for projects no step is busy with;
4. ``beyond_retention``: the payloads of finished deploys that only the count rule
   (``keep_successful``) or the failed grace period keeps, largest first, then oldest.

Never reclaimed: the payload of a project's desired deploy or of the release active on
this node, a pinned deploy's, one that a deploy still running refers to, or a blob held
(being ingested, staged, downloaded or sent). Payloads are dropped with the same
replicated drop as ``delete_deployment_payload`` (every node frees its copy; the records
stay). A deploy is admitted only if its payload and the estimate of its extraction fit
above the watermark after reclaiming; otherwise it fails with 507
``insufficient_storage`` before it writes (:class:`~node.deploy.space.SpaceGuard`).

Checked at a deploy's start, every few MiB while a payload streams in, before a blob
fetch and an extraction, and every ``check_s`` in the background. Reported in
``cluster_status`` (``storage``), ``/metrics`` and the log (``storage_pressure``,
``storage_reclaimed``, ``storage_pressure_relieved``, ``deploy_refused_storage``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import structlog

from node.config import StorageConfig
from node.deploy.context import DeployContext
from node.deploy.releases import prune_releases
from node.deploy.retention import prunable
from node.deploy.space import insufficient
from storage.errors import BlobMissing
from storage.records import Deployment

__all__ = ["DiskPressure", "Drop", "Step", "Usage"]

log = structlog.get_logger(__name__)

#: Drops one deployment's payload (replicated) and returns the bytes freed here.
Drop = Callable[[DeployContext, Deployment], Awaitable[int]]
#: How long an ingest believes a pass that found nothing to take (no rescan storms).
_BARREN_S = 2.0
#: How long the blob store's size (a directory walk) is reused while a payload streams.
_BLOB_BYTES_TTL_S = 1.0


class Step(StrEnum):
    """What a reclaim pass takes, in order."""

    ORPHAN = "orphan"
    RETENTION = "retention"
    RELEASES = "releases"
    BEYOND_RETENTION = "beyond_retention"


_ORDER = {step: i for i, step in enumerate(Step)}


class _Vfs(Protocol):
    """The fields of ``os.statvfs_result`` used here (the test seam)."""

    @property
    def f_frsize(self) -> int: ...
    @property
    def f_blocks(self) -> int: ...
    @property
    def f_bavail(self) -> int: ...


Statvfs = Callable[[Path], _Vfs]


@dataclass(frozen=True, slots=True)
class Usage:
    """The data directory's filesystem and the blob store, at one moment."""

    free: int
    total: int
    watermark: int
    blob_bytes: int
    max_blob_bytes: int  # 0: no cap

    def fits(self, need: int = 0, blob: int = 0) -> bool:
        """Whether ``need`` more bytes (``blob`` of them into the blob store) fit."""
        if self.free - need < self.watermark:
            return False
        return not self.max_blob_bytes or self.blob_bytes + blob <= self.max_blob_bytes

    @property
    def under_pressure(self) -> bool:
        return not self.fits()


@dataclass(frozen=True, slots=True)
class _Candidate:
    """One blob a pass may free, with the live deployments that refer to it."""

    hash: str
    size: int
    newest: int  # creation version of the newest deploy using it (older goes first)
    deploys: tuple[Deployment, ...]
    step: Step


@dataclass
class _Totals:
    """Counters since start (metrics and ``cluster_status``)."""

    bytes: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in Step})
    payloads: int = 0
    releases: int = 0
    refused: int = 0
    last: dict[str, Any] | None = None


class DiskPressure:
    """The node's :class:`~node.deploy.space.SpaceGuard`, and its reclaim loop.

    Args:
        context: returns the node's current deploy context (it is built after this).
        config: the ``[storage]`` section.
        data_dir: the directory whose filesystem is watched.
        drop: drops a deployment's payload cluster-wide (``drop_payload``).
        statvfs: the seam tests replace (``os.statvfs``).
    """

    def __init__(
        self,
        context: Callable[[], DeployContext],
        config: StorageConfig,
        *,
        data_dir: Path,
        drop: Drop,
        statvfs: Statvfs = os.statvfs,
    ) -> None:
        self._context = context
        self.config = config
        self.data_dir = data_dir
        self._drop = drop
        self._statvfs = statvfs
        self._lock = asyncio.Lock()
        self._barren_until = 0.0
        self._blob_bytes: tuple[float, int] | None = None
        self._pressure = False
        self.totals = _Totals()

    # -- measuring ------------------------------------------------------------------------

    def usage(self, *, fresh: bool = True) -> Usage:
        """Free space and the blob store's size now (``fresh=False`` may reuse a blob
        store size measured within the last second)."""
        st = self._statvfs(self.data_dir)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        cfg = self.config
        watermark = max(cfg.min_free_bytes, int(cfg.min_free_ratio * total))
        return Usage(free, total, watermark, self._blobs_size(fresh), cfg.max_blob_bytes)

    def _blobs_size(self, fresh: bool) -> int:
        now = time.monotonic()
        if not fresh and self._blob_bytes and now - self._blob_bytes[0] < _BLOB_BYTES_TTL_S:
            return self._blob_bytes[1]
        size = self._context().blobs.stats()[1]
        self._blob_bytes = (now, size)
        return size

    def status(self) -> dict[str, Any]:
        u = self.usage()
        t = self.totals
        return {
            "data_dir": str(self.data_dir),
            "free_bytes": u.free,
            "total_bytes": u.total,
            "watermark_bytes": u.watermark,
            "blob_bytes": u.blob_bytes,
            "max_blob_bytes": u.max_blob_bytes or None,
            "under_pressure": u.under_pressure,
            "reclaimed_bytes": dict(t.bytes),
            "reclaimed_payloads": t.payloads,
            "reclaimed_releases": t.releases,
            "refused_deploys": t.refused,
            "last_reclaim": t.last,
        }

    # -- the guard ------------------------------------------------------------------------

    async def admit(self, need_bytes: int, *, phase: str, blob_bytes: int = 0) -> None:
        u = self.usage()
        if u.fits(need_bytes, blob_bytes):
            return
        # Room that no amount of reclaiming makes is refused without taking anything.
        possible = need_bytes <= u.total - u.watermark and (
            not u.max_blob_bytes or blob_bytes <= u.max_blob_bytes
        )
        if possible:
            await self.reclaim(need_bytes, blob_bytes)
            u = self.usage()
            if u.fits(need_bytes, blob_bytes):
                return
        raise self._refuse(u, need_bytes, blob_bytes, phase)

    async def ingesting(self, received_bytes: int) -> None:
        u = self.usage(fresh=False)
        if u.fits(0, received_bytes):
            return
        # Called every few MiB: a pass that just found nothing is not run again at once.
        if time.monotonic() >= self._barren_until:
            await self.reclaim(0, received_bytes)
        u = self.usage()
        if not u.fits(0, received_bytes):
            raise self._refuse(u, 0, received_bytes, "receive")

    def _refuse(self, u: Usage, need: int, blob: int, phase: str) -> Exception:
        self.totals.refused += 1
        log.warning("deploy_refused_storage", phase=phase, free_bytes=u.free,
                    needed_bytes=need, watermark_bytes=u.watermark, blob_bytes=u.blob_bytes,
                    max_blob_bytes=u.max_blob_bytes or None)  # fmt: skip
        if u.max_blob_bytes and u.blob_bytes + blob > u.max_blob_bytes:
            what = (f"the blob store would exceed its cap of {u.max_blob_bytes} bytes "
                    f"({u.blob_bytes} stored, {blob} more)")  # fmt: skip
        else:
            what = (f"{u.free} bytes are free on the data directory's filesystem; this step "
                    f"needs {need} more and the node keeps {u.watermark} free")  # fmt: skip
        return insufficient(
            f"not enough storage after reclaiming: {what}",
            phase=phase,
            free_bytes=u.free,
            needed_bytes=need,
            watermark_bytes=u.watermark,
        )

    # -- the background check -------------------------------------------------------------

    async def run(self) -> None:
        """Check every ``check_s`` and reclaim while under pressure, until cancelled."""
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed pass is logged; the next one tries again
                log.exception("storage_check_failed")
            await asyncio.sleep(self.config.check_s)

    async def check(self) -> Usage:
        """Look once: log a change of state and reclaim while under pressure."""
        u = self.usage()
        if u.under_pressure:
            if not self._pressure:
                self._pressure = True
                log.warning("storage_pressure", free_bytes=u.free, watermark_bytes=u.watermark,
                            blob_bytes=u.blob_bytes,
                            max_blob_bytes=u.max_blob_bytes or None)  # fmt: skip
            await self.reclaim()
            u = self.usage()
        if self._pressure and not u.under_pressure:
            self._pressure = False
            log.info("storage_pressure_relieved", free_bytes=u.free, watermark_bytes=u.watermark)
        return u

    # -- reclaiming -----------------------------------------------------------------------

    async def reclaim(self, need_bytes: int = 0, blob_bytes: int = 0) -> int:
        """Free space in the stated order until ``need_bytes`` (``blob_bytes`` of them
        into the blob store) fit, or nothing reclaimable is left. One pass at a time.

        Returns:
            Bytes freed by this pass.
        """
        async with self._lock:
            if self.usage().fits(need_bytes, blob_bytes):
                return 0
            ctx = self._context()
            taken: list[dict[str, Any]] = []
            candidates = await self._candidates(ctx)
            for step in Step:
                if step is Step.RELEASES:
                    taken += await self._releases(ctx)
                else:
                    for c in (c for c in candidates if c.step is step):
                        if self.usage().fits(need_bytes, blob_bytes):
                            break
                        if item := await self._take(ctx, c):
                            taken.append(item)
                if self.usage().fits(need_bytes, blob_bytes):
                    break
            freed = sum(int(t["freed_bytes"]) for t in taken)
            self._barren_until = 0.0 if taken else time.monotonic() + _BARREN_S
            if taken:
                self.totals.last = {
                    "at": ctx.store.clock.now_ms(),
                    "freed_bytes": freed,
                    "taken": taken,
                }
                u = self.usage()
                log.info("storage_reclaim_done", freed_bytes=freed, items=len(taken),
                         free_bytes=u.free, watermark_bytes=u.watermark)  # fmt: skip
            return freed

    async def _candidates(self, ctx: DeployContext) -> list[_Candidate]:
        """Every blob a pass may take here, in the order it takes them."""
        store, blobs = ctx.store, ctx.blobs
        allowed = {
            d.deployment_id
            for d in await prunable(ctx, ctx.retention, project=None, now_ms=store.clock.now_ms())
        }
        protected = {i for i, _, _ in (await store.desired_releases()).values()}
        protected |= {r["deployment_id"] for r in (await store.active_releases()).values()}
        for project in ctx.components.projects():
            if (current := ctx.components.current(project)) is not None:
                protected.add(current)
        found: list[_Candidate] = []
        for h in blobs.hashes():
            if blobs.held(h):
                continue
            try:
                size = blobs.size(h)
            except BlobMissing:
                continue
            users = await store.deployments(payload_hash=h)
            dropped = await store.dropped([u.deployment_id for u in users])
            live = tuple(u for u in users if u.deployment_id not in dropped)
            if not live:
                found.append(_Candidate(h, size, 0, (), Step.ORPHAN))
                continue
            if any(not u.terminal or u.deployment_id in protected for u in live):
                continue
            ids = [u.deployment_id for u in live]
            if await store.pinned(ids):
                continue
            step = Step.RETENTION if allowed.issuperset(ids) else Step.BEYOND_RETENTION
            found.append(_Candidate(h, size, max(u.created_version for u in live), live, step))
        found.sort(key=lambda c: (_ORDER[c.step], -c.size, c.newest, c.hash))
        return found

    async def _take(self, ctx: DeployContext, c: _Candidate) -> dict[str, Any] | None:
        """Free one candidate blob; None when it turned out to be in use after all."""
        store = ctx.store
        if c.step is Step.ORPHAN:

            async def unused() -> bool:
                return await store.live_references(c.hash) == 0

            freed = await ctx.blobs.delete_unused(c.hash, unused)
            ids: list[str] = []
        else:
            ids = [d.deployment_id for d in c.deploys]
            if ctx.blobs.held(c.hash) or await store.pinned(ids):
                return None  # taken into use (or pinned) since the candidates were listed
            freed = 0
            for d in c.deploys:
                freed += await self._drop(ctx, d)
            self.totals.payloads += len(ids)
        if not freed and not ids:
            return None
        self.totals.bytes[c.step.value] += freed
        log.info("storage_reclaimed", step=str(c.step), payload_hash=c.hash,
                 deployment_ids=ids, freed_bytes=freed)  # fmt: skip
        return {"step": str(c.step), "payload_hash": c.hash, "deployment_ids": ids,
                "freed_bytes": freed}  # fmt: skip

    async def _releases(self, ctx: DeployContext) -> list[dict[str, Any]]:
        """Release directories beyond the newest N, of every project nothing is busy with
        (a busy project's lock may be held by the very step asking for room)."""
        taken: list[dict[str, Any]] = []
        for project in ctx.components.projects():
            lock = ctx.locks(project)
            if lock.locked():
                continue
            before = self.usage().free
            async with lock:
                removed = await prune_releases(ctx, project)
            if not removed:
                continue
            freed = max(0, self.usage().free - before)
            self.totals.bytes[Step.RELEASES.value] += freed
            self.totals.releases += len(removed)
            log.info("storage_reclaimed", step=str(Step.RELEASES), project=project,
                     deployment_ids=removed, freed_bytes=freed)  # fmt: skip
            taken.append({"step": str(Step.RELEASES), "project": project,
                          "deployment_ids": removed, "freed_bytes": freed})  # fmt: skip
        return taken
