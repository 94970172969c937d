"""What the deploy code needs from the rest of the node, as seams.

``node/deploy`` never imports ``replication``: the cluster is seen through
:class:`ClusterView` (who is a member, who is connected) and payload blobs a node lacks
are obtained through :class:`BlobFetcher`. Supervised processes are started through
:class:`ComponentRunner`. ``node/app.py`` passes the real implementations; a single node
uses :class:`SoloCluster`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from node.config import Limits, RetentionConfig
from node.deploy.component_config import RunSpec
from node.deploy.components import Components
from node.deploy.extract import ExtractLimits
from node.deploy.hooks import HookGroups
from node.deploy.runstate import Outcome, ProcessState, ReadyResult
from node.deploy.space import SpaceGuard, Unguarded
from storage.blobs import BlobStore
from storage.errors import BlobMissing
from storage.faults import NO_FAULTS, Faults
from storage.store import Store

__all__ = [
    "BlobFetcher",
    "ClusterView",
    "ComponentRunner",
    "DeployContext",
    "NoRunner",
    "ProjectLocks",
    "SoloCluster",
]


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


class ComponentRunner(Protocol):
    """Runs each project's ``[run]`` process for its active release (the
    :class:`~node.deploy.supervisor.Supervisor`)."""

    async def switch(
        self,
        project: str,
        deployment_id: str,
        release_dir: Path,
        spec: RunSpec | None,
        *,
        restart: bool,
    ) -> ReadyResult:
        """Make ``project``'s process run from ``release_dir`` and wait until it is ready
        (``restart=False``: leave a running process alone)."""
        ...

    async def stop(self, project: str) -> bool:
        """Stop ``project``'s process, if it has one."""
        ...

    def state(self, project: str) -> ProcessState:
        """The project's process state."""
        ...


class NoRunner:
    """A runner for nodes that supervise nothing: every switch is ready at once."""

    async def switch(
        self,
        project: str,
        deployment_id: str,
        release_dir: Path,
        spec: RunSpec | None,
        *,
        restart: bool,
    ) -> ReadyResult:
        return ReadyResult(Outcome.NO_PROCESS, "this node runs no component processes")

    async def stop(self, project: str) -> bool:
        return False

    def state(self, project: str) -> ProcessState:
        return ProcessState(project)


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


@dataclass
class ProjectLocks:
    """One lock per project: whatever touches a project's releases or its process (the
    origin's coordinator, the reconciler, a drop) holds it from decision to last write."""

    _locks: defaultdict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )

    def __call__(self, project: str) -> asyncio.Lock:
        return self._locks[project]


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
    runner: ComponentRunner = field(default_factory=NoRunner)
    locks: ProjectLocks = field(default_factory=ProjectLocks)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    #: Free space: asked before a step writes (:mod:`node.deploy.pressure`).
    space: SpaceGuard = field(default_factory=Unguarded)

    @property
    def extract_limits(self) -> ExtractLimits:
        return ExtractLimits(
            max_members=self.limits.max_members,
            max_total_bytes=self.limits.max_extracted_bytes,
            max_ratio=self.limits.max_compression_ratio,
            ratio_floor_bytes=self.limits.compression_ratio_floor_bytes,
            max_path_len=self.limits.max_path_length,
        )
