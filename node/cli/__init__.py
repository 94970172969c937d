"""The operator's side of cairn: the ``cairn`` command line and its client.

It talks to nodes only through the operations API (:mod:`node.cli.api`); the one
exception is ``cairn node run`` (:mod:`node.cli.daemon`), which starts the server.
The commands live one family per module and are assembled in :mod:`node.cli.root`;
local-cluster tooling (``cairn cluster up``, ``cairn demo``, the test harness) is in
:mod:`node.cli.local`. Nothing outside this package imports it (``tests/test_layering.py``).
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:
    """The ``cairn`` console script: loads the command tree only when it runs."""
    from node.cli.root import main as run

    run()
