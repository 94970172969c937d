"""``python -m node`` runs the ``cairn`` command line."""

from node.cli.root import main

main()
