"""Agreement of skyt1's math grader with its peers' own test suites.

    python bench/grader_agreement.py [--out bench/results/grader_agreement_cpu_DATE.json] [--show-misses]

Math-Verify (tests/data/math_verify_cases.json: every (gold, pred, expected) case of huggingface/Math-Verify's
parametrized tests): each case is graded as grade_math(pred, gold), pred being the response and gold the
reference, and agrees when the verdict is Math-Verify's expected one. Reported on
- the boxed cases (a \\boxed{} in the gold or in the pred), with the default extraction (boxed answers only)
  and with answer_line=True (a response without a box may answer with its final "The answer is X" line,
  or be nothing but its answer);
- every case, with answer_line=True (the rest read answers out of free text: "Answer $9$", the last number
  of a sentence, which skyt1 does not do).
Two conventions of ours replace Math-Verify's expected verdict, and the record lists them: equivalence of a
set and a relation holds both ways round (its test_set_rel_assymetry expects 0 for a gold set against a
relation unless allow_set_relation_comp), and only its strict comparison is used (f(x) is not f(y)).

Qwen2.5-Math (tests/data/qwen25_math_grader_cases.json: the pairs of evaluation/grader.py's
_test_math_equal()) are graded as math_equal(reference, prediction) against that grader's own verdict.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))

from skyt1.recipe.math_grader import DEFAULT_TIMEOUT_S, grade_math, math_equal  # noqa: E402


def math_verify_cases() -> list[dict]:
    """Math-Verify's cases with the verdict skyt1 is held to (see the module docstring)."""
    cases = []
    for c in json.loads((DATA / "math_verify_cases.json").read_text())["cases"]:
        opts = c["options"]
        if opts.get("strict") is False:
            continue
        expected = bool(c["expected"])
        if opts.get("allow_set_relation_comp") is False:
            expected = True  # set vs relation: equal both ways round
        cases.append({**c, "expected": expected, "boxed": "\\boxed" in c["gold"] or "\\boxed" in c["pred"]})
    return cases


def qwen_cases() -> list[dict]:
    return json.loads((DATA / "qwen25_math_grader_cases.json").read_text())["cases"]


def grade_math_verify(case: dict, answer_line: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    return grade_math(case["pred"], case["gold"], answer_line=answer_line, timeout_s=timeout_s).correct


def grade_qwen(case: dict, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    return math_equal(case["reference"], case["prediction"], timeout_s=timeout_s)


def tally(cases: list[dict], grade) -> dict:
    misses = []
    for c in cases:
        got = grade(c)
        if got != bool(c["expected"]):
            misses.append({k: v for k, v in c.items() if k != "boxed"} | {"skyt1": got})
    return {"agree": len(cases) - len(misses), "cases": len(cases), "misses": misses}


def run() -> dict:
    mv = math_verify_cases()
    boxed = [c for c in mv if c["boxed"]]
    t0 = time.perf_counter()
    results = {
        "math_verify_boxed_default": tally(boxed, lambda c: grade_math_verify(c, False)),
        "math_verify_boxed_answer_line": tally(boxed, lambda c: grade_math_verify(c, True)),
        "math_verify_all_answer_line": tally(mv, lambda c: grade_math_verify(c, True)),
        "qwen25_math": tally(qwen_cases(), grade_qwen),
    }
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write a dated JSON record here")
    ap.add_argument("--show-misses", action="store_true")
    args = ap.parse_args()
    results = run()
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:32s} {r['agree']:4d} / {r['cases']:<4d} ({100.0 * r['agree'] / r['cases']:.1f}%)")
            if args.show_misses:
                for m in r["misses"]:
                    print("    miss:", json.dumps(m, ensure_ascii=False)[:400])
    if args.out:
        record = {
            "benchmark": "bench/grader_agreement.py",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "device": f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), no GPU",
            "python": platform.python_version(),
            "torch": _version("torch"),
            "math_verify": _version("math_verify"),
            "sources": {"math_verify": "huggingface/Math-Verify tests/ at 5d148cf",
                        "qwen25_math": "QwenLM/Qwen2.5-Math evaluation/grader.py at a45202b"},
            "conventions": ["set vs relation equal both ways round (Math-Verify expects 0 for a gold set against "
                            "an answer relation without allow_set_relation_comp)",
                            "strict comparison only (Math-Verify's strict=False case is left out)"],
            **{name: _trimmed(r) for name, r in results.items()},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        print("wrote", args.out)
    return 0


def _trimmed(result):
    """A result with the long responses of its misses cut for the record (the case files hold them whole)."""
    if not isinstance(result, dict):
        return result
    cut = [{k: (v[:300] + " ..." if isinstance(v, str) and len(v) > 300 else v) for k, v in m.items()}
           for m in result["misses"]]
    return {**result, "misses": cut}


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:  # noqa: BLE001  (a missing package is recorded as None)
        return None


if __name__ == "__main__":
    sys.exit(main())
