"""Overhead of the code sandbox per program run: the median wall time of run_sandboxed on a trivial
program, beside a bare `python -I -c pass` start on the same machine.

    python bench/sandbox.py [--runs 21] [--out bench/results/sandbox_overhead_DATE.json]

Prints one JSON record (machine, python, commit, date, medians in ms) and writes it when --out is given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from skyt1.recipe.sandbox import isolation_report, run_sandboxed


def _median_ms(fn, runs: int) -> float:
    fn()  # warm: the once-per-process probe and the page cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    bare = _median_ms(lambda: subprocess.run([sys.executable, "-I", "-c", "pass"], check=True), args.runs)
    trivial = _median_ms(lambda: run_sandboxed("pass"), args.runs)
    stdio = _median_ms(lambda: run_sandboxed("import sys\nprint(sum(map(int, sys.stdin.read().split())))",
                                             stdin=b"1 2 3\n"), args.runs)
    record = {
        "bench": "sandbox_overhead", "date": time.strftime("%Y-%m-%d"), "commit": commit,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Linux {platform.release()}",
        "python": platform.python_version(), "runs": args.runs, "uid": os.geteuid(),
        "isolation": isolation_report(),
        "median_ms": {"bare_python_start": bare, "sandbox_pass": trivial, "sandbox_stdio_sum": stdio,
                      "sandbox_overhead": round(trivial - bare, 2)},
    }
    print(json.dumps(record, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
