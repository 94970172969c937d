"""The cluster's PKI: the CA, node certificates, and the names and ids read from them.

One CA per cluster signs a short-lived certificate per node. A node's name lives in its
certificate (a URI SAN ``urn:cairn:node:<name>``, with the subject CN as fallback), so the
name of a peer is read from the TLS session and never from a frame. Every node
certificate also carries ``DNSName(<name>)``, so a dialler can pass the peer's node name
as ``server_hostname`` and let hostname checking verify *who* answers, whatever address
it dialled. The cluster id is derived from the CA certificate and needs no configuration.

The SSL contexts of the peer and admin ports, and reading the peer's name from a TLS
session, live in :mod:`replication.sslctx`, which builds on this module.

Foreign errors (``cryptography``, the file system) are translated here into
:class:`~replication.errors.CertificateError` with one sentence naming the file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from replication.errors import CertificateError
from replication.messages import NODE_NAME_RE

__all__ = [
    "NODE_URI_PREFIX",
    "CAFiles",
    "NodeCertFiles",
    "check_node_credentials",
    "cluster_id_for_ca",
    "init_ca",
    "issue_node_cert",
    "load_node_pair",
    "node_name_from_cert",
]

NODE_URI_PREFIX = "urn:cairn:node:"

_CA_CERT = "ca.pem"
_CA_KEY = "ca.key"
# Certificates start a little in the past so a peer whose clock lags still accepts them.
_BACKDATE = timedelta(minutes=5)
# A reused node certificate must stay valid at least this long, else it is reissued.
_MIN_REMAINING = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class CAFiles:
    """Where the cluster CA lives."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class NodeCertFiles:
    """A node's certificate and key files."""

    node: str
    cert: Path
    key: Path


# -- creating material ----------------------------------------------------------------


def init_ca(ca_dir: Path, *, common_name: str = "cairn cluster CA", days: int = 3650) -> CAFiles:
    """Create the cluster CA in ``ca_dir``, or reuse the one already there.

    Args:
        ca_dir: directory for ``ca.pem`` and ``ca.key`` (created if missing).
        common_name: subject CN of a new CA.
        days: validity of a new CA.

    Returns:
        The paths of the CA certificate and key.

    Raises:
        CertificateError: only one of the two files exists, or the existing pair is unusable.
    """
    files = CAFiles(ca_dir / _CA_CERT, ca_dir / _CA_KEY)
    have_cert, have_key = files.cert.exists(), files.key.exists()
    if have_cert and have_key:
        _load_pair(files.cert, files.key, "CA certificate")
        return files
    if have_cert or have_key:
        present, absent = (files.cert, files.key) if have_cert else (files.key, files.cert)
        raise CertificateError(
            f"CA directory {ca_dir} has {present.name} but no {absent.name}; "
            "restore it or remove both to create a new CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = _sign(
        name,
        name,
        key,
        key,
        now - _BACKDATE,
        now + timedelta(days=days),
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (_key_usage(ca=True), True),
        ],
    )
    _write_pair(ca_dir, files, cert, key)
    return files


def issue_node_cert(
    ca_dir: Path,
    out_dir: Path,
    node: str,
    hosts: Sequence[str],
    *,
    days: int = 30,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    force: bool = False,
) -> NodeCertFiles:
    """Issue ``<node>.pem`` and ``<node>.key`` in ``out_dir``, signed by the CA in ``ca_dir``.

    Existing files are reused when they are valid for this node and CA, cover ``hosts`` and
    stay valid for at least another day, unless ``force`` or an explicit validity is given.

    Args:
        ca_dir: directory made by :func:`init_ca`.
        out_dir: where to write the node's files (created if missing).
        node: node name, ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``.
        hosts: IP addresses and DNS names the node is reached at.
        days: validity of a new certificate.
        not_before: explicit start of validity (for tests: not-yet-valid certificates).
        not_after: explicit end of validity (for tests: expired certificates).
        force: always issue a new certificate and key.

    Returns:
        The node's certificate and key paths.

    Raises:
        CertificateError: bad node name or host, unusable CA, or an empty validity window.
    """
    if not NODE_NAME_RE.fullmatch(node):
        raise CertificateError(
            f"node name {node!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    sans = [_host_san(h) for h in hosts]
    sans += [x509.DNSName(node), x509.UniformResourceIdentifier(NODE_URI_PREFIX + node)]
    ca = CAFiles(ca_dir / _CA_CERT, ca_dir / _CA_KEY)
    files = NodeCertFiles(node, out_dir / f"{node}.pem", out_dir / f"{node}.key")
    if files.cert.resolve() == ca.cert.resolve() or files.key.resolve() == ca.key.resolve():
        raise CertificateError(f"node name {node!r} would overwrite the CA files in {ca_dir}")
    explicit = not_before is not None or not_after is not None
    if not (force or explicit) and _reusable(files, ca, sans):
        return files

    ca_cert, ca_key = _load_pair(ca.cert, ca.key, "CA certificate")
    now = datetime.now(UTC)
    start = _utc(not_before) if not_before is not None else now - _BACKDATE
    end = _utc(not_after) if not_after is not None else now + timedelta(days=days)
    if not_before is None and end <= start:  # an expired certificate was asked for
        start = end - timedelta(days=days)
    if end <= start:
        raise CertificateError(f"certificate for {node!r} would expire before it starts")
    key = ec.generate_private_key(ec.SECP256R1())
    eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = _sign(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]),
        ca_cert.subject,
        key,
        ca_key,
        start,
        end,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_key_usage(ca=False), True),
            (x509.ExtendedKeyUsage(eku), False),
            (x509.SubjectAlternativeName(sans), False),
        ],
    )
    _write_pair(out_dir, files, cert, key)
    return files


# -- reading and checking material ----------------------------------------------------


def node_name_from_cert(der_or_pem: bytes) -> str:
    """Return the node name a certificate was issued for.

    Args:
        der_or_pem: the certificate, DER or PEM.

    Returns:
        The name from the ``urn:cairn:node:`` URI SAN, else from the subject CN.

    Raises:
        CertificateError: the bytes are not a certificate or name no valid node.
    """
    return _name_of(_parse_cert(der_or_pem))


def load_node_pair(cert: Path, key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load a node's certificate and its matching private key.

    Raises:
        CertificateError: unreadable, not PEM, or the key does not match.
    """
    return _load_pair(cert, key, "certificate")


def cluster_id_for_ca(ca_pem: bytes) -> str:
    """Return the cluster id: the first 16 hex chars of sha256 over the CA certificate DER.

    Args:
        ca_pem: the CA certificate (PEM, or DER).

    Returns:
        16 lowercase hex characters.

    Raises:
        CertificateError: the bytes are not a certificate.
    """
    der = _parse_cert(ca_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()[:16]


def check_node_credentials(
    cert: Path, key: Path, ca: Path, node_name: str, *, now: datetime | None = None
) -> None:
    """Check at start that a node's TLS material is usable, before anything listens.

    Args:
        cert: the node certificate.
        key: the node's private key.
        ca: the cluster CA certificate.
        node_name: the configured ``node.name``.
        now: the time to check validity at (default: now).

    Raises:
        CertificateError: one sentence naming the file and the problem: missing,
            unreadable or not PEM; key and certificate do not match; not signed by the
            CA; expired or not yet valid; issued for another node.
    """
    at = _utc(now) if now is not None else datetime.now(UTC)
    ca_cert = _load_cert(ca, "CA certificate")
    node_cert, _ = _load_pair(cert, key, "certificate")
    try:
        node_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise CertificateError(f"certificate {cert} is not signed by the cluster CA {ca}") from e
    _check_validity(ca_cert, ca, "CA certificate", at)
    _check_validity(node_cert, cert, "certificate", at)
    name = _name_of(node_cert, cert)
    if name != node_name:
        raise CertificateError(
            f"certificate {cert} is for node {name!r}, but node.name is {node_name!r}"
        )


# -- helpers --------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise CertificateError(f"{what} {path} does not exist") from e
    except OSError as e:
        raise CertificateError(f"{what} {path} cannot be read: {e.strerror}") from e


def _load_cert(path: Path, what: str) -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise CertificateError(f"{what} {path} is not a PEM certificate") from e


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read(path, "key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise CertificateError(f"key {path} is encrypted; cairn needs an unencrypted key") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"key {path} is not a PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"key {path} is not an EC private key")
    return key


def _parse_cert(data: bytes) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise CertificateError("the data is not an X.509 certificate") from e


def _load_pair(
    cert_path: Path, key_path: Path, what: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert, key = _load_cert(cert_path, what), _load_key(key_path)
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise CertificateError(f"key {key_path} does not match certificate {cert_path}")
    return cert, key


def _check_validity(cert: x509.Certificate, path: Path, what: str, at: datetime) -> None:
    if at < cert.not_valid_before_utc:
        since = cert.not_valid_before_utc.isoformat(timespec="seconds")
        raise CertificateError(f"{what} {path} is not valid before {since}")
    if at > cert.not_valid_after_utc:
        until = cert.not_valid_after_utc.isoformat(timespec="seconds")
        raise CertificateError(f"{what} {path} expired on {until}")


def _name_of(cert: x509.Certificate, path: Path | None = None) -> str:
    where = f"certificate {path}" if path is not None else "the certificate"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except ValueError as e:  # a malformed extension from a foreign certificate
        raise CertificateError(f"{where} has a malformed extension") from e
    names = [u.removeprefix(NODE_URI_PREFIX) for u in uris if u.startswith(NODE_URI_PREFIX)]
    if not names:
        names = [
            a.value
            for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(a.value, str)
        ]
    if len(names) != 1 or not NODE_NAME_RE.fullmatch(names[0]):
        raise CertificateError(f"{where} does not name exactly one valid cairn node")
    return names[0]


def _reusable(files: NodeCertFiles, ca: CAFiles, sans: Sequence[x509.GeneralName]) -> bool:
    if not (files.cert.exists() and files.key.exists()):
        return False
    try:
        check_node_credentials(files.cert, files.key, ca.cert, files.node)
        cert = _load_cert(files.cert, "certificate")
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (CertificateError, x509.ExtensionNotFound):
        return False
    remaining = cert.not_valid_after_utc - datetime.now(UTC)
    return remaining > _MIN_REMAINING and all(s in have for s in sans)


def _host_san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or not host.isascii() or any(c.isspace() or c in "/@:" for c in host):
        raise CertificateError(f"host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # Positional: digital_signature, content_commitment, key_encipherment, data_encipherment,
    # key_agreement, key_cert_sign, crl_sign, encipher_only, decipher_only.
    return x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False)


def _sign(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    start: datetime,
    end: datetime,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    # Key identifiers on every certificate: OpenSSL's X509_STRICT verification wants them.
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(
    directory: Path,
    files: CAFiles | NodeCertFiles,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically, with ``mode`` set before any byte lands (keys are never readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by umask and ignored for old files
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if fd != -1:
            os.close(fd)
        tmp.unlink(missing_ok=True)
