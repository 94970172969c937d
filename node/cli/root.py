"""The ``cairn`` root command group: every command family, added explicitly.

The families live one module each in :mod:`node.cli`; this module only assembles them.
"""

from __future__ import annotations

import sys

import click

from node.cli.audit import audit
from node.cli.backup import node_backup, node_restore
from node.cli.cert import cert
from node.cli.cluster import cluster, demo
from node.cli.common import EXIT_USAGE, fail, os_error_line
from node.cli.components import components
from node.cli.daemon import node
from node.cli.deploy import deploy
from node.cli.deployments import deployments
from node.cli.nodes import nodes
from node.cli.users import roles, users

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cairn")
def cli() -> None:
    """cairn: deploy components to a cluster and keep a record of every deploy."""


for _command in (
    node, deploy, deployments, components, nodes, audit, users, roles, cluster, cert, demo,
):  # fmt: skip
    cli.add_command(_command)


for _command in (node_backup, node_restore):  # `cairn node backup|restore`
    node.add_command(_command)


def main() -> None:
    """Run the command line (the ``cairn`` console script and ``python -m node``).

    A local OS error that no command put into words (a file or directory it could not
    use) still ends as one line and exit 2, never a traceback.
    """
    try:
        cli(prog_name="cairn")
    except OSError as e:
        fail(os_error_line(e), EXIT_USAGE)
    sys.exit(0)
