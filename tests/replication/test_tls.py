"""The cluster PKI and the peer port's mutual TLS, with real certificates and sockets."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import ssl
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from replication.errors import CertificateError
from replication.sslctx import (
    admin_ssl_context,
    client_ssl_context,
    peer_name_from_ssl,
    server_ssl_context,
)
from replication.tls import (
    CAFiles,
    NodeCertFiles,
    check_node_credentials,
    cluster_id_for_ca,
    init_ca,
    issue_node_cert,
    node_name_from_cert,
)

HOSTS = ("127.0.0.1", "localhost", "::1")


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def issue(ca_dir: Path, tmp_path: Path) -> Callable[..., NodeCertFiles]:
    def issue(node: str, **kw: object) -> NodeCertFiles:
        return issue_node_cert(ca_dir, tmp_path / "certs", node, HOSTS, **kw)  # type: ignore[arg-type]

    return issue


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- issuing and parsing --------------------------------------------------------------


def test_issue_and_parse_round_trip(ca_dir: Path, issue: Callable[..., NodeCertFiles]) -> None:
    files = issue("n1")
    cert = _load(files.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert node_name_from_cert(files.cert.read_bytes()) == "n1"
    assert node_name_from_cert(cert.public_bytes(serialization.Encoding.DER)) == "n1"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n1"
    assert cert.issuer == _load(ca_dir / "ca.pem").subject
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "n1"}
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:cairn:node:n1"]
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=29) < lifetime <= timedelta(days=30)
    check_node_credentials(files.cert, files.key, ca_dir / "ca.pem", "n1")


def test_keys_are_private_and_separate(ca_dir: Path, issue: Callable[..., NodeCertFiles]) -> None:
    files = issue("n1")
    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(files.key) == 0o600
    assert files.key.read_bytes() != (ca_dir / "ca.key").read_bytes()


def test_init_ca_reuses_existing_pair(ca_dir: Path) -> None:
    before = (ca_dir / "ca.pem").read_bytes()
    assert init_ca(ca_dir) == CAFiles(ca_dir / "ca.pem", ca_dir / "ca.key")
    assert (ca_dir / "ca.pem").read_bytes() == before


def test_init_ca_refuses_half_a_pair(ca_dir: Path) -> None:
    (ca_dir / "ca.key").unlink()
    with pytest.raises(CertificateError, match=r"has ca\.pem but no ca\.key"):
        init_ca(ca_dir)


def test_issue_reuses_valid_cert_unless_forced(issue: Callable[..., NodeCertFiles]) -> None:
    first = issue("n1").cert.read_bytes()
    assert issue("n1").cert.read_bytes() == first
    assert issue("n1", force=True).cert.read_bytes() != first


def test_issue_reissues_when_hosts_change(
    ca_dir: Path, tmp_path: Path, issue: Callable[..., NodeCertFiles]
) -> None:
    first = issue("n1").cert.read_bytes()
    files = issue_node_cert(ca_dir, tmp_path / "certs", "n1", ["10.0.0.7"])
    assert files.cert.read_bytes() != first


def test_issue_reissues_expired_cert(issue: Callable[..., NodeCertFiles]) -> None:
    expired = issue("n1", not_after=datetime.now(UTC) - timedelta(days=1))
    fresh = issue("n1")
    assert _load(fresh.cert).not_valid_after_utc > datetime.now(UTC)
    assert fresh == expired


@pytest.mark.parametrize("name", ["", "-n1", "n 1", "n1/../x", "é", "x" * 65, "n1\n"])
def test_issue_rejects_bad_node_names(issue: Callable[..., NodeCertFiles], name: str) -> None:
    with pytest.raises(CertificateError, match="is not valid"):
        issue(name)


def test_issue_will_not_overwrite_the_ca(ca_dir: Path) -> None:
    with pytest.raises(CertificateError, match="would overwrite the CA"):
        issue_node_cert(ca_dir, ca_dir, "ca", HOSTS)


def test_cluster_id_is_stable_and_per_ca(ca_dir: Path, tmp_path: Path) -> None:
    pem = (ca_dir / "ca.pem").read_bytes()
    cid = cluster_id_for_ca(pem)
    assert len(cid) == 16
    assert int(cid, 16) >= 0
    assert (
        cluster_id_for_ca(_load(ca_dir / "ca.pem").public_bytes(serialization.Encoding.DER)) == cid
    )
    other = init_ca(tmp_path / "other")
    assert cluster_id_for_ca(other.cert.read_bytes()) != cid


def test_node_name_falls_back_to_common_name() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "legacy-1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert node_name_from_cert(cert.public_bytes(serialization.Encoding.PEM)) == "legacy-1"


def test_node_name_from_garbage_raises() -> None:
    with pytest.raises(CertificateError):
        node_name_from_cert(b"not a certificate")


# -- check_node_credentials -----------------------------------------------------------


def test_check_reports_the_wrong_node_name(
    ca_dir: Path,
    tmp_path: Path,
    issue: Callable[..., NodeCertFiles],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n2 = issue("n2")
    shutil.copy(n2.cert, tmp_path / "certs" / "n1.pem")
    shutil.copy(n2.key, tmp_path / "certs" / "n1.key")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CertificateError) as info:
        check_node_credentials(Path("certs/n1.pem"), Path("certs/n1.key"), ca_dir / "ca.pem", "n1")
    assert str(info.value) == "certificate certs/n1.pem is for node 'n2', but node.name is 'n1'"


def test_check_reports_expired_and_not_yet_valid(
    ca_dir: Path, issue: Callable[..., NodeCertFiles]
) -> None:
    now = datetime.now(UTC)
    ca = ca_dir / "ca.pem"
    old = issue("old", not_after=now - timedelta(hours=1))
    with pytest.raises(CertificateError, match=r"certificate .*old\.pem expired on"):
        check_node_credentials(old.cert, old.key, ca, "old")
    future = issue("future", not_before=now + timedelta(days=1), not_after=now + timedelta(days=2))
    with pytest.raises(CertificateError, match=r"future\.pem is not valid before"):
        check_node_credentials(future.cert, future.key, ca, "future")
    fresh = issue("n1")
    with pytest.raises(CertificateError, match="expired"):
        check_node_credentials(fresh.cert, fresh.key, ca, "n1", now=now + timedelta(days=31))


def test_check_reports_a_cert_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    init_ca(tmp_path / "rogue")
    rogue = issue_node_cert(tmp_path / "rogue", tmp_path / "rogue-certs", "n1", HOSTS)
    with pytest.raises(CertificateError, match="is not signed by the cluster CA"):
        check_node_credentials(rogue.cert, rogue.key, ca_dir / "ca.pem", "n1")


def test_check_reports_a_key_mismatch(ca_dir: Path, issue: Callable[..., NodeCertFiles]) -> None:
    n1, n2 = issue("n1"), issue("n2")
    with pytest.raises(CertificateError, match=r"key .*n2\.key does not match certificate"):
        check_node_credentials(n1.cert, n2.key, ca_dir / "ca.pem", "n1")


def test_check_reports_missing_and_malformed_files(
    ca_dir: Path, tmp_path: Path, issue: Callable[..., NodeCertFiles]
) -> None:
    n1 = issue("n1")
    ca = ca_dir / "ca.pem"
    with pytest.raises(CertificateError, match=r"certificate .*nope\.pem does not exist"):
        check_node_credentials(tmp_path / "nope.pem", n1.key, ca, "n1")
    with pytest.raises(CertificateError, match=r"CA certificate .*nope\.pem does not exist"):
        check_node_credentials(n1.cert, n1.key, tmp_path / "nope.pem", "n1")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(CertificateError, match=r"junk\.pem is not a PEM certificate"):
        check_node_credentials(junk, n1.key, ca, "n1")
    with pytest.raises(CertificateError, match=r"key .*junk\.pem is not a PEM private key"):
        check_node_credentials(n1.cert, junk, ca, "n1")


def test_contexts_report_missing_files(tmp_path: Path, issue: Callable[..., NodeCertFiles]) -> None:
    n1 = issue("n1")
    with pytest.raises(CertificateError, match="does not exist"):
        server_ssl_context(n1.cert, n1.key, tmp_path / "missing.pem")
    with pytest.raises(CertificateError, match="does not exist"):
        client_ssl_context(tmp_path / "missing.pem", n1.key, n1.cert)
    with pytest.raises(CertificateError, match="does not exist"):
        admin_ssl_context(n1.cert, tmp_path / "missing.key")


def test_peer_name_without_a_session_raises() -> None:
    with pytest.raises(CertificateError, match="no TLS certificate"):
        peer_name_from_ssl(None)


# -- a real TLS server ----------------------------------------------------------------


class PeerServer:
    """A TLS echo of the client's node name, recording who got through."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.accepted: list[str] = []
        self.versions: list[str | None] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            name = peer_name_from_ssl(ssl_object)
            self.accepted.append(name)
            self.versions.append(ssl_object.version())
            writer.write(name.encode())
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> PeerServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def attempt(self, ctx: ssl.SSLContext, server_hostname: str) -> bytes | Exception:
        """Connect and read the reply; a failed handshake shows as an exception or EOF."""
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.port, ssl=ctx, server_hostname=server_hostname
            )
        except (ssl.SSLError, OSError) as e:
            return e
        try:
            reply: bytes | Exception = await asyncio.wait_for(reader.read(100), 10)
            server_name = peer_name_from_ssl(writer.get_extra_info("ssl_object"))
            assert server_name == "n1"
        except (ssl.SSLError, OSError) as e:
            reply = e
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, OSError):
                await writer.wait_closed()
        return reply


@pytest.fixture
def server_ctx(ca_dir: Path, issue: Callable[..., NodeCertFiles]) -> ssl.SSLContext:
    n1 = issue("n1")
    return server_ssl_context(n1.cert, n1.key, ca_dir / "ca.pem")


def _refused(result: bytes | Exception) -> bool:
    return isinstance(result, Exception) or result == b""


async def test_mutual_tls_accepts_a_member_and_names_it(
    ca_dir: Path, issue: Callable[..., NodeCertFiles], server_ctx: ssl.SSLContext
) -> None:
    n2 = issue("n2")
    ctx = client_ssl_context(n2.cert, n2.key, ca_dir / "ca.pem")
    async with PeerServer(server_ctx) as server:
        assert await server.attempt(ctx, "n1") == b"n2"
        assert await server.attempt(ctx, "127.0.0.1") == b"n2"
    assert server.accepted == ["n2", "n2"]
    assert server.versions == ["TLSv1.3", "TLSv1.3"]


async def test_mutual_tls_rejects_a_client_without_certificate(
    ca_dir: Path, server_ctx: ssl.SSLContext
) -> None:
    ctx = ssl.create_default_context(cafile=ca_dir / "ca.pem")
    async with PeerServer(server_ctx) as server:
        assert _refused(await server.attempt(ctx, "n1"))
    assert server.accepted == []


async def test_mutual_tls_rejects_a_client_from_another_ca(
    ca_dir: Path, tmp_path: Path, server_ctx: ssl.SSLContext
) -> None:
    init_ca(tmp_path / "rogue")
    rogue = issue_node_cert(tmp_path / "rogue", tmp_path / "rogue-certs", "n2", HOSTS)
    ctx = ssl.create_default_context(cafile=ca_dir / "ca.pem")  # trusts the real server
    ctx.load_cert_chain(rogue.cert, rogue.key)
    async with PeerServer(server_ctx) as server:
        assert _refused(await server.attempt(ctx, "n1"))
    assert server.accepted == []


async def test_mutual_tls_rejects_an_expired_client(
    ca_dir: Path, issue: Callable[..., NodeCertFiles], server_ctx: ssl.SSLContext
) -> None:
    old = issue("n2", not_after=datetime.now(UTC) - timedelta(hours=1))
    ctx = client_ssl_context(old.cert, old.key, ca_dir / "ca.pem")
    async with PeerServer(server_ctx) as server:
        assert _refused(await server.attempt(ctx, "n1"))
    assert server.accepted == []


async def test_client_rejects_a_server_that_is_not_the_dialled_node(
    ca_dir: Path, issue: Callable[..., NodeCertFiles], server_ctx: ssl.SSLContext
) -> None:
    n2 = issue("n2")
    ctx = client_ssl_context(n2.cert, n2.key, ca_dir / "ca.pem")
    async with PeerServer(server_ctx) as server:
        result = await server.attempt(ctx, "n3")
    assert isinstance(result, ssl.SSLCertVerificationError)
    assert server.accepted == []


async def test_client_rejects_a_server_from_another_ca(
    ca_dir: Path, tmp_path: Path, issue: Callable[..., NodeCertFiles]
) -> None:
    init_ca(tmp_path / "rogue")
    rogue = issue_node_cert(tmp_path / "rogue", tmp_path / "rogue-certs", "n1", HOSTS)
    rogue_ctx = server_ssl_context(rogue.cert, rogue.key, ca_dir / "ca.pem")
    n2 = issue("n2")
    ctx = client_ssl_context(n2.cert, n2.key, ca_dir / "ca.pem")
    async with PeerServer(rogue_ctx) as server:
        result = await server.attempt(ctx, "n1")
    assert isinstance(result, ssl.SSLCertVerificationError)


async def test_admin_context_needs_no_client_certificate(
    ca_dir: Path, issue: Callable[..., NodeCertFiles]
) -> None:
    n1 = issue("n1")
    ctx = ssl.create_default_context(cafile=ca_dir / "ca.pem")
    served: list[bool] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True) is None)
        writer.write(b"ok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=admin_ssl_context(n1.cert, n1.key)
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        assert await asyncio.wait_for(reader.read(10), 10) == b"ok"
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert served == [True]
