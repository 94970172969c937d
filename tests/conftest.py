"""Fixtures shared by every test package."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Api, make_config

from node.app import create_app
from node.config import Config


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., Config]:
    def factory(name: str = "n1", **sections: dict[str, Any]) -> Config:
        return make_config(tmp_path, name, **sections)

    return factory


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Api]:
    """A started single node (real app, real SQLite and files) behind a test client."""
    app = create_app(make_config(tmp_path))
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    yield Api(client, app)
