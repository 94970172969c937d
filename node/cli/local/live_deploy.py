"""A deploy with live progress, for ``cairn cluster up --deploy`` and ``cairn demo``.

Packs a component directory (or takes a ``.tar.gz``), sends it as a multipart
``deploy_component`` with ``Accept: text/event-stream``, and renders each event as one
line as it arrives (rendered like ``cairn deploy`` does, by
:func:`node.cli.render.render_event`), including a ``peer`` line per node and step.
Synchronous on purpose: the cluster commands are plain foreground programs.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from node.cli.api.errors import ConnectError, describe_os_error
from node.cli.render import render_event
from node.deploy.pack import pack_directory

__all__ = ["DeployOutcome", "deploy_with_progress", "payload_bytes", "read_sse"]


@dataclass(slots=True)
class DeployOutcome:
    """How a deploy ended: ``ok``, the final ``result`` or error body, and its id."""

    ok: bool
    result: dict[str, Any]
    deployment_id: str | None = None
    events: list[tuple[str, Any]] = field(default_factory=list)


def payload_bytes(source: Path) -> bytes:
    """The payload for ``source``: a directory packed as tar.gz, or a file's bytes.

    Raises:
        OSError: the source cannot be read.
    """
    if source.is_dir():
        buf = io.BytesIO()
        pack_directory(source, buf)
        return buf.getvalue()
    return source.read_bytes()


def _multipart(fields: dict[str, str], payload: bytes) -> tuple[bytes, str]:
    boundary = "cairn-" + secrets.token_hex(12)
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    out.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="payload"; '
        'filename="payload.tar.gz"\r\nContent-Type: application/gzip\r\n\r\n'.encode()
    )
    out.write(payload + f"\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def read_sse(stream: IO[bytes]) -> Iterator[tuple[str, Any]]:
    """Yield ``(event, data)`` from a ``text/event-stream`` body (comments skipped)."""
    name, data_lines = "message", list[str]()
    for raw in stream:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data_lines:
                text = "\n".join(data_lines)
                try:
                    data: Any = json.loads(text)
                except ValueError:
                    data = text
                yield name, data
            name, data_lines = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data_lines.append(line[5:].removeprefix(" "))


def deploy_with_progress(
    url: str,
    project: str,
    source: Path,
    *,
    user: str,
    password: str,
    echo: Callable[[str], None],
    fields: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> DeployOutcome:
    """Deploy ``source`` as ``project`` through the node at ``url``, echoing progress.

    Args:
        url: the node's admin URL.
        project: component name.
        source: component directory or ``.tar.gz``.
        user, password: credentials.
        echo: receives one line per event worth showing.
        fields: more ``deploy_component`` fields, as form strings.
        timeout_s: socket timeout while waiting for the next byte.

    Returns:
        The outcome; ``ok`` only when the stream ended with ``done``.

    Raises:
        ConnectError: the node cannot be reached, or the stream broke off (in words).
        OSError: the source cannot be read.
    """
    form = {"operation": "deploy_component", "project": project, **(fields or {})}
    body, ctype = _multipart(form, payload_bytes(source))
    req = urllib.request.Request(url.rstrip("/") + "/", data=body, method="POST")
    req.add_header("Content-Type", ctype)
    req.add_header("Accept", "text/event-stream")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    outcome = DeployOutcome(ok=False, result={})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            outcome.result = json.loads(raw or b"{}")
        except ValueError:
            outcome.result = {"error": raw.decode(errors="replace"), "code": str(e.code)}
        return outcome
    except (urllib.error.URLError, OSError) as e:
        raise ConnectError(f"cannot reach {url}: {describe_os_error(e)}") from e
    try:
        _follow(resp, outcome, echo)
    except OSError as e:
        raise ConnectError(f"the progress stream broke off: {describe_os_error(e)}") from e
    if not outcome.ok and not outcome.result:
        outcome.result = {"error": "the progress stream ended before the deploy finished"}
    return outcome


def _follow(resp: Any, outcome: DeployOutcome, echo: Callable[[str], None]) -> None:
    """Read the deploy's event stream into ``outcome``, echoing each event's line."""
    with resp:
        for event, data in read_sse(resp):
            outcome.events.append((event, data))
            if event == "deployment" and isinstance(data, dict):
                outcome.deployment_id = data.get("deployment_id")
            if event == "done":
                result = data.get("result") if isinstance(data, dict) else None
                outcome.ok, outcome.result = True, result if isinstance(result, dict) else {}
                break
            # The stream's own end is an ``error`` carrying the answer (``{error, code}``);
            # the deploy's ``error`` event ({message, code, phase}) is only a line of it.
            if event == "error" and not (isinstance(data, dict) and "message" in data):
                outcome.result = data if isinstance(data, dict) else {"error": str(data)}
                break
            line = render_event(event, data)
            if line is not None:
                echo(line)
