"""What the deploy code needs from the rest of the node, as seams.

``node/deploy`` never imports ``replication``: the cluster is seen through
:class:`ClusterView` (who is a member, who is connected) and payload blobs a node lacks
are obtained through :class:`BlobFetcher`. ``node/app.py`` passes the replication
implementations; a single node uses :class:`SoloCluster`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from node.config import Limits
from node.deploy.components import Components
from node.deploy.extract import ExtractLimits
from node.deploy.hooks import HookGroups
from storage.blobs import BlobStore
from storage.errors import BlobMissing
from storage.faults import NO_FAULTS, Faults
from storage.store import Store

__all__ = ["BlobFetcher", "ClusterView", "DeployContext", "SoloCluster"]


class ClusterView(Protocol):
    """This node's view of the cluster."""

    def members(self) -> list[str]:
        """Every node name in the cluster, this node included, sorted."""
        ...

    def connected(self) -> set[str]:
        """Peers with a live channel right now."""
        ...


class BlobFetcher(Protocol):
    async def fetch(self, payload_hash: str, size: int) -> None:
        """Bring the blob into the local store, verified.

        Raises:
            BlobMissing: no reachable peer has it.
            BlobCorrupt: the bytes received did not match.
        """
        ...


class SoloCluster:
    """A cluster of one: no peers, nothing to fetch from."""

    def __init__(self, node: str) -> None:
        self._node = node

    def members(self) -> list[str]:
        return [self._node]

    def connected(self) -> set[str]:
        return set()

    async def fetch(self, payload_hash: str, size: int) -> None:
        raise BlobMissing(f"blob {payload_hash} is not on this node and it has no peers")


@dataclass(frozen=True, slots=True)
class DeployContext:
    """Everything a deploy step touches on this node."""

    node: str
    store: Store
    blobs: BlobStore
    components: Components
    limits: Limits
    cluster: ClusterView
    fetcher: BlobFetcher
    faults: Faults = NO_FAULTS
    hook_groups: HookGroups | None = None

    @property
    def extract_limits(self) -> ExtractLimits:
        return ExtractLimits(
            max_members=self.limits.max_members,
            max_total_bytes=self.limits.max_extracted_bytes,
            max_ratio=self.limits.max_compression_ratio,
            ratio_floor_bytes=self.limits.compression_ratio_floor_bytes,
            max_path_len=self.limits.max_path_length,
        )
