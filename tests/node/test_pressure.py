"""Disk pressure (SPEC 8): reclaim in the stated order, never what must stay, refuse with
507 ``insufficient_storage`` what cannot fit, and leave nothing half-written.

The node runs for real (``create_app`` under ``aiohttp_client``, real SQLite, blob store
and releases in ``tmp_path``); a second :class:`DiskPressure` over the node's own deploy
context sees a small simulated filesystem through the ``statvfs`` seam: its size is fixed,
and what is used is what the node's blob store and releases hold on the real disk, so
whatever reclaiming deletes shows up as free space.
"""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import Api, make_config

from node.app import create_app
from node.appkeys import Services
from node.config import RetentionConfig, StorageConfig
from node.deploy.context import DeployContext
from node.deploy.pressure import DiskPressure, Step
from node.deploy.space import extraction_estimate
from node.errors import DeployFailed, is_disk_full
from node.operations.payloads import drop_payload
from storage.errors import StorageError
from storage.faults import FaultPlan
from storage.records import Deployment

KiB = 1024


def _payload(size: int, seed: int, *, install: str | None = None) -> bytes:
    """A tar.gz of ``size`` random (incompressible) bytes under ``app/``."""
    files: dict[str, bytes] = {
        "index.html": b"<p>hi</p>\n",
        "data.bin": random.Random(seed).randbytes(size),
    }
    if install is not None:
        files["component.toml"] = f'[install]\ncommand = "{install}"\ntimeout_s = 30\n'.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"app/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


class SmallDisk:
    """A ``statvfs`` seam: a filesystem of ``total`` bytes whose use is what the node's
    blob store and component tree hold on disk, plus ``other`` bytes."""

    def __init__(self, data_dir: Path, total: int, other: int = 0) -> None:
        self.data_dir = data_dir
        self.total = total
        self.other = other

    def used(self) -> int:
        return (
            _tree_size(self.data_dir / "blobs")
            + _tree_size(self.data_dir / "components")
            + self.other
        )

    def __call__(self, path: Path) -> Any:
        free = max(0, self.total - self.used())
        return SimpleNamespace(f_frsize=1, f_blocks=self.total, f_bavail=free)


async def _drop(ctx: DeployContext, d: Deployment) -> int:
    return await drop_payload(ctx, d, user=None)


async def _node(aiohttp_client: Any, tmp_path: Path, **sections: Any) -> tuple[Api, DeployContext]:
    app = create_app(make_config(tmp_path, **sections))
    api = Api(await aiohttp_client(app), app)
    return api, Services(app).ctx


def _pressure(
    ctx: DeployContext, disk: SmallDisk, *, keep_releases: int = 3, **storage: Any
) -> DiskPressure:
    retention = replace(ctx.retention, keep_releases=keep_releases)
    return DiskPressure(
        lambda: replace(ctx, retention=retention),
        StorageConfig(**storage),
        data_dir=disk.data_dir,
        drop=_drop,
        statvfs=disk,
    )


async def _deploy(api: Api, project: str, payload: bytes, ok: bool = True) -> str:
    status, body = await api.deploy(project, payload)
    assert (status == 200) is ok, body
    return str(body["deployment_id"])


async def _present(api: Api, deployment_id: str) -> bool:
    _, rec = await api.op("get_deployment", deployment_id=deployment_id)
    return bool(rec["payload_blob_present"])


async def test_reclaims_in_the_stated_order_and_never_what_must_stay(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    api, ctx = await _node(
        aiohttp_client, tmp_path,
        retention={"keep_successful": 1, "failed_grace_s": 3600, "keep_releases": 10},
    )  # fmt: skip
    web = {
        "v0": await _deploy(api, "web", _payload(300 * KiB, 0)),
        "v1": await _deploy(api, "web", _payload(100 * KiB, 1)),
        "v2": await _deploy(api, "web", _payload(200 * KiB, 2)),
        "failed": await _deploy(api, "web", _payload(250 * KiB, 3, install="exit 1"), ok=False),
        "v3": await _deploy(api, "web", _payload(100 * KiB, 4)),
    }
    other = await _deploy(api, "api", _payload(400 * KiB, 5))
    status, _ = await api.op("pin_deployment", deployment_id=web["v1"])
    assert status == 200
    releases = ctx.components.releases_dir("web")
    assert {p.name for p in releases.iterdir()} == {web[k] for k in ("v0", "v1", "v2", "v3")}

    data = tmp_path / "n1"
    disk = SmallDisk(data, total=0)
    watermark = 1000 * KiB
    # Free space is 450 KiB short of the watermark: the two payloads retention would
    # drop anyway (v0, then v2: largest first) free about 500 KiB, and the pass stops.
    disk.total = disk.used() + watermark - 450 * KiB
    pressure = _pressure(ctx, disk, keep_releases=1, min_free_bytes=watermark)
    assert pressure.usage().under_pressure
    assert pressure.status()["under_pressure"] is True

    freed = await pressure.reclaim()
    assert freed >= 450 * KiB
    taken = pressure.totals.last["taken"] if pressure.totals.last else []
    assert [(t["step"], t["deployment_ids"]) for t in taken] == [
        ("retention", [web["v0"]]),
        ("retention", [web["v2"]]),
    ]
    assert not pressure.usage().under_pressure
    assert [await _present(api, web[k]) for k in ("v0", "v1", "v2", "failed", "v3")] == [
        False, True, False, True, True,
    ]  # fmt: skip

    # Further short: release directories beyond the newest one come next, then the
    # failed deploy's payload (kept only by its grace period).
    disk.total = disk.used() + watermark - 700 * KiB
    await pressure.reclaim()
    taken = pressure.totals.last["taken"] if pressure.totals.last else []
    assert [t["step"] for t in taken] == ["releases", "beyond_retention"]
    assert set(taken[0]["deployment_ids"]) == {web["v0"], web["v1"], web["v2"]}
    assert taken[1]["deployment_ids"] == [web["failed"]]
    assert {p.name for p in releases.iterdir()} == {web["v3"]}

    # Nothing else may go: the active v3 and api's deploy, and the pinned v1.
    disk.total = disk.used() + watermark - 100 * KiB
    assert await pressure.reclaim() == 0
    assert pressure.usage().under_pressure
    assert [await _present(api, i) for i in (web["v1"], web["v3"], other)] == [True] * 3
    assert ctx.components.current("web") == web["v3"]
    counted = pressure.status()
    assert counted["reclaimed_payloads"] == 3 and counted["reclaimed_releases"] == 3
    assert counted["reclaimed_bytes"][Step.RETENTION] >= 500 * KiB
    assert counted["reclaimed_bytes"][Step.RELEASES] > 0


async def test_a_payload_in_use_is_never_reclaimed(aiohttp_client: Any, tmp_path: Path) -> None:
    api, ctx = await _node(aiohttp_client, tmp_path, retention={"keep_successful": 0})
    old = await _deploy(api, "web", _payload(200 * KiB, 0))
    shared = await _deploy(api, "web", _payload(200 * KiB, 1))
    await _deploy(api, "web", _payload(100 * KiB, 2))
    rows = {d: await ctx.store.get_deployment(d) for d in (old, shared)}
    old_hash, shared_hash = (rows[d].payload_hash for d in (old, shared))  # type: ignore[union-attr]
    assert old_hash and shared_hash
    # A deploy still running that names the second payload (as a rollback does).
    src = rows[shared]
    assert src is not None
    running = await ctx.store.create_deployment(
        {
            "deployment_id": "00000000-0000-4000-8000-0000000000aa", "project": "web",
            "kind": "deploy", "package_identifier": None, "payload_hash": shared_hash,
            "payload_size": src.payload_size, "status": "pending", "phase": "receive",
            "expected_nodes": ["n1"], "activate_nodes": [], "origin_node": "n1",
            "restart_mode": "immediate", "replicated": True,
            "ignore_replication_errors": False, "timeout_ms": 60_000,
            "started_at": ctx.store.clock.now_ms(), "completed_at": None, "user": None,
            "rollback_of": shared, "superseded_by": None, "error": None,
        }
    )  # fmt: skip
    assert not running.terminal
    disk = SmallDisk(tmp_path / "n1", total=0)
    disk.total = disk.used()  # everything is short
    pressure = _pressure(ctx, disk, min_free_bytes=1)
    with ctx.blobs.holding(old_hash):  # a stage or a download reading it
        assert await pressure.reclaim() == 0
    assert await _present(api, old) and await _present(api, shared)
    freed = await pressure.reclaim()  # released: now it may go, the shared one still not
    assert freed >= 200 * KiB
    assert not await _present(api, old) and await _present(api, shared)


async def test_a_deploy_that_cannot_fit_is_refused_before_anything_is_taken(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    api, ctx = await _node(aiohttp_client, tmp_path, retention={"keep_successful": 0})
    old = await _deploy(api, "web", _payload(100 * KiB, 0))
    await _deploy(api, "web", _payload(100 * KiB, 1))
    disk = SmallDisk(tmp_path / "n1", total=0)
    disk.total = disk.used() + 2000 * KiB
    pressure = _pressure(ctx, disk, min_free_bytes=1000 * KiB)
    assert not pressure.usage().under_pressure
    with pytest.raises(DeployFailed) as refused:  # more than the whole disk can ever give
        await pressure.admit(disk.total, phase="extract")
    assert refused.value.code == "insufficient_storage" and refused.value.status == 507
    assert refused.value.phase == "extract"
    assert await _present(api, old)  # nothing was reclaimed for a hopeless request
    # A request that fits once the old payload is gone is admitted after reclaiming.
    await pressure.admit(1050 * KiB, phase="extract")
    assert not await _present(api, old)
    assert pressure.status()["refused_deploys"] == 1


async def test_the_blob_store_cap_is_a_pressure_too(aiohttp_client: Any, tmp_path: Path) -> None:
    api, ctx = await _node(aiohttp_client, tmp_path, retention={"keep_successful": 0})
    old = await _deploy(api, "web", _payload(300 * KiB, 0))
    await _deploy(api, "web", _payload(100 * KiB, 1))
    disk = SmallDisk(tmp_path / "n1", total=10**12)  # plenty of free space
    stored = ctx.blobs.stats()[1]
    pressure = _pressure(ctx, disk, min_free_bytes=0, max_blob_bytes=stored - 1)
    assert pressure.usage().under_pressure
    u = await pressure.check()
    assert not u.under_pressure and u.blob_bytes <= stored - 300 * KiB
    assert not await _present(api, old)
    with pytest.raises(DeployFailed) as refused:
        await pressure.admit(0, blob_bytes=stored, phase="fetch")
    assert "cap" in refused.value.message


async def test_ingest_stops_below_the_watermark_and_leaves_no_temp_file(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    _, ctx = await _node(aiohttp_client, tmp_path)
    disk = SmallDisk(tmp_path / "n1", total=0)
    disk.total = disk.used() + 20 * (1 << 20)  # 20 MiB free, 12 MiB kept
    pressure = _pressure(ctx, disk, min_free_bytes=12 << 20)
    ctx.blobs.guard = pressure.ingesting

    async def chunks() -> Any:
        for i in range(32):  # 32 MiB: the guard stops it after about 8
            yield random.Random(i).randbytes(1 << 20)

    with pytest.raises(DeployFailed) as refused:
        await ctx.blobs.ingest(chunks(), max_bytes=1 << 30)
    assert refused.value.code == "insufficient_storage" and refused.value.phase == "receive"
    assert list((tmp_path / "n1" / "blobs" / "tmp").iterdir()) == []
    assert ctx.blobs.stats() == (0, 0)


async def test_the_api_refuses_with_507_and_reports_the_pressure(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    # A watermark above any real disk's free space: always under pressure.
    api, _ = await _node(aiohttp_client, tmp_path, storage={"min_free_bytes": 1 << 60})
    status, body = await api.deploy("web", _payload(10 * KiB, 0))
    assert status == 507, body
    assert body["code"] == "insufficient_storage"
    assert body["watermark_bytes"] == 1 << 60 and body["free_bytes"] < 1 << 60
    status, listing = await api.op("list_deployments")
    assert listing["total"] == 0  # refused before the row: not an accepted deploy
    status, cluster = await api.op("cluster_status")
    storage = cluster["storage"]
    assert storage["under_pressure"] is True and storage["refused_deploys"] == 1
    assert storage["watermark_bytes"] == 1 << 60
    resp = await api.client.get("/metrics")
    text = await resp.text()
    assert "cairn_storage_pressure 1.0" in text
    assert "cairn_storage_refused_deploys_total 1.0" in text
    assert 'cairn_storage_reclaimed_bytes_total{step="retention"} 0.0' in text


@pytest.mark.parametrize(
    ("point", "phase"), [("blob.after_write", "receive"), ("extract.member", "extract")]
)
async def test_a_full_disk_mid_step_fails_the_deploy_and_removes_the_partial_files(
    aiohttp_client: Any, tmp_path: Path, point: str, phase: str
) -> None:
    faults = FaultPlan({point: "oserror:once"})  # ENOSPC, as a full disk raises it
    app = create_app(make_config(tmp_path), faults=faults)
    api = Api(await aiohttp_client(app), app)
    status, body = await api.deploy("web", _payload(600 * KiB, 0))
    assert faults.fired == [point]
    assert status == 507, body
    assert body["code"] == "insufficient_storage" and body["phase"] == phase
    _, rec = await api.op("get_deployment", deployment_id=body["deployment_id"])
    assert rec["status"] == "failed" and rec["error"]["code"] == "insufficient_storage"
    data = tmp_path / "n1"
    assert list((data / "blobs" / "tmp").glob("*")) == []
    leftovers = [p for p in (data / "components").rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    releases = data / "components" / "web" / "releases"
    assert not releases.exists() or list(releases.iterdir()) == []
    # The disk has room again: the next deploy goes through.
    status, body = await api.deploy("web", _payload(600 * KiB, 1))
    assert status == 200, body


def test_the_extraction_estimate_reads_the_gzip_trailer(tmp_path: Path) -> None:
    raw = b"a" * 1_000_000
    gz = tmp_path / "p.tar.gz"
    gz.write_bytes(gzip.compress(raw))
    size = gz.stat().st_size
    assert size < 10_000
    assert extraction_estimate(gz, size, 1 << 30) == 1_000_000
    assert extraction_estimate(gz, size, 500_000) == 500_000  # never past the limit
    plain = tmp_path / "p.tar"
    plain.write_bytes(raw)
    assert extraction_estimate(plain, len(raw), 1 << 30) == len(raw)
    assert extraction_estimate(tmp_path / "missing", 123, 1 << 30) == 123


def test_a_full_disk_is_recognised_wherever_it_is_wrapped() -> None:
    import errno

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise StorageError("blob store I/O failed") from e
    except StorageError as wrapped:
        assert is_disk_full(wrapped)
    assert is_disk_full(StorageError("database or disk is full"))
    assert not is_disk_full(OSError(errno.EIO, "I/O error"))
    assert not is_disk_full(RuntimeError("no"))


def test_storage_config_is_checked() -> None:
    from node.config import ConfigError

    with pytest.raises(ConfigError):
        StorageConfig(min_free_ratio=1.0)
    with pytest.raises(ConfigError):
        StorageConfig(check_s=0)
    assert RetentionConfig().keep_releases == 3
