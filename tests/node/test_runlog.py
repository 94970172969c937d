"""The rotated per-project output log, alone and fed by a real process."""

from __future__ import annotations

import random
from pathlib import Path

from helpers import wait_until
from supervision import py, release, supervisor

from node.deploy.runlog import LogLine, RunLog, _last_lines
from node.deploy.supervisor import Outcome


def _lines(n: int, start: int = 0, stream: str = "stdout") -> list[LogLine]:
    return [LogLine(1_700_000_000_000 + i, stream, f"line {i}") for i in range(start, start + n)]


def test_lines_round_trip_with_time_and_stream(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "web", max_bytes=1 << 20, backups=2)
    assert not log.exists()
    log.write([LogLine(1_700_000_000_123, "stderr", "boom  with  spaces\r"), *_lines(2)])
    assert (
        log.path.read_bytes().decode().split("\n")[0]
        == "2023-11-14T22:13:20.123Z stderr boom  with  spaces\r"
    )
    tail = log.tail(10)
    assert tail.lines[0] == LogLine(1_700_000_000_123, "stderr", "boom  with  spaces\r")
    assert [x.line for x in tail.lines[1:]] == ["line 0", "line 1"]
    assert not tail.truncated


def test_tail_returns_the_newest_lines_and_says_when_older_exist(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "web", max_bytes=1 << 20, backups=2)
    log.write(_lines(50))
    tail = log.tail(10)
    assert [x.line for x in tail.lines] == [f"line {i}" for i in range(40, 50)]
    assert tail.truncated
    assert not log.tail(50).truncated and len(log.tail(500).lines) == 50


def test_rotation_keeps_the_files_bounded(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "web", max_bytes=2048, backups=2)
    for i in range(40):
        log.write(_lines(25, start=i * 25))  # 1000 lines of about 40 bytes
    files = sorted(p.name for p in log.directory.iterdir())
    assert files == ["output.log", "output.log.1", "output.log.2"]
    assert all(p.stat().st_size <= 2048 for p in log.directory.iterdir())
    tail = log.tail(10_000)
    numbers = [int(x.line.split()[1]) for x in tail.lines]
    assert numbers == list(range(numbers[0], 1000))  # the newest, in order, no gap
    assert 100 < len(numbers) < 160 and tail.truncated is False


def test_tail_across_rotated_files_reports_older_files(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "web", max_bytes=2048, backups=3)
    log.write(_lines(200))
    last = log.tail(60)
    assert [x.line for x in last.lines] == [f"line {i}" for i in range(140, 200)]
    assert last.truncated


def test_no_backups_means_one_file(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "web", max_bytes=1024, backups=0)
    log.write(_lines(100))
    assert [p.name for p in log.directory.iterdir()] == ["output.log"]
    assert log.tail(1).lines[0].line == "line 99"


def test_a_torn_line_is_kept_as_text(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "web", max_bytes=1 << 20, backups=1)
    log.write(_lines(1))
    with log.path.open("a") as f:
        f.write("2023-11-14T22:1")  # a crash mid-write
    tail = log.tail(5)
    assert tail.lines[-1] == LogLine(None, "unknown", "2023-11-14T22:1")


async def test_a_chatty_process_is_logged_within_the_bound(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, log_max_bytes=4096, log_backups=2)
    try:
        dep, path = release(tmp_path)
        spec = py(
            "import time\nfor i in range(3000): print('out', i)\nprint('done'); time.sleep(600)"
        )
        assert (await sup.switch("web", dep, path, spec, restart=True)).outcome == Outcome.READY

        async def done() -> bool:
            tail = await sup.logs("web", 1)
            return tail is not None and tail.lines[-1].line == "done"

        await wait_until(done, timeout_s=30)
        files = list((tmp_path / "run" / "components" / "web").iterdir())
        assert sorted(p.name for p in files) == ["output.log", "output.log.1", "output.log.2"]
        assert sum(p.stat().st_size for p in files) <= 3 * 4096
        # Everything still on disk fits in one answer; what rotated away is gone.
        tail = await sup.logs("web", 10_000)
        assert tail is not None and not tail.truncated
        outs = [int(x.line.split()[1]) for x in tail.lines[:-1]]
        assert outs == list(range(outs[0], 3000)) and outs[0] > 2000
        assert {x.stream for x in tail.lines} == {"stdout"}
    finally:
        await sup.close()


def test_reading_backwards_matches_reading_everything(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "f.log"
    for trial in range(30):
        lines = [
            "x" * rng.choice([0, 1, 50, 4000, 70_000]) + str(i) for i in range(rng.randint(0, 60))
        ]
        torn = rng.random() < 0.3
        path.write_text("\n".join(lines) + ("" if torn or not lines else "\n"))
        every = path.read_bytes().decode().split("\n")
        if every[-1] == "":
            every.pop()
        for count in (1, 2, 7, 59, 61, 500):
            got, more = _last_lines(path, count)
            assert got == every[-count:], (trial, count)
            assert more == (len(every) > count), (trial, count)
