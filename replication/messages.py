"""The frames of the peer protocol, as values. No I/O and no encoding here.

Each connection is a pull: the dialler sends :class:`Hello`, the listener answers
:class:`Welcome` or :class:`Refuse`; then the dialler (the receiver of changes)
subscribes to the listener's change log and grants credit, and fetches blobs by hash.

    dialler (receiver)                  listener (sender)
    Hello ------------------------------>
          <------------------------------ Welcome | Refuse
    Subscribe(after_seq, credit) ------->
          <------------------------------ Changes ... (one per batch of credit)
    Credit(batches) -------------------->
    Want(hash, offset), BlobCredit ----->
          <------------------------------ Chunk ... End | Missing
    Ping <------------------------------> Pong   (either side)

The codec (:mod:`replication.codec`) is the only place that turns these into bytes and
validates what arrives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

__all__ = [
    "NODE_NAME_RE",
    "OPS",
    "PROTOCOL_VERSION",
    "BlobCredit",
    "ChangeEntry",
    "Changes",
    "Chunk",
    "Credit",
    "End",
    "Hello",
    "Message",
    "Missing",
    "Ping",
    "Pong",
    "Refuse",
    "Subscribe",
    "Want",
    "Welcome",
]

PROTOCOL_VERSION = 1
# "append" is how a batch of deployment events travels (storage logs it so).
OPS = frozenset({"upsert", "delete", "append"})
# A node name, as in node.name, certificates and frames; match it with ``fullmatch``.
NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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


@dataclass(frozen=True, slots=True)
class Welcome:
    """The listener accepts; ``caps`` is the negotiated set."""

    TYPE: ClassVar[str] = "welcome"
    proto: int
    cluster_id: str
    node: str
    caps: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Refuse:
    """The listener refuses the session, with a reason for the dialler's logs."""

    TYPE: ClassVar[str] = "refuse"
    reason: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Send me your changes after ``after_seq``; you may send ``credit`` batches."""

    TYPE: ClassVar[str] = "subscribe"
    after_seq: int
    credit: int


@dataclass(frozen=True, slots=True)
class Credit:
    """The receiver grants ``batches`` more change batches."""

    TYPE: ClassVar[str] = "credit"
    batches: int


@dataclass(frozen=True, slots=True)
class ChangeEntry:
    """One entry of the sender's change log (not a frame: it travels inside Changes)."""

    seq: int
    tbl: str
    key: str
    version: int
    origin: str
    op: str  # "upsert" or "delete"
    data: dict[str, Any] | list[Any] | None
    user: str | None
    t: int


@dataclass(frozen=True, slots=True)
class Changes:
    """A batch of change-log entries in seq order.

    The batch covers the sender's log range ``(after_seq, last_seq]``: ``last_seq`` is
    the receiver's next cursor (it may pass entries the sender skipped) and
    ``after_seq`` lets the receiver see a gap (a batch that starts past its cursor).
    ``head_seq`` is the sender's newest seq and ``lag_bytes`` the change-data bytes the
    sender still holds for this receiver after ``last_seq``: together, the lag.
    """

    TYPE: ClassVar[str] = "changes"
    entries: tuple[ChangeEntry, ...]
    last_seq: int
    head_seq: int
    after_seq: int = 0
    lag_bytes: int = 0


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
    | Changes
    | Want
    | Chunk
    | End
    | Missing
    | BlobCredit
    | Ping
    | Pong
)
