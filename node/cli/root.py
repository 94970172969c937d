"""The ``cairn`` root command group: every command family, added explicitly.

The families live one module each in :mod:`node.cli`; this module only assembles them.
"""

from __future__ import annotations

import click

from node.cli.cert import cert
from node.cli.cluster import cluster, demo
from node.cli.daemon import node
from node.cli.deploy import deploy
from node.cli.deployments import deployments
from node.cli.users import roles, users

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cairn")
def cli() -> None:
    """cairn: deploy components to a cluster and keep a record of every deploy."""


for _command in (node, deploy, deployments, users, roles, cluster, cert, demo):
    cli.add_command(_command)


def main() -> None:
    """Run the command line (the ``cairn`` console script and ``python -m node``)."""
    cli(prog_name="cairn")
