"""Overhead of the code sandbox per program run: the median wall time of run_sandboxed on a trivial
program, beside a bare `python -I -c pass` start on the same machine, and the CPU time (user + system,
of every process of the run) per run, which a loaded shared machine disturbs less than the wall clock.

    python bench/sandbox.py [--runs 21] [--out bench/results/sandbox_overhead_DATE.json]

Prints one JSON record (machine, python, commit, date, medians in ms) and writes it when --out is given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from skyt1.recipe import sandbox
from skyt1.recipe.sandbox import isolation_report, run_sandboxed


def _cpu_s() -> float:
    # Every process of a run is waited for by its parent, so all of it lands in RUSAGE_CHILDREN.
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def _measure(fn, runs: int) -> dict:
    """Median wall ms and mean CPU ms (this process and its children) of one call."""
    fn()  # warm: the once-per-process probe and the page cache
    times, cpu0 = [], _cpu_s() + time.process_time()
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    cpu = (_cpu_s() + time.process_time() - cpu0) / runs
    return {"wall_ms": round(1e3 * statistics.median(times), 2), "cpu_ms": round(1e3 * cpu, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(sandbox.__file__))  # the skyt1 measured, wherever this file is
    commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    bare = _measure(lambda: subprocess.run([sys.executable, "-I", "-c", "pass"], check=True), args.runs)
    trivial = _measure(lambda: run_sandboxed("pass"), args.runs)
    stdio = _measure(lambda: run_sandboxed("import sys\nprint(sum(map(int, sys.stdin.read().split())))",
                                           stdin=b"1 2 3\n"), args.runs)
    record = {
        "bench": "sandbox_overhead", "date": time.strftime("%Y-%m-%d"), "commit": commit,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Linux {platform.release()}",
        "python": platform.python_version(), "runs": args.runs, "uid": os.geteuid(),
        "isolation": isolation_report(),
        "load_avg_1m": os.getloadavg()[0],
        "per_run": {"bare_python_start": bare, "sandbox_pass": trivial, "sandbox_stdio_sum": stdio},
        "overhead_ms": {k: round(trivial[k] - bare[k], 2) for k in ("wall_ms", "cpu_ms")},
    }
    print(json.dumps(record, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
