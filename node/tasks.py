"""Background tasks owned in one place: kept in a set, cancelled and awaited at shutdown.

No fire-and-forget tasks: everything long-running that the node starts goes through a
:class:`TaskSet`, which the app's cleanup context closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

from node.errors import CairnError

__all__ = ["TaskSet"]

T = TypeVar("T")
log = structlog.get_logger(__name__)


class TaskSet:
    """A named set of tasks that can be closed together."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun: nothing new may start."""
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Start ``coro`` as a task owned by this set; its failure is logged."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"task set {self.name} is closed")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, CairnError):
            # An expected outcome (a failed deploy, say), already recorded and answered.
            log.info("task_ended", task=task.get_name(), code=exc.code)
            return
        log.error("task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)

    async def close(self) -> None:
        """Cancel every task and wait for all of them to finish."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
