"""The read-only operator web view served under ``/ui/`` on every node's admin port.

Python here only serves static files (:mod:`node.ui.routes`); the pages are plain
JavaScript modules in ``static/`` that call the operations API like any other client.
"""

from node.ui.routes import ui_routes

__all__ = ["ui_routes"]
