"""Fixtures of the simulator's tests: cluster material issued once per session."""

from __future__ import annotations

import pytest

from .certs import Certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("sim-certs"))
