"""The node's task sets: :class:`storage.tasks.TaskSet`, where a ``CairnError`` ending a
task is an outcome already recorded and answered (a failed deploy, say), not a failure."""

from __future__ import annotations

from node.errors import CairnError
from storage.tasks import TaskSet as _TaskSet

__all__ = ["TaskSet"]


class TaskSet(_TaskSet):
    """A named set of tasks that can be closed together (see the storage one)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, expected=(CairnError,))
