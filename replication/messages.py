"""The frames of the peer protocol, as values. No I/O and no encoding here.

Each connection is a pull: the dialler sends :class:`Hello`, the listener answers
:class:`Welcome` or :class:`Refuse`; both name the log this node writes (``log_id``).
Then the dialler (the receiver of changes) subscribes and grants credit, and fetches
blobs by hash.

    dialler (receiver)                  listener (sender)
    Hello ------------------------------>
          <------------------------------ Welcome | Refuse
    Subscribe(positions, scope, ...) --->        (again whenever the scope changes)
          <------------------------------ Certs (writers' certificates, once each)
          <------------------------------ Batch ... (one per unit of credit)
    Credit(batches, positions) --------->
    Want(hash, offset), BlobCredit ----->
          <------------------------------ Chunk ... End | Missing
    Ping <------------------------------> Pong   (either side)

A subscription names what the receiver holds of every log it knows (``positions``,
``{log_id: oseq}``) and its scope: ``own`` (only the sender's own log) or ``relay`` (every
log the sender holds except those in ``exclude``, which the receiver pulls from their
writers directly). A :class:`Batch` covers, per log, a range ``(after, last]``, dense or
compacted (:mod:`storage.serve`); its entries are signed by their writers.

The codec (:mod:`replication.codec`) is the only place that turns these into bytes and
validates what arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from storage.rules import NODE_NAME_RE

__all__ = [
    "NODE_NAME_RE",
    "PROTOCOL_VERSION",
    "Batch",
    "BlobCredit",
    "Certs",
    "Chunk",
    "Credit",
    "End",
    "Hello",
    "LogRange",
    "Message",
    "Missing",
    "Ping",
    "Pong",
    "Refuse",
    "Scope",
    "Subscribe",
    "Want",
    "Welcome",
    "WireEntry",
]

PROTOCOL_VERSION = 2

#: Subscription scopes.
Scope: TypeAlias = str
OWN: Scope = "own"
RELAY: Scope = "relay"


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of the dialler: who it claims to be and what it can do.

    The claimed ``node`` must equal the name in the dialler's TLS certificate.
    """

    TYPE: ClassVar[str] = "hello"
    proto: int
    cluster_id: str
    node: str
    caps: tuple[str, ...]
    log_id: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """The listener accepts; ``caps`` is the negotiated set."""

    TYPE: ClassVar[str] = "welcome"
    proto: int
    cluster_id: str
    node: str
    caps: tuple[str, ...]
    log_id: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """The listener refuses the session, with a reason for the dialler's logs."""

    TYPE: ClassVar[str] = "refuse"
    reason: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Send me entries after ``positions`` (``{log_id: oseq}``; a log not named is held
    from 0) for the logs ``scope`` names; you may send ``credit`` batches.

    Sent after the handshake, and again whenever the receiver's scope changes (the
    sender then serves the new subscription; credit granted so far is kept).
    """

    TYPE: ClassVar[str] = "subscribe"
    positions: dict[str, int]
    scope: str
    exclude: tuple[str, ...]
    credit: int


@dataclass(frozen=True, slots=True)
class Credit:
    """The receiver grants ``batches`` more batches and says how far it now holds the
    logs that moved (so the sender knows what it may trim)."""

    TYPE: ClassVar[str] = "credit"
    batches: int
    positions: dict[str, int]


@dataclass(frozen=True, slots=True)
class WireEntry:
    """One signed entry (not a frame: it travels inside a Batch)."""

    log_id: str
    oseq: int
    writer: str
    key_id: str
    body: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class LogRange:
    """What a batch covers of one log: ``(after, last]``, dense or compacted."""

    log_id: str
    after: int
    last: int
    compacted: bool


@dataclass(frozen=True, slots=True)
class Batch:
    """Entries of one or more logs, each log covering its declared range.

    ``lag_entries`` and ``lag_bytes``: what the sender still holds for this receiver
    after this batch (its lag, as the sender sees it).
    """

    TYPE: ClassVar[str] = "batch"
    ranges: tuple[LogRange, ...]
    entries: tuple[WireEntry, ...]
    lag_entries: int
    lag_bytes: int


@dataclass(frozen=True, slots=True)
class Certs:
    """Certificates (DER) of the writers whose entries follow, sent once per session."""

    TYPE: ClassVar[str] = "certs"
    certs: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Want:
    """Send me blob ``hash`` from byte ``offset``."""

    TYPE: ClassVar[str] = "want"
    hash: str
    offset: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes of blob ``hash`` starting at ``offset``."""

    TYPE: ClassVar[str] = "chunk"
    hash: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """Blob ``hash`` is complete; its total size is ``size``."""

    TYPE: ClassVar[str] = "end"
    hash: str
    size: int


@dataclass(frozen=True, slots=True)
class Missing:
    """The sender does not have blob ``hash``."""

    TYPE: ClassVar[str] = "missing"
    hash: str


@dataclass(frozen=True, slots=True)
class BlobCredit:
    """The fetcher grants ``chunks`` more chunk frames."""

    TYPE: ClassVar[str] = "blob_credit"
    chunks: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Heartbeat; ``t`` is echoed back in the Pong."""

    TYPE: ClassVar[str] = "ping"
    t: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping, carrying its ``t``."""

    TYPE: ClassVar[str] = "pong"
    t: int


Message: TypeAlias = (
    Hello
    | Welcome
    | Refuse
    | Subscribe
    | Credit
    | Batch
    | Certs
    | Want
    | Chunk
    | End
    | Missing
    | BlobCredit
    | Ping
    | Pong
)
