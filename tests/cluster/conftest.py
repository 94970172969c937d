"""Fixtures for the multi-process cluster tests: clusters that are always stopped.

Makes ``tests/cluster`` importable (``import cluster_harness``). Every cluster a test
starts is stopped by a finalizer, even when the test fails; a failing test also gets
the tail of every node's log in its report.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from cluster_harness import Cluster  # noqa: E402


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


@pytest.fixture
def make_cluster(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(count=3, **kwargs)`` → a laid-out (not started) cluster in tmp_path."""
    made: list[Cluster] = []

    def make(count: int = 3, **kwargs: Any) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", count, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
        if _failed(request):
            print(c.logs())


@pytest.fixture(scope="module")
def shared_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """One started 3-node cluster for a whole module (tests must not break it)."""
    c = Cluster(tmp_path_factory.mktemp("shared"), 3)
    try:
        c.start()
    except BaseException:
        print(c.logs())
        c.stop()
        raise
    yield c
    c.stop()
