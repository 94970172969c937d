"""Replication errors. msgpack errors are translated in the codec, TLS in tls.py.

ReplicationError
├── ProtocolError    a frame that is malformed, too large, too deep or unexpected:
│                    the channel is closed and nothing is applied
├── HandshakeError   protocol version / cluster id / identity mismatch
└── CertificateError bad or unreadable certificate material
"""

from __future__ import annotations

__all__ = ["CertificateError", "HandshakeError", "ProtocolError", "ReplicationError"]


class ReplicationError(Exception):
    """Base of replication failures."""


class ProtocolError(ReplicationError):
    """A peer sent something the protocol does not allow."""


class HandshakeError(ReplicationError):
    """The peers cannot talk: version, cluster id or identity mismatch."""


class CertificateError(ReplicationError):
    """Certificate material is missing, malformed or does not fit its use."""
