"""The simulator's command line: one history, a range of seeds, the soak, the scale run.

    python -m tests.sim --seed 7                    one history (-v: its trace)
    python -m tests.sim --seed 7 --keep 0,3,5       a replay: only those events
    python -m tests.sim --seeds 0:50                a range, then the table
    python -m tests.sim --minutes 3 --out soak.jsonl    the soak: seeds from where the
                                                    file stops, for 3 minutes; the table
                                                    covers every history in the file
    python -m tests.sim --report soak.jsonl         the table of a soak file
    python -m tests.sim --scale 3,5,10,20,50,100    convergence and traffic per deploy

A failing history is shrunk (``--no-minimize`` skips it) and printed as a replay command.
Run from the repository root (``tests`` must be importable), ideally under ``nice``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .certs import Certs, default_cache
from .history import HistoryResult, run_history
from .minimize import minimize, replay_command
from .schedule import generate

_DETERMINISM_EVERY = 25


def _record(r: HistoryResult, cpu_s: float, rerun: str | None) -> dict[str, Any]:
    return {
        "seed": r.seed, "nodes": r.nodes, "ok": r.ok, "events": r.events,
        "ops": dict(r.ops), "answers": dict(r.answers), "acknowledged": r.acknowledged,
        "faults": dict(r.faults), "restarts": r.restarts,
        "internal_errors": dict(r.internal_errors), "anomalies": r.anomalies,
        "trace_hash": r.trace_hash, "rerun_hash": rerun, "virtual_s": round(r.virtual_s, 1),
        "settle_s": round(r.settle_s, 1), "cpu_s": round(cpu_s, 2), "real_s": round(r.real_s, 2),
    }  # fmt: skip


def table(records: list[dict[str, Any]]) -> str:
    """The soak's one table."""
    ops: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    internal: Counter[str] = Counter()
    for rec in records:
        ops.update(rec["ops"])
        answers.update(rec["answers"])
        faults.update(rec["faults"])
        internal.update(rec["internal_errors"])
    reruns = [r for r in records if r.get("rerun_hash")]
    same = sum(1 for r in reruns if r["rerun_hash"] == r["trace_hash"])
    failing = [r for r in records if not r["ok"]]
    seeds = sorted(r["seed"] for r in records)
    nodes = sorted({r["nodes"] for r in records})
    lines = [
        f"cairn simulator: {len(records)} histories of {'/'.join(map(str, nodes))} nodes, "
        f"seeds {seeds[0] if seeds else '-'}..{seeds[-1] if seeds else '-'}",
        "",
        f"| {'what':<34} | {'count':>9} |",
        f"|{'-' * 36}|{'-' * 11}|",
    ]

    def row(what: str, n: int | str) -> None:
        lines.append(f"| {what:<34} | {n:>9} |")

    row("histories", len(records))
    row("virtual time (hours)", f"{sum(r['virtual_s'] for r in records) / 3600:.1f}")
    row("operations", sum(ops.values()))
    for kind, n in sorted(ops.items()):
        row(f"  {kind}", n)
    row("operations acknowledged", sum(r["acknowledged"] for r in records))
    row("  deploys acknowledged success", answers.get("ok:success", 0))
    refused = sum(n for a, n in answers.items() if a.startswith("error"))
    row("  refused or failed (answered)", refused)
    row("  cut off by a crash", answers.get("lost", 0))
    row("faults injected", sum(faults.values()))
    for kind, n in sorted(faults.items()):
        row(f"  {kind}", n)
    row("node restarts", sum(r["restarts"] for r in records))
    row("internal errors (from injected faults)", sum(internal.values()))
    row("determinism reruns identical", f"{same}/{len(reruns)}")
    row("anomalies", sum(len(r["anomalies"]) for r in records))
    row("failing histories", len(failing))
    cpu = sum(r["cpu_s"] for r in records)
    lines.append("")
    lines.append(f"cpu {cpu / 60:.1f} min ({cpu / max(1, len(records)):.2f} s per history)")
    for r in failing[:20]:
        lines.append(f"FAIL seed {r['seed']}: {r['anomalies'][0]}")
    return "\n".join(lines)


def _print_result(r: HistoryResult, verbose: bool) -> None:
    status = "ok" if r.ok else "FAIL"
    print(f"seed {r.seed}: {status}  events {r.events}  answers {dict(r.answers)}")
    print(f"  faults {dict(r.faults)}  restarts {r.restarts}")
    print(f"  virtual {r.virtual_s:.1f} s (settled in {r.settle_s:.1f} s)  real {r.real_s:.1f} s"
          f"  trace {r.trace_hash}")  # fmt: skip
    if r.internal_errors:
        print(f"  internal errors {dict(r.internal_errors)}")
    for a in r.anomalies:
        print(f"  ANOMALY {a}")
    if verbose:
        for line in r.trace:
            print(f"    {line}")


def _shrink(seed: int, certs: Certs, nodes: int, r: HistoryResult) -> None:
    print(f"shrinking seed {seed} ...", flush=True)
    kept, best = minimize(seed, certs, nodes=nodes, failure=r, log=print)
    events = {e.index: e for e in generate(seed)}
    print(f"minimal replay ({len(kept)} of {len(events)} events):")
    print(f"  {replay_command(seed, kept, nodes)}")
    for i in kept:
        print(f"    {events[i].describe()}")
    for a in best.anomalies[:5]:
        print(f"  ANOMALY {a}")


def _run(seed: int, certs: Certs, nodes: int, rerun: bool) -> tuple[HistoryResult, dict[str, Any]]:
    c = time.process_time()
    r = run_history(seed, nodes=nodes, certs=certs)
    cpu = time.process_time() - c
    again = run_history(seed, nodes=nodes, certs=certs).trace_hash if rerun else None
    return r, _record(r, cpu, again)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int)
    p.add_argument("--keep", help="event indices to keep (a replay), comma-separated")
    p.add_argument("--seeds", help="a range of seeds, A:B")
    p.add_argument("--minutes", type=float, help="run the soak for this long")
    p.add_argument("--out", type=Path, help="soak results (JSON lines, appended)")
    p.add_argument("--report", type=Path, help="print the table of a soak file")
    p.add_argument("--scale", help="node counts for the scale run, e.g. 3,5,10,100")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--span", type=float, help="schedule length in virtual seconds")
    p.add_argument("--ops", type=int, help="operations in the schedule")
    p.add_argument("--faults", type=int, help="faults in the schedule")
    p.add_argument("--no-minimize", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    certs = Certs(default_cache())

    if args.report:
        records = [json.loads(line) for line in args.report.read_text().splitlines() if line]
        print(table(records))
        return 0
    if args.scale:
        from .scale import scale_report

        print(scale_report([int(n) for n in args.scale.split(",")], certs))
        return 0
    if args.seed is not None:
        keep = None
        if args.keep is not None:
            keep = [] if args.keep == "none" else [int(i) for i in args.keep.split(",")]
        schedule = generate(args.seed, span_s=args.span, ops=args.ops, faults=args.faults)
        r = run_history(args.seed, nodes=args.nodes, certs=certs, keep=keep, schedule=schedule)
        _print_result(r, args.verbose)
        if keep is not None:
            events = {e.index: e for e in schedule}
            for i in keep:
                print(f"    {events[i].describe()}")
        custom = (args.span, args.ops, args.faults) != (None, None, None)
        if not r.ok and keep is None and not args.no_minimize and not custom:
            _shrink(args.seed, certs, args.nodes, r)
        return 0 if r.ok else 1

    records: list[dict[str, Any]] = []
    if args.seeds:
        a, b = (int(x) for x in args.seeds.split(":"))
        seeds: Any = iter(range(a, b))
        deadline = float("inf")
    else:
        minutes = args.minutes if args.minutes is not None else 1.0
        start = 0
        if args.out is not None and args.out.exists():
            done = [json.loads(line) for line in args.out.read_text().splitlines() if line]
            start = max((r["seed"] for r in done), default=-1) + 1
        seeds = iter(range(start, 1 << 62))
        deadline = time.monotonic() + minutes * 60
    failing: list[tuple[int, HistoryResult]] = []
    for seed in seeds:
        if time.monotonic() >= deadline:
            break
        r, rec = _run(seed, certs, args.nodes, rerun=seed % _DETERMINISM_EVERY == 0)
        records.append(rec)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        mark = "." if r.ok else "F"
        print(mark, end="\n" if len(records) % 50 == 0 else "", flush=True)
        if not r.ok:
            failing.append((seed, r))
    print()
    if args.out is not None and args.minutes is not None:
        records = [json.loads(line) for line in args.out.read_text().splitlines() if line]
    print(table(records))
    if not args.no_minimize:
        for seed, r in failing[:3]:
            _print_result(r, False)
            _shrink(seed, certs, args.nodes, r)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
