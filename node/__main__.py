"""``python -m node`` runs the ``cairn`` command line."""

from node.cli import main

main()
