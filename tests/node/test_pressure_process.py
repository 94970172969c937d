"""Disk pressure on a real node process whose data directory is a small filesystem.

The test mounts a 64 MiB tmpfs of its own (so it needs root; it is skipped, saying why,
otherwise), runs ``cairn node run`` with its data directory there, and fills it with
deploys: reclamation frees space in the stated order (payloads retention would drop,
largest first, then the payloads only the failed grace period keeps), never the active
or pinned ones; then deploys are refused with 507 ``insufficient_storage``, and nothing
half-written remains on the disk.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import shutil
import sqlite3
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import NodeProcess

MiB = 1 << 20
DISK_MIB = 64
WATERMARK_MIB = 16


def _mount_tmpfs(where: Path) -> str | None:
    """Mount a small tmpfs at ``where``; the reason it cannot, or None."""
    if os.geteuid() != 0:
        return "mounting a small filesystem needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    where.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return f"cannot mount a tmpfs here: {done.stderr.strip()}"
    return None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "disk"
    reason = _mount_tmpfs(where)
    if reason is not None:
        pytest.skip(f"disk pressure on a real filesystem: {reason}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _payload(mib: float, seed: int, *, install: str | None = None) -> bytes:
    files = {"data.bin": random.Random(seed).randbytes(int(mib * MiB)), "index.html": b"hi\n"}
    if install is not None:
        files["component.toml"] = f'[install]\ncommand = "{install}"\ntimeout_s = 30\n'.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=0) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"app/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deploy(node: NodeProcess, project: str, payload: bytes) -> tuple[int, Any]:
    return node.op(
        "deploy_component",
        project=project,
        payload=base64.b64encode(payload).decode(),
        timeout_s=120,
    )


def _events(node: NodeProcess, name: str) -> list[dict[str, Any]]:
    found = []
    for line in node.log().splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == name:
                found.append(entry)
    return found


def _present(node: NodeProcess, deployment_id: str) -> bool:
    code, rec = node.op("get_deployment", deployment_id=deployment_id)
    assert code == 200, rec
    return bool(rec["payload_blob_present"])


def test_a_small_disk_filled_by_deploys_reclaims_in_order_then_refuses(
    small_disk: Path, tmp_path: Path
) -> None:
    node = NodeProcess("n1", tmp_path)
    node.write_config()
    config = node.config_path.read_text().replace(
        f'data_dir = "{node.data_dir}"', f'data_dir = "{small_disk / "data"}"'
    )
    node.config_path.write_text(
        config
        + f"[storage]\nmin_free_bytes = {WATERMARK_MIB * MiB}\ncheck_s = 0.5\n"
        + "[retention]\nkeep_successful = 1\nfailed_grace_s = 3600\nkeep_releases = 1\n"
    )
    data = small_disk / "data"
    node.start()
    try:
        # Phase 1, no pressure yet: web gets payloads of 4, 2 and 5 MiB, a failed deploy
        # (3 MiB, kept by its grace period), a pinned one and the active one.
        web: dict[str, str] = {}
        sizes = {"w1": 4, "w2": 2, "w3": 5, "w4": 3, "w5": 3, "w6": 1}
        for i, (name, mib) in enumerate(sizes.items()):
            install = "exit 1" if name == "w4" else None
            code, body = _deploy(node, "web", _payload(mib, i, install=install))
            assert code == (422 if name == "w4" else 200), body
            web[name] = body["deployment_id"]
        code, body = node.op("pin_deployment", deployment_id=web["w5"])
        assert code == 200, body
        status = node.op("cluster_status")[1]["storage"]
        assert status["under_pressure"] is False and status["reclaimed_payloads"] == 0
        assert status["watermark_bytes"] == WATERMARK_MIB * MiB

        # Phase 2: new projects of 6 MiB each; each one's payload and release are active,
        # so reclaiming can only take web's old payloads. Deploy until refused.
        refusals: list[dict[str, Any]] = []
        accepted: list[str] = []
        for i in range(12):
            code, body = _deploy(node, f"p{i}", _payload(6, 100 + i))
            if code == 507:
                refusals.append(body)
                if len(refusals) == 2:
                    break
                continue
            assert code == 200, body
            assert not refusals, "a deploy went through after a refusal of the same size"
            accepted.append(f"p{i}")
        assert len(refusals) == 2, f"never refused; accepted {accepted}"
        assert all(r["code"] == "insufficient_storage" for r in refusals)

        # What was reclaimed, and in which order (the node's log). Phase 2 adds nothing
        # reclaimable of its own, so the steps of every pass follow the stated order.
        reclaimed = _events(node, "storage_reclaimed")
        order = ["orphan", "retention", "releases", "beyond_retention"]
        all_steps = [e["step"] for e in reclaimed]
        assert all_steps == sorted(all_steps, key=order.index), all_steps
        taken = [
            (e["step"], e["deployment_ids"])
            for e in reclaimed
            if e["step"] in ("retention", "beyond_retention")
        ]
        retention = [ids for step, ids in taken if step == "retention"]
        assert retention == [[web["w3"]], [web["w1"]], [web["w2"]]]  # largest first
        beyond = [ids for step, ids in taken if step == "beyond_retention"]
        assert beyond and beyond[0] == [web["w4"]]  # then what only the grace period kept
        steps = [step for step, _ in taken]
        assert steps.index("beyond_retention") > max(
            i for i, s in enumerate(steps) if s == "retention"
        )
        for name in ("w1", "w2", "w3", "w4"):
            assert not _present(node, web[name]), name
        for name in ("w5", "w6"):  # pinned, active: never
            assert _present(node, web[name]), name
        for project in accepted:
            code, comps = node.op("get_components")
            active = {c["project"]: c["deployment_id"] for c in comps["components"]}
            assert active[project] is not None
        assert _events(node, "storage_pressure") or _events(node, "storage_reclaim_done")
        status = node.op("cluster_status")[1]["storage"]
        assert status["reclaimed_payloads"] >= 4 and status["refused_deploys"] >= 2
        metrics = _metrics(node)
        assert "cairn_storage_refused_deploys_total" in metrics

        # Nothing half-written: no temp or partial files, no half-extracted release, no
        # release of a failed deploy, and every blob holds the bytes its name says.
        assert list((data / "blobs" / "tmp").glob("*")) == []
        assert list((data / "blobs" / "partial").glob("*")) == []
        assert [p for p in (data / "components").rglob("*") if ".tmp" in p.name] == []
        for blob in (data / "blobs" / "sha256").rglob("*"):
            if blob.is_file():
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        for project_dir in (data / "components").iterdir():
            releases = {p.name for p in (project_dir / "releases").iterdir()}
            current = (project_dir / "current").resolve().name
            assert current in releases
            code, listing = node.op("list_deployments", project=project_dir.name, limit=100)
            ok = {d["deployment_id"] for d in listing["deployments"] if d["status"] == "success"}
            assert releases <= ok, f"{project_dir.name}: releases {releases - ok} not succeeded"
        with sqlite3.connect(f"file:{data / 'cairn.db'}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)

        # A deploy that fits still goes through.
        code, body = _deploy(node, "small", _payload(0.1, 999))
        assert code == 200, body
    finally:
        assert node.stop() == 0


def _metrics(node: NodeProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{node.url}/metrics", timeout=10) as r:
        return str(r.read().decode())
