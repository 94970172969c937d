"""Filters and cursors of ``list_deployments``: newest first, paged in SQL."""

from __future__ import annotations

import base64
import json

from storage.records import Deployment

__all__ = ["DeploymentFilter", "decode_cursor", "encode_cursor"]


class DeploymentFilter:
    """Filters for :meth:`Store.list_deployments` (all optional, combined with AND)."""

    def __init__(
        self,
        *,
        project: str | None = None,
        status: str | None = None,
        user: str | None = None,
        since: int | None = None,
        until: int | None = None,
    ) -> None:
        self.project, self.status, self.user = project, status, user
        self.since, self.until = since, until

    def where(self) -> tuple[list[str], list[object]]:
        clauses: list[str] = []
        params: list[object] = []
        for col, value in (("project", self.project), ("status", self.status), ("user", self.user)):
            if value is not None:
                clauses.append(f"{col} = ?")
                params.append(value)
        if self.since is not None:
            clauses.append("started_at >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("started_at <= ?")
            params.append(self.until)
        return clauses, params


def encode_cursor(d: Deployment) -> str:
    raw = json.dumps([d.started_at, d.deployment_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError
        started_at, deployment_id = value
        if isinstance(started_at, bool) or not isinstance(started_at, int):
            raise ValueError
        if not isinstance(deployment_id, str) or not 0 <= started_at < 1 << 63:
            raise ValueError
        return started_at, deployment_id
    except (ValueError, TypeError) as e:
        raise ValueError("cursor is not one this node issued") from e
