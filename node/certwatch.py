"""This node's certificate over time: a renewal is picked up without a restart, and an
expiry coming closer is said loudly.

Every ``check_s`` the watch looks at the certificate and key files. When they changed
(``cairn cert issue`` wrote a renewed pair), it checks them like a start would, then
loads them into the peer transport's TLS contexts (new sessions present the new
certificate), makes the new key sign this node's change entries from then on, and adds
the certificate to the keyring so peers can verify those entries. Within
``warn_days`` of the certificate's end it logs a warning (once a day), and
``cluster_status`` and ``/metrics`` show when it expires.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509

from replication.channel import TlsTransport
from replication.errors import CertificateError
from replication.signing import Keyring, NodeSigner
from replication.tls import check_node_credentials
from storage.store import Store

__all__ = ["CertWatch"]

log = structlog.get_logger(__name__)

_DAY_S = 86_400


@dataclass
class CertWatch:
    """Watches ``cert``/``key`` (issued by ``ca``) of node ``node``."""

    node: str
    cert: Path
    key: Path
    ca: Path
    transport: TlsTransport
    store: Store
    keyring: Keyring
    warn_days: float = 14.0
    check_s: float = 30.0
    expires_at_ms: int | None = None
    _stamp: tuple[float, float] | None = None
    _warned_at: float = field(default=0.0)

    def _mtimes(self) -> tuple[float, float]:
        return (self.cert.stat().st_mtime, self.key.stat().st_mtime)

    def load_expiry(self) -> None:
        cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        self.expires_at_ms = int(cert.not_valid_after_utc.timestamp() * 1000)

    def warnings(self) -> list[str]:
        if self.expires_at_ms is None:
            return []
        left_s = self.expires_at_ms / 1000 - time.time()
        if left_s > self.warn_days * _DAY_S:
            return []
        if left_s <= 0:
            return [f"the certificate of {self.node} has expired: renew it (cairn cert issue)"]
        return [
            f"the certificate of {self.node} expires in {left_s / _DAY_S:.1f} days: renew it "
            "(cairn cert issue); the node picks it up without a restart"
        ]

    def status(self) -> dict[str, Any]:
        return {"cert_expires_at": self.expires_at_ms, "warnings": self.warnings()}

    async def check(self) -> bool:
        """Reload the pair if it changed; warn if it expires soon. True if reloaded."""
        try:
            stamp = await asyncio.to_thread(self._mtimes)
        except OSError as e:
            log.error("certificate_unreadable", cert=str(self.cert), error=str(e))
            return False
        reloaded = False
        if self._stamp is not None and stamp != self._stamp:
            reloaded = await self._reload()
        self._stamp = stamp
        for warning in self.warnings():
            if time.monotonic() - self._warned_at > _DAY_S or self._warned_at == 0:
                self._warned_at = time.monotonic()
                log.warning("certificate_expiring", node=self.node, detail=warning)
        return reloaded

    async def _reload(self) -> bool:
        try:
            await asyncio.to_thread(check_node_credentials, self.cert, self.key, self.ca, self.node)
            signer = await asyncio.to_thread(NodeSigner.load, self.cert, self.key)
            self.transport.reload(self.cert, self.key)
        except CertificateError as e:
            log.error("certificate_reload_refused", node=self.node, error=str(e))
            return False
        known = self.keyring.add(signer.cert_der)
        await self.store.put_cert(
            known.key_id, known.node, known.der, known.not_before_ms, known.not_after_ms
        )
        self.store.signer = signer
        self.load_expiry()
        log.info("certificate_reloaded", node=self.node, key_id=signer.key_id,
                 expires_at=self.expires_at_ms)  # fmt: skip
        return True

    async def run(self) -> None:
        """Check every ``check_s`` until cancelled."""
        self.load_expiry()
        self._stamp = await asyncio.to_thread(self._mtimes)
        while True:
            await self.check()
            await asyncio.sleep(self.check_s)
