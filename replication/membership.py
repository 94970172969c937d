"""Who is in the cluster: the config's ``[[peers]]`` plus the replicated ``members`` table.

A live ``members`` row adds a node (or gives a configured peer a new URL); a tombstone
removes a node, even one the config file names, so ``remove_node`` works cluster-wide
without editing every config. This node is always a member of its own view.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from storage.accounts import Accounts
from storage.records import Member

__all__ = ["Membership", "PeerAddress", "resolve_peers"]


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """A peer's node name and the ``wss://`` URL of its peer port."""

    name: str
    url: str


def resolve_peers(
    node: str, configured: Iterable[PeerAddress], rows: Iterable[Member]
) -> dict[str, str]:
    """Combine configured peers and ``members`` rows into ``{name: url}``.

    Args:
        node: this node's name (never its own peer).
        configured: ``[[peers]]`` from the config file.
        rows: every ``members`` row, tombstones included.

    Returns:
        The peers to dial and accept, by name.
    """
    peers = {p.name: p.url for p in configured}
    for row in rows:
        if row.deleted:
            peers.pop(row.name, None)
        else:
            peers[row.name] = row.url
    peers.pop(node, None)
    return peers


class Membership:
    """This node's current view of the members (refreshed from storage on change).

    Args:
        node: this node's name.
        configured: the config file's peers.
    """

    def __init__(self, node: str, configured: Sequence[PeerAddress]) -> None:
        self.node = node
        self._configured = tuple(configured)
        self._peers = resolve_peers(node, self._configured, ())

    async def refresh(self, accounts: Accounts) -> dict[str, str]:
        """Re-read the ``members`` table.

        Returns:
            The peers, ``{name: url}``.
        """
        rows = await accounts.list_members(include_deleted=True)
        self._peers = resolve_peers(self.node, self._configured, rows)
        return dict(self._peers)

    def peers(self) -> dict[str, str]:
        """Every other member, ``{name: url}``."""
        return dict(self._peers)

    def names(self) -> list[str]:
        """Every member's name, this node included, sorted."""
        return sorted({self.node, *self._peers})

    def __contains__(self, name: object) -> bool:
        return name == self.node or name in self._peers
