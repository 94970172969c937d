"""Background tasks owned in one place: kept in a set, cancelled and awaited at shutdown.

No fire-and-forget tasks: everything long-running that a node starts, in any package,
goes through a :class:`TaskSet`, which whoever started it closes (a cleanup context, a
service's ``stop``). It lives in ``storage``, the bottom of the import order, so that
replication and the node share the one scheme.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

__all__ = ["TaskSet"]

T = TypeVar("T")
log = structlog.get_logger(__name__)


class TaskSet:
    """A named set of tasks that can be closed together.

    Args:
        name: for logs.
        expected: exception types that end a task as an outcome already recorded and
            answered (logged at info), not as a failure (logged with its traceback).
    """

    def __init__(self, name: str, *, expected: tuple[type[BaseException], ...] = ()) -> None:
        self.name = name
        self._expected = expected
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
        if isinstance(exc, self._expected):
            # An expected outcome (a failed deploy, say), already recorded and answered.
            log.info("task_ended", task=task.get_name(), code=getattr(exc, "code", None))
            return
        log.error("task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)

    async def close(self) -> None:
        """Cancel every task and wait for all of them to finish."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
