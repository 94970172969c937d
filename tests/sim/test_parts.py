"""The simulator's parts: the virtual-time loop, the in-memory network, the inline
database seam, the schedule and the shrinker."""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path
from typing import Any

import pytest

from replication.channel import ChannelClosed, DialError
from replication.errors import HandshakeError
from replication.messages import Ping
from storage.db import INLINE, Database

from .history import HistoryResult
from .minimize import minimize
from .net import SimNetwork, url_of
from .schedule import generate
from .vloop import NODE, VirtualLoop


def run(coro: Any) -> Any:
    """Run ``coro`` on a fresh virtual loop; whatever it left running is cancelled."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        rest = asyncio.all_tasks(loop)
        for task in rest:
            task.cancel()
        if rest:
            loop.run_until_complete(asyncio.wait(rest))
        loop.close()


# -- the loop ---------------------------------------------------------------------------


def test_time_moves_only_when_nothing_can_run() -> None:
    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(3600)  # an hour, at once
        t1 = loop.time()
        for _ in range(1000):
            await asyncio.sleep(0)
        return t0, t1, loop.time()

    t0, t1, t2 = run(main())
    assert (t0, t1) == (0.0, 3600.0)
    assert t2 == t1  # callbacks alone never move time


def test_executor_work_runs_inline_on_the_loop_thread() -> None:
    async def main() -> tuple[int, int]:
        before = threading.active_count()
        ident = await asyncio.to_thread(threading.get_ident)
        return ident, threading.active_count() - before

    ident, new_threads = run(main())
    assert ident == threading.get_ident()
    assert new_threads == 0


def test_tasks_belong_to_the_node_that_made_them() -> None:
    loop = VirtualLoop()

    async def child() -> None:
        await asyncio.sleep(10)

    async def node_main() -> None:
        asyncio.create_task(child())  # noqa: RUF006 - the loop keeps it, the test cancels it
        await asyncio.sleep(10)

    async def main() -> list[str]:
        import contextvars

        ctx = contextvars.copy_context()
        ctx.run(NODE.set, ("n1", 1))
        loop.create_task(node_main(), context=ctx)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        mine = loop.tasks_of("n1")
        names = [str(loop.owner(t)) for t in mine]
        for t in mine:
            t.cancel()
        await asyncio.wait(mine)
        return names

    try:
        assert loop.run_until_complete(main()) == ["('n1', 1)", "('n1', 1)"]
    finally:
        loop.close()


# -- the network ------------------------------------------------------------------------


async def _pair(net: SimNetwork, accepted: asyncio.Queue[Any] | None = None) -> tuple[Any, Any]:
    queue: asyncio.Queue[Any] = accepted if accepted is not None else asyncio.Queue()

    async def accept(channel: Any) -> None:
        await queue.put(channel)
        await asyncio.sleep(1e9)

    await net.transport("b").start(accept)
    a = await net.transport("a").dial("b", url_of("b"))
    return a, await queue.get()


def test_frames_arrive_in_order_and_a_close_travels_behind_them() -> None:
    async def main() -> list[Any]:
        net = SimNetwork(asyncio.get_running_loop(), __import__("random").Random(1))
        a, b = await _pair(net)
        assert (a.peer, b.peer) == ("b", "a")
        for i in range(50):
            await a.send(Ping(t=i))
        await a.close("bye")
        got = [(await b.receive()).t for _ in range(50)]
        with pytest.raises(ChannelClosed):
            await b.receive()
        with pytest.raises(ChannelClosed):
            await a.send(Ping(t=0))
        return got

    assert run(main()) == list(range(50))


def test_a_cut_holds_frames_and_a_heal_delivers_them() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        net = SimNetwork(loop, __import__("random").Random(1))
        a, b = await _pair(net)
        net.cut("a", "b")
        await a.send(Ping(t=1))
        got = asyncio.ensure_future(b.receive())
        await asyncio.sleep(30)
        assert not got.done()
        with pytest.raises(DialError):  # a new dial across the cut times out
            await net.transport("a").dial("b", url_of("b"))
        net.uncut("a", "b")
        assert (await got).t == 1

    run(main())


def test_a_reset_breaks_both_ends_and_a_crash_closes_the_peers_end() -> None:
    async def main() -> None:
        net = SimNetwork(asyncio.get_running_loop(), __import__("random").Random(1))
        accepted: asyncio.Queue[Any] = asyncio.Queue()
        a, b = await _pair(net, accepted)
        assert net.reset("a", "b") == 1
        with pytest.raises(ChannelClosed):
            await a.receive()
        with pytest.raises(ChannelClosed):
            await b.receive()
        a2 = await net.transport("a").dial("b", url_of("b"))
        b2 = await accepted.get()
        await a2.send(Ping(t=7))
        net.crash("a")  # what "a" sent before it died still arrives, then the close
        assert (await b2.receive()).t == 7
        with pytest.raises(ChannelClosed):
            await b2.receive()
        with pytest.raises(ChannelClosed):
            await a2.send(Ping(t=8))

    run(main())


def test_a_dial_to_the_wrong_node_is_refused() -> None:
    async def main() -> None:
        net = SimNetwork(asyncio.get_running_loop(), __import__("random").Random(1))
        await _pair(net)
        with pytest.raises(HandshakeError):
            await net.transport("a").dial("c", url_of("b"))

    run(main())


# -- the inline database seam (storage.db.INLINE) ----------------------------------------


def test_an_inline_database_starts_no_thread_and_keeps_its_contract(tmp_path: Path) -> None:
    async def main() -> tuple[int, list[Any]]:
        INLINE.set(True)
        before = threading.active_count()
        db = await Database.open(tmp_path / "db.sqlite")
        try:
            async with db.write() as conn:
                await conn.execute("CREATE TABLE t (x INTEGER)")
                await conn.execute("INSERT INTO t VALUES (1)")
            with pytest.raises(RuntimeError):
                async with db.write() as conn:
                    await conn.execute("INSERT INTO t VALUES (2)")
                    raise RuntimeError("rolled back")
            rows = [r["x"] for r in await db.fetchall("SELECT x FROM t")]
            return threading.active_count() - before, rows
        finally:
            await db.close()

    threads, rows = run(main())
    assert threads == 0
    assert rows == [1]


async def test_without_the_seam_the_database_uses_its_threads(tmp_path: Path) -> None:
    assert INLINE.get() is False
    before = threading.active_count()
    db = await Database.open(tmp_path / "db.sqlite")
    try:
        assert threading.active_count() > before  # aiosqlite's worker thread
        assert await db.schema_version() > 0
    finally:
        await db.close()


# -- schedules and shrinking --------------------------------------------------------------


def test_a_schedule_is_a_function_of_its_seed() -> None:
    assert generate(5) == generate(5)
    assert generate(5) != generate(6)
    events = generate(5)
    assert [e.index for e in events] == list(range(len(events)))
    assert all(a.at <= b.at for a, b in itertools.pairwise(events))


def test_shrinking_finds_the_events_a_failure_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    events = generate(11, ops=12, faults=6)
    culprits = {events[3].index, events[9].index}

    def fake_run(seed: int, *, keep: Any = None, **_kw: Any) -> HistoryResult:
        kept = {e.index for e in events} if keep is None else set(keep)
        r = HistoryResult(seed, 5, None)
        if culprits <= kept:
            r.anomalies.append("state: tables differ")
        return r

    from . import minimize as m

    monkeypatch.setattr(m, "generate", lambda _seed: events)
    monkeypatch.setattr(m, "run_history", fake_run)
    kept, result = minimize(11, certs=None, budget=200)  # type: ignore[arg-type]
    assert set(kept) == culprits
    assert not result.ok
