"""Cluster material for simulated nodes: one CA and node certificates, made once.

Certificates are issued with :mod:`replication.tls` into a cache directory and reused by
every history (issuing costs more than a short history). They are valid around
:data:`EPOCH_MS`, the simulator's fixed wall-clock origin, so a history's versions and
validity checks do not depend on the day it runs.

:class:`SimSigner` is the real :class:`~replication.signing.NodeSigner` with RFC 6979
deterministic ECDSA nonces: the same entry signs to the same bytes in every run, so a
seed replays to byte-identical rows. Verification is the ordinary ECDSA check.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from replication.signing import NodeSigner
from replication.tls import cluster_id_for_ca, init_ca, issue_node_cert

__all__ = ["EPOCH_MS", "Certs", "SimSigner", "default_cache"]

#: The simulator's wall clock at virtual time 0 (2033-05-18).
EPOCH_MS = 2_000_000_000_000
_EPOCH = datetime.fromtimestamp(EPOCH_MS / 1000, UTC)

try:
    _DETERMINISTIC = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
except TypeError:  # cryptography < 44: signatures differ per run (sizes may too)
    _DETERMINISTIC = ec.ECDSA(hashes.SHA256())


class SimSigner(NodeSigner):
    """A node's signer with deterministic nonces."""

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message, _DETERMINISTIC)


def default_cache() -> Path:
    """Where certificates are kept between runs (``CAIRN_SIM_CACHE`` overrides)."""
    if env := os.environ.get("CAIRN_SIM_CACHE"):
        return Path(env)
    return Path(tempfile.gettempdir()) / f"cairn-sim-certs-{os.getuid()}"


class Certs:
    """The CA and node certificates under ``root`` (created on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_dir = root / "ca"
        init_ca(self.ca_dir)
        self.ca_pem = (self.ca_dir / "ca.pem").read_bytes()
        self.cluster_id = cluster_id_for_ca(self.ca_pem)
        self._signers: dict[str, SimSigner] = {}

    def signer(self, node: str) -> SimSigner:
        """The signer of ``node`` (its certificate is issued the first time)."""
        if node not in self._signers:
            out = self.root / "nodes"
            cert, key = out / f"{node}.pem", out / f"{node}.key"
            if not (cert.exists() and key.exists()):
                issue_node_cert(
                    self.ca_dir, out, node, ("127.0.0.1",),
                    not_before=_EPOCH - timedelta(days=1),
                    not_after=_EPOCH + timedelta(days=3650),
                )  # fmt: skip
            base = NodeSigner.load(cert, key)
            self._signers[node] = SimSigner(base._key, base.cert_der)
        return self._signers[node]
