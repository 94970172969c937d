"""``cairn node backup`` / ``restore`` on one node: a consistent copy while the node runs,
verified on the way back, into an empty data directory only, with a new change log.

The node runs for real in this process (``create_app`` under ``aiohttp_client``); the
backup runs in a thread meanwhile, as the CLI would in another process. The cluster
round trip (wipe, restore, rejoin) is ``tests/cluster/test_backup_restore.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import ADMIN, Api, component, make_config

from node.app import create_app
from node.appkeys import Services
from node.backup import RESTORED_META, BackupError, backup, restore
from node.cli.root import cli
from node.config import Config


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [tuple(r) for r in conn.execute(sql)]


def _leftovers(root: Path) -> list[Path]:
    return [*root.glob(".backup*"), *(root / "n1" / "tmp").glob("backup-*")]


async def _busy_node(aiohttp_client: Any, config: Config) -> tuple[Api, dict[str, str]]:
    app = create_app(config)
    api = Api(await aiohttp_client(app), app)
    ids = {}
    for name, payload in (
        ("web-1", component(v="1")),
        ("web-2", component(install="printf built > built.txt", v="2")),
        ("api-1", component(v="a")),
    ):
        status, body = await api.deploy(name.split("-")[0], payload)
        assert status == 200, body
        ids[name] = body["deployment_id"]
    status, _ = await api.op("add_user", username="ops", password="ops-password-1",
                             role="super_user")  # fmt: skip
    assert status == 200
    return api, ids


@pytest.mark.parametrize("out_name", ["backup", "backup.tar.gz"])
async def test_a_running_node_backs_up_and_restores_into_an_empty_data_dir(
    aiohttp_client: Any, tmp_path: Path, out_name: str
) -> None:
    config = make_config(tmp_path)
    api, ids = await _busy_node(aiohttp_client, config)
    store = Services(api.app).store
    out = tmp_path / out_name

    async def keep_writing() -> None:  # the node keeps working while it is backed up
        for i in range(20):
            await store.set_meta(f"busy-{i}", "x")

    writer = asyncio.ensure_future(keep_writing())
    summary = await asyncio.to_thread(backup, config, out)
    await writer
    assert summary.node == "n1" and summary.blobs == 3 and summary.blobs_absent == []
    assert {(r["project"], r["deployment_id"]) for r in summary.releases} == {
        ("web", ids["web-2"]), ("api", ids["api-1"]),
    }  # fmt: skip
    assert summary.log_id == store.log_id and summary.log_head > 0
    assert _leftovers(tmp_path) == [], "temporary files or blob holds left behind"

    target = make_config(tmp_path / "restored")
    restored = restore(target, out)
    assert restored.files == summary.files and restored.bytes == summary.bytes
    data, new = tmp_path / "n1", tmp_path / "restored" / "n1"
    for sql in (
        "SELECT deployment_id, status, payload_hash FROM deployments ORDER BY 1",
        "SELECT username, role FROM users ORDER BY 1",
        "SELECT project, deployment_id FROM active_releases ORDER BY 1",
    ):
        assert _rows(new / "cairn.db", sql) == _rows(data / "cairn.db", sql), sql
    meta = dict(_rows(new / "cairn.db", "SELECT key, value FROM meta"))
    assert "log_id" not in meta  # a new change log at the next start
    assert json.loads(meta[RESTORED_META])["log_id"] == store.log_id
    for project, deployment_id in (("web", ids["web-2"]), ("api", ids["api-1"])):
        cur = new / "components" / project / "current"
        assert cur.is_symlink() and cur.resolve().name == deployment_id
        assert _tree(cur.resolve()) == _tree((data / "components" / project / "current").resolve())
    assert (new / "components" / "web" / "current" / "built.txt").read_bytes() == b"built"
    blobs = [p for p in (new / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert len(blobs) == 3
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in blobs)

    # The restored node starts as itself, with a new log, and takes deploys.
    app2 = create_app(target)
    api2 = Api(await aiohttp_client(app2), app2)
    store2 = Services(app2).store
    assert store2.log_id != store.log_id and store2.log_id.startswith("n1/")
    status, listing = await api2.op("list_deployments")
    assert {d["deployment_id"] for d in listing["deployments"]} == set(ids.values())
    status, body = await api2.deploy("web", component(v="3"))
    assert status == 200, body
    assert await store2.get_meta(RESTORED_META) == ""  # recovered: the mark is cleared
    status, _ = await api2.op("list_users", auth=None)
    assert status == 401  # credentials come back with the records: the old ones work
    ops = Api(api2.client, app2)
    from helpers import basic

    ops.auth = basic("ops", "ops-password-1")
    status, _ = await ops.op("list_users")
    assert status == 200


async def test_restore_refuses_a_live_or_nonempty_data_dir_and_a_damaged_backup(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    await _busy_node(aiohttp_client, config)
    out = tmp_path / "b"
    await asyncio.to_thread(backup, config, out)
    with pytest.raises(BackupError, match="exists"):
        backup(config, out)
    with pytest.raises(BackupError, match="running"):
        restore(config, out)  # the node holds its data directory's lock

    other = make_config(tmp_path / "x")
    other.node.data_dir.mkdir(parents=True)
    (other.node.data_dir / "notes.txt").write_text("mine")
    with pytest.raises(BackupError, match="not empty"):
        restore(other, out)
    assert (other.node.data_dir / "notes.txt").read_text() == "mine"

    elsewhere = make_config(tmp_path / "y", name="n9")
    with pytest.raises(BackupError, match="backup of node 'n1'"):
        restore(elsewhere, out)
    assert not elsewhere.node.data_dir.exists()

    blob = next(p for p in (out / "blobs").rglob("*") if p.is_file())
    damaged = bytearray(blob.read_bytes())
    damaged[-1] ^= 1
    blob.write_bytes(bytes(damaged))
    fresh = make_config(tmp_path / "z")
    with pytest.raises(BackupError, match="damaged"):
        restore(fresh, out)
    assert not fresh.node.data_dir.exists()
    assert not list((tmp_path / "z").glob(".*restore*")), "staging left behind"
    blob.write_bytes(bytes(damaged[:-1]) + bytes([damaged[-1] ^ 1]))
    (out / "blobs" / "extra").write_bytes(b"?")
    with pytest.raises(BackupError, match="does not name"):
        restore(fresh, out)


def _tar_with(tmp_path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    path = tmp_path / "crafted.tar"
    with tarfile.open(path, "w") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                assert data is not None
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "members",
    [
        [("../outside", b"x", None)],
        [("/etc/cairn-test", b"x", None)],
        [("elsewhere/file", b"x", None)],
        [("components/p/releases/r/a", None, "/tmp"), ("components/p/releases/r/a/f", b"x", None)],
    ],
    ids=["dotdot", "absolute", "unknown-root", "through-symlink"],
)
def test_restore_refuses_a_crafted_tar(tmp_path: Path, members: Any) -> None:
    manifest = ("manifest.json", json.dumps({"format": "cairn-backup"}).encode(), None)
    crafted = _tar_with(tmp_path, [*members, manifest])
    config = make_config(tmp_path / "t")
    with pytest.raises(BackupError):
        restore(config, crafted)
    assert not config.node.data_dir.exists()
    assert not (tmp_path / "outside").exists()


def test_the_cli_backs_up_and_restores_with_exit_codes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    toml = tmp_path / "n1.toml"
    toml.write_text(f'[node]\nname = "n1"\ndata_dir = "{data}"\n'
                    f'[auth]\nbootstrap_password = "{ADMIN[1]}"\n')  # fmt: skip

    async def seed() -> None:
        from storage.store import Store

        store = await Store.open(data / "cairn.db", node="n1")
        await store.set_meta("seeded", "yes")
        await store.close()

    asyncio.run(seed())
    runner = CliRunner()
    out = tmp_path / "b.tar"
    done = runner.invoke(cli, ["node", "backup", "--config", str(toml), str(out), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["node"] == "n1" and out.is_file()
    again = runner.invoke(cli, ["node", "backup", "--config", str(toml), str(out)])
    assert again.exit_code == 1 and "exists" in again.output
    refused = runner.invoke(cli, ["node", "restore", "--config", str(toml), str(out)])
    assert refused.exit_code == 1 and "not empty" in refused.output
    bad = runner.invoke(cli, ["node", "restore", "--config", str(tmp_path / "nope.toml"), str(out)])
    assert bad.exit_code == 2
    toml.write_text(toml.read_text().replace(str(data), str(tmp_path / "new")))
    done = runner.invoke(cli, ["node", "restore", "--config", str(toml), str(out)])
    assert done.exit_code == 0, done.output
    assert "restored node n1" in done.output
    meta = dict(_rows(tmp_path / "new" / "cairn.db", "SELECT key, value FROM meta"))
    assert meta["seeded"] == "yes" and RESTORED_META in meta
