"""Fixtures for the web view's browser tests: a headless Chromium, a page, a cluster.

The browser is the distribution's Chromium (``.ci/run`` installs it when missing). Where
none can be found the browser tests skip with a message saying so; the tests of the
static routes and of ``get_session`` need no browser and always run. Screenshots go to
``tests/ui/artifacts/`` (ignored by git).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
for extra in (_HERE, _HERE.parent / "cluster", _HERE.parent / "node"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from cdp import Browser, Page, find_chromium  # noqa: E402
from cluster_harness import Cluster, ClusterNode  # noqa: E402
from procs import wait_for  # noqa: E402
from uihelpers import ARTIFACTS, VIEWER, VIEWER_OPERATIONS, CliDeploy, CliStart  # noqa: E402


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip(
            "no Chromium to drive: install the distribution's package "
            "(`apt-get install chromium`, as .ci/run does) or set CAIRN_CHROMIUM to a browser"
        )
    return found


@pytest.fixture
async def browser(chromium: str, tmp_path: Path) -> AsyncIterator[Browser]:
    b = await Browser.launch(chromium, tmp_path / "profile")
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A fresh tab; on failure its problems and a screenshot are kept."""
    p = await browser.new_page()
    yield p
    failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
    if failed:
        print("page problems:", p.page_problems())
        print("browser stderr:", "\n".join(browser.stderr_tail[-20:]))
        await p.screenshot(ARTIFACTS / f"FAILED-{request.node.name}.png")


@pytest.fixture(scope="session")
def ui_cluster(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One started 3-node cluster for the UI tests, with a read-only ``viewer`` user.

    Every user of it drives a browser: without one, skip before starting three nodes."""
    c = Cluster(tmp_path_factory.mktemp("ui"), 3)
    try:
        c.start()
        n1 = c.nodes[0]
        n1.ok("add_role", role="viewer", permission={"operations": VIEWER_OPERATIONS})
        n1.ok("add_user", fields={"username": VIEWER[0], "password": VIEWER[1], "role": "viewer"})
        for n in c.nodes:  # the user replicates; every node must know it before a test
            wait_for(
                lambda n=n: n.op("get_session", user=VIEWER[0], password=VIEWER[1])[0] == 200,
                timeout_s=30,
                what=f"{n.name} to know the viewer user",
            )
    except BaseException:
        print(c.logs())
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture
async def cairn_deploy() -> AsyncIterator[CliStart]:
    """Starts ``cairn deploy`` processes; any still running at the end is killed."""
    started: list[CliDeploy] = []

    async def start(node: ClusterNode, source: Path, project: str) -> CliDeploy:
        started.append(await CliDeploy.start(node, source, project))
        return started[-1]

    yield start
    for d in started:
        await d.stop()
