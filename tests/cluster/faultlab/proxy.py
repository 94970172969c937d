"""A fault-injecting TCP proxy for the directed peer links of a test cluster.

Each directed link ``a->b`` (the connection node ``a`` dials to ``b``'s peer port) gets
its own listening port on loopback; ``a``'s ``[[peers]]`` URL for ``b`` points there and
the proxy forwards to ``b``'s real peer port. Bytes flow both ways on a link: ``up`` is
what the dialler sends (``a`` to ``b``), ``down`` what it receives back. The proxy never
looks inside the stream (it is TLS): it only decides when bytes move.

What a test can do to a link, per direction where it makes sense:

- ``cut``: existing connections are reset and new ones are reset as soon as they are
  accepted (a firewall that rejects), until healed;
- ``stall``: nothing moves in either direction, connections stay open, bytes wait (a
  blackhole); healing delivers what waited, in order, as TCP would after a long outage;
- ``one_way(direction)``: a stall of one direction only;
- ``delay(seconds)``: every chunk is delivered that much later (order kept);
- ``reset``: every open connection is reset now (RST), new ones pass.

All sockets live on one asyncio loop in a daemon thread; the test thread calls the
methods of :class:`ProxyHub`, which are thread-safe and return once the change is in
effect. Every link counts connections, bytes and resets, for the soak table.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["DIRECTIONS", "Link", "LinkStats", "ProxyHub"]

T = TypeVar("T")
DIRECTIONS = ("up", "down")
_CHUNK = 64 * 1024
#: Chunks a stalled direction holds before it stops reading (TCP back-pressure).
_QUEUE_CHUNKS = 256


@dataclass
class LinkStats:
    connections: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class _Direction:
    flowing: asyncio.Event
    delay_s: float = 0.0


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for w in (self.client, self.server):
            if w is not None:
                _rst(w)
        for t in self.tasks:
            t.cancel()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Link:
    """One directed link ``src->dst``: a listening port forwarding to ``target_port``.

    Only the proxy's loop touches the state below; tests go through :class:`ProxyHub`.
    """

    def __init__(self, src: str, dst: str, target_port: int, host: str) -> None:
        self.src, self.dst = src, dst
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.cut = False
        self.dirs: dict[str, _Direction] = {}
        self.conns: set[_Conn] = set()
        self.stats = LinkStats()
        self.server: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"

    @property
    def url(self) -> str:
        """The ``wss://`` URL the dialler uses for this link."""
        return f"wss://{self.host}:{self.port}"

    def describe(self) -> str:
        if self.cut:
            return "cut"
        parts = []
        for d in DIRECTIONS:
            if not self.dirs[d].flowing.is_set():
                parts.append(f"{d} stalled")
            elif self.dirs[d].delay_s:
                parts.append(f"{d} +{self.dirs[d].delay_s:.2f}s")
        return ", ".join(parts) or "ok"

    async def start(self) -> None:
        self.dirs = {d: _Direction(asyncio.Event()) for d in DIRECTIONS}
        for d in self.dirs.values():
            d.flowing.set()
        self.server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        if self.cut:
            self.stats.resets += 1
            _rst(writer)
            return
        conn = _Conn(writer)
        self.conns.add(conn)
        try:
            try:
                s_reader, s_writer = await asyncio.open_connection(self.host, self.target_port)
            except OSError:
                _rst(writer)  # the peer is down: the dialler sees a refused connection
                return
            conn.server = s_writer
            if self.cut:
                conn.abort()
                return
            up = asyncio.ensure_future(self._pump(reader, s_writer, "up"))
            down = asyncio.ensure_future(self._pump(s_reader, writer, "down"))
            conn.tasks = [up, down]
            done, _ = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
            if any(t.cancelled() or t.exception() is not None or not t.result() for t in done):
                conn.abort()  # a side broke off: the other side sees it too
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self.conns.discard(conn)
            for w in (writer, conn.server):
                if w is not None:
                    w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> bool:
        """Move bytes one way: a reader fills a queue (stamped with arrival time), a
        writer empties it when the direction flows and the delay has passed. True when
        the stream ended cleanly (EOF passed on), False when a side broke off."""
        # (arrival time, bytes); b"" is a clean end of stream, None a broken one.
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(_QUEUE_CHUNKS)
        state = self.dirs[direction]
        loop = asyncio.get_running_loop()

        async def read() -> None:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except (ConnectionError, OSError):
                    await queue.put((loop.time(), None))
                    return
                await queue.put((loop.time(), data))
                if not data:
                    return

        async def write() -> bool:
            while True:
                at, data = await queue.get()
                while True:
                    await state.flowing.wait()
                    wait_s = at + state.delay_s - loop.time()
                    if wait_s <= 0:
                        break
                    await asyncio.sleep(min(wait_s, 0.05))  # re-read the delay and stall
                if data is None:
                    return False
                if not data:
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
                    return True
                if direction == "up":
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                writer.write(data)
                await writer.drain()

        reading = asyncio.ensure_future(read())
        try:
            return await write()
        except (ConnectionError, OSError):
            return False
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading

    def reset_all(self) -> int:
        n = len(self.conns)
        for conn in list(self.conns):
            conn.abort()
        self.stats.resets += n
        return n


class ProxyHub:
    """Every link of a cluster, served from one background event loop."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.links: dict[str, Link] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="faultlab-proxy", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def add(self, src: str, dst: str, target_port: int) -> Link:
        """A new link ``src->dst`` forwarding to ``target_port``; returns it (started)."""
        link = Link(src, dst, target_port, self.host)
        self._call(link.start())
        self.links[link.name] = link
        return link

    def link(self, src: str, dst: str) -> Link:
        return self.links[f"{src}->{dst}"]

    def links_of(self, node: str) -> list[Link]:
        """Every link from or to ``node``."""
        return [x for x in self.links.values() if node in (x.src, x.dst)]

    async def _set(
        self,
        link: Link,
        *,
        cut: bool | None,
        flowing: dict[str, bool],
        delay_s: float | None,
        reset: bool,
    ) -> None:
        if cut is not None:
            link.cut = cut
        for d, on in flowing.items():
            (link.dirs[d].flowing.set if on else link.dirs[d].flowing.clear)()
        if delay_s is not None:
            for d in DIRECTIONS:
                link.dirs[d].delay_s = delay_s
        if reset or cut:
            link.reset_all()

    def _apply(
        self,
        link: Link,
        *,
        cut: bool | None = None,
        flowing: dict[str, bool] | None = None,
        delay_s: float | None = None,
        reset: bool = False,
    ) -> None:
        self._call(self._set(link, cut=cut, flowing=flowing or {}, delay_s=delay_s, reset=reset))

    # -- faults (thread-safe) -------------------------------------------------------------

    def cut(self, link: Link) -> None:
        self._apply(link, cut=True)

    def stall(self, link: Link) -> None:
        self._apply(link, flowing={"up": False, "down": False})

    def one_way(self, link: Link, direction: str) -> None:
        """Stall only ``direction`` (``up``: what the dialler sends; ``down``: what it
        receives)."""
        assert direction in DIRECTIONS
        self._apply(link, flowing={direction: False})

    def delay(self, link: Link, seconds: float) -> None:
        self._apply(link, delay_s=seconds)

    def reset(self, link: Link) -> None:
        self._apply(link, reset=True)

    def heal(self, link: Link) -> None:
        """Back to a plain pipe: not cut, both directions flowing, no delay."""
        self._apply(link, cut=False, flowing={"up": True, "down": True}, delay_s=0.0)

    def heal_all(self) -> None:
        for link in self.links.values():
            self.heal(link)

    def state(self) -> dict[str, str]:
        return {name: link.describe() for name, link in sorted(self.links.items())}

    def close(self) -> None:
        """Stop every link and the loop (idempotent)."""
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            for link in self.links.values():
                link.reset_all()
                if link.server is not None:
                    link.server.close()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            self._call(stop(), timeout_s=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._loop.is_running():
            with contextlib.suppress(Exception):
                self._loop.close()
