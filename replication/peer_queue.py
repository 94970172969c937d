"""The per-peer pull loop: dial, handshake, subscribe, apply, back off.

This node is the receiver on the channel it dials. After the handshake (which names the
log each side writes) it subscribes with what it holds of every log, in the scope the
service decides (:meth:`ReplicationService.scope_for`): the peer's own log only, or, on
the one link chosen as relay, every log the peer holds except those this node pulls from
their writers directly. Each ``Batch`` is applied by :func:`storage.apply.apply_batch`
in one transaction under the peer's name as the channel authenticated it (never a name
from a frame), then one batch of credit goes back with the positions reached. A batch
whose range starts past what this node holds (a gap) is not applied for that log and
the subscription is renewed from the true positions; a structurally broken batch is a
protocol violation that closes the channel, and the next session resumes from the
stored positions.

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
from replication.errors import CertificateError, HandshakeError, ProtocolError, ReplicationError
from replication.handshake import check_welcome, client_hello
from replication.messages import (
    Batch,
    Certs,
    Chunk,
    Credit,
    End,
    Missing,
    Ping,
    Pong,
    Subscribe,
)
from replication.session import CAPS, Clock, Liveness, Settings, heartbeat, race, uncancelled
from replication.signing import Keyring
from storage.apply import ApplyReport, InvalidBatch, Range, apply_batch
from storage.blobs import BlobStore
from storage.entries import SignedEntry
from storage.errors import StorageError
from storage.store import Store

__all__ = ["Backoff", "ChangeReceiver", "PeerQueue", "PeerState", "PeerStats"]

log = structlog.get_logger(__name__)

#: The scope of a subscription: ``(scope, exclude)``.
ScopeFor = Callable[[str], tuple[str, tuple[str, ...]]]


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

    lag_entries: int | None = None
    lag_bytes: int | None = None
    batches_received: int = 0
    entries_received: int = 0
    entries_applied: int = 0
    quarantined: int = 0
    refused: int = 0
    parked: int = 0
    blob_bytes_received: int = 0
    #: Why the channel is down or the last attempt failed; cleared once it is up.
    last_error: str | None = None
    last_error_at_ms: int | None = None
    connected_at_ms: int | None = None
    #: Sessions that were up and then lost (a flapping peer shows here).
    disconnects: int = 0
    #: The log the peer writes, and when it last changed (a rebuilt data directory).
    log_id: str | None = None
    log_changed_at_ms: int | None = None


class ChangeReceiver:
    """Applies one sender's batches to the store (the protocol layer, without I/O).

    Args:
        store: this node's store.
        peer: the sender's authenticated node name.
        peer_log_id: the log the sender writes (its entries need no signature check).
        stats: counters to update.
        keyring: verifies relayed entries' signatures.
        max_clock_offset_ms: versions further ahead than this are parked.
    """

    def __init__(
        self,
        store: Store,
        peer: str,
        peer_log_id: str,
        stats: PeerStats,
        *,
        keyring: Keyring | None,
        max_clock_offset_ms: int,
    ) -> None:
        self.store = store
        self.peer = peer
        self.peer_log_id = peer_log_id
        self.stats = stats
        self.keyring = keyring
        self.max_clock_offset_ms = max_clock_offset_ms

    async def on_batch(self, batch: Batch) -> ApplyReport:
        """Apply ``batch`` and the positions it reaches in one transaction.

        Raises:
            ProtocolError: the batch's structure is wrong (nothing of it is applied).
            StorageError: the database failed (nothing of it is applied).
        """
        ranges = [Range(r.log_id, r.after, r.last, r.compacted) for r in batch.ranges]
        entries = [
            SignedEntry(e.log_id, e.oseq, e.writer, e.key_id, e.body, e.sig) for e in batch.entries
        ]
        try:
            report = await uncancelled(
                apply_batch(
                    self.store, self.peer, ranges, entries, verifier=self.keyring,
                    direct_log=self.peer_log_id, max_clock_offset_ms=self.max_clock_offset_ms,
                )
            )  # fmt: skip
        except InvalidBatch as e:
            raise ProtocolError(f"{self.peer!r} sent a malformed batch: {e}") from e
        s = self.stats
        s.batches_received += 1
        s.entries_received += len(entries)
        s.entries_applied += report.applied
        s.parked += report.parked
        s.quarantined += sum(1 for r in report.refusals if r.quarantined)
        s.refused += sum(1 for r in report.refusals if not r.quarantined)
        s.lag_entries = batch.lag_entries
        s.lag_bytes = batch.lag_bytes
        return report


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
        settings: credits, heartbeats, backoff bounds, clock offset.
        clock: the clock seam.
        rng: randomness for backoff jitter.
        keyring: member certificates (relayed entries are verified against them).
        scope_for: the subscription scope for this peer, asked at every (re)subscribe.
        on_change: called with the peer's name when the channel comes up or goes down.
        on_certs: called with certificates the peer sent (after the keyring took them).
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
        keyring: Keyring | None = None,
        scope_for: ScopeFor = lambda _name: ("own", ()),
        on_change: Callable[[str], None] = lambda _name: None,
        on_certs: Callable[[list[bytes]], None] = lambda _ders: None,
        stats: PeerStats | None = None,
    ) -> None:
        self.name, self.url = name, url
        self.node, self.cluster_id = node, cluster_id
        self.store, self.blobs = store, blobs
        self.transport = transport
        self.settings, self.clock, self.rng = settings, clock, rng
        self.keyring = keyring
        self.scope_for = scope_for
        self.on_change = on_change
        self.on_certs = on_certs
        self.state = PeerState.CONNECTING
        self.stats = stats if stats is not None else PeerStats()
        self.liveness: Liveness | None = None
        self.receiver: BlobReceiver | None = None  # set while connected
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self.attempt = 0
        self.peer_log_id: str | None = None
        #: Set once a batch said there was nothing more to send (this session).
        self.caught_up = asyncio.Event()
        self._channel: Channel | None = None
        self._scope: tuple[str, tuple[str, ...]] | None = None
        self._excluded: set[str] = set()

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
            error, reason, protocol_error = f"protocol error: {e}", str(e)[:100], True
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
            self._channel = None
            self.caught_up.clear()
            if self.receiver is not None:
                self.receiver.close(f"channel to {self.name!r} ended")
                self.receiver = None
            if was_up:
                self.on_change(self.name)
            await channel.close(reason, protocol_error=protocol_error)
        return error, was_up

    async def resubscribe(self) -> None:
        """Renew the subscription on the live channel if its scope changed."""
        channel = self._channel
        if channel is None:
            return
        scope = self.scope_for(self.name)
        if scope == self._scope:
            return
        await self._subscribe(channel, credit=0)

    async def _subscribe(self, channel: Channel, *, credit: int) -> None:
        # A new scope (this peer became the relay, say) serves logs not yet here: not
        # caught up with it until its answer to this subscription says so.
        self.caught_up.clear()
        scope, exclude = self._scope = self.scope_for(self.name)
        positions = self.store.logs.positions()
        if self.peer_log_id is not None and self.peer_log_id in positions:
            # From the writer itself, ask again for what only a relay vouched for.
            positions[self.peer_log_id] = self.store.logs.sent_position(
                self.peer_log_id, from_writer=True
            )
        await channel.send(
            Subscribe(
                positions=positions, scope=scope,
                exclude=tuple(sorted({*exclude, *self._excluded})), credit=credit,
            )
        )  # fmt: skip

    async def _session(self, channel: Channel) -> None:
        s = self.settings
        liveness = self.liveness = Liveness(self.clock)
        async with asyncio.timeout(s.dead_after_s):
            await channel.send(client_hello(self.node, self.cluster_id, CAPS, self.store.log_id))
            welcome = check_welcome(
                await channel.receive(), expected_node=self.name, cluster_id=self.cluster_id,
                authenticated_peer=channel.peer, caps=CAPS,
            )  # fmt: skip
        liveness.saw()
        self._note_log(welcome.log_id)
        self._excluded = set()
        changes = ChangeReceiver(
            self.store, self.name, welcome.log_id, self.stats, keyring=self.keyring,
            max_clock_offset_ms=int(s.max_clock_offset_s * 1000),
        )  # fmt: skip
        if "blobs" in welcome.caps:
            self.receiver = BlobReceiver(
                channel, self.blobs, chunk_credit=s.chunk_credit,
                max_transfers=s.max_transfers, on_bytes=self._bytes_in,
            )  # fmt: skip
        self._channel = channel
        self.state = PeerState.CONNECTED
        self.stats.connected_at_ms = self.clock.wall_ms()
        self.stats.last_error = None  # a stale error next to "connected" would mislead
        log.info("peer_connected", peer=self.name, url=self.url, log_id=welcome.log_id)
        self.on_change(self.name)
        await self._subscribe(channel, credit=s.credit_batches)
        await race(
            self._read(channel, changes, liveness),
            heartbeat(
                channel, liveness, clock=self.clock, interval_s=s.heartbeat_s,
                dead_after_s=s.dead_after_s,
            ),
        )  # fmt: skip

    def _note_log(self, log_id: str) -> None:
        if self.stats.log_id is not None and self.stats.log_id != log_id:
            # The peer's data directory was rebuilt: its new log starts from nothing,
            # and what it wrote before is still held (and relayed) by the others.
            self.stats.log_changed_at_ms = self.clock.wall_ms()
            log.warning("peer_log_changed", peer=self.name, old=self.stats.log_id, new=log_id)
        self.stats.log_id = log_id
        self.peer_log_id = log_id

    async def _read(self, channel: Channel, changes: ChangeReceiver, liveness: Liveness) -> None:
        credit_left = self.settings.credit_batches
        while True:
            msg = await channel.receive()
            liveness.saw()
            if isinstance(msg, Batch):
                credit_left -= 1
                if credit_left < 0:
                    raise ProtocolError("a batch arrived beyond the credit granted")
                report = await changes.on_batch(msg)
                moved = {r.log_id: self.store.logs.head(r.log_id) for r in msg.ranges}
                await channel.send(Credit(1, moved))
                credit_left += 1
                if report.gaps or any(not r.quarantined for r in report.refusals):
                    await self._renew(channel, report)
                elif msg.lag_entries == 0:
                    self.caught_up.set()
            elif isinstance(msg, Certs):
                self._take_certs(list(msg.certs))
            elif isinstance(msg, Chunk | End | Missing) and self.receiver is not None:
                await self.receiver.on_frame(msg)
            elif isinstance(msg, Ping):
                await channel.send(Pong(t=msg.t))
            elif isinstance(msg, Pong):
                liveness.pong(msg.t)
            else:
                raise ProtocolError(f"unexpected {msg.TYPE} frame from {self.name!r}")

    async def _renew(self, channel: Channel, report: ApplyReport) -> None:
        """After a gap or a refused entry: ask again from what this node holds, and stop
        taking a log from this peer that it keeps sending refused entries of."""
        for refusal in report.refusals:
            if not refusal.quarantined:
                if refusal.log_id == self.peer_log_id:
                    raise ProtocolError(f"{self.name!r} sent its own entries unsigned by it")
                self._excluded.add(refusal.log_id)
        log.info("subscription_renewed", peer=self.name, gaps=report.gaps,
                 excluded=sorted(self._excluded))  # fmt: skip
        await self._subscribe(channel, credit=0)

    def _take_certs(self, ders: list[bytes]) -> None:
        if self.keyring is None:
            return
        accepted = []
        for der in ders:
            try:
                self.keyring.add(der)
            except CertificateError as e:
                log.warning("peer_cert_refused", peer=self.name, error=str(e))
                continue
            accepted.append(der)
        if accepted:
            self.on_certs(accepted)
