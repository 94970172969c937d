"""The replication service: one node's part of the full mesh.

Every node listens on its peer port and dials every other member, so each pair of
nodes has two channels, one per direction, each a pull: the dialler receives the
listener's change log (:mod:`replication.peer_queue`) and the listener serves it
(:mod:`replication.sender`). Blobs are fetched over the pull channels
(:mod:`replication.blobs`). Membership (:mod:`replication.membership`) follows the
replicated ``members`` table through the change feed: a new member is dialled at once,
a removed one is disconnected and refused.

:class:`ReplicationService` implements the deploy code's ``ClusterView`` (``members``,
``connected``) and ``BlobFetcher`` (``fetch``) protocols and answers ``cluster_status``.
Everything it starts is owned: tasks are kept and cancelled and awaited on :meth:`stop`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from replication.blobs import BlobFetcher, Source
from replication.channel import Channel, ChannelClosed, Transport
from replication.errors import ProtocolError, ReplicationError
from replication.handshake import answer_hello, expect_hello
from replication.membership import Membership, PeerAddress
from replication.messages import Refuse
from replication.peer_queue import PeerQueue, PeerState, PeerStats
from replication.sender import SenderSession, SendStats
from replication.session import CAPS, SYSTEM_CLOCK, Clock, Settings
from storage.accounts import Accounts
from storage.blobs import BlobStore
from storage.errors import StorageError
from storage.store import Store
from storage.tables import MEMBERS

__all__ = ["ReplicationService"]

log = structlog.get_logger(__name__)


class ReplicationService:
    """Replication of one node's store and blobs with its peers.

    Args:
        node: this node's name (as in its certificate).
        store: this node's store.
        blobs: this node's blob store.
        cluster_id: from :func:`replication.tls.cluster_id_for_ca`.
        peers: the config file's ``[[peers]]``.
        transport: dials and listens (a seam: tests and the fault suite replace it).
        settings: tunables.
        clock: the clock seam.
        rng: randomness for backoff jitter (seeded in tests).
    """

    def __init__(
        self,
        *,
        node: str,
        store: Store,
        blobs: BlobStore,
        cluster_id: str,
        peers: Sequence[PeerAddress],
        transport: Transport,
        settings: Settings | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.blobs = blobs
        self.cluster_id = cluster_id
        self.transport = transport
        self.settings = settings or Settings()
        self.clock = clock
        self.rng = rng or random.Random()
        self.membership = Membership(node, peers)
        self._accounts = Accounts(store)
        self._queues: dict[str, tuple[PeerQueue, asyncio.Task[None]]] = {}
        self._inbound: dict[str, SenderSession] = {}
        self._serving: set[asyncio.Task[Any]] = set()
        self._sent: dict[str, SendStats] = {}
        self._received: dict[str, PeerStats] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[Callable[[str], None]] = []
        self._connect_event = asyncio.Event()
        self._running = False
        self.fetcher = BlobFetcher(
            blobs, sources=self._sources, wait_for_connect=self._wait_for_connect,
            clock=clock, wait_s=self.settings.fetch_wait_s,
        )  # fmt: skip

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the peer port and start dialling every member.

        Raises:
            TransportError: the peer port cannot be bound.
        """
        self._running = True
        try:
            await self.transport.start(self._accept)
            await self._sync_members()
        except BaseException:
            self._running = False
            await self._stop_queues()
            await self.transport.close()
            raise
        self._spawn(self._watch_members(), name="replication-members")
        log.info("replication_started", node=self.node, peers=sorted(self.membership.peers()))

    async def stop(self) -> None:
        """Disconnect every peer, stop listening, and wait for everything started."""
        if not self._running:
            return
        self._running = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._stop_queues()
        await self.fetcher.close()
        await asyncio.gather(
            *(s.channel.close("node stopping") for s in self._inbound.values()),
            return_exceptions=True,
        )
        if self._serving:
            await asyncio.wait(list(self._serving), timeout=self.settings.dead_after_s)
        await self.transport.close()
        log.info("replication_stopped", node=self.node)

    def _spawn(self, coro: Any, *, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def on_connected(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(peer)`` whenever a pull channel to a peer comes up."""
        self._listeners.append(callback)

    # -- ClusterView and BlobFetcher --------------------------------------------------

    def members(self) -> list[str]:
        """Every member's name, this node included, sorted."""
        return self.membership.names()

    def connected(self) -> set[str]:
        """Peers whose pull channel (this node receiving from them) is up."""
        return {n for n, (q, _) in self._queues.items() if q.state is PeerState.CONNECTED}

    def subscribers(self) -> set[str]:
        """Peers pulling this node's changes right now (their channel to us is up)."""
        return set(self._inbound)

    async def fetch(self, payload_hash: str, size: int) -> None:
        """Bring a blob into the local store from a peer (see :class:`BlobFetcher`).

        Raises:
            BlobMissing: no connected peer has it.
            BlobCorrupt: the bytes received did not match; nothing is stored.
        """
        await self.fetcher.fetch(payload_hash, size)

    def _sources(self) -> list[Source]:
        return [
            (name, q.receiver)
            for name, (q, _) in sorted(self._queues.items())
            if q.state is PeerState.CONNECTED and q.receiver is not None
        ]

    async def _wait_for_connect(self, timeout_s: float) -> bool:
        event = self._connect_event
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _peer_connected(self, name: str) -> None:
        event, self._connect_event = self._connect_event, asyncio.Event()
        event.set()
        for callback in self._listeners:
            callback(name)

    # -- membership -------------------------------------------------------------------

    async def _watch_members(self) -> None:
        with self.store.feed.subscribe(lambda n: n.tbl == MEMBERS.name, maxsize=1) as sub:
            while True:
                # First pass right after subscribing: a change made since start() read
                # the table is not missed.
                try:
                    await self._sync_members()
                except StorageError as e:  # the next notice tries again
                    log.error("membership_refresh_failed", error=str(e))
                await sub.get()

    async def _sync_members(self) -> None:
        peers = await self.membership.refresh(self._accounts)
        for name, (queue, _) in list(self._queues.items()):
            if peers.get(name) != queue.url:
                await self._stop_queue(name)
        for name, session in list(self._inbound.items()):
            if name not in peers:
                log.info("peer_removed", peer=name)
                await session.channel.close("no longer a member")
        for name, url in peers.items():
            if name not in self._queues and self._running:
                self._start_queue(name, url)

    def _start_queue(self, name: str, url: str) -> None:
        queue = PeerQueue(
            name, url, node=self.node, cluster_id=self.cluster_id, store=self.store,
            blobs=self.blobs, transport=self.transport, settings=self.settings,
            clock=self.clock, rng=self.rng, on_connected=self._peer_connected,
            stats=self._received.setdefault(name, PeerStats()),
        )  # fmt: skip
        task = asyncio.create_task(queue.run(), name=f"peer-{name}")
        self._queues[name] = (queue, task)

    async def _stop_queue(self, name: str) -> None:
        _, task = self._queues.pop(name)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _stop_queues(self) -> None:
        await asyncio.gather(*(self._stop_queue(n) for n in list(self._queues)))

    # -- listener ---------------------------------------------------------------------

    async def _accept(self, channel: Channel) -> None:
        """Handshake and serve one inbound channel (runs in the listener's handler)."""
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            await self._serve(channel)
        finally:
            self._serving.discard(task)

    async def _serve(self, channel: Channel) -> None:
        peer = channel.peer
        if not self._running:
            return
        try:
            async with asyncio.timeout(self.settings.dead_after_s):
                hello = expect_hello(await channel.receive())
        except (ReplicationError, TimeoutError) as e:
            log.warning("peer_refused", peer=peer, remote=channel.remote, reason=f"no hello: {e}")
            return
        answer = answer_hello(
            hello, my_node=self.node, cluster_id=self.cluster_id, authenticated_peer=peer,
            members=self.membership.peers(), caps=CAPS,
        )  # fmt: skip
        try:
            await channel.send(answer)
        except ChannelClosed:
            return
        if isinstance(answer, Refuse):
            log.warning("peer_refused", peer=peer, remote=channel.remote, reason=answer.reason)
            await channel.close("refused")
            return
        old = self._inbound.get(peer)
        if old is not None:  # the peer redialled before this side saw the old one die
            await old.channel.close("replaced by a new session")
        session = SenderSession(
            channel, store=self.store, blobs=self.blobs, settings=self.settings,
            clock=self.clock, stats=self._sent.setdefault(peer, SendStats()),
        )  # fmt: skip
        self._inbound[peer] = session
        log.info("subscriber_connected", peer=peer, remote=channel.remote)
        try:
            await session.run()
        except ProtocolError as e:
            log.warning("peer_protocol_error", peer=peer, direction="serve", error=str(e))
            await channel.close(str(e)[:120], protocol_error=True)
        except (ReplicationError, StorageError) as e:
            log.info("subscriber_disconnected", peer=peer, reason=str(e) or type(e).__name__)
        except Exception:  # a bug: log it; the subscriber redials
            log.exception("subscriber_failed", peer=peer)
        finally:
            if self._inbound.get(peer) is session:
                del self._inbound[peer]

    # -- status -----------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The ``cluster_status`` answer: this node and each peer, as SPEC section 4."""
        peers = []
        for name, url in sorted(self.membership.peers().items()):
            entry = self._queues.get(name)
            queue = entry[0] if entry else None
            inbound = self._inbound.get(name)
            sent = self._sent.get(name, SendStats())
            seen = [
                live.last_wall_ms
                for live in (queue.liveness if queue else None, inbound and inbound.liveness)
                if live
            ]
            st = self._received.get(name)
            transfers = (queue.receiver.transfers() if queue and queue.receiver else []) + (
                inbound.transfers() if inbound else []
            )
            peers.append({
                "name": name,
                "url": url,
                "state": str(queue.state if queue else PeerState.DISCONNECTED),
                "last_seen": max(seen) if seen else None,
                "lag_changes": st.lag_changes if st else None,
                "lag_bytes": st.lag_bytes if st else None,
                "transfers": transfers,
                "last_error": st.last_error if st else None,
                "last_error_at": st.last_error_at_ms if st else None,
                "disconnects": st.disconnects if st else 0,
                "inbound": inbound is not None,
                "rtt_ms": queue.liveness.rtt_ms if queue and queue.liveness else None,
                "changes_received": st.changes_received if st else 0,
                "changes_applied": st.changes_applied if st else 0,
                "blob_bytes_received": st.blob_bytes_received if st else 0,
                "changes_sent": sent.changes_sent,
                "blob_bytes_sent": sent.blob_bytes_sent,
            })  # fmt: skip
        return {
            "node": self.node,
            "cluster_id": self.cluster_id,
            "head_seq": await self.store.head_seq(),
            "blob_bytes_received": sum(r.blob_bytes_received for r in self._received.values()),
            "blob_bytes_sent": sum(s.blob_bytes_sent for s in self._sent.values()),
            "peers": peers,
        }
