"""Basic-auth failure limiting, constant-cost checks for unknown users, refusal logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import ADMIN, Api, basic, make_config
from structlog.testing import capture_logs

import node.auth
from node.app import create_app
from node.auth import FailureLimiter

PASSWORD = "limits-password-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_blocks_for_the_rest_of_the_window_and_stays_bounded() -> None:
    clock = Clock()
    lim = FailureLimiter(3, 60.0, 100, clock=clock)
    for _ in range(2):
        lim.failed("k")
        assert lim.retry_after("k") is None
    lim.failed("k")
    clock.now += 10
    assert lim.retry_after("k") == pytest.approx(50.0)
    assert lim.retry_after("other") is None
    clock.now += 50
    assert lim.retry_after("k") is None  # the window is over: a fresh start
    lim.failed("k")
    assert lim.retry_after("k") is None
    for i in range(1000):
        lim.failed(f"spray-{i}")
    assert len(lim) == 100
    assert FailureLimiter(0, 60.0, 10).retry_after("k") is None  # 0 = off


async def _api(aiohttp_client: Any, tmp_path: Path, **auth: Any) -> Api:
    app = create_app(make_config(tmp_path, auth=auth))
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    api = Api(client, app)
    perm = {"operations": ["list_users"]}
    status, body = await api.op("add_role", role="reader", permission=perm)
    assert status == 200, body
    status, body = await api.op("add_user", username="bob", password=PASSWORD, role="reader")
    assert status == 200, body
    return api


async def test_failures_per_user_get_429_with_retry_after(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    api = await _api(aiohttp_client, tmp_path, max_failures_per_user=3, failure_window_s=120)
    with capture_logs() as logs:
        for _ in range(3):
            status, body = await api.op("list_users", auth=basic("bob", "guess-guess-1"))
            assert status == 401, body
        # Now even the right password waits: guessing gets no answer at all.
        resp = await api.client.post(
            "/", json={"operation": "list_users"}, headers={"Authorization": basic("bob", PASSWORD)}
        )
        body = await resp.json()
        assert resp.status == 429 and body["code"] == "too_many_requests", body
        assert 1 <= int(resp.headers["Retry-After"]) <= 120
        # Other users are not affected by bob's lock.
        status, _ = await api.op("list_users")
        assert status == 200
    failed = [e for e in logs if e["event"] == "auth_failed"]
    assert len(failed) == 3 and {e["user"] for e in failed} == {"bob"}
    assert all(e["source"] == "127.0.0.1" and e["reason"] == "wrong_password" for e in failed)
    assert any(e["event"] == "auth_rate_limited" and e["user"] == "bob" for e in logs)
    assert "guess-guess-1" not in repr(logs) and PASSWORD not in repr(logs)


async def test_failures_per_source_count_unknown_users_too(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    api = await _api(aiohttp_client, tmp_path, max_failures_per_source=5, max_failures_per_user=0)
    for i in range(5):  # a spray over user names, each tried once
        status, body = await api.op("list_users", auth=basic(f"user{i}", "guess-guess-1"))
        assert status == 401, body
    for auth in (basic(*ADMIN), basic("user9", "x"), "Basic !!!", None):
        status, body = await api.op("list_users", auth=auth)
        assert status == 429, (auth, body)


async def test_unknown_users_cost_a_full_scrypt_check(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await _api(aiohttp_client, tmp_path)
    checked: list[str] = []
    real = node.auth.verify_password

    def counting(password: str, stored: str) -> bool:
        checked.append(stored)
        return real(password, stored)

    monkeypatch.setattr(node.auth, "verify_password", counting)
    status, _ = await api.op("list_users", auth=basic("bob", "wrong-password-9"))
    assert status == 401
    status, _ = await api.op("list_users", auth=basic("nobody-here", "wrong-password-9"))
    assert status == 401
    status, _ = await api.op("alter_user", username="bob", active=False)
    status, _ = await api.op("list_users", auth=basic("bob", PASSWORD))
    assert status == 401
    assert len(checked) == 3  # a real hash, then the dummy twice (unknown, inactive)
    params = {s.split("$")[1:4] == checked[0].split("$")[1:4] for s in checked}
    assert params == {True}  # same scrypt cost for all three


async def test_every_403_is_logged_with_user_and_source(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    api = await _api(aiohttp_client, tmp_path)
    with capture_logs() as logs:
        status, _ = await api.op(
            "add_user", auth=basic("bob", PASSWORD), username="x1", password=PASSWORD, role="reader"
        )
        assert status == 403
    (event,) = [e for e in logs if e["event"] == "operation_forbidden"]
    assert event["user"] == "bob" and event["source"] == "127.0.0.1"
    assert event["operation"] == "add_user"
    assert PASSWORD not in repr(logs)
