"""An in-memory network with the replication transport's seams, and its faults.

:class:`SimTransport` implements ``replication.channel.Transport`` (``start``, ``dial``,
``close``) and :class:`SimChannel` implements ``Channel`` (``peer``, ``remote``,
``send``, ``receive``, ``close``) for nodes in one process. Frames are encoded with the
real codec on ``send`` and decoded (validated as hostile input) on ``receive``, so no
two nodes ever share a message object and every size limit applies as on a socket.

A connection behaves like a WebSocket over TCP: each direction is a FIFO pipe with a
per-frame latency; a close travels behind the frames sent before it. The faults are:

- **latency**: each link has a base latency plus seeded jitter; a slow link adds more;
- **cut** (partition, one-way or both): frames from ``a`` to ``b`` are held (TCP keeps
  retransmitting) and flow again, in order, once the cut heals; a dial across a cut
  times out (``connect_timeout_s``);
- **reset**: a connection breaks; both ends see ``ChannelClosed`` and what was in
  flight is lost;
- **crash**: the node's ends die silently; its peers receive what it had sent and then
  a close (the kernel closes a killed process's sockets);
- **mangle** (not something TCP does, a hostile network): a frame is dropped,
  duplicated or delivered after the next one. The receiving side may end the session
  with a protocol error but must never store anything wrong; the connection is reset
  when the mangling window ends, so a session left wedged (a lost credit) is not
  mistaken for a liveness bug.

:class:`NetStats` counts frames and bytes by message type, and (when asked) each
delivery of each log entry to each node, which is how the scale report shows that every
entry and every blob crosses to each node once.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from replication.channel import Accept, ChannelClosed, DialError, TransportError
from replication.codec import DEFAULT_LIMITS, FrameLimits, decode, encode
from replication.errors import HandshakeError
from replication.messages import Batch, Chunk, Message

__all__ = ["NetStats", "SimChannel", "SimNetwork", "SimTransport", "url_of"]

_CLOSE = object()  # the close marker travelling behind the frames on a pipe


def url_of(node: str) -> str:
    """A node's (simulated) peer URL: a real-looking ``wss://`` address (the members
    table checks its shape); the network maps it to the node listening there."""
    return f"wss://{node}.sim:7443"


@dataclass
class NetStats:
    """What crossed the network."""

    frames: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    entries_sent: int = 0
    entry_bytes: int = 0
    chunk_bytes: int = 0
    dials: int = 0
    dial_failures: int = 0
    #: Deliveries per ``(receiver, log_id, oseq)`` (only when ``track_entries``).
    deliveries: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    track_entries: bool = False

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def total_frames(self) -> int:
        return sum(self.frames.values())

    def snapshot(self) -> dict[str, Any]:
        return {
            "frames": self.total_frames(),
            "bytes": self.total_bytes(),
            "entries": self.entries_sent,
            "entry_bytes": self.entry_bytes,
            "chunk_bytes": self.chunk_bytes,
        }


class _Pipe:
    """One direction of a connection: FIFO, with a latency per frame, holdable."""

    def __init__(self, net: SimNetwork, src: str, dst: str, end: SimChannel) -> None:
        self.net, self.src, self.dst, self.end = net, src, dst, end
        self.queue: deque[tuple[float, object]] = deque()
        self.last_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.deferred: object | None = None  # a frame mangled to arrive after the next one
        self.dead = False
        self.mangled = False

    def put(self, item: object) -> None:
        if self.dead:
            return
        now = self.net.loop.time()
        at = max(now + self.net.latency(self.src, self.dst), self.last_at)
        self.last_at = at
        self.queue.append((at, item))
        self.schedule()

    def schedule(self) -> None:
        if self.timer is not None or not self.queue or self.net.held(self.src, self.dst):
            return
        at = max(self.queue[0][0], self.net.loop.time())
        self.timer = self.net.loop.call_at(at, self.pump)

    def pump(self) -> None:
        self.timer = None
        if self.dead or self.net.held(self.src, self.dst):
            return
        now = self.net.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            self.end.arrive(item)
            if self.dead:
                return
        self.schedule()

    def release(self) -> None:
        """A cut healed: what was held flows on, no earlier than one latency from now."""
        now = self.net.loop.time()
        if self.queue:
            at = now + self.net.latency(self.src, self.dst)
            self.queue = deque((max(t, at), item) for t, item in self.queue)
            self.last_at = max(self.last_at, self.queue[-1][0])
        self.schedule()

    def kill(self) -> None:
        self.dead = True
        self.queue.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class SimChannel:
    """One end of a simulated connection (a ``replication.channel.Channel``)."""

    def __init__(self, net: SimNetwork, node: str, peer: str, conn: _Conn) -> None:
        self._net = net
        self.node = node
        self._peer = peer
        self.conn = conn
        self.out: _Pipe | None = None  # set by the connection
        self._inbox: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: str | None = None  # why this end can no longer send
        self._eof = False  # the peer's close arrived: receive ends once the inbox is empty

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def remote(self) -> str:
        return url_of(self._peer)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def send(self, msg: Message) -> None:
        frame = encode(msg, self._net.limits)  # ProtocolError when too large, as on a socket
        if self._closed is not None:
            raise ChannelClosed(f"channel to {self._peer!r} is closed ({self._closed})")
        self._net.sent(self, msg, frame)

    async def receive(self) -> Message:
        while not self._inbox:
            if self._eof or self._closed is not None:
                raise ChannelClosed(f"{self._peer!r} closed the channel")
            self._waiter = self._net.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._inbox.popleft()
        msg = decode(frame, self._net.limits)
        self._net.received(self, msg)
        return msg

    async def close(self, reason: str = "", *, protocol_error: bool = False) -> None:
        if self._closed is not None:
            return
        self._closed = reason or "closed"
        if self.out is not None:
            self.out.put(_CLOSE)
        self._wake()

    # -- network side ---------------------------------------------------------------

    def arrive(self, item: object) -> None:
        if item is _CLOSE:
            self._eof = True
            self._closed = self._closed or "the peer closed it"
        elif self._closed is None or not self._eof:
            assert isinstance(item, bytes)
            self._inbox.append(item)
        self._wake()

    def broken(self, why: str) -> None:
        """The connection broke under this end: nothing more arrives or leaves."""
        self._closed = self._closed or why
        self._eof = True
        self._inbox.clear()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Conn:
    """A connection between a dialler and a listener: two ends, two pipes."""

    def __init__(self, net: SimNetwork, dialler: str, listener: str) -> None:
        self.dialler, self.listener = dialler, listener
        self.a = SimChannel(net, dialler, listener, self)
        self.b = SimChannel(net, listener, dialler, self)
        self.a.out = _Pipe(net, dialler, listener, self.b)
        self.b.out = _Pipe(net, listener, dialler, self.a)
        self.mangled = False

    def pipes(self) -> tuple[_Pipe, _Pipe]:
        assert self.a.out is not None and self.b.out is not None
        return self.a.out, self.b.out

    def involves(self, node: str) -> bool:
        return node in (self.dialler, self.listener)


@dataclass
class _Listener:
    node: str
    accept: Accept
    context: contextvars.Context


class SimNetwork:
    """Every connection between simulated nodes, and the faults on them.

    Args:
        loop: the (virtual-time) loop.
        rng: the network's randomness (latency jitter, mangling).
        limits: frame limits (as on the real channel).
        base_latency_s: one-way latency of every link.
        jitter_s: mean of the exponential jitter added per frame.
        connect_timeout_s: how long a dial across a cut waits before failing.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        *,
        limits: FrameLimits = DEFAULT_LIMITS,
        base_latency_s: float = 0.0005,
        jitter_s: float = 0.001,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.loop = loop
        self.rng = rng
        self.limits = limits
        self.base_latency_s = base_latency_s
        self.jitter_s = jitter_s
        self.connect_timeout_s = connect_timeout_s
        self.stats = NetStats()
        self._listeners: dict[str, _Listener] = {}
        self._conns: list[_Conn] = []
        self._cuts: Counter[tuple[str, str]] = Counter()
        self._slow: dict[tuple[str, str], float] = {}
        self._mangle: dict[tuple[str, str], float] = {}
        #: ``(src, dst)`` links that have carried a mangled frame: a receiver may refuse
        #: what a lost frame (its signing certificate, say) left it unable to check.
        self.mangled_links: set[tuple[str, str]] = set()
        #: Called with (node, event) for what a trace records (dial failures, resets).
        self.on_event: Callable[[str, str], None] = lambda _n, _e: None

    def transport(self, node: str) -> SimTransport:
        return SimTransport(self, node)

    # -- link properties -------------------------------------------------------------

    def latency(self, src: str, dst: str) -> float:
        extra = self._slow.get((src, dst), 0.0)
        return self.base_latency_s + extra + self.rng.expovariate(1 / self.jitter_s)

    def held(self, src: str, dst: str) -> bool:
        return self._cuts[(src, dst)] > 0

    def cut(self, src: str, dst: str) -> None:
        """Hold every frame from ``src`` to ``dst`` until :meth:`uncut` (nests)."""
        self._cuts[(src, dst)] += 1

    def uncut(self, src: str, dst: str) -> None:
        self._cuts[(src, dst)] -= 1
        if self._cuts[(src, dst)] <= 0:
            del self._cuts[(src, dst)]
            for conn in self._conns:
                for pipe in conn.pipes():
                    if (pipe.src, pipe.dst) == (src, dst):
                        pipe.release()

    def slow(self, src: str, dst: str, extra_s: float) -> None:
        if extra_s <= 0:
            self._slow.pop((src, dst), None)
        else:
            self._slow[(src, dst)] = extra_s

    def mangle(self, src: str, dst: str, probability: float) -> None:
        """Drop, duplicate or reorder frames from ``src`` to ``dst`` with ``probability``;
        0 ends the window and resets the connections that were mangled."""
        if probability > 0:
            self._mangle[(src, dst)] = probability
            return
        self._mangle.pop((src, dst), None)
        for conn in list(self._conns):
            if conn.mangled and not any(self._mangle.get(p) for p in self._links(conn)):
                self._reset(conn, "mangled connection reset")

    def heal(self) -> None:
        """Every fault off: cuts healed, links fast, mangled connections reset."""
        for src, dst in list(self._cuts):
            self._cuts[(src, dst)] = 1
            self.uncut(src, dst)
        self._slow.clear()
        for src, dst in list(self._mangle):
            self.mangle(src, dst, 0)

    @staticmethod
    def _links(conn: _Conn) -> list[tuple[str, str]]:
        return [(conn.dialler, conn.listener), (conn.listener, conn.dialler)]

    # -- connections -----------------------------------------------------------------

    def reset(self, a: str, b: str) -> int:
        """Break every connection between ``a`` and ``b``; returns how many."""
        doomed = [c for c in self._conns if {c.dialler, c.listener} == {a, b}]
        for conn in doomed:
            self._reset(conn, "connection reset")
        return len(doomed)

    def _reset(self, conn: _Conn, why: str) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
        for pipe in conn.pipes():
            pipe.kill()
        # Each end hears of it after a latency (the RST travels too).
        for end in (conn.a, conn.b):
            self.loop.call_at(
                self.loop.time() + self.latency(conn.dialler, conn.listener), end.broken, why
            )

    def crash(self, node: str) -> None:
        """``node`` died: its listener is gone, its ends go silent, its peers get what it
        had sent and then a close."""
        self._listeners.pop(url_of(node), None)
        for conn in [c for c in self._conns if c.involves(node)]:
            self._conns.remove(conn)
            mine, theirs = (conn.a, conn.b) if conn.dialler == node else (conn.b, conn.a)
            assert mine.out is not None and theirs.out is not None
            theirs.out.kill()  # frames towards the dead node vanish
            mine.out.put(_CLOSE)  # behind what it had sent
            mine.broken("node crashed")

    def connections(self, node: str | None = None) -> int:
        return sum(1 for c in self._conns if node is None or c.involves(node))

    # -- frames ----------------------------------------------------------------------

    def sent(self, end: SimChannel, msg: Message, frame: bytes) -> None:
        s = self.stats
        s.frames[msg.TYPE] += 1
        s.bytes[msg.TYPE] += len(frame)
        if isinstance(msg, Batch):
            s.entries_sent += len(msg.entries)
            s.entry_bytes += sum(len(e.body) + len(e.sig) for e in msg.entries)
        elif isinstance(msg, Chunk):
            s.chunk_bytes += len(msg.data)
        pipe = end.out
        assert pipe is not None
        p = self._mangle.get((pipe.src, pipe.dst), 0.0)
        if p and self.rng.random() < p:
            end.conn.mangled = True
            self.mangled_links.add((pipe.src, pipe.dst))
            how = self.rng.choice(("drop", "duplicate", "reorder"))
            self.on_event(end.node, f"mangle:{how}")
            if how == "drop":
                return
            if how == "duplicate":
                pipe.put(frame)
            elif pipe.deferred is None:
                pipe.deferred = frame
                return
        pipe.put(frame)
        if pipe.deferred is not None and pipe.deferred is not frame:
            deferred, pipe.deferred = pipe.deferred, None
            pipe.put(deferred)

    def received(self, end: SimChannel, msg: Message) -> None:
        if self.stats.track_entries and isinstance(msg, Batch):
            for e in msg.entries:
                self.stats.deliveries[(end.node, e.log_id, e.oseq)] += 1

    # -- dialling ----------------------------------------------------------------------

    def listen(self, node: str, accept: Accept) -> None:
        url = url_of(node)
        if url in self._listeners:
            raise TransportError(f"{url} is already listening")
        self._listeners[url] = _Listener(node, accept, contextvars.copy_context())

    def unlisten(self, node: str) -> None:
        self._listeners.pop(url_of(node), None)

    async def dial(self, node: str, peer: str, url: str) -> SimChannel:
        self.stats.dials += 1
        rtt = self.latency(node, peer) + self.latency(peer, node)
        target = self._listeners.get(url)
        if target is not None and (self.held(node, target.node) or self.held(target.node, node)):
            await asyncio.sleep(self.connect_timeout_s)
            self.stats.dial_failures += 1
            raise DialError(f"cannot reach {peer!r} at {url}: timed out")
        await asyncio.sleep(rtt if target is None else 3 * rtt)  # TCP, TLS, upgrade
        target = self._listeners.get(url)
        if target is None or self.held(node, target.node) or self.held(target.node, node):
            self.stats.dial_failures += 1
            raise DialError(f"cannot reach {peer!r} at {url}: connection refused")
        if target.node != peer:
            raise HandshakeError(f"dialled node {peer!r} at {url} but {target.node!r} answered")
        conn = _Conn(self, node, target.node)
        self._conns.append(conn)
        self.loop.create_task(_serve(conn.b, target.accept), context=target.context.copy())
        return conn.a


async def _serve(channel: SimChannel, accept: Accept) -> None:
    """The listener's side of one connection (what TlsTransport's handler does)."""
    try:
        await accept(channel)
    finally:
        await channel.close()


class SimTransport:
    """One node's ``Transport`` on a :class:`SimNetwork`."""

    def __init__(self, net: SimNetwork, node: str) -> None:
        self.net = net
        self.node = node

    async def start(self, accept: Accept) -> None:
        self.net.listen(self.node, accept)

    async def dial(self, peer: str, url: str) -> SimChannel:
        return await self.net.dial(self.node, peer, url)

    async def close(self) -> None:
        self.net.unlisten(self.node)
