"""The ``cairn`` command line (also ``python -m node``).

``cairn node run`` runs a node; the client commands (deploy, deployments, users) live in
:mod:`node.client_cli`, the cluster and certificate commands in :mod:`node.cluster_cli`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from node.config import ConfigError, load_config
from node.logs import configure_logging

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cairn")
def cli() -> None:
    """cairn: deploy components to a cluster and keep a record of every deploy."""


@cli.group()
def node() -> None:
    """Run a node."""


@node.command("run")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="TOML config file",
)
def node_run(config_path: Path) -> None:
    """Run one node in the foreground until SIGTERM or Ctrl-C."""
    from node.runner import StartupError, serve

    try:
        config = load_config(config_path)
        if config.tls is not None:
            from replication.errors import CertificateError
            from replication.tls import check_node_credentials

            try:
                check_node_credentials(
                    config.tls.cert, config.tls.key, config.tls.ca, config.node.name
                )
            except CertificateError as e:
                raise StartupError(str(e)) from None
        configure_logging(config.log_level)
        asyncio.run(serve(config))
    except (ConfigError, StartupError) as e:
        click.echo(f"cairn: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch it
        sys.exit(130)


def _register_optional() -> None:
    """Attach the command families that live in their own modules, when present."""
    import importlib

    for module in ("node.client_cli", "node.cluster_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(cli)


_register_optional()


def main() -> None:
    cli(prog_name="cairn")
