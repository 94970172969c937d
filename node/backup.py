"""Backup and restore of one node (``cairn node backup`` / ``cairn node restore``).

A **backup** is taken while the node runs, from another process:

1. every stored blob is hard-linked into ``<data>/tmp/backup-<pid>-<random>/``, so that
   no blob the snapshot names can vanish before it is copied (a drop, reclaiming);
2. the database is copied with SQLite's online backup API, from a reader connection, in
   one step: one read transaction, so the copy is one consistent state (WAL readers do
   not block the node's writer);
3. from that copy: the payload blobs that live records refer to, and the release
   directory each project runs here (``active_releases``), are copied;
4. ``manifest.json`` names every file with its size, sha256 and mode, and what the node
   did not hold (blobs it had not fetched, a release it had not staged).

It is written under a temporary name next to ``OUT`` and renamed at the end, so a
backup that broke off never looks complete. ``OUT`` ending in ``.tar``, ``.tar.gz`` or
``.tgz`` is a tar, anything else a directory.

A **restore** writes into an absent or empty data directory (a live node's lock, or any
file in it, refuses it), verifies every file against the manifest before anything is
put in place, and then gives the node a **new change log**: its peers may hold entries
of the old log beyond the backup's position (what the node wrote after the backup), and
a restored log continuing from the backup's position would write *different* entries at
those positions, which peers would skip as already held. With a new log id the node is,
to its peers, a rebuilt node: they pull its new log from the start, and it gets the rest
of its old log back from them (see docs/operations.md, "Backup and restore"). Until it
has caught up, it leaves the deploys it originated and that the backup shows unfinished
alone (:func:`recover_after_restore`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from node.backup_files import (
    MANIFEST,
    ArchiveError,
    FileInfo,
    Sink,
    make_symlinks,
    open_sink,
    read_backup,
)
from node.config import Config
from storage.blob_io import HASH_RE
from storage.db import migrations

__all__ = [
    "FORMAT",
    "RESTORED_META",
    "BackupError",
    "Summary",
    "backup",
    "recover_after_restore",
    "restore",
]

log = structlog.get_logger(__name__)

FORMAT = "cairn-backup"
VERSION = 1
#: ``meta`` key a restore sets (JSON: the backup's log and position); cleared once the
#: node has recovered the deploys it originated.
RESTORED_META = "restored_from"


class BackupError(Exception):
    """A backup or restore cannot be done; the message is one line saying why."""


@dataclass(frozen=True, slots=True)
class Summary:
    """What a backup holds (or a restore put back)."""

    path: str
    node: str
    created_at: int
    files: int
    bytes: int
    blobs: int
    blobs_absent: list[str]
    releases: list[dict[str, str]]
    releases_absent: list[dict[str, str]]
    log_id: str | None
    log_head: int

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


# -- backup -------------------------------------------------------------------------------


class _Holds:
    """Hard links to the stored blobs, taken before the snapshot (see the module doc)."""

    def __init__(self, data: Path) -> None:
        tmp = data / "tmp"
        tmp.mkdir(exist_ok=True)
        for old in tmp.glob("backup-*"):  # left by a backup that was killed
            pid = old.name.split("-")[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        self.dir = tmp / f"backup-{os.getpid()}-{secrets.token_hex(4)}"
        self.dir.mkdir()
        for prefix in sorted((data / "blobs" / "sha256").glob("??")):
            for blob in prefix.iterdir():
                if HASH_RE.fullmatch(blob.name):
                    # Gone meanwhile, or no hard links here: copied from the store then.
                    with contextlib.suppress(OSError):
                        os.link(blob, self.dir / blob.name)

    def path(self, h: str) -> Path:
        return self.dir / h

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _snapshot(db: Path, dest: Path) -> None:
    """Copy the live database at ``db`` to ``dest``: one consistent state."""
    src = sqlite3.connect(db, isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout=10000")
        src.execute("PRAGMA query_only=ON")  # a reader, like the node's own
        dst = sqlite3.connect(dest, isolation_level=None)
        try:
            src.backup(dst)  # all pages in one step: one read transaction
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            (check,) = dst.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise BackupError(f"the database copy does not check out: {check}")
        finally:
            dst.close()
    except sqlite3.Error as e:
        raise BackupError(f"cannot copy the database {db}: {e}") from e
    finally:
        src.close()


def _read_snapshot(db: Path) -> dict[str, Any]:
    """What the backup needs to know from the copied database."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        log_id = meta.get("log_id")
        row = conn.execute("SELECT head FROM logs WHERE log_id = ?", (log_id,)).fetchone()
        hashes = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT payload_hash FROM deployments d WHERE payload_hash IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM payload_drops p "
                "WHERE p.deployment_id = d.deployment_id) ORDER BY payload_hash"
            )
        ]
        active = conn.execute(
            "SELECT project, deployment_id FROM active_releases ORDER BY project"
        ).fetchall()
        (schema,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    return {
        "log_id": log_id,
        "log_head": int(row[0]) if row else 0,
        "hashes": hashes,
        "active": [(str(p), str(d)) for p, d in active],
        "schema": int(schema),
    }


def _add_file(sink: Sink, files: dict[str, FileInfo], name: str, path: Path, mode: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        files[name] = sink.file(name, f, os.fstat(fd).st_size, mode)


def _add_release(sink: Sink, files: dict[str, FileInfo], links: dict[str, str],
                 root: Path, name: str) -> None:  # fmt: skip
    """Copy one release directory (files, directories, symlinks as they are)."""
    sink.directory(name)
    for top, dirs, names in os.walk(root):
        rel = Path(top).relative_to(root)
        for d in sorted(dirs):
            p = Path(top) / d
            member = f"{name}/{(rel / d).as_posix()}"
            if p.is_symlink():
                links[member] = os.readlink(p)
                sink.symlink(member, links[member])
            else:
                sink.directory(member)
        for f in sorted(names):
            p = Path(top) / f
            member = f"{name}/{(rel / f).as_posix()}"
            st = os.lstat(p)
            if p.is_symlink():
                links[member] = os.readlink(p)
                sink.symlink(member, links[member])
            elif os.path.isfile(p):
                _add_file(sink, files, member, p, 0o755 if st.st_mode & 0o111 else 0o644)


def backup(config: Config, out: Path) -> Summary:
    """Back up the node of ``config`` into ``out`` (a new directory or tar), while it runs.

    Raises:
        BackupError: nothing to back up, ``out`` exists, or a copy failed (nothing is
            left at ``out``).
    """
    data = config.node.data_dir
    db = data / "cairn.db"
    if not db.is_file():
        raise BackupError(f"{db} does not exist: this node has no data to back up")
    if out.exists() or out.is_symlink():
        raise BackupError(f"{out} exists; name a new directory or tar file")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent} is not a directory")
    token = secrets.token_hex(4)
    work = out.parent / f".{out.name}.partial-{token}"
    scratch = out.parent / f".{out.name}.db-{token}"
    holds = _Holds(data)
    sink: Sink | None = None
    try:
        scratch.mkdir(mode=0o700)
        _snapshot(db, scratch / "cairn.db")
        snap = _read_snapshot(scratch / "cairn.db")
        created = int(time.time() * 1000)
        sink = open_sink(out, work)
        files: dict[str, FileInfo] = {}
        links: dict[str, str] = {}
        _add_file(sink, files, "cairn.db", scratch / "cairn.db", 0o600)
        blobs, absent = {}, []
        for h in snap["hashes"]:
            src = holds.path(h)
            if not src.is_file():
                src = data / "blobs" / "sha256" / h[:2] / h
            name = f"blobs/sha256/{h[:2]}/{h}"
            try:
                _add_file(sink, files, name, src, 0o644)
            except FileNotFoundError:
                absent.append(h)  # never fetched here, or dropped since: peers have it
                continue
            if files[name].sha256 != h:
                raise BackupError(f"the stored blob {h} does not match its sha256; "
                                  "run the node's checks before backing it up")  # fmt: skip
            blobs[h] = files[name].size
        releases, releases_absent = [], []
        for project, deployment_id in snap["active"]:
            entry = {"project": project, "deployment_id": deployment_id}
            root = data / "components" / project / "releases" / deployment_id
            if not root.is_dir():
                releases_absent.append(entry)
                continue
            try:
                _add_release(sink, files, links, root, f"components/{project}/releases/"
                             f"{deployment_id}")  # fmt: skip
            except FileNotFoundError as e:
                raise BackupError(
                    f"the release {deployment_id} of {project} changed while it was copied "
                    f"({e.filename}); run the backup again"
                ) from e
            releases.append(entry)
        manifest = {
            "format": FORMAT, "version": VERSION, "node": config.node.name,
            "created_at": created, "schema": snap["schema"], "log_id": snap["log_id"],
            "log_head": snap["log_head"], "blobs": blobs, "blobs_absent": absent,
            "releases": releases, "releases_absent": releases_absent,
            "files": {name: info.as_json() for name, info in files.items()},
            "symlinks": links,
        }  # fmt: skip
        sink.data(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        sink.close()
        sink = None
        os.replace(work, out)
    except ArchiveError as e:
        raise BackupError(str(e)) from e
    finally:
        holds.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if sink is not None:
            with contextlib.suppress(Exception):  # failed already: only cleanup matters
                sink.close()
        if work.is_dir():
            shutil.rmtree(work, ignore_errors=True)
        else:
            work.unlink(missing_ok=True)
    return Summary(
        str(out), config.node.name, created, len(files), sum(f.size for f in files.values()),
        len(blobs), absent, releases, releases_absent, snap["log_id"], snap["log_head"],
    )  # fmt: skip


# -- restore ------------------------------------------------------------------------------


def _check_target(data: Path) -> None:
    """The data directory must be absent or empty, and no node may hold its lock."""
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)  # as the node creates its data dir
        return
    if not data.is_dir():
        raise BackupError(f"{data} is not a directory")
    import fcntl

    lock = data / "lock"
    if lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"a node is running on {data}: stop it first") from None
        finally:
            os.close(fd)
    if any(data.iterdir()):
        raise BackupError(
            f"{data} is not empty: restore only into an empty data directory "
            "(move the old one away first)"
        )


def _verify(written: dict[str, FileInfo], manifest: dict[str, Any], node: str) -> None:
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BackupError("this is not a cairn backup of a version this cairn reads")
    if manifest.get("node") != node:
        raise BackupError(f"this is a backup of node {manifest.get('node')!r}, not of {node!r}")
    if int(manifest.get("schema", 0)) > len(migrations()):
        raise BackupError("the backup was made by a newer cairn (its database schema is newer)")
    listed: dict[str, dict[str, Any]] = manifest.get("files") or {}
    for name, info in listed.items():
        got = written.get(name)
        if got is None:
            raise BackupError(f"the backup is incomplete: {name} is missing")
        if got.size != info.get("size") or got.sha256 != info.get("sha256"):
            raise BackupError(f"the backup is damaged: {name} does not match its sha256")
    extra = sorted(set(written) - set(listed))
    if extra:
        raise BackupError(f"the backup holds files its manifest does not name: {extra[0]}")
    for h in manifest.get("blobs") or {}:
        if (
            not HASH_RE.fullmatch(h)
            or listed.get(f"blobs/sha256/{h[:2]}/{h}", {}).get("sha256") != h
        ):
            raise BackupError(f"the backup's blob {h} is not what its name says")
    if "cairn.db" not in listed:
        raise BackupError("the backup holds no database")


def _prepare_database(db: Path, manifest: dict[str, Any], restored: set[tuple[str, str]]) -> None:
    """A new log id at the next start, what the restore came from, and only the releases
    that are on disk recorded as active or staged."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM meta WHERE key = 'log_id'")
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (RESTORED_META, json.dumps({"log_id": manifest.get("log_id"),
                                        "log_head": manifest.get("log_head"),
                                        "created_at": manifest.get("created_at")})),
        )  # fmt: skip
        for table in ("active_releases", "staged_releases"):
            for project, deployment_id in conn.execute(
                f"SELECT project, deployment_id FROM {table}"
            ).fetchall():
                if (project, deployment_id) not in restored:
                    conn.execute(
                        f"DELETE FROM {table} WHERE project = ? AND deployment_id = ?",
                        (project, deployment_id),
                    )
        conn.execute("COMMIT")
        (check,) = conn.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise BackupError(f"the backup's database does not check out: {check}")
    except sqlite3.Error as e:
        raise BackupError(f"the backup's database cannot be used: {e}") from e
    finally:
        conn.close()


def restore(config: Config, source: Path) -> Summary:
    """Restore the node of ``config`` from the backup at ``source``.

    Raises:
        BackupError: the data directory is in use or not empty, or the backup is not a
            complete, undamaged backup of this node (nothing is written then).
    """
    data = config.node.data_dir
    _check_target(data)
    staging = data.parent / f".{data.name}.restore-{secrets.token_hex(4)}"
    try:
        try:
            got = read_backup(source, staging)
        except ArchiveError as e:
            raise BackupError(str(e)) from e
        manifest = got.manifest
        _verify(got.files, manifest, config.node.name)
        if got.symlinks != (manifest.get("symlinks") or {}):
            raise BackupError("the backup's symlinks differ from its manifest")
        for name, info in (manifest.get("files") or {}).items():
            os.chmod(staging / name, int(info.get("mode", 0o644)) & 0o755)
        make_symlinks(staging, got.symlinks)
        releases = [(r["project"], r["deployment_id"]) for r in manifest.get("releases") or []]
        _prepare_database(staging / "cairn.db", manifest, set(releases))
        for project, deployment_id in releases:
            project_dir = staging / "components" / project
            os.symlink(f"releases/{deployment_id}", project_dir / "current")
        os.sync()
        if data.exists():
            data.rmdir()  # empty, checked above
        os.replace(staging, data)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    blobs = manifest.get("blobs") or {}
    files = manifest.get("files") or {}
    return Summary(
        str(source), config.node.name, int(manifest.get("created_at", 0)), len(files),
        sum(int(f["size"]) for f in files.values()), len(blobs),
        list(manifest.get("blobs_absent") or []), list(manifest.get("releases") or []),
        list(manifest.get("releases_absent") or []), manifest.get("log_id"),
        int(manifest.get("log_head", 0)),
    )  # fmt: skip


# -- the first start after a restore ------------------------------------------------------


async def recover_after_restore(
    *,
    restored: str,
    caught_up: Callable[[], Awaitable[bool]] | None,
    recover: Callable[[], Awaitable[list[str]]],
    done: Callable[[], Awaitable[None]],
) -> list[str]:
    """Resolve the deploys this node originated that the backup shows unfinished, once
    the node has caught up with its peers.

    What the node wrote after the backup comes back from its peers (its old log): a
    deploy that finished after the backup must not be failed as ``interrupted`` from the
    backup's older state, so the origin's recovery waits for the catch-up (bounded by
    ``caught_up``'s own deadline) and then runs once.

    Args:
        restored: the ``restored_from`` meta value (for the log).
        caught_up: waits until this node holds what a peer holds (None: a single node).
        recover: the origin's recovery of unfinished deploys.
        done: clears the ``restored_from`` mark.
    """
    if caught_up is not None and not await caught_up():
        log.warning("restored_node_not_caught_up", restored_from=restored)
    failed = await recover()
    await done()
    log.info("restored_node_recovered", restored_from=restored, interrupted=len(failed))
    return failed
