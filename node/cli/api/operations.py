"""The names of the operations a node serves, for checking names before they are sent.

A role is granted operations by name (``cairn roles add deployer --allow
deploy_component``); a misspelt name would be stored and grant nothing, so the client
refuses it and names the closest real one. The list mirrors the server's registry
(``node.app.registry()``); ``tests/node/test_cli.py`` fails when the two drift apart.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["OPERATIONS", "closest_operation", "unknown_operations"]

OPERATIONS: frozenset[str] = frozenset(
    {
        # deployments
        "deploy_component",
        "list_deployments",
        "get_deployment",
        "get_components",
        "get_component_logs",
        "drop_component",
        # payloads
        "get_deployment_payload",
        "delete_deployment_payload",
        "pin_deployment",
        "prune_deployment_payloads",
        # users and roles
        "add_user",
        "alter_user",
        "drop_user",
        "list_users",
        "add_role",
        "alter_role",
        "drop_role",
        "list_roles",
        # cluster
        "cluster_status",
        "add_node",
        "remove_node",
        "read_audit_log",
        # the caller
        "get_session",
    }
)


def closest_operation(name: str) -> str | None:
    """The real operation name ``name`` most probably meant, or None when none is close."""
    found = difflib.get_close_matches(name.strip().lower(), sorted(OPERATIONS), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_operations(names: Iterable[str]) -> list[str]:
    """The names that are not operations, in the order given (duplicates once)."""
    seen: list[str] = []
    for name in names:
        if name not in OPERATIONS and name not in seen:
            seen.append(name)
    return seen
