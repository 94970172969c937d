"""Crash safety with real SIGKILLs: a supervising process dies, its component group is
stopped by the next supervisor (or node) in the same data directory, with no orphan left."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from procs import NodeProcess
from supervision import PY, group_gone, live_groups, release, supervisor

from node.deploy.component_config import RunSpec
from node.deploy.supervisor import Outcome

# A stand-in for a node: runs one component through a Supervisor, prints its pid, waits.
DRIVER = """
import asyncio, sys
from pathlib import Path
from node.config import ComponentsConfig
from node.deploy.component_config import RunSpec
from node.deploy.supervisor import Supervisor

async def main() -> None:
    run_dir, deployment_id, release_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    sup = Supervisor(node="n1", run_dir=run_dir, settings=ComponentsConfig(settle_s=0.2))
    result = await sup.switch("web", deployment_id, release_dir, RunSpec(sys.argv[4]), restart=True)
    print("component-pid", result.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""

# Two processes in the group, both ignoring SIGTERM: only SIGKILL of the group stops them.
FAMILY = "trap '' TERM; sleep 600 & sleep 600"


async def _run_and_sigkill_driver(run_dir: Path, deployment_id: str, path: Path) -> int:
    """Start the driver, wait for its component, SIGKILL the driver; the component's pid."""
    driver = await asyncio.create_subprocess_exec(
        PY, "-c", DRIVER, str(run_dir), deployment_id, str(path), FAMILY,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert driver.stdout is not None
    try:
        line = b""
        while not line.startswith(b"component-pid "):  # structlog prints to stdout too
            line = await asyncio.wait_for(driver.stdout.readline(), 30)
            assert line, "the driver exited"
    finally:
        driver.send_signal(signal.SIGKILL)
        assert await driver.wait() == -signal.SIGKILL
    return int(line.split()[1])


async def test_a_new_supervisor_stops_what_a_killed_one_left_and_starts_once(
    tmp_path: Path,
) -> None:
    marker = f"CAIRN_RELEASE_DIR={tmp_path}"
    dep, path = release(tmp_path)
    old = await _run_and_sigkill_driver(tmp_path / "run", dep, path)
    assert live_groups(marker) == {old}  # the orphaned component is still running
    sup = supervisor(tmp_path, stop_grace_s=0.3)
    try:
        results = await sup.recover({"web": (dep, path, RunSpec(FAMILY))})
        assert results["web"].outcome == Outcome.READY
        new = sup.state("web").pid
        assert group_gone(old) and new is not None and live_groups(marker) == {new}
    finally:
        await sup.close()
    assert live_groups(marker) == set()


def test_a_returning_node_stops_the_component_its_killed_predecessor_left(
    tmp_path: Path,
) -> None:
    node = NodeProcess("n1", tmp_path)
    marker = f"CAIRN_RELEASE_DIR={tmp_path}"
    dep, path = release(tmp_path)
    old = asyncio.run(_run_and_sigkill_driver(node.data_dir / "run", dep, path))
    assert live_groups(marker) == {old}
    node.extra_toml = "[components]\nstop_grace_s = 0.5\n"
    node.start()
    try:
        # Start-up (before the node answers) stopped the leftover group.
        assert group_gone(old) and live_groups(marker) == set()
        assert "leftover_components_stopped" in node.log()
    finally:
        assert node.stop() == 0
