"""Change entries: the signed unit of replication.

Every write to a replicated table is one entry in its writer's change log. The entry's
*body* is a msgpack array, signed as it is by the writer's node key::

    [1, log_id, oseq, writer, tbl, key, version, op, data, user, t]

``log_id`` names the writer's log: ``<writer>/<32 random hex digits>``, made with its
database. A log id names its writer, so no node can claim another node's log, and a
node rebuilt from an empty data directory starts a new log. ``oseq`` is the
entry's position in that log (1, 2, 3, ...), ``writer`` the node that wrote it,
``version`` the hybrid-clock version of the write, ``data`` the row (or the batch of
events) it wrote, ``user`` who asked for it and ``t`` when (epoch ms). Receivers verify
the signature over the body bytes exactly as they arrived, then decode them: nothing is
re-encoded, so there is no canonical form to get wrong, and a row stores the body and
signature of the entry that wrote it, so it can be sent on (relayed, or as part of a
compacted catch-up) and verified by any node.

A body is at most :data:`MAX_ENTRY_BYTES`: writers keep every unit under it by
construction (event batches are split by size, hook lines and messages are capped), so
one entry always fits in one frame.

Signing and verification are seams (:class:`Signer`, :class:`Verifier`): storage never
touches keys or certificates; replication provides both. A node without a cluster
certificate signs nothing (:data:`UNSIGNED`); it re-signs its rows once it has a key.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Final, Protocol

from storage.packing import PackError, PackLimits, pack, unpack
from storage.rules import NODE_NAME_RE

__all__ = [
    "ENTRY_FORMAT",
    "MAX_ENTRY_BYTES",
    "OPS",
    "UNSIGNED",
    "UNSIGNED_KEY_ID",
    "Entry",
    "EntryError",
    "SignedEntry",
    "Signer",
    "Verifier",
    "decode_body",
    "encode_body",
    "is_log_id",
    "key_id_of",
    "log_writer",
    "new_log_id",
    "signing_message",
]

ENTRY_FORMAT: Final = 1
#: The largest entry body a writer produces and a receiver accepts.
MAX_ENTRY_BYTES: Final = 256 * 1024
#: Operations an entry may carry: a row write, or a batch of deployment events.
OPS: Final = frozenset({"upsert", "append"})
#: The key id of an entry written by a node that had no cluster key.
UNSIGNED_KEY_ID: Final = "unsigned"
_CONTEXT: Final = b"cairn change entry v1\x00"
_LIMITS: Final = PackLimits(max_bytes=MAX_ENTRY_BYTES, max_depth=12, max_items=20_000)
_HEX = frozenset("0123456789abcdef")


class EntryError(ValueError):
    """An entry body that cannot be decoded into a well-formed :class:`Entry`."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded change entry."""

    log_id: str
    oseq: int
    writer: str
    tbl: str
    key: str
    version: int
    op: str
    data: Any
    user: str | None
    t: int


@dataclass(frozen=True, slots=True)
class SignedEntry:
    """An entry as it is stored and sent: where it sits (log, position, writer: routing
    in the clear, which the body repeats under the signature), the key id, the body
    bytes and the signature."""

    log_id: str
    oseq: int
    writer: str
    key_id: str
    body: bytes
    sig: bytes


class Signer(Protocol):
    """This node's signing key (the private key of its cluster certificate)."""

    @property
    def key_id(self) -> str:
        """Identifies the certificate whose key signs (see :func:`key_id_of`)."""
        ...

    def sign(self, message: bytes) -> bytes:
        """Sign ``message``."""
        ...


class Verifier(Protocol):
    """Checks that an entry was signed by its writer's cluster certificate."""

    def verify(
        self, *, writer: str, key_id: str, message: bytes, sig: bytes, at_ms: int
    ) -> str | None:
        """None when the signature is good; otherwise why it is not (one line)."""
        ...


class _Unsigned:
    key_id = UNSIGNED_KEY_ID

    def sign(self, message: bytes) -> bytes:
        return b""


UNSIGNED: Final[Signer] = _Unsigned()


def key_id_of(cert_der: bytes) -> str:
    """The key id of a certificate: the first 32 hex digits of its DER's sha256."""
    return hashlib.sha256(cert_der).hexdigest()[:32]


def new_log_id(writer: str) -> str:
    """A fresh log id for ``writer``: ``<writer>/<32 random hex digits>``."""
    return f"{writer}/{secrets.token_hex(16)}"


def log_writer(log_id: str) -> str:
    """The writer a log id names."""
    return log_id.partition("/")[0]


def is_log_id(value: object) -> bool:
    """True for a well-formed log id (a node name, ``/``, 32 lowercase hex digits)."""
    if not isinstance(value, str):
        return False
    writer, slash, rand = value.partition("/")
    return (
        slash == "/"
        and NODE_NAME_RE.fullmatch(writer) is not None
        and len(rand) == 32
        and set(rand) <= _HEX
    )


def signing_message(body: bytes) -> bytes:
    """What a signature covers: a fixed context, then the body."""
    return _CONTEXT + body


def encode_body(e: Entry) -> bytes:
    """The body bytes of ``e``.

    Raises:
        EntryError: the entry cannot be encoded or is larger than MAX_ENTRY_BYTES.
    """
    try:
        body = pack(
            [ENTRY_FORMAT, e.log_id, e.oseq, e.writer, e.tbl, e.key, e.version, e.op, e.data,
             e.user, e.t]
        )  # fmt: skip
    except PackError as err:
        raise EntryError(str(err)) from err
    if len(body) > MAX_ENTRY_BYTES:
        raise EntryError(
            f"{e.tbl} entry {e.key!r} is {len(body)} bytes, over the {MAX_ENTRY_BYTES} limit"
        )
    return body


def decode_body(body: bytes) -> Entry:
    """Decode and check the envelope of an entry body (the row inside is checked by
    the table rules, not here).

    Raises:
        EntryError: malformed, too large, or a field of the wrong type or range.
    """
    try:
        value = unpack(body, _LIMITS)
    except PackError as e:
        raise EntryError(f"malformed entry: {e}") from e
    if not isinstance(value, list) or len(value) != 11 or value[0] != ENTRY_FORMAT:
        raise EntryError("an entry must be an array of 11 fields in format 1")
    _, log_id, oseq, writer, tbl, key, version, op, data, user, t = value
    if not is_log_id(log_id):
        raise EntryError("entry log_id must be <node>/<32 hex digits>")
    for name, number in (("oseq", oseq), ("version", version), ("t", t)):
        if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
            raise EntryError(f"entry {name} must be a positive integer")
    if not isinstance(writer, str) or log_writer(log_id) != writer:
        raise EntryError("entry writer must be the node its log id names")
    if not isinstance(tbl, str) or not isinstance(key, str) or not 0 < len(key) <= 512:
        raise EntryError("entry table and key must be strings (key at most 512 characters)")
    if op not in OPS:
        raise EntryError(f"entry op must be one of {', '.join(sorted(OPS))}")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise EntryError("entry user must be a string of at most 256 characters")
    return Entry(log_id, oseq, writer, tbl, key, version, op, data, user, t)
