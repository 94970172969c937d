"""Deployment ids given as unique prefixes: ``cairn deployments show 3f2a`` .

A full id is used as given. A prefix (hex digits and hyphens, as ids are written) is
resolved on the client through ``list_deployments``, page by page, newest first: one
match is the id; none is exit 1 (:data:`~node.cli.common.EXIT_FAILED`); several are a
usage error, exit 2, listing the candidates so the operator can type a longer prefix.
Resolving a prefix needs ``list_deployments``; a role without it must give full ids.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from node.cli.common import EXIT_FAILED, EXIT_USAGE, CommandError
from node.cli.render import format_time
from storage.rules import is_deployment_id

if TYPE_CHECKING:
    from node.cli.api.client import Client

__all__ = ["MAX_CANDIDATES", "check_id_or_prefix", "resolve_deployment_id"]

#: Candidates listed for an ambiguous prefix (the search stops after one more).
MAX_CANDIDATES = 10
_PAGE = 1000
_PREFIX_RE = re.compile(r"[0-9a-f-]{1,36}")


def check_id_or_prefix(text: str) -> str:
    """The id or prefix in canonical (lowercase) form.

    Raises:
        CommandError: (exit 2) it cannot be the start of a deployment id.
    """
    value = text.strip().lower()
    if not _PREFIX_RE.fullmatch(value):
        raise CommandError(
            f"{text!r} is not a deployment id or the start of one "
            "(ids look like 3f2a9c1e-...; `cairn deployments list` shows them)",
            exit_code=EXIT_USAGE,
            code="invalid_id",
        )
    return value


async def resolve_deployment_id(client: Client, text: str) -> str:
    """The full deployment id that ``text`` is, or is the unique prefix of.

    Raises:
        CommandError: not an id or prefix (exit 2); no deployment matches (exit 1);
            several match (exit 2, ``candidates`` in the error body); the caller may not
            list deployments (exit 1).
        ConnectError, ApiError: the node could not be asked.
    """
    from node.cli.api.errors import ApiError

    value = check_id_or_prefix(text)
    if is_deployment_id(value):
        return value
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        fields: dict[str, Any] = {"limit": _PAGE}
        if cursor:
            fields["cursor"] = cursor
        try:
            page = await client.op("list_deployments", **fields)
        except ApiError as e:
            if e.status != 403:
                raise
            raise CommandError(
                f"cannot resolve the id prefix {value!r}: your role does not allow "
                "list_deployments; give the full deployment id",
                code="forbidden",
            ) from e
        found += [d for d in page["deployments"] if d["deployment_id"].startswith(value)]
        cursor = page.get("next_cursor")
        if not cursor or len(found) > MAX_CANDIDATES:
            break
    if len(found) == 1:
        return str(found[0]["deployment_id"])
    if not found:
        raise CommandError(
            f"no deployment id starts with {value!r}; `cairn deployments list` shows them",
            exit_code=EXIT_FAILED,
            code="not_found",
        )
    shown = found[:MAX_CANDIDATES]
    lines = [
        f"  {d['deployment_id']}  {d.get('project')}  {d.get('status')}  "
        f"{format_time(d.get('started_at'))}"
        for d in shown
    ]
    count = f"more than {MAX_CANDIDATES}" if len(found) > MAX_CANDIDATES else str(len(found))
    raise CommandError(
        f"the id prefix {value!r} is ambiguous: it matches {count} deployments; "
        "give more characters:\n" + "\n".join(lines),
        exit_code=EXIT_USAGE,
        code="ambiguous_id",
        candidates=[d["deployment_id"] for d in shown],
    )
