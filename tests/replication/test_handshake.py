"""The peer handshake as pure functions: no sockets, identity passed in from TLS."""

from __future__ import annotations

import pytest

from replication.codec import decode, encode
from replication.errors import HandshakeError, ProtocolError
from replication.handshake import (
    answer_hello,
    check_welcome,
    client_hello,
    expect_hello,
    negotiate_caps,
)
from replication.messages import PROTOCOL_VERSION, Hello, Ping, Refuse, Welcome

CID = "00112233aabbccdd"
OTHER_CID = "ffffffffffffffff"
MEMBERS = frozenset({"n1", "n2", "n3"})


def log(node: str) -> str:
    """A log id of ``node``."""
    return f"{node}/" + "0" * 32


def answer(hello: Hello, *, peer: str = "n2", caps: tuple[str, ...] = ()) -> Welcome | Refuse:
    return answer_hello(
        hello, my_node="n1", cluster_id=CID, authenticated_peer=peer, members=MEMBERS,
        log_id=log("n1"), caps=caps,
    )  # fmt: skip


def test_client_hello_carries_version_and_sorted_unique_caps() -> None:
    hello = client_hello("n2", CID, ["snapshot", "blobs", "blobs"], log("n2"))
    assert hello == Hello(PROTOCOL_VERSION, CID, "n2", ("blobs", "snapshot"), log("n2"))


def test_member_is_welcomed_with_negotiated_caps() -> None:
    hello = client_hello("n2", CID, ["blobs", "snapshot", "zstd"], log("n2"))
    reply = answer(hello, caps=("blobs", "zstd", "bulk"))
    assert reply == Welcome(PROTOCOL_VERSION, CID, "n1", ("blobs", "zstd"), log("n1"))
    welcome = check_welcome(
        decode(encode(reply)),
        expected_node="n1",
        cluster_id=CID,
        authenticated_peer="n1",
        caps=hello.caps,
    )
    assert welcome.caps == ("blobs", "zstd")


def test_negotiate_caps_is_the_sorted_intersection() -> None:
    assert negotiate_caps(["b", "a", "c"], {"c", "a", "d"}) == ("a", "c")
    assert negotiate_caps([], ["a"]) == ()


def test_refuses_another_protocol_version() -> None:
    hello = Hello(PROTOCOL_VERSION + 1, CID, "n2", (), log("n2"))
    reply = answer(hello)
    assert isinstance(reply, Refuse)
    assert f"protocol version {PROTOCOL_VERSION + 1} is not supported" in reply.reason


def test_refuses_another_cluster() -> None:
    reply = answer(client_hello("n2", OTHER_CID, (), log("n2")))
    assert isinstance(reply, Refuse)
    assert f"cluster id {OTHER_CID} does not match" in reply.reason


def test_refuses_a_hello_that_names_another_node_than_the_certificate() -> None:
    reply = answer(client_hello("n3", CID, (), log("n3")), peer="n2")
    assert isinstance(reply, Refuse)
    assert reply.reason == "hello names node 'n3' but the TLS certificate is for 'n2'"


def test_refuses_a_node_that_is_not_a_member() -> None:
    reply = answer(client_hello("n9", CID, (), log("n9")), peer="n9")
    assert isinstance(reply, Refuse)
    assert reply.reason == "node 'n9' is not a member of this cluster"


def test_refuses_a_session_with_itself() -> None:
    reply = answer(client_hello("n1", CID, (), log("n1")), peer="n1")
    assert isinstance(reply, Refuse)
    assert "with itself" in reply.reason


def test_version_is_checked_before_anything_else() -> None:
    reply = answer(Hello(99, OTHER_CID, "n9", (), log("n9")), peer="n8")
    assert isinstance(reply, Refuse)
    assert "protocol version 99" in reply.reason


def test_expect_hello_rejects_other_first_frames() -> None:
    hello = client_hello("n2", CID, (), log("n2"))
    assert expect_hello(hello) is hello
    with pytest.raises(ProtocolError, match="expected a hello frame first, got ping"):
        expect_hello(Ping(t=1))


def test_check_welcome_raises_on_refuse() -> None:
    with pytest.raises(HandshakeError, match="node 'n1' refused the session: go away"):
        check_welcome(Refuse("go away"), expected_node="n1", cluster_id=CID)


def test_check_welcome_rejects_unexpected_frames() -> None:
    with pytest.raises(ProtocolError, match="expected a welcome or refuse frame, got hello"):
        check_welcome(client_hello("n1", CID, (), log("n1")), expected_node="n1", cluster_id=CID)


@pytest.mark.parametrize(
    ("welcome", "kw", "message"),
    [
        (Welcome(PROTOCOL_VERSION + 1, CID, "n1", (), log("n1")), {}, "protocol version"),
        (
            Welcome(PROTOCOL_VERSION, OTHER_CID, "n1", (), log("n1")),
            {},
            f"is in cluster {OTHER_CID}",
        ),
        (
            Welcome(PROTOCOL_VERSION, CID, "n3", (), log("n3")),
            {},
            "dialled node 'n1' but 'n3' answered",
        ),
        (
            Welcome(PROTOCOL_VERSION, CID, "n1", (), log("n1")),
            {"authenticated_peer": "n3"},
            "dialled node 'n1' but 'n3' answered",
        ),
        (
            Welcome(PROTOCOL_VERSION, CID, "n1", ("blobs", "evil"), log("n1")),
            {"caps": ("blobs",)},
            "granted capabilities never offered: evil",
        ),
    ],
    ids=["version", "cluster", "frame-name", "certificate-name", "caps"],
)
def test_check_welcome_rejects_mismatches(
    welcome: Welcome, kw: dict[str, object], message: str
) -> None:
    with pytest.raises(HandshakeError, match=message):
        check_welcome(welcome, expected_node="n1", cluster_id=CID, **kw)  # type: ignore[arg-type]
