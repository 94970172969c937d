"""``peer_results``: one entry per node a deploy had to reach, from the result rows."""

from __future__ import annotations

from typing import Any

from storage.records import Deployment, NodeResult

__all__ = ["peer_results"]


def peer_results(d: Deployment, results: list[NodeResult]) -> list[dict[str, Any]]:
    """One entry per expected node (plus any other node that reported), in node order.

    A node that has not reported is ``pending``. Each entry carries the node's hook
    output (``install_output``) when it has any.
    """
    by_node = {r.node: r for r in results}
    out: list[dict[str, Any]] = []
    for node in sorted(set(d.expected_nodes) | set(by_node)):
        r = by_node.get(node)
        if r is None:
            out.append({
                "node": node, "status": "pending", "phase": None, "error": None,
                "started_at": None, "completed_at": None, "late": False,
                "install_output": None,
            })  # fmt: skip
            continue
        out.append({
            "node": node, "status": str(r.status), "phase": r.phase, "error": r.error,
            "started_at": r.started_at, "completed_at": r.completed_at, "late": r.late,
            "install_output": r.install_output,
        })  # fmt: skip
    return out
