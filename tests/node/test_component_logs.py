"""``get_component_logs`` through the real app: shape, bounds, 404, permission."""

from __future__ import annotations

from pathlib import Path

from helpers import Api, basic, wait_until
from supervision import py, release

from node.appkeys import Services
from node.deploy.supervisor import Outcome


async def _run_web(api: Api, tmp_path: Path, code: str) -> None:
    sup = Services(api.app).supervisor
    dep, path = release(tmp_path)
    assert (await sup.switch("web", dep, path, py(code), restart=True)).outcome == Outcome.READY


PRINT_150 = (
    "import sys, time\n"
    "for i in range(150): print('line', i)\n"
    "print('oops', file=sys.stderr, flush=True); time.sleep(600)"
)


async def _logs(api: Api, **fields: object) -> tuple[int, dict[str, object]]:
    status, body = await api.op("get_component_logs", **fields)
    return status, body


async def test_logs_answer_the_newest_lines(api: Api, tmp_path: Path) -> None:
    await _run_web(api, tmp_path, PRINT_150)

    async def everything() -> bool:
        _, body = await _logs(api, project="web", lines=10_000)
        seen = {(x["stream"], x["line"]) for x in body["lines"]}  # type: ignore[union-attr]
        return {("stderr", "oops"), ("stdout", "line 149")} <= seen

    await wait_until(everything)
    status, body = await _logs(api, project="web")
    assert status == 200
    assert set(body) == {"project", "node", "lines", "truncated"}
    assert body["project"] == "web" and body["node"] == "n1" and body["truncated"] is True
    lines = body["lines"]
    assert isinstance(lines, list) and len(lines) == 100
    assert set(lines[0]) == {"t", "stream", "line"} and isinstance(lines[0]["t"], int)
    status, body = await _logs(api, project="web", lines=10_000)
    everything_logged = [(x["stream"], x["line"]) for x in body["lines"]]  # type: ignore[union-attr]
    assert status == 200 and body["truncated"] is False
    assert everything_logged[0][0] == "cairn"  # "started pid ..."
    assert [x for x in everything_logged if x[0] == "stdout"] == [
        ("stdout", f"line {i}") for i in range(150)
    ]
    assert ("stderr", "oops") in everything_logged
    assert lines == body["lines"][-100:]  # type: ignore[index]


async def test_unknown_project_is_404_naming_it(api: Api) -> None:
    status, body = await _logs(api, project="nothing-here")
    assert status == 404
    assert body["code"] == "not_found" and "nothing-here" in str(body["error"])
    assert body["project"] == "nothing-here"


async def test_bad_input_is_400(api: Api) -> None:
    for fields, field in (
        ({"project": "web", "lines": 10_001}, "lines"),
        ({"project": "web", "lines": 0}, "lines"),
        ({"project": "web", "lines": "5"}, "lines"),
        ({"project": "../etc"}, "project"),
        ({}, "project"),
    ):
        status, body = await _logs(api, **fields)
        assert status == 400 and body["field"] == field, (fields, body)


async def test_it_needs_its_own_permission(api: Api, tmp_path: Path) -> None:
    await _run_web(api, tmp_path, "import time; print('hi', flush=True); time.sleep(600)")
    for role, ops in (("logs", ["get_component_logs"]), ("comps", ["get_components"])):
        assert (await api.op("add_role", role=role, permission={"operations": ops}))[0] == 200
        user = f"u-{role}"
        await api.op("add_user", username=user, password="password-of-u1", role=role)
    ok, body = await api.op(
        "get_component_logs", project="web", auth=basic("u-logs", "password-of-u1")
    )
    assert ok == 200, body
    no, body = await api.op(
        "get_component_logs", project="web", auth=basic("u-comps", "password-of-u1")
    )
    assert no == 403 and "get_component_logs" in body["error"]
