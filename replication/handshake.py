"""The handshake of a peer session, as pure functions over messages (no sockets).

The dialler sends :class:`Hello`; the listener answers :class:`Welcome` or :class:`Refuse`.
Identity never comes from a frame: each side passes in the node name read from the
verified TLS certificate (:func:`replication.sslctx.peer_name_from_ssl`), and a frame that
claims another name is refused. The certificate wins.

The listener decides the session's capabilities: the intersection of both sides' sets,
sent back in the Welcome.
"""

from __future__ import annotations

from collections.abc import Collection

from replication.errors import HandshakeError, ProtocolError
from replication.messages import PROTOCOL_VERSION, Hello, Message, Refuse, Welcome

__all__ = ["answer_hello", "check_welcome", "client_hello", "expect_hello", "negotiate_caps"]


def negotiate_caps(mine: Collection[str], theirs: Collection[str]) -> tuple[str, ...]:
    """Return the capabilities both sides support, sorted.

    Args:
        mine: our capabilities.
        theirs: the peer's capabilities.

    Returns:
        The sorted intersection.
    """
    return tuple(sorted(set(mine) & set(theirs)))


def client_hello(node: str, cluster_id: str, caps: Collection[str], log_id: str) -> Hello:
    """Build the dialler's first frame.

    Args:
        node: this node's name (as in its certificate).
        cluster_id: this node's cluster id (from the CA).
        caps: this node's capabilities.
        log_id: the change log this node writes.

    Returns:
        The Hello, with this build's protocol version.
    """
    return Hello(PROTOCOL_VERSION, cluster_id, node, tuple(sorted(set(caps))), log_id)


def expect_hello(msg: Message) -> Hello:
    """Check that the first frame a listener received is a Hello.

    Args:
        msg: the decoded first frame.

    Returns:
        The Hello.

    Raises:
        ProtocolError: the frame is of another type.
    """
    if not isinstance(msg, Hello):
        raise ProtocolError(f"expected a hello frame first, got {msg.TYPE}")
    return msg


def answer_hello(
    hello: Hello,
    *,
    my_node: str,
    cluster_id: str,
    authenticated_peer: str,
    members: Collection[str],
    log_id: str,
    caps: Collection[str] = (),
) -> Welcome | Refuse:
    """Decide whether the listener accepts a dialler's session.

    Args:
        hello: the dialler's Hello.
        my_node: this (listening) node's name.
        cluster_id: this node's cluster id.
        authenticated_peer: the dialler's name from its verified TLS certificate.
        members: names of the cluster's current members.
        log_id: the change log this (listening) node writes.
        caps: this node's capabilities.

    Returns:
        A Welcome carrying the negotiated capabilities, or a Refuse with the reason:
        protocol version mismatch, cluster id mismatch, a Hello naming another node than
        the certificate, a dialler that is not a member, or a dialler that is this node.
    """
    if hello.proto != PROTOCOL_VERSION:
        return Refuse(
            f"protocol version {hello.proto} is not supported; "
            f"node {my_node!r} speaks version {PROTOCOL_VERSION}"
        )
    if hello.cluster_id != cluster_id:
        return Refuse(f"cluster id {hello.cluster_id} does not match this cluster's {cluster_id}")
    if hello.node != authenticated_peer:
        return Refuse(
            f"hello names node {hello.node!r} but the TLS certificate is for {authenticated_peer!r}"
        )
    if authenticated_peer == my_node:
        return Refuse(f"node {my_node!r} cannot open a session with itself")
    if authenticated_peer not in members:
        return Refuse(f"node {authenticated_peer!r} is not a member of this cluster")
    return Welcome(PROTOCOL_VERSION, cluster_id, my_node, negotiate_caps(caps, hello.caps), log_id)


def check_welcome(
    msg: Message,
    *,
    expected_node: str,
    cluster_id: str,
    authenticated_peer: str | None = None,
    caps: Collection[str] | None = None,
) -> Welcome:
    """Check the listener's answer on the dialler's side.

    Args:
        msg: the decoded answer frame.
        expected_node: the member this node meant to dial.
        cluster_id: this node's cluster id.
        authenticated_peer: the listener's name from its verified TLS certificate, if
            the caller has it; it must be ``expected_node`` too.
        caps: the capabilities this node offered; if given, the Welcome may not grant
            any other.

    Returns:
        The Welcome; its ``caps`` are the session's capabilities.

    Raises:
        HandshakeError: the listener refused, speaks another protocol version, is in
            another cluster, is not the node that was dialled, or granted capabilities
            that were not offered.
        ProtocolError: the frame is neither a Welcome nor a Refuse.
    """
    if isinstance(msg, Refuse):
        raise HandshakeError(f"node {expected_node!r} refused the session: {msg.reason}")
    if not isinstance(msg, Welcome):
        raise ProtocolError(f"expected a welcome or refuse frame, got {msg.TYPE}")
    if msg.proto != PROTOCOL_VERSION:
        raise HandshakeError(
            f"node {expected_node!r} answered with protocol version {msg.proto}; "
            f"this node speaks version {PROTOCOL_VERSION}"
        )
    if msg.cluster_id != cluster_id:
        raise HandshakeError(
            f"node {expected_node!r} is in cluster {msg.cluster_id}, not {cluster_id}"
        )
    for name in (msg.node, authenticated_peer):
        if name is not None and name != expected_node:
            raise HandshakeError(f"dialled node {expected_node!r} but {name!r} answered")
    if caps is not None and not set(msg.caps) <= set(caps):
        extra = ", ".join(sorted(set(msg.caps) - set(caps)))
        raise HandshakeError(f"node {expected_node!r} granted capabilities never offered: {extra}")
    return msg
