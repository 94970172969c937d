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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from replication.blobs import BlobFetcher, Source
from replication.channel import Channel, ChannelClosed, Transport
from replication.errors import ProtocolError, ReplicationError
from replication.handshake import answer_hello, expect_hello
from replication.membership import Membership, PeerAddress
from replication.messages import OWN, RELAY, Refuse
from replication.peer_queue import PeerQueue, PeerState, PeerStats
from replication.sender import SenderSession, SendStats
from replication.session import CAPS, SYSTEM_CLOCK, Clock, Settings
from replication.signing import Keyring
from storage.accounts import Accounts
from storage.apply import retry_parked
from storage.blobs import BlobStore
from storage.errors import StorageError
from storage.store import Store
from storage.tables import MEMBERS
from storage.tasks import TaskSet
from storage.trim import TrimPolicy, TrimReport, record_positions, trim

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
        keyring: member certificates, for verifying relayed entries (None: trust only
            what each writer sends directly).
        own_cert: this node's certificate (DER), sent to subscribers with its entries.
        trim_policy: how long the change log keeps what every member has.
        maintain_s: how often trimming and parked retries run.
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
        keyring: Keyring | None = None,
        own_cert: bytes | None = None,
        trim_policy: TrimPolicy | None = None,
        maintain_s: float = 30.0,
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
        self._tasks = TaskSet("replication")
        self._peer_tasks = TaskSet("replication-peers")
        self._listeners: list[Callable[[str], None]] = []
        self._connect_event = asyncio.Event()
        self._running = False
        self.keyring = keyring
        self._own_cert = own_cert
        self.trim_policy = trim_policy or TrimPolicy()
        self._maintain_s = maintain_s
        #: What each subscriber said it holds, by member and log (for trimming).
        self._positions: dict[str, dict[str, int]] = {}
        self.last_trim: TrimReport | None = None
        self._scope_dirty = asyncio.Event()
        #: Which connected peer (by name order) is the relay; see :meth:`scope_for`.
        self._relay_turn = 0
        self.fetcher = BlobFetcher(
            blobs, sources=self._sources, wait_for_connect=self._wait_for_connect,
            clock=clock, wait_s=self.settings.fetch_wait_s,
            all_connected=lambda: all(
                q.state is PeerState.CONNECTED for q, _ in self._queues.values()
            ),
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
        self._spawn(self._maintain(), name="replication-maintain")
        self._spawn(self._rescope(), name="replication-scopes")
        log.info("replication_started", node=self.node, peers=sorted(self.membership.peers()))

    async def stop(self) -> None:
        """Disconnect every peer, stop listening, and wait for everything started."""
        if not self._running:
            return
        self._running = False
        await self._tasks.close()
        await self._stop_queues()
        await self._peer_tasks.close()
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
        task: asyncio.Task[None] = self._tasks.spawn(coro, name=name)
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

    def _peer_changed(self, name: str) -> None:
        """A pull channel came up or went down: scopes may change; wake the waiters."""
        self._scope_dirty.set()
        queue = self._queues.get(name)
        if queue is None or queue[0].state is not PeerState.CONNECTED:
            return
        event, self._connect_event = self._connect_event, asyncio.Event()
        event.set()
        for callback in self._listeners:
            callback(name)

    # -- subscription scopes ----------------------------------------------------------

    def scope_for(self, name: str) -> tuple[str, tuple[str, ...]]:
        """The scope of this node's subscription to peer ``name``.

        Each writer's log comes from the writer itself while this node is connected to
        it. Every other log (a writer out of reach, a log from before a node was
        rebuilt, a member not yet dialled) comes from one relay, asked for everything
        except the logs pulled directly. So each entry crosses each link once, and a
        node never pulls the same state from every peer at once.

        The relay takes turns among the connected peers, one more each maintenance
        pass: what only some peer holds (entries of a writer that has been out of
        reach, or removed, since it wrote them) reaches every node in the end, not
        only when it happens to sit on the first peer by name.
        """
        connected = sorted(
            (n, q.peer_log_id)
            for n, (q, _) in self._queues.items()
            if q.state is PeerState.CONNECTED and q.peer_log_id is not None
        )
        if not connected or connected[self._relay_turn % len(connected)][0] != name:
            return (OWN, ())
        return (RELAY, tuple(sorted(log_id for n, log_id in connected if n != name)))

    async def _rescope(self) -> None:
        while True:
            await self._scope_dirty.wait()
            self._scope_dirty.clear()
            for queue, _ in list(self._queues.values()):
                try:
                    await queue.resubscribe()
                except ReplicationError as e:  # that channel is going down anyway
                    log.debug("resubscribe_failed", peer=queue.name, error=str(e))

    def _note_positions(self, member: str, positions: Mapping[str, int]) -> None:
        held = self._positions.setdefault(member, {})
        for log_id, oseq in positions.items():
            if oseq > held.get(log_id, -1):
                held[log_id] = oseq

    def _cert_der(self, key_id: str) -> bytes | None:
        if self.keyring is not None and (known := self.keyring.get(key_id)) is not None:
            return known.der
        return None

    def _persist_certs(self, ders: list[bytes]) -> None:
        self._spawn(self._store_certs(ders), name="replication-certs")

    async def _store_certs(self, ders: list[bytes]) -> None:
        if self.keyring is None:
            return
        for der in ders:
            known = self.keyring.add(der)
            await self.store.put_cert(
                known.key_id, known.node, der, known.not_before_ms, known.not_after_ms
            )

    # -- maintenance --------------------------------------------------------------------

    async def maintain_once(self) -> TrimReport:
        """Record members' positions, trim the change log, retry parked entries."""
        for member, positions in list(self._positions.items()):
            await record_positions(self.store, member, positions)
        report = await trim(self.store, self.membership.peers(), self.trim_policy)
        self.last_trim = report
        if report.total:
            log.info("changelog_trimmed", by_members=report.by_members, by_age=report.by_age,
                     by_size=report.by_size, remaining=report.remaining)  # fmt: skip
        await retry_parked(
            self.store, max_clock_offset_ms=int(self.settings.max_clock_offset_s * 1000)
        )
        return report

    async def _maintain(self) -> None:
        while True:
            await self.clock.sleep(self._maintain_s)
            self._relay_turn += 1  # the next peer relays (see scope_for)
            self._scope_dirty.set()
            try:
                await self.maintain_once()
            except StorageError as e:
                log.error("replication_maintenance_failed", error=str(e))

    async def caught_up(self, timeout_s: float, *, unless_alone: bool = False) -> bool:
        """Wait until every connected peer has sent everything it serves this node.

        One peer is not enough: with scopes, each peer sends its own log and one relays
        the rest, so a node that stopped at the first peer caught up would create a
        bootstrap user the cluster already has (overwriting its password), or converge
        to releases older than rows still on their way.

        Args:
            timeout_s: how long to wait at most.
            unless_alone: give up at once while no peer is connected (a node with no
                reachable peer goes on with what it has).

        Returns:
            True once caught up; False at the deadline, or alone with ``unless_alone``.
        """
        deadline = self.clock.monotonic() + timeout_s
        while (left := deadline - self.clock.monotonic()) > 0:
            up = [q for q, _ in self._queues.values() if q.state is PeerState.CONNECTED]
            if not up and unless_alone:
                return False
            behind = [q for q in up if not q.caught_up.is_set()]
            if up and not behind:
                return True
            waits = [asyncio.ensure_future(q.caught_up.wait()) for q in behind]
            try:
                if waits:
                    await asyncio.wait(
                        waits, timeout=min(left, 0.5), return_when=asyncio.FIRST_COMPLETED
                    )
                else:  # nobody connected yet
                    await asyncio.sleep(min(left, 0.1))
            finally:
                for w in waits:
                    w.cancel()
        return False

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
            clock=self.clock, rng=self.rng, keyring=self.keyring, scope_for=self.scope_for,
            on_change=self._peer_changed, on_certs=self._persist_certs,
            stats=self._received.setdefault(name, PeerStats()),
        )  # fmt: skip
        task = self._peer_tasks.spawn(queue.run(), name=f"peer-{name}")
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
            members=self.membership.peers(), log_id=self.store.log_id, caps=CAPS,
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
            channel, peer_log_id=hello.log_id, store=self.store, blobs=self.blobs,
            settings=self.settings, clock=self.clock,
            stats=self._sent.setdefault(peer, SendStats()), certs=self._cert_der,
            on_positions=self._note_positions,
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
            st = self._received.get(name) or PeerStats()
            transfers = (queue.receiver.transfers() if queue and queue.receiver else []) + (
                inbound.transfers() if inbound else []
            )
            peers.append({
                "name": name,
                "url": url,
                "state": str(queue.state if queue else PeerState.DISCONNECTED),
                "last_seen": max(seen) if seen else None,
                "lag_changes": st.lag_entries,
                "lag_bytes": st.lag_bytes,
                "transfers": transfers,
                "last_error": st.last_error,
                "last_error_at": st.last_error_at_ms,
                "disconnects": st.disconnects,
                "inbound": inbound is not None,
                "rtt_ms": queue.liveness.rtt_ms if queue and queue.liveness else None,
                "log_id": st.log_id,
                "log_changed_at": st.log_changed_at_ms,
                "scope": queue.scope_for(name)[0] if queue else None,
                "changes_received": st.entries_received,
                "changes_applied": st.entries_applied,
                "quarantined": st.quarantined,
                "refused": st.refused,
                "parked": st.parked,
                "blob_bytes_received": st.blob_bytes_received,
                "changes_sent": sent.entries_sent,
                "blob_bytes_sent": sent.blob_bytes_sent,
                "sending_lag_changes": inbound.lag_entries if inbound else None,
            })  # fmt: skip
        trim_report = self.last_trim
        held_back = trim_report.held_back_by if trim_report else {}
        return {
            "node": self.node,
            "cluster_id": self.cluster_id,
            "log_id": self.store.log_id,
            "head_seq": self.store.logs.own_head,
            "blob_bytes_received": sum(r.blob_bytes_received for r in self._received.values()),
            "blob_bytes_sent": sum(s.blob_bytes_sent for s in self._sent.values()),
            "changelog": {
                "entries": trim_report.remaining if trim_report else None,
                "trimmed_by_members": trim_report.by_members if trim_report else 0,
                "trimmed_by_age": trim_report.by_age if trim_report else 0,
                "trimmed_by_size": trim_report.by_size if trim_report else 0,
                "held_back_by": {
                    log_id: {"member": m, "position": pos} for log_id, (m, pos) in held_back.items()
                },
            },
            "peers": peers,
        }
