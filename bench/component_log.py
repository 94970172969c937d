"""How fast a supervised process's output reaches its log, against a plain redirect.

A process prints N lines as fast as it can. Baseline: the same process with stdout
redirected to a file by the shell (no supervisor). Measured: the process run by a
``Supervisor``, its lines read from the pipe, stamped, and appended to the rotated log in
a thread; timed from the switch until the last line is in the log. Prints both rates,
each the median of ``--repeat`` runs, and their ratio.

    .venv/bin/python bench/component_log.py [--lines 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from node.config import ComponentsConfig
from node.deploy.component_config import RunSpec
from node.deploy.supervisor import Supervisor

PRINTER = (
    "import sys\nw = sys.stdout.write\n"
    "for i in range({n}): w(f'line {{i}} of the output\\n')\n"
    "print('done', flush=True)\nimport time; time.sleep(600)"
)


def baseline(n: int, tmp: Path) -> float:
    out = tmp / "plain.log"
    start = time.perf_counter()
    with out.open("wb") as f:
        code = PRINTER.format(n=n).replace("import time; time.sleep(600)", "")
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True)
    return time.perf_counter() - start


async def supervised(n: int, tmp: Path) -> float:
    settings = ComponentsConfig(log_max_bytes=8 << 20, log_backups=3, settle_s=0.01)
    sup = Supervisor(node="bench", run_dir=tmp / "run", settings=settings)
    release = tmp / str(uuid.uuid4())
    release.mkdir()
    try:
        start = time.perf_counter()
        await sup.switch(
            "bench",
            release.name,
            release,
            RunSpec((sys.executable, "-c", PRINTER.format(n=n))),
            restart=True,
        )
        while True:
            tail = await sup.logs("bench", 1)
            if tail and tail.lines and tail.lines[-1].line == "done":
                return time.perf_counter() - start
            await asyncio.sleep(0.005)
    finally:
        await sup.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.lines
    base, measured = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            base.append(baseline(n, Path(d)))
            measured.append(asyncio.run(supervised(n, Path(d))))
    b, m = statistics.median(base), statistics.median(measured)
    print(f"lines: {n}, runs: {args.repeat}")
    print(f"baseline (shell redirect to a file): {n / b:,.0f} lines/s ({b:.2f} s)")
    print(f"supervised (pipe, stamp, rotated log): {n / m:,.0f} lines/s ({m:.2f} s)")
    print(f"ratio supervised/baseline time: {m / b:.2f}")


if __name__ == "__main__":
    main()
