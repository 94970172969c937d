"""A virtual-time asyncio event loop: one thread, time moves only when nothing can run.

:class:`VirtualLoop` is a ``SelectorEventLoop`` whose ``time()`` is a number the loop
itself advances: when no callback is ready, the selector is asked to wait until the next
timer, and instead of waiting it moves the clock there. A history of minutes of
heartbeats, backoffs and deadlines therefore runs as fast as its callbacks do, and the
order of callbacks is a function of the program alone.

Thread hops are the other source of disorder, so ``run_in_executor`` (and with it
``asyncio.to_thread`` and the blob store's thread calls) runs the function at once on
the loop's thread and returns a finished future; the database runs inline through the
``storage.db.INLINE`` seam. Nothing in a simulated history ever runs on another thread.

Every task is tagged with the node it belongs to (:data:`NODE`, inherited through
contexts), so a node's crash can cancel exactly its tasks, in the order they were made.
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["NODE", "Deadlock", "VirtualLoop"]

T = TypeVar("T")

#: The node (and the life of it: its start count) the running code belongs to (None: the
#: simulator itself).
NODE: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "sim_node", default=None
)


class Deadlock(RuntimeError):
    """Nothing can run and no timer is due (the history can never move again), or
    callbacks keep running without ever letting time move (a livelock)."""


#: Loop iterations in a row without time moving that count as a livelock.
LIVELOCK_ITERATIONS = 100_000


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Never blocks: a wait for ``timeout`` moves the virtual clock instead. Only the
    loop's self-pipe is ever registered, and nothing writes to it (no other thread runs),
    so there is nothing to poll."""

    def __init__(self, advance: Callable[[float], None]) -> None:
        super().__init__()
        self._advance = advance
        self._spins = 0

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise Deadlock("no callback is ready and no timer is scheduled")
        if timeout > 0:
            self._advance(timeout)
            self._spins = 0
        else:
            self._spins += 1
            if self._spins > LIVELOCK_ITERATIONS:
                raise Deadlock(f"{LIVELOCK_ITERATIONS} loop iterations without time moving")
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (seconds from 0), executors run inline."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(selector=_VirtualSelector(self._advance))
        self._clock_resolution = 1e-9
        self._seq = 0
        self._owners: weakref.WeakKeyDictionary[
            asyncio.Task[Any], tuple[int, tuple[str, int] | None]
        ] = weakref.WeakKeyDictionary()
        self.set_task_factory(self._task)  # type: ignore[arg-type]

    # -- time -------------------------------------------------------------------------

    def time(self) -> float:
        return self._now

    def reset_spins(self) -> None:
        """Forget the iterations counted towards a livelock (before running again)."""
        selector = self._selector
        assert isinstance(selector, _VirtualSelector)
        selector._spins = 0

    def _advance(self, seconds: float) -> None:
        self._now += seconds

    # -- executors --------------------------------------------------------------------

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self.create_future()
        try:
            result = func(*args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # handed to the awaiting code as it is
            fut.set_exception(e)
        else:
            fut.set_result(result)
        return fut

    # -- task ownership ---------------------------------------------------------------

    def _task(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        owner = context.get(NODE) if context is not None else NODE.get()
        task = asyncio.Task(coro, loop=loop, context=context)
        self._seq += 1
        self._owners[task] = (self._seq, owner)
        return task

    def owner(self, task: object) -> tuple[str, int] | None:
        """The node (and life) a task belongs to (None: the simulator, or not a task)."""
        found = self._owners.get(task) if isinstance(task, asyncio.Task) else None
        return found[1] if found else None

    def tasks_of(self, node: str) -> list[asyncio.Task[Any]]:
        """The node's unfinished tasks, oldest first."""
        found = [(seq, t) for t, (seq, o) in list(self._owners.items()) if o and o[0] == node]
        return [t for _, t in sorted(found, key=lambda x: x[0]) if not t.done()]

    def all_owned(self) -> list[asyncio.Task[Any]]:
        """Every unfinished task, oldest first."""
        found = sorted(((seq, t) for t, (seq, _) in list(self._owners.items())), key=lambda x: x[0])
        return [t for _, t in found if not t.done()]
