"""Fixtures of the replication tests: a mesh of in-process nodes that is always closed."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from mesh import Mesh  # noqa: E402


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        await m.close()
