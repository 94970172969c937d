"""Supervised component operations: the output log of a project's ``[run]`` process.

``get_component_logs {project, lines}`` answers this node's log only (every node keeps
its own); the CLI asks each node it is pointed at.
"""

from __future__ import annotations

from typing import Any

from node.errors import NotFound
from node.operations.registry import Call, Registry

__all__ = ["MAX_LOG_LINES", "registry"]

registry = Registry()

#: The most lines one call returns (the log on disk may hold more).
MAX_LOG_LINES = 10_000


@registry.add("get_component_logs")
async def get_component_logs(call: Call) -> dict[str, Any]:
    """The newest ``lines`` (default 100, at most 10000) lines of ``project``'s log.

    Returns:
        ``{project, node, lines: [{t, stream, line}], truncated}``, oldest line first;
        ``t`` in epoch ms, ``stream`` one of ``stdout``, ``stderr``, ``cairn`` (the
        supervisor's own notes); ``truncated`` when older lines exist.

    Raises:
        NotFound: 404 when the project has no log on this node (it never ran a process
            here), naming the project.
    """
    project = call.fields.project()
    assert project is not None
    count = call.fields.integer("lines", default=100, minimum=1, maximum=MAX_LOG_LINES)
    assert count is not None
    node = call.config.node.name
    tail = await call.services.supervisor.logs(project, count)
    if tail is None:
        raise NotFound(f"component {project} has no log on node {node}", project=project)
    return {
        "project": project,
        "node": node,
        "lines": [x.as_dict() for x in tail.lines],
        "truncated": tail.truncated,
    }
