"""``cairn node run``: run one node in the foreground (the server side's entry point)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from node.config import ConfigError, load_config
from node.logs import configure_logging

__all__ = ["node"]


@click.group()
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
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="log JSON lines even on a terminal (the default off one)",
)
def node_run(config_path: Path, as_json: bool) -> None:
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
        configure_logging(config.log_level, json=True if as_json else None)
        asyncio.run(serve(config))
    except (ConfigError, StartupError) as e:
        click.echo(f"cairn: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch it
        sys.exit(130)
