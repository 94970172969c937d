"""``cairn node backup`` and ``cairn node restore``: a node's data, while it runs and back.

The work is :mod:`node.backup` (server-side code on the local data directory named by
the node's config file); this module is the command line around it. Exit codes: 0 done;
1 the backup or restore cannot be done (the message says why: an existing ``OUT``, a
data directory that is in use or not empty, a damaged backup); 2 a config file that
cannot be used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from node.cli.common import EXIT_FAILED, EXIT_USAGE, fail, human_stream, json_option, print_json

__all__ = ["node_backup", "node_restore"]

_CONFIG = click.option(
    "--config", "config_path", required=True, type=click.Path(path_type=Path),
    help="the node's TOML config file (its [node] data_dir is backed up or restored)",
)  # fmt: skip


def _load(config_path: Path) -> Any:
    from node.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _report(summary: Any, verb: str, as_json: bool) -> None:
    if as_json:
        print_json(summary.as_json())
        return
    lines = [
        f"{verb} node {summary.node}: {summary.files} files, {_size(summary.bytes)}",
        f"  payload blobs:     {summary.blobs}",
    ]
    if summary.blobs_absent:
        n = len(summary.blobs_absent)
        lines.append(f"  not on this node:  {n} blob(s) (its peers hold them)")
    lines += [f"  release:           {r['project']} {r['deployment_id']}" for r in summary.releases]
    lines += [
        f"  release not here:  {r['project']} {r['deployment_id']} (staged again at start)"
        for r in summary.releases_absent
    ]
    lines.append(f"  change log:        {summary.log_id} at {summary.log_head}")
    for line in lines:
        click.echo(line, file=human_stream(as_json))


@click.command("backup")
@_CONFIG
@click.argument("out", type=click.Path(path_type=Path))
@json_option
def node_backup(config_path: Path, out: Path, as_json: bool) -> None:
    """Back up this node into OUT (a new directory, or OUT.tar / OUT.tar.gz), while it runs.

    OUT holds a consistent copy of the database, the payload blobs its records use, the
    release each project runs here, and manifest.json with every file's sha256. Keep the
    config file and the node's TLS key elsewhere: the backup holds neither.
    """
    from node.backup import BackupError, backup

    config = _load(config_path)
    try:
        summary = backup(config, out)
    except BackupError as e:
        if as_json:
            print_json({"error": str(e), "code": "backup_failed"})
        fail(str(e), EXIT_FAILED)
    _report(summary, "backed up", as_json)


@click.command("restore")
@_CONFIG
@click.argument("source", metavar="IN", type=click.Path(path_type=Path))
@json_option
def node_restore(config_path: Path, source: Path, as_json: bool) -> None:
    """Restore this node's data directory from the backup IN (a directory or tar).

    The data directory must be absent or empty and no node may be running on it. Every
    file is checked against the manifest before anything is put in place. At its next
    start the node writes a new change log and gets what it wrote after the backup back
    from its peers (docs/operations.md, "Backup and restore").
    """
    from node.backup import BackupError, restore

    config = _load(config_path)
    try:
        summary = restore(config, source)
    except BackupError as e:
        if as_json:
            print_json({"error": str(e), "code": "restore_failed"})
        fail(str(e), EXIT_FAILED)
    _report(summary, "restored", as_json)
    if not as_json:
        click.echo(f"start it with: cairn node run --config {config_path}")
