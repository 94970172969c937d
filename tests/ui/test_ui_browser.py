"""The web view in headless Chromium against a real 3-node cluster.

Deploys are started from the CLI (a real ``cairn deploy`` process) on one node and
followed on a page served by another. Hooks that must hold a deploy in flight wait for a
gate file the test creates; nothing sleeps to synchronise. Every test ends by checking
what the page sent: credentials only in ``Authorization`` headers, never in a URL, a
cookie or localStorage, and no script error or CSP violation on the way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cdp import Page
from cluster_harness import ADMIN_PASSWORD, ADMIN_USER, Cluster
from helpers import component, wait_until
from uihelpers import (
    NODE_STATUSES,
    SEQS,
    VIEWER,
    CliStart,
    assert_no_credentials_leak,
    node_statuses,
    open_deployment,
    operation_requests,
    page_origin,
    same,
    shot,
    sign_in,
    write_component,
)

pytestmark = pytest.mark.cluster

# -- tests -----------------------------------------------------------------------------


async def test_a_cli_deploy_is_followed_live_on_another_node(
    ui_cluster: Cluster, page: Page, tmp_path: Path, cairn_deploy: CliStart
) -> None:
    n1, _, n3 = ui_cluster.nodes
    gate = tmp_path / "gate"
    source = write_component(
        tmp_path / "web",
        install=f'until [ -e "{gate}" ]; do sleep 0.05; done; echo "built on $CAIRN_RELEASE_DIR"',
    )
    await sign_in(page, n3, ADMIN_USER, ADMIN_PASSWORD)
    cli = await cairn_deploy(n1, source, "live-web")
    await open_deployment(page, cli.deployment_id)

    # The origin is held in its install hook: the page shows it working, the others waiting.
    await page.wait(f"{NODE_STATUSES}.length === 3", what="three node columns")
    await page.wait(
        "document.querySelector('#nodes article[data-node=n1]')?.dataset.status === 'installing'",
        what="n1 installing",
    )
    before = await node_statuses(page)
    assert before["n2"] == before["n3"] == "pending", before
    assert await page.eval("!!document.querySelector('#live')"), "the page is not live"
    await shot(page, "deployment-live")

    gate.touch()
    await page.wait(
        f"{NODE_STATUSES}.every(([n, s]) => s === 'active')", timeout_s=90, what="all active"
    )
    await page.wait("document.querySelector('#summary .badge')?.dataset.status === 'success'")
    assert await cli.finish() == 0, cli.out
    # The stream ended with its `done` record: the page shows the finished deploy.
    await page.wait("!document.querySelector('#live')", what="the stream to end")
    assert "Completed\n—" not in await page.text("#summary")

    # Every event once, in order, and the stream came from the node serving the page.
    seqs = await page.eval(SEQS)
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert await page.eval("document.querySelector('#timeline li:last-child').dataset.event") in (
        "finished",
        "payload_dropped",
    )
    streams = [
        h
        for body, h in operation_requests(page, n3.url)
        if body["operation"] == "get_deployment" and h.get("Accept") == "text/event-stream"
    ]
    assert streams, "the page did not follow the deploy's event stream on n3"
    await shot(page, "deployment")
    await assert_no_credentials_leak(page, ADMIN_USER, ADMIN_PASSWORD)


async def test_a_failed_deploy_shows_the_failing_nodes_error_and_hook_output(
    ui_cluster: Cluster, page: Page, tmp_path: Path, cairn_deploy: CliStart
) -> None:
    n1, n2, n3 = ui_cluster.nodes
    # The check refuses only the origin's release (its path names the node's directory).
    origin_fails = write_component(
        tmp_path / "origin-fails",
        check='case "$CAIRN_RELEASE_DIR" in */n1/data/*) '
        'echo "n1 refuses this release" >&2; exit 4;; esac; echo fine',
    )
    cli = await cairn_deploy(n1, origin_fails, "fails")
    assert await cli.finish() != 0, cli.out
    await sign_in(page, n2, ADMIN_USER, ADMIN_PASSWORD)
    await open_deployment(page, cli.deployment_id)
    failed = "#nodes article[data-node=n1]"
    await page.wait(f"document.querySelector('{failed}')?.dataset.status === 'failed'")
    column = await page.text(failed)
    assert "check hook exited with status 4" in column and "check_failed" in column, column
    assert "n1 refuses this release" in column, column
    assert await page.eval(f"document.querySelector('{failed} details.hook-output').open")
    assert await page.eval("document.querySelector('#summary .badge').dataset.status") == "failed"
    await shot(page, "deployment-failed")

    # A peer's failure is shown against that peer, from a page on a third node.
    peer_fails = write_component(
        tmp_path / "peer-fails",
        check='case "$CAIRN_RELEASE_DIR" in */n2/data/*) echo "n2 says no" >&2; exit 3;; esac',
    )
    cli = await cairn_deploy(n1, peer_fails, "fails")
    await sign_in(page, n3, ADMIN_USER, ADMIN_PASSWORD)  # another origin: its own session
    await open_deployment(page, cli.deployment_id)
    assert await cli.finish() != 0, cli.out
    await page.wait("document.querySelector('#summary .badge')?.dataset.status === 'failed'")
    statuses = await node_statuses(page)
    assert statuses["n2"] == "failed" and "active" not in statuses.values(), statuses
    column = await page.text("#nodes article[data-node=n2]")
    assert "check hook exited with status 3" in column, column
    summary = await page.text("#summary")
    assert "n2" in summary, summary
    await assert_no_credentials_leak(page, ADMIN_USER, ADMIN_PASSWORD)


async def test_actions_are_offered_only_to_users_allowed_them(
    ui_cluster: Cluster, page: Page, tmp_path: Path
) -> None:
    n1, n2, _ = ui_cluster.nodes
    code, body = ui_cluster.deploy(n1, "acts", component())
    assert code == 200, body
    original = body["deployment_id"]
    ui_cluster.wait_everywhere(original)

    # A viewer (no deploy_component, no pin_deployment) sees the record and no buttons.
    await sign_in(page, n2, *VIEWER)
    await open_deployment(page, original)
    await page.wait("document.querySelector('#summary .badge')?.dataset.status === 'success'")
    assert await page.eval("document.querySelector('#actions').children.length") == 0
    assert not await page.eval("!!document.querySelector('#rollback, #pin')")
    await assert_no_credentials_leak(page, *VIEWER)
    await page.click("#sign-out")
    await page.wait("!!document.querySelector('#signin')")
    assert await page.eval("sessionStorage.length") == 0

    # An admin gets both, each behind a confirmation.
    await sign_in(page, n2, ADMIN_USER, ADMIN_PASSWORD)
    await open_deployment(page, original)
    await page.wait("!!document.querySelector('#rollback') && !!document.querySelector('#pin')")
    await page.click("#pin")
    await page.wait("!!document.querySelector('dialog[open]')")
    await shot(page, "confirm-pin")
    await page.click("dialog[open] [data-action=confirm]")
    await page.wait("document.querySelector('#pin')?.textContent === 'Unpin'")
    await wait_until(lambda: n1.deployment(original)["pinned"] is True, what="pinned on n1")

    before = n1.ok("list_deployments", project="acts")["total"]
    await page.click("#rollback")
    await page.wait("!!document.querySelector('dialog[open]')")
    await page.click("dialog[open] [data-action=cancel]")
    await page.wait("!document.querySelector('dialog')")
    assert n1.ok("list_deployments", project="acts")["total"] == before

    await page.click("#rollback")
    await page.click("dialog[open] [data-action=confirm]")
    await page.wait(
        f"(document.querySelector('#deployment-id')?.textContent || {json.dumps(original)})"
        f" !== {json.dumps(original)}",
        what="the rollback's own page",
    )
    rollback_id = await page.text("#deployment-id")
    await page.wait(
        f"{NODE_STATUSES}.length === 3 && {NODE_STATUSES}.every(([n, s]) => s === 'active')",
        timeout_s=60,
    )
    assert ui_cluster.wait_deployment(n1, rollback_id)["rollback_of"] == original
    assert original in await page.text("#summary")
    await assert_no_credentials_leak(page, ADMIN_USER, ADMIN_PASSWORD)


async def test_the_deployments_table_filters_and_pages(
    ui_cluster: Cluster, page: Page, tmp_path: Path
) -> None:
    n1, n2, _ = ui_cluster.nodes
    ids = []
    for i in range(3):
        code, body = ui_cluster.deploy(n1, "paged", component(**{"v.txt": str(i)}))
        assert code == 200, body
        ids.append(body["deployment_id"])
    code, body = ui_cluster.deploy(n1, "paged", component(install="exit 9"))
    assert code == 422, body
    ids.append(body["deployment_id"])
    ui_cluster.wait_everywhere(ids[-1], nodes=[n2])

    await sign_in(page, n2, ADMIN_USER, ADMIN_PASSWORD)
    await page.wait("!!document.querySelector('#deployments tbody tr')")
    await page.fill("#f-project", "paged")
    await page.eval("document.querySelector('#filters').requestSubmit()")
    rows = "[...document.querySelectorAll('#deployments tbody tr')].map(r => r.dataset.id)"
    await page.wait(f"{rows}.length === 4")
    assert await page.eval(rows) == ids[::-1]
    # Peers stage as the origin does, so the failing install fails on one node or more.
    assert re.search(r"0/3 [123] failed", await page.text("#deployments tbody tr:first-child"))
    assert "3/3" in await page.text("#deployments tbody tr:nth-child(2)")
    await shot(page, "deployments")

    # Two per page, through the cursor, and back.
    await page.goto(page_origin(page) + "/ui/#/deployments?project=paged&limit=2")
    await page.wait(f"JSON.stringify({rows}) === {same(ids[:1:-1])}")
    await page.click("#older")
    await page.wait(f"JSON.stringify({rows}) === {same(ids[1::-1])}")
    assert not await page.eval("!!document.querySelector('#older')")
    await page.click("#newer")
    await page.wait(f"JSON.stringify({rows}) === {same(ids[:1:-1])}")

    await page.goto(page_origin(page) + "/ui/#/deployments?project=paged&status=failed")
    await page.wait(f"JSON.stringify({rows}) === {same([ids[-1]])}")
    await page.goto(page_origin(page) + "/ui/#/deployments?user=viewer")
    await page.wait("/No deployments match/.test(document.querySelector('.list-status').innerText)")
    newest = n1.deployment(ids[-1])
    assert newest is not None
    since = newest["started_at"]
    await page.goto(page_origin(page) + f"/ui/#/deployments?project=paged&since={since}")
    await page.wait(f"JSON.stringify({rows}) === {same([ids[-1]])}")

    sent = [b for b, _ in operation_requests(page, n2.url) if b["operation"] == "list_deployments"]
    assert any(b.get("cursor") for b in sent), "paging did not use list_deployments' cursor"
    assert {"project": "paged", "status": "failed", "limit": 25} in [
        {k: v for k, v in b.items() if k != "operation"} for b in sent
    ]
    await assert_no_credentials_leak(page, ADMIN_USER, ADMIN_PASSWORD)


async def test_the_cluster_page_shows_every_node_and_what_it_runs(
    ui_cluster: Cluster, page: Page
) -> None:
    n1 = ui_cluster.nodes[0]
    code, body = ui_cluster.deploy(n1, "clustered", component())
    assert code == 200, body
    ui_cluster.wait_everywhere(body["deployment_id"])
    await sign_in(page, n1, *VIEWER)
    await page.goto(n1.url + "/ui/#/cluster")
    await page.wait(
        "[...document.querySelectorAll('#peers tbody tr')].map(r => r.dataset.node + '=' +"
        " r.dataset.state).join() === 'n2=connected,n3=connected'"
    )
    cells = (
        "[...document.querySelectorAll('#components-table tr[data-project=clustered] td.cell')]"
        ".map(c => c.dataset.node + '=' + c.dataset.deployment)"
    )
    expected = [f"{n}={body['deployment_id']}" for n in ("n1", "n2", "n3")]
    await page.wait(f"JSON.stringify({cells}) === {same(expected)}")
    assert "n1" in await page.text("#self")
    await shot(page, "cluster")
    await assert_no_credentials_leak(page, *VIEWER)


async def test_signing_in_and_out(ui_cluster: Cluster, page: Page) -> None:
    n2 = ui_cluster.nodes[1]
    await page.goto(n2.url + "/")  # a browser asking for / lands on the view
    await page.wait("!!document.querySelector('#signin')")
    assert (await page.eval("location.pathname")) == "/ui/"
    await page.fill("#username", ADMIN_USER)
    await page.fill("#password", "not-the-password")
    await page.eval("document.querySelector('#signin').requestSubmit()")
    await page.wait(
        "/Wrong user or password/.test(document.querySelector('.form-error')?.innerText)"
    )
    assert await page.eval("sessionStorage.length") == 0
    await shot(page, "sign-in")
    await sign_in(page, n2, ADMIN_USER, ADMIN_PASSWORD)
    assert await page.eval("sessionStorage.length") == 1
    # The tab keeps its session across a reload, and loses it on sign-out.
    await page.goto(n2.url + "/ui/#/cluster")
    await page.eval("location.reload()")
    await page.wait("!!document.querySelector('#peers')")
    await page.click("#sign-out")
    await page.wait("!!document.querySelector('#signin')")
    assert await page.eval("sessionStorage.length") == 0
    # 401 problems are expected here (the wrong password); nothing else may go wrong.
    assert page.errors == []
