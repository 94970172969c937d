"""The soak: seeded histories on real node processes, one after another, for a set time.

    .venv/bin/python tests/cluster/faultlab/soak.py --minutes 60 [--first-seed 1]
        [--rounds 8] [--out DIR]

Runs histories with seeds ``first-seed, first-seed+1, ...`` until the time is up (the
history running then finishes), one at a time (the machine is shared), and prints one
table: histories, operations (sent, answered, acknowledged), faults injected by kind,
and anomalies. The report of every history with an anomaly (schedule, history, anomalies,
node logs) is written to ``DIR/seed-<n>.txt``; the exit status is 1 if there was any.
``CAIRN_SOAK_MINUTES`` in the environment makes ``tests/cluster/test_faultlab.py`` run
the same soak as a test.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SoakTable", "main", "soak"]


@dataclass
class SoakTable:
    histories: int = 0
    ops: int = 0
    answered: int = 0
    acknowledged: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    anomalies: int = 0
    failing_seeds: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def render(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        rows = [
            ("histories", str(self.histories)),
            ("operations sent", str(self.ops)),
            ("operations answered", str(self.answered)),
            ("operations acknowledged (2xx)", str(self.acknowledged)),
            ("faults injected", f"{sum(self.faults.values())} ({faults})"),
            (
                "anomalies",
                str(self.anomalies)
                + (
                    f" (seeds {', '.join(map(str, self.failing_seeds))})"
                    if self.failing_seeds
                    else ""
                ),
            ),
            ("wall time", f"{self.seconds / 60:.1f} min"),
        ]
        width = max(len(k) for k, _ in rows)
        line = "+" + "-" * (width + 2) + "+" + "-" * 62 + "+"
        out = [line]
        out += [f"| {k:<{width}} | {v:<60} |" for k, v in rows]
        out.append(line)
        return "\n".join(out)


def soak(
    minutes: float,
    *,
    first_seed: int = 1,
    rounds: int = 8,
    out: Path | None = None,
    work: Path | None = None,
    log: object = print,
) -> SoakTable:
    """Run histories until ``minutes`` have passed; returns the table."""
    from faultlab.runner import RunSettings, run_history

    table = SoakTable()
    started = time.monotonic()
    seed = first_seed
    base = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="cairn-soak-"))
    while time.monotonic() - started < minutes * 60:
        root = base / f"seed-{seed}"
        result = run_history(seed, root, RunSettings(rounds=rounds))
        table.histories += 1
        table.ops += result.ops
        table.answered += result.answered
        table.acknowledged += result.acknowledged
        table.faults.update(result.faults)
        table.anomalies += result.anomaly_count
        assert callable(log)
        log(
            f"seed {seed}: {result.ops} ops, {result.acknowledged} acknowledged, "
            f"{sum(result.faults.values())} faults, {result.anomaly_count} anomalies, "
            f"{result.duration_s:.0f}s"
        )
        if result.anomalies:
            table.failing_seeds.append(seed)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"seed-{seed}.txt").write_text(result.report() + "\n\n" + result.logs)
        else:
            shutil.rmtree(root, ignore_errors=True)
        seed += 1
    table.seconds = time.monotonic() - started
    if work is None:
        shutil.rmtree(base, ignore_errors=True)
    return table


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the soak as ^C does: clusters are stopped


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("soak-reports"))
    args = parser.parse_args(argv)
    table = soak(
        args.minutes,
        first_seed=args.first_seed,
        rounds=args.rounds,
        out=args.out,
        log=lambda line: print(line, flush=True),
    )
    print(table.render())
    return 1 if table.anomalies else 0


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent.parent), str(here.parent)]  # tests/ and tests/cluster/
    sys.exit(main())
