"""The outbound policy for package URLs, without a network: classification, allowlists,
the resolver seam, URL redaction and the archive check (node/deploy/outbound.py)."""

from __future__ import annotations

import io
import ipaddress
import socket
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from helpers import component, make_config

from node.config import ConfigError
from node.deploy.outbound import OutboundPolicy, PolicyResolver, Refused, classify, redact_url
from node.deploy.sources import archive_only
from node.errors import DeployFailed

DENIED = {
    "127.0.0.1": "a loopback address",
    "127.255.0.9": "a loopback address",
    "10.1.2.3": "a private address",
    "172.16.0.1": "a private address",
    "192.168.1.1": "a private address",
    "169.254.169.254": "a link-local address",
    "224.0.0.1": "a multicast address",
    "0.0.0.0": "an unspecified address",
    "100.64.0.1": "not a public address",
    "240.0.0.1": "a private address",
    "::1": "a loopback address",
    "::": "an unspecified address",
    "fe80::1": "a link-local address",
    "fc00::1": "a private address",
    "ff02::1": "a multicast address",
    "::ffff:127.0.0.1": "a loopback address (as IPv6 ::ffff:7f00:1)",
    "::ffff:169.254.169.254": "a link-local address (as IPv6 ::ffff:a9fe:a9fe)",
    "::ffff:0.0.0.0": "an unspecified address (as IPv6 ::ffff:0:0)",
    "2002:7f00:1::": "a loopback address (as IPv6 2002:7f00:1::)",
    "64:ff9b::a9fe:a9fe": "a link-local address (as IPv6 64:ff9b::a9fe:a9fe)",
}
PUBLIC = ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888", "::ffff:8.8.8.8"]


@pytest.mark.parametrize(("address", "kind"), sorted(DENIED.items()))
def test_non_public_addresses_are_classified(address: str, kind: str) -> None:
    assert classify(ipaddress.ip_address(address)) == kind
    with pytest.raises(Refused) as e:
        OutboundPolicy().check(address, address)
    assert str(e.value).startswith(f"package URL host {address} is {kind};")


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert classify(ipaddress.ip_address(address)) is None
    OutboundPolicy().check(address, address)


def test_refusal_messages_are_plain_words() -> None:
    policy = OutboundPolicy()
    with pytest.raises(Refused) as e:
        policy.check("127.0.0.1", "127.0.0.1")
    assert str(e.value) == (
        "package URL host 127.0.0.1 is a loopback address; refused by the outbound "
        "policy ([deploy] package_allow_hosts, package_allow_networks)"
    )
    with pytest.raises(Refused) as e:
        policy.check("metadata.test", "169.254.169.254", redirect=True)
    assert str(e.value).startswith(
        "package URL redirect to host metadata.test resolves to 169.254.169.254, "
        "a link-local address; refused"
    )


def test_allowlists_by_network_and_by_host() -> None:
    policy = OutboundPolicy.from_config(["Pkgs.Internal.", "10.9.9.9"], ["10.0.0.0/8", "fd00::/8"])
    policy.check("anything", "10.1.2.3")
    policy.check("anything", "::ffff:10.1.2.3")  # the mapped form of an allowed address
    policy.check("anything", "fd12::1")
    policy.check("pkgs.internal", "127.0.0.1")  # an allowlisted name may resolve anywhere
    policy.check("PKGS.INTERNAL", "192.168.0.1")
    policy.check_literal("10.9.9.9")
    refused = [("anything", "127.0.0.1"), ("anything", "192.168.0.1"),
               ("pkgs.internal.evil", "127.0.0.1"), ("anything", "fc00::1")]  # fmt: skip
    for host, address in refused:
        with pytest.raises(Refused):
            policy.check(host, address)
    with pytest.raises(Refused):
        policy.check_literal("[::1]")
    policy.check_literal("example.org")  # a name: left to the resolver


def test_bad_allowlisted_network_stops_the_node_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="package_allow_networks"):
        make_config(tmp_path, deploy={"package_allow_networks": ["10.0.0.0/33"]})
    config = make_config(tmp_path, deploy={"package_allow_networks": "10.0.0.0/8,fd00::/8"})
    assert config.deploy.package_allow_networks == ("10.0.0.0/8", "fd00::/8")


class _Fake(AbstractResolver):
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.answers:
            raise OSError("no such host")
        return [
            {"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
            for a in self.answers[host]
        ]

    async def close(self) -> None:
        pass


async def test_resolver_checks_every_address_of_a_name() -> None:
    fake = _Fake({
        "metadata.test": ["169.254.169.254"],
        "rebind.test": ["93.184.216.34", "127.0.0.1"],
        "public.test": ["93.184.216.34"],
        "mapped.test": ["::ffff:127.0.0.1"],
    })  # fmt: skip
    resolver = PolicyResolver(OutboundPolicy(), base=fake)
    assert [r["host"] for r in await resolver.resolve("public.test", 80)] == ["93.184.216.34"]
    for name in ("metadata.test", "rebind.test", "mapped.test"):
        with pytest.raises(Refused, match=f"host {name} resolves to"):
            await resolver.resolve(name, 80)
    with pytest.raises(OSError):
        await resolver.resolve("nxdomain.test", 80)
    allowed = PolicyResolver(OutboundPolicy.from_config(["metadata.test"], []), base=fake)
    assert await allowed.resolve("metadata.test", 80)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@host.example/p.tgz", "https://host.example/p.tgz"),
        ("https://user@host.example:8443/p?x=1", "https://host.example:8443/p?x=1"),
        ("http://a:b@c@host.example/", "http://host.example/"),
        ("https://host.example/p.tgz", "https://host.example/p.tgz"),
        ("https://u:secret@[::1/p", "https://[::1/p"),  # does not parse: still redacted
        ("/srv/packages/app.tgz", "/srv/packages/app.tgz"),
    ],
)
def test_credentials_are_removed_from_urls(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "secret" not in redact_url(url)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("size", [1, 100, 1 << 20])
async def test_archive_check_passes_gzip_and_tar_whole(size: int) -> None:
    for data in (component(), _plain_tar()):
        out = [c async for c in archive_only(_chunks(data, size), "x")]
        assert b"".join(out) == data


def _plain_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("a")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


@pytest.mark.parametrize(
    "data", [b"", b"<html>metadata</html>", b'{"AccessKeyId": "AKIA"}' * 100, b"\x1f"]
)
async def test_anything_else_is_refused_before_a_byte_is_passed_on(data: bytes) -> None:
    seen: list[bytes] = []
    with pytest.raises(DeployFailed) as e:
        async for chunk in archive_only(_chunks(data, 7), "http://h/p"):
            seen.append(chunk)
    assert seen == []
    assert e.value.code == "bad_payload" and "nothing was kept" in e.value.message
    assert "AKIA" not in e.value.message
