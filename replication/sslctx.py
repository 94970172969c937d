"""The SSL contexts of the peer and admin ports, and the peer's name from a TLS session.

The peer port speaks mutual TLS: both sides present a certificate signed by the cluster
CA and verify the other's (``CERT_REQUIRED``), and the dialler checks the hostname, so
passing the peer's node name as ``server_hostname`` verifies *who* answers. The admin
port authenticates the server only. The certificates themselves are made and checked by
:mod:`replication.tls`; this module only builds on them.

Foreign errors (``ssl``, the file system) are translated here into
:class:`~replication.errors.CertificateError` with one sentence naming the file.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from replication.errors import CertificateError
from replication.tls import node_name_from_cert

__all__ = [
    "admin_ssl_context",
    "client_ssl_context",
    "peer_name_from_ssl",
    "server_ssl_context",
]

_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Build the peer port's context: mutual TLS, the client must present a CA-signed cert.

    Args:
        cert: this node's certificate.
        key: this node's private key.
        ca: the cluster CA certificate.

    Returns:
        A TLS 1.2+ server context with ``verify_mode = CERT_REQUIRED``.

    Raises:
        CertificateError: a file is missing or unusable.
    """
    return _peer_context(server=True, cert=cert, key=key, ca=ca)


def client_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Build the dialler's context: present our cert, verify the server against the CA.

    Hostname checking is on. Pass the peer's node name as ``server_hostname`` to verify
    the peer's identity (every node certificate carries ``DNSName(<node>)``).

    Args:
        cert: this node's certificate.
        key: this node's private key.
        ca: the cluster CA certificate.

    Returns:
        A TLS 1.2+ client context.

    Raises:
        CertificateError: a file is missing or unusable.
    """
    ctx = _peer_context(server=False, cert=cert, key=key, ca=ca)
    ctx.check_hostname = True
    return ctx


def admin_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Build the optional admin port context (server authentication only).

    Args:
        cert: the admin certificate (chain) file.
        key: its private key.

    Returns:
        A TLS 1.2+ server context that does not ask clients for certificates.

    Raises:
        CertificateError: a file is missing or unusable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key)
    return ctx


def peer_name_from_ssl(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """Return the node name of the verified peer of a TLS session.

    Only meaningful on sessions made with :func:`server_ssl_context` or
    :func:`client_ssl_context`, which verify the peer certificate against the CA.

    Args:
        ssl_object: the session's SSL object (``transport.get_extra_info("ssl_object")``).

    Returns:
        The peer's node name.

    Raises:
        CertificateError: no TLS session, no peer certificate, or no valid name in it.
    """
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise CertificateError("the peer presented no TLS certificate")
    return node_name_from_cert(der)


# -- helpers --------------------------------------------------------------------------


def _peer_context(*, server: bool, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # 1.3 is negotiated whenever both can
    ctx.set_ciphers(_TLS12_CIPHERS)  # TLS 1.2 only: forward secrecy and AEAD
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, cert, key)
    if not ca.is_file():
        raise CertificateError(f"CA certificate {ca} does not exist")
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ValueError) as e:
        raise CertificateError(f"cannot load CA certificate {ca}: {e}") from e
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    for path in (cert, key):
        if not path.is_file():
            raise CertificateError(f"TLS file {path} does not exist")
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise CertificateError(f"cannot load certificate {cert} with key {key}: {e}") from e
