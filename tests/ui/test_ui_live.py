"""The live stream after a dropped connection, and records in shapes still settling.

A relay between the browser and a node cuts the page's stream while a deploy is held in
its install hook: the page must reconnect on its own, resume with ``Last-Event-ID`` set
to the last event it showed, and end with every event exactly once. Then the page is fed
made-up answers (through the DevTools ``Fetch`` domain) carrying every field the record,
``cluster_status`` and ``get_components`` may carry, plus junk and unknown values: it must
show each field it knows and survive the rest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cdp import Page, Request
from cluster_harness import ADMIN_PASSWORD, ADMIN_USER, Cluster
from helpers import wait_until
from relay import Relay
from uihelpers import (
    NODE_STATUSES,
    SEQS,
    CliStart,
    assert_no_credentials_leak,
    node_statuses,
    open_deployment,
    operation_requests,
    shot,
    sign_in,
    write_component,
)

pytestmark = pytest.mark.cluster


async def test_a_dropped_stream_resumes_after_the_last_event_shown(
    ui_cluster: Cluster, page: Page, tmp_path: Path, cairn_deploy: CliStart
) -> None:
    n1, n2, _ = ui_cluster.nodes
    gate = tmp_path / "gate"
    source = write_component(
        tmp_path / "resumed", install=f'until [ -e "{gate}" ]; do sleep 0.05; done'
    )
    async with Relay("127.0.0.1", n2.admin_port) as relay:
        await sign_in(page, relay.url, ADMIN_USER, ADMIN_PASSWORD)
        cli = await cairn_deploy(n1, source, "resumed")
        await open_deployment(page, cli.deployment_id)
        await page.wait(
            "document.querySelector('#nodes article[data-node=n1]')?.dataset.status"
            " === 'installing' && !!document.querySelector('#live')"
        )

        def resumes() -> list[str]:
            """Last-Event-ID of each stream request (the first one resumes after the
            stored log the page loaded)."""
            return [
                h["Last-Event-ID"]
                for body, h in operation_requests(page, relay.url)
                if body["operation"] == "get_deployment" and "Last-Event-ID" in h
            ]

        # Held in the hook, the deploy writes nothing more: this is the last event shown.
        shown = await page.eval(SEQS)
        before = resumes()
        relay.cut()
        await wait_until(lambda: len(resumes()) > len(before), what="the page to reconnect")
        assert resumes()[len(before) :] == [str(shown[-1])], (shown, before, resumes())
        await page.wait("!!document.querySelector('#live:not(.reconnecting)')")

        gate.touch()
        await page.wait(
            f"{NODE_STATUSES}.length === 3 && {NODE_STATUSES}.every(([n, s]) => s === 'active')",
            timeout_s=90,
        )
        assert await cli.finish() == 0, cli.out
        seqs = await page.eval(SEQS)
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > len(shown), seqs
        assert relay.cuts == 1
        await assert_no_credentials_leak(page, ADMIN_USER, ADMIN_PASSWORD)


DID = "6b1f9a52-0c1e-4c55-9b1a-0d5e2f7c9a11"
OTHER = "0f0e0d0c-0b0a-4909-8807-060504030201"


def _record(now: int) -> dict[str, Any]:
    return {
        "deployment_id": DID,
        "project": "shapes",
        "status": "failed",
        "phase": "replicate",
        "origin_node": "n1",
        "user": "admin",
        "started_at": now - 65_000,
        "completed_at": now,
        "error": {"message": "staging failed on n2", "code": "replication_failed"},
        "expected_nodes": ["n1", "n2", "n3", "n4", "n5"],
        "peer_results": [
            {"node": "n1", "status": "discarded", "phase": "stage", "error": None, "late": False},
            {
                "node": "n2",
                "status": "failed",
                "phase": "install",
                "error": {"message": "install hook exited with status 2", "code": "install_failed"},
                "started_at": now - 30_000,
                "completed_at": now - 29_000,
                "late": False,
                "install_output": {
                    "lines": [
                        {"stream": "stdout", "line": "npm ci"},
                        {"stream": "stderr", "line": "ENOSPC: no space left on device"},
                    ],
                    "truncated": True,
                    "dropped_lines": 40,
                },
            },
            {"node": "n3", "status": "superseded", "late": True},
            {"node": "n4", "status": "some_future_status", "phase": None},
            "not an object",
            None,
        ],
        "event_log": [
            {"seq": 1, "t": now - 65_000, "event": "deployment", "data": {"project": "shapes"}},
            {"seq": 2, "t": now - 1000, "event": "mystery", "data": {"x": [1, 2]}},
            {"seq": 3, "t": now, "event": "finished", "data": {"status": "failed"}},
        ],
    }


def _status(now: int) -> dict[str, Any]:
    day = 86_400_000
    return {
        "node": "n1",
        "cluster_id": "c0ffee",
        "quarantined": 2,
        "cert_expires_at": now + 5 * day + day // 2,
        "peers": [
            {
                "name": "n2",
                "url": "wss://10.0.0.2:9933",
                "state": "connected",
                "last_seen": now - 3000,
                "lag_changes": 4,
                "lag_bytes": 2048,
                "transfers": [{"hash": "ab" * 32, "offset": 10}],
                "last_error": "handshake timed out",
                "quarantined": [{"table": "deployments", "reason": "bad signer"}],
                "cert_expires_at": now + 100 * day + day // 2,
            },
            {"name": "n3", "state": "disconnected"},
        ],
    }


def _components(now: int) -> dict[str, Any]:
    return {
        "node": "n1",
        "components": [
            {
                "project": "shapes",
                "deployment_id": OTHER,
                "payload_hash": "cd" * 32,
                "activated_at": now,
                "nodes": [
                    {
                        "node": "n1",
                        "deployment_id": OTHER,
                        "activated_at": now,
                        "process": {
                            "running": True,
                            "pid": 4242,
                            "restarts": 2,
                            "ready": True,
                            "last_exit": None,
                        },
                        "converged": True,
                        "reason": None,
                    },
                    {
                        "node": "n2",
                        "deployment_id": DID,
                        "process": {
                            "running": False,
                            "ready": False,
                            "restarts": 0,
                            "last_exit": 137,
                        },
                        "converged": False,
                        "reason": "payload gone",
                    },
                ],
            }
        ],
    }


async def test_every_field_is_shown_and_unknown_shapes_do_no_harm(
    ui_cluster: Cluster, page: Page
) -> None:
    n1 = ui_cluster.nodes[0]
    answers = {"get_deployment": _record, "cluster_status": _status, "get_components": _components}

    async def fake(request: Request) -> tuple[int, Any] | None:
        if request.method != "POST" or not request.post_data:
            return None
        op = json.loads(request.post_data).get("operation")
        now = int(time.time() * 1000)  # as of the answer: "last seen 3 s ago" stays true
        return (200, answers[op](now)) if op in answers else None

    await sign_in(page, n1, ADMIN_USER, ADMIN_PASSWORD)
    await page.intercept(fake)
    await open_deployment(page, DID)
    statuses = await node_statuses(page)
    assert statuses == {
        "n1": "discarded",
        "n2": "failed",
        "n3": "superseded",
        "n4": "some_future_status",
        "n5": "pending",
    }
    n2 = await page.text("#nodes article[data-node=n2]")
    for text in ("install hook exited with status 2", "ENOSPC: no space left on device",
                 "40 lines dropped", "npm ci", "1.0 s"):  # fmt: skip
        assert text in n2, (text, n2)
    assert "late" in await page.text("#nodes article[data-node=n3]")
    assert "mystery" in await page.text("#timeline")
    summary = await page.text("#summary")
    assert "staging failed on n2" in summary and "1 min 5 s" in summary, summary
    await shot(page, "deployment-shapes")

    await page.goto(n1.url + "/ui/#/cluster")
    await page.wait("!!document.querySelector('#components-table')")
    me = await page.text("#self")
    assert "2 quarantined" in me and "in 5 days" in me and "c0ffee" in me, me
    peer = await page.text("#peers tr[data-node=n2]")
    for text in ("4 changes", "2.0 KiB", "1 quarantined", "handshake timed out", "in 100 days",
                 "3 s ago"):  # fmt: skip
        assert text in peer, (text, peer)
    assert "disconnected" in await page.text("#peers tr[data-node=n3]")
    ok = await page.text("#components-table td[data-node=n1]")
    assert "ready" in ok and "pid 4242" in ok and "2 restarts" in ok, ok
    behind = await page.text("#components-table td[data-node=n2]")
    for text in ("not the active deploy", "not converged: payload gone", "last exit 137"):
        assert text in behind, (text, behind)
    await shot(page, "cluster-shapes")
    assert page.page_problems() == [], page.page_problems()
