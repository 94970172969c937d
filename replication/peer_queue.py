"""The per-peer pull loop: dial, handshake, subscribe from the stored cursor, apply.

This node is the receiver of the peer's change log on the channel it dials. Each
``Changes`` batch is applied by :func:`storage.apply.apply_changes` in one transaction
together with the peer's cursor, under the peer's name as the channel authenticated it
(never a name from a frame); then one batch of credit goes back. A batch that starts
past the cursor (a gap: reordered or lost delivery) or that storage refuses is a
protocol violation: the channel closes having applied nothing of it, and the next
session resumes from the stored cursor. Batches that overlap what was applied are
applied again, harmlessly (apply is idempotent).

The loop reconnects forever with jittered exponential backoff (:class:`Backoff`, a value
object with the randomness passed in), and pings the peer so that a silent one is
dropped after ``dead_after_s``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import structlog

from replication.blobs import BlobReceiver
from replication.channel import Channel, DialError, Transport
from replication.errors import HandshakeError, ProtocolError, ReplicationError
from replication.handshake import check_welcome, client_hello
from replication.messages import Changes, Chunk, Credit, End, Missing, Ping, Pong, Subscribe
from replication.session import CAPS, Clock, Liveness, Settings, heartbeat, race, uncancelled
from storage.apply import InvalidChange, apply_changes
from storage.blobs import BlobStore
from storage.errors import StorageError
from storage.records import Change
from storage.store import Store

__all__ = ["Backoff", "ChangeReceiver", "PeerQueue", "PeerState", "PeerStats"]

log = structlog.get_logger(__name__)


class PeerState(StrEnum):
    """The state of this node's pull channel to a peer (``cluster_status``)."""

    CONNECTED = "connected"
    CONNECTING = "connecting"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: exponential from ``min_s`` up to ``max_s``, with equal jitter.

    The delay for attempt ``n`` (0-based) is uniform in ``[cap/2, cap]`` where
    ``cap = min(max_s, min_s * factor**n)``: never zero, so peers that lost each other
    at the same moment do not redial in lockstep.
    """

    min_s: float
    max_s: float
    factor: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before reconnect attempt ``attempt``."""
        cap = min(self.max_s, self.min_s * self.factor ** min(attempt, 64))
        return cap / 2 + rng.uniform(0, cap / 2)


@dataclass
class PeerStats:
    """What this node knows about its pull from one peer (kept across sessions)."""

    lag_changes: int | None = None
    lag_bytes: int | None = None
    head_seq: int | None = None
    batches_received: int = 0
    changes_received: int = 0
    changes_applied: int = 0
    blob_bytes_received: int = 0
    #: Why the channel is down or the last attempt failed; cleared once it is up.
    last_error: str | None = None
    last_error_at_ms: int | None = None
    connected_at_ms: int | None = None
    #: Sessions that were up and then lost (a flapping peer shows here).
    disconnects: int = 0


class ChangeReceiver:
    """Applies one sender's batches to the store (the protocol layer, without I/O).

    Args:
        store: this node's store.
        peer: the sender's authenticated node name.
        cursor: the stored cursor for ``peer`` (where the subscription started).
        stats: counters to update.
    """

    def __init__(self, store: Store, peer: str, cursor: int, stats: PeerStats) -> None:
        self.store = store
        self.peer = peer
        self.cursor = cursor
        self.stats = stats

    async def on_changes(self, batch: Changes) -> int:
        """Apply ``batch`` and its cursor in one transaction.

        Returns:
            How many of its changes were new here.

        Raises:
            ProtocolError: the batch leaves a gap after the cursor, or holds a change
                this node will not apply (nothing of it is applied).
            StorageError: the database failed (nothing of it is applied).
        """
        if batch.after_seq > self.cursor:
            raise ProtocolError(
                f"batch from {self.peer!r} starts after seq {batch.after_seq} but this node "
                f"has applied up to {self.cursor}"
            )
        changes = [
            Change(
                seq=e.seq, tbl=e.tbl, key=e.key, version=e.version, origin=e.origin, op=e.op,
                data=e.data, user=e.user, t=e.t,
            )
            for e in batch.entries
        ]  # fmt: skip
        try:
            applied = await uncancelled(
                apply_changes(self.store, self.peer, changes, cursor=batch.last_seq)
            )
        except InvalidChange as e:
            raise ProtocolError(f"{self.peer!r} sent a change this node refuses: {e}") from e
        self.cursor = max(self.cursor, batch.last_seq)
        s = self.stats
        s.batches_received += 1
        s.changes_received += len(changes)
        s.changes_applied += applied
        s.head_seq = batch.head_seq
        s.lag_changes = max(0, batch.head_seq - self.cursor)
        s.lag_bytes = batch.lag_bytes
        return applied


class PeerQueue:
    """Keeps this node's pull channel to one peer up, for as long as :meth:`run` runs.

    Args:
        name: the peer's node name (its certificate must say so).
        url: its peer port, ``wss://host:port``.
        node: this node's name.
        cluster_id: this cluster's id (from the CA).
        store: this node's store.
        blobs: this node's blob store.
        transport: how to dial.
        settings: credits, heartbeats, backoff bounds.
        clock: the clock seam.
        rng: randomness for backoff jitter.
        on_connected: called with the peer's name each time the channel is up.
        stats: counters to update (the caller keeps them across queues).
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        node: str,
        cluster_id: str,
        store: Store,
        blobs: BlobStore,
        transport: Transport,
        settings: Settings,
        clock: Clock,
        rng: random.Random,
        on_connected: Callable[[str], None] = lambda _name: None,
        stats: PeerStats | None = None,
    ) -> None:
        self.name, self.url = name, url
        self.node, self.cluster_id = node, cluster_id
        self.store, self.blobs = store, blobs
        self.transport = transport
        self.settings, self.clock, self.rng = settings, clock, rng
        self.on_connected = on_connected
        self.state = PeerState.CONNECTING
        self.stats = stats if stats is not None else PeerStats()
        self.liveness: Liveness | None = None
        self.receiver: BlobReceiver | None = None  # set while connected
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self.attempt = 0

    def _bytes_in(self, n: int) -> None:
        self.stats.blob_bytes_received += n

    async def run(self) -> None:
        """Connect, serve, reconnect, until cancelled."""
        while True:
            self.state = PeerState.CONNECTING
            started = self.clock.monotonic()
            error, was_up = await self._connect_once()
            if was_up:
                self.stats.disconnects += 1
                log.warning("peer_disconnected", peer=self.name, url=self.url, error=error)
            elif error != self.stats.last_error:  # failed dials repeat: log what is news
                log.warning("peer_unreachable", peer=self.name, url=self.url, error=error)
            self.stats.last_error, self.stats.last_error_at_ms = error, self.clock.wall_ms()
            # Only a session that stayed up a while resets the backoff: a peer that
            # accepts and then fails at once must not be redialled in a tight loop.
            if self.clock.monotonic() - started > self.settings.reconnect_max_s:
                self.attempt = 0
            await self.clock.sleep(self.backoff.delay(self.attempt, self.rng))
            self.attempt += 1

    async def _connect_once(self) -> tuple[str, bool]:
        """One dial and session: why it ended, and whether the session was up."""
        try:
            channel = await self.transport.dial(self.name, self.url)
        except (DialError, HandshakeError) as e:
            self.state = PeerState.DISCONNECTED
            return str(e), False
        reason, protocol_error = "", False
        try:
            await self._session(channel)
            error = "session ended"  # pragma: no cover - _session only ends by raising
        except HandshakeError as e:
            error, reason = str(e), "handshake refused"
        except ProtocolError as e:
            log.warning("peer_protocol_error", peer=self.name, direction="pull", error=str(e))
            error, reason, protocol_error = f"protocol error: {e}", str(e), True
        except (ReplicationError, StorageError, TimeoutError) as e:
            error = str(e) or type(e).__name__
        except Exception as e:  # a bug: say so loudly, but keep the peer's queue alive
            log.exception("peer_session_failed", peer=self.name)
            error = f"internal error: {e!r}"
        finally:
            # Down for everyone at once (connected(), blob sources), before the close
            # handshake, which may take a while with a peer that stopped answering.
            was_up = self.state is PeerState.CONNECTED
            self.state = PeerState.DISCONNECTED
            if self.receiver is not None:
                self.receiver.close(f"channel to {self.name!r} ended")
                self.receiver = None
            await channel.close(reason, protocol_error=protocol_error)
        return error, was_up

    async def _session(self, channel: Channel) -> None:
        s = self.settings
        liveness = self.liveness = Liveness(self.clock)
        async with asyncio.timeout(s.dead_after_s):
            await channel.send(client_hello(self.node, self.cluster_id, CAPS))
            welcome = check_welcome(
                await channel.receive(), expected_node=self.name, cluster_id=self.cluster_id,
                authenticated_peer=channel.peer, caps=CAPS,
            )  # fmt: skip
        liveness.saw()
        cursor = await self.store.cursor(self.name)
        changes = ChangeReceiver(self.store, self.name, cursor, self.stats)
        await channel.send(Subscribe(after_seq=changes.cursor, credit=s.credit_batches))
        if "blobs" in welcome.caps:
            self.receiver = BlobReceiver(
                channel, self.blobs, chunk_credit=s.chunk_credit, on_bytes=self._bytes_in
            )
        self.state = PeerState.CONNECTED
        self.stats.connected_at_ms = self.clock.wall_ms()
        self.stats.last_error = None  # a stale error next to "connected" would mislead
        log.info("peer_connected", peer=self.name, url=self.url, cursor=changes.cursor)
        self.on_connected(self.name)
        await race(
            self._read(channel, changes, liveness),
            heartbeat(
                channel, liveness, clock=self.clock, interval_s=s.heartbeat_s,
                dead_after_s=s.dead_after_s,
            ),
        )  # fmt: skip

    async def _read(self, channel: Channel, changes: ChangeReceiver, liveness: Liveness) -> None:
        credit_left = self.settings.credit_batches
        while True:
            msg = await channel.receive()
            liveness.saw()
            if isinstance(msg, Changes):
                credit_left -= 1
                if credit_left < 0:
                    raise ProtocolError("a batch arrived beyond the credit granted")
                await changes.on_changes(msg)
                await channel.send(Credit(1))
                credit_left += 1
            elif isinstance(msg, Chunk | End | Missing) and self.receiver is not None:
                await self.receiver.on_frame(msg)
            elif isinstance(msg, Ping):
                await channel.send(Pong(t=msg.t))
            elif isinstance(msg, Pong):
                liveness.pong(msg.t)
            else:
                raise ProtocolError(f"unexpected {msg.TYPE} frame from {self.name!r}")
