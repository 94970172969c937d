"""Signing a node's change entries, and verifying other nodes' (as a keyring).

Every entry a node writes is signed with the private key of its cluster certificate
(ECDSA P-256, SHA-256), so any node can check who wrote it, also when a third node
relays it (DESIGN-NOTES: "a session vouches for the link, not for the rows on it"). An
entry names the key that signed it by a key id (:func:`storage.entries.key_id_of`, a
digest of the certificate); senders send the certificates behind the key ids they send
(a ``Certs`` frame), and the :class:`Keyring` accepts a certificate only if the cluster
CA issued it, keeping it by key id (in memory and in the ``certs`` table).

A signature is good when the key id names a certificate the CA issued for the entry's
writer, valid (give or take a day of clock skew) at the time the entry says it was
written, and the signature verifies over the entry body. cryptography's exceptions are
translated here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from replication.errors import CertificateError
from replication.tls import load_node_pair, node_name_from_cert
from storage.entries import key_id_of

__all__ = ["Keyring", "KnownCert", "NodeSigner"]

log = structlog.get_logger(__name__)

_SKEW: Final = timedelta(days=1)
_ALGORITHM: Final = ec.ECDSA(hashes.SHA256())


class NodeSigner:
    """Signs with this node's certificate key (the ``Signer`` storage expects)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert_der: bytes) -> None:
        self._key = key
        self.cert_der = cert_der
        self._key_id = key_id_of(cert_der)

    @classmethod
    def load(cls, cert: Path, key: Path) -> NodeSigner:
        """Load the node's certificate and key (raises CertificateError)."""
        node_cert, node_key = load_node_pair(cert, key)
        return cls(node_key, node_cert.public_bytes(serialization.Encoding.DER))

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message, _ALGORITHM)


@dataclass(frozen=True, slots=True)
class KnownCert:
    """A member certificate the CA issued: whose it is, when it is valid, its key."""

    key_id: str
    node: str
    der: bytes
    not_before_ms: int
    not_after_ms: int
    public_key: ec.EllipticCurvePublicKey


class Keyring:
    """Member certificates by key id, each checked against the cluster CA once.

    Args:
        ca_pem: the cluster CA certificate.
    """

    def __init__(self, ca_pem: bytes) -> None:
        try:
            self._ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError as e:
            raise CertificateError("the cluster CA certificate is not PEM") from e
        self._known: dict[str, KnownCert] = {}

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._known

    def get(self, key_id: str) -> KnownCert | None:
        return self._known.get(key_id)

    def all(self) -> list[KnownCert]:
        return list(self._known.values())

    def add(self, der: bytes) -> KnownCert:
        """Accept a certificate if the cluster CA issued it for a node.

        Raises:
            CertificateError: not a certificate, not issued by the CA, or names no node.
        """
        key_id = key_id_of(der)
        known = self._known.get(key_id)
        if known is not None:
            return known
        try:
            cert = x509.load_der_x509_certificate(der)
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CertificateError("certificate not issued by the cluster CA") from e
        public_key = cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise CertificateError("member certificates carry EC keys")
        known = KnownCert(
            key_id=key_id,
            node=node_name_from_cert(der),
            der=der,
            not_before_ms=int((cert.not_valid_before_utc - _SKEW).timestamp() * 1000),
            not_after_ms=int((cert.not_valid_after_utc + _SKEW).timestamp() * 1000),
            public_key=public_key,
        )
        self._known[key_id] = known
        return known

    def verify(
        self, *, writer: str, key_id: str, message: bytes, sig: bytes, at_ms: int
    ) -> str | None:
        """None when ``sig`` is ``writer``'s signature of ``message``; else why not."""
        known = self._known.get(key_id)
        if known is None:
            return f"unknown key {key_id[:32]}"
        if known.node != writer:
            return f"key {key_id} belongs to {known.node}, not {writer}"
        if at_ms and not known.not_before_ms <= at_ms <= known.not_after_ms:
            when = _iso(at_ms)
            return f"{writer}'s certificate {key_id} was not valid at {when}"
        try:
            known.public_key.verify(sig, message, _ALGORITHM)
        except InvalidSignature:
            return f"bad signature by {writer}"
        return None


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
