"""The outbound policy for ``package`` URLs: where a node may fetch a payload from.

A ``deploy_component {package: "https://..."}`` makes the node open a connection on a
caller's behalf, so without a policy any deployer can reach what only the node can:
its own admin port, other services on loopback, private networks, a cloud metadata
address. The policy refuses every destination that is not a public unicast address —
loopback, private, link-local, multicast, unspecified and reserved ranges, and IPv6
forms that embed such an IPv4 address (IPv4-mapped, 6to4, NAT64, Teredo) — unless the
operator allowlists it under ``[deploy]``: ``package_allow_hosts`` (host names or
literal addresses exactly as the URL names them; such a host may resolve anywhere) or
``package_allow_networks`` (CIDR networks whose addresses may be connected to).

It is applied to the address actually connected to: names are checked after
resolution by :class:`PolicyResolver` (the connector connects only to what it returns),
literal addresses by :meth:`OutboundPolicy.check_literal` before the request, and
:class:`PolicyConnector` checks the peer address of every connection once more before
a byte of the request is written. All of it again on every redirect hop, which the
fetcher follows itself (see ``node/deploy/sources.py``).

Refusals are :class:`Refused` with a message in plain words that names the host and
the rule. Nothing here does I/O except :class:`PolicyResolver`, which wraps a resolver.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import ClientRequest, ClientTimeout, TCPConnector
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import Connection
from aiohttp.resolver import DefaultResolver

if TYPE_CHECKING:
    from aiohttp.tracing import Trace

__all__ = [
    "IPAddress",
    "OutboundPolicy",
    "PolicyConnector",
    "PolicyResolver",
    "Refused",
    "classify",
    "parse_networks",
    "redact_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_RULE = "refused by the outbound policy ([deploy] package_allow_hosts, package_allow_networks)"


class Refused(Exception):
    """A destination the outbound policy does not allow; the message says why."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the translation
    forms a host or a gateway may route to that IPv4 address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def classify(ip: IPAddress) -> str | None:
    """What kind of non-public address ``ip`` is ("a loopback address", ...), or None
    for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            kind = classify(inner)
            return None if kind is None else f"{kind} (as IPv6 {ip})"
        if ip.scope_id:
            return "a link-local address"
    checks = (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a public address"),
    )
    for hit, kind in checks:
        if hit:
            return kind
    return None


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDR networks (``10.0.0.0/8``, ``fd00::/8``, or a single address).

    Raises:
        ValueError: a text that is not a network.
    """
    return tuple(ipaddress.ip_network(t.strip(), strict=False) for t in texts)


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """Which destinations a package fetch may connect to."""

    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[Network, ...] = ()

    @classmethod
    def from_config(cls, hosts: Iterable[str], networks: Iterable[str]) -> OutboundPolicy:
        """Build from ``[deploy] package_allow_hosts`` and ``package_allow_networks``.

        Raises:
            ValueError: a network that does not parse.
        """
        return cls(frozenset(_normal_host(h) for h in hosts if h.strip()), parse_networks(networks))

    def host_allowed(self, host: str) -> bool:
        """True when ``host`` (as the URL names it) is allowlisted by name."""
        return _normal_host(host) in self.allow_hosts

    def _network_allowed(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)) is not None:
            candidates.append(inner)
        nets = self.allow_networks
        return any(c.version == n.version and c in n for c in candidates for n in nets)

    def check(self, host: str, address: str, *, redirect: bool = False) -> None:
        """Refuse a connection to ``address`` made for a URL naming ``host``.

        Raises:
            Refused: the address is not public and neither the host nor the address
                is allowlisted (or ``address`` is not an IP address at all).
        """
        if self.host_allowed(host):
            return
        where = "package URL redirect to host" if redirect else "package URL host"
        ip = _parse_ip(address)
        if ip is None:
            raise Refused(f"{where} {host} did not resolve to an IP address; {_RULE}")
        if self._network_allowed(ip):
            return
        kind = classify(ip)
        if kind is None:
            return
        literal = _parse_ip(host)
        if literal is not None and literal == ip:
            raise Refused(f"{where} {host} is {kind}; {_RULE}")
        raise Refused(f"{where} {host} resolves to {ip}, {kind}; {_RULE}")

    def check_literal(self, host: str, *, redirect: bool = False) -> None:
        """Check a URL whose host is a literal address (names are left to the resolver).

        Raises:
            Refused: as :meth:`check`.
        """
        ip = _parse_ip(host)
        if ip is not None:
            self.check(host, str(ip), redirect=redirect)


class PolicyResolver(AbstractResolver):
    """A resolver that answers only with addresses the policy allows for that name.

    The connector connects to what :meth:`resolve` returns and nothing else, so this is
    where a name is checked on the address actually used. A name with any refused
    address is refused whole (no partial answers a rebinding server could steer).
    """

    def __init__(
        self,
        policy: OutboundPolicy,
        *,
        base: AbstractResolver | None = None,
        redirect: bool = False,
    ) -> None:
        self.policy = policy
        self.base: AbstractResolver = base if base is not None else DefaultResolver()
        self.redirect = redirect

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve with the wrapped resolver, then check every address.

        Raises:
            Refused: an address the policy does not allow.
            OSError: the name does not resolve.
        """
        results = await self.base.resolve(host, port, family)
        for r in results:
            self.policy.check(host, r["host"], redirect=self.redirect)
        return results

    async def close(self) -> None:
        await self.base.close()


class PolicyConnector(TCPConnector):
    """A connector that resolves through :class:`PolicyResolver` and checks the peer
    address of each new connection before the request is sent on it."""

    def __init__(self, policy: OutboundPolicy, resolver: PolicyResolver, **kwargs: Any) -> None:
        super().__init__(resolver=resolver, use_dns_cache=False, force_close=True, **kwargs)
        self.policy = policy
        self.guard = resolver

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        """Connect, then refuse (and close) a connection whose peer is not allowed.

        Raises:
            Refused: the peer address is one the policy refuses, or unknown.
        """
        conn = await super().connect(req, traces, timeout)
        host = req.url.raw_host or ""
        transport = conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        try:
            if not peer:
                raise Refused(f"the address package URL host {host} connected to is unknown")
            self.policy.check(host, str(peer[0]), redirect=self.guard.redirect)
        except Refused:
            conn.close()
            raise
        return conn


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for storing, logging and showing.

    A text that does not split as a URL is returned with everything up to the last
    ``@`` of its authority removed as well, so credentials never survive a parse error.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        scheme, sep, rest = url.partition("://")
        authority, slash, tail = rest.partition("/")
        return scheme + sep + authority.rpartition("@")[2] + slash + tail
