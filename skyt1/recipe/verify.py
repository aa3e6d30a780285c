"""Rejection sampling: grade every sample against its problem and keep each one with its verdict.

    python -m skyt1.recipe verify --input samples.jsonl --problems problems.jsonl --output verified.jsonl

problems.jsonl rows: {"id", "problem", "domain": "math"|"code"|"science", "answer"} for math and science
(a string, a number, or a list of answers graded as an unordered list; a science answer that is an option
letter is graded as multiple choice, any other as a math answer), or
{"id", "problem", "domain": "code", "tests"} with tests as code_tests.parse_tests reads them.
samples.jsonl rows: {"id": problem id, "sample_index": int, "text": response}.
Output rows: the sample row plus domain, check (math|code|choice), correct, reason, extracted and
details (and the problem text when the sample carries neither prompt nor problem, for export).

Resumable: samples whose (id, sample_index) is already in the output are skipped; every verdict is one
appended, flushed line, and a line torn by a kill is cut off on restart. Samples are graded in a process
pool; every check is bounded (math: a time bound on the symbolic stage; code: the sandbox's limits per
test; choice: regular expressions only), and a checker that raises marks its sample wrong with the
error as the reason instead of stopping the run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from skyt1.recipe.choice import grade_choice, reference_letter
from skyt1.recipe.code_tests import grade_code, parse_tests
from skyt1.recipe.jobs import cut_torn_tail, iter_jsonl
from skyt1.recipe.math_grader import grade_math
from skyt1.recipe.sandbox import SandboxPolicy, SandboxUnavailable, check_sandbox, die_with_parent
from skyt1.recipe.verdict import Verdict

DOMAINS = ("math", "code", "science")


@dataclass(frozen=True)
class CheckOptions:
    math_timeout_s: float = 5.0
    code_timeout_s: float = 6.0     # per test
    memory_mb: int = 1024
    unsafe_sandbox: bool = False    # run code even where a required sandbox layer is missing
    math_answer_line: bool = False  # math: also read a final "The answer is X" line (responses without a box)


@dataclass(frozen=True)
class Problem:
    id: str
    domain: str
    kind: str                       # math | code | choice
    problem: str = ""
    answer: str | None = None
    tests: Any = None


def _id(row: dict, where: str) -> str:
    value = row.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{where}: 'id' must be a non-empty string or an integer, got {value!r}")
    return str(value)


def load_problems(path: str | Path) -> dict[str, Problem]:
    """Problems by id; any bad row raises naming the file, line and field."""
    path = Path(path)
    problems: dict[str, Problem] = {}
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        pid = _id(row, where)
        if pid in problems:
            raise ValueError(f"{where}: duplicate problem id {pid!r}")
        domain = row.get("domain")
        if domain not in DOMAINS:
            raise ValueError(f"{where}: 'domain' must be one of {', '.join(DOMAINS)}, got {domain!r}")
        if domain == "code":
            if "tests" not in row:
                raise ValueError(f"{where}: a code problem needs 'tests'")
            try:
                parse_tests(row["tests"])
            except ValueError as e:
                raise ValueError(f"{where}: field 'tests': {e}") from None
            problems[pid] = Problem(pid, domain, "code", problem=str(row.get("problem", "")), tests=row["tests"])
            continue
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        elif isinstance(answer, list) and answer and all(isinstance(a, (str, int, float)) for a in answer):
            answer = ", ".join(str(a) for a in answer)  # several answers: graded as an unordered list
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{where}: a {domain} problem needs a non-empty 'answer' string, got {answer!r}")
        kind = "choice" if domain == "science" and reference_letter(answer) is not None else "math"
        problems[pid] = Problem(pid, domain, kind, problem=str(row.get("problem", "")), answer=answer)
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def _sample_key(row: dict, where: str) -> tuple[str, int]:
    index = row.get("sample_index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"{where}: 'sample_index' must be a non-negative integer, got {index!r}")
    return _id(row, where), index


def _check_sample(row: dict, where: str, problems: dict[str, Problem]) -> tuple[str, int]:
    key = _sample_key(row, where)
    if key[0] not in problems:
        raise ValueError(f"{where}: id {key[0]!r} is not in the problems file")
    if not isinstance(row.get("text"), str):
        raise ValueError(f"{where}: 'text' must be a string, got {type(row.get('text')).__name__}")
    return key


def grade(problem: Problem, text: str, options: CheckOptions) -> Verdict:
    """One sample's verdict; never raises for a bad response (a checker failure becomes the reason)."""
    try:
        if problem.kind == "code":
            return grade_code(text, problem.tests, timeout_s=options.code_timeout_s, memory_mb=options.memory_mb,
                              policy=SandboxPolicy(unsafe=options.unsafe_sandbox))
        if problem.kind == "choice":
            return grade_choice(text, problem.answer)
        return grade_math(text, problem.answer, timeout_s=options.math_timeout_s,
                          answer_line=options.math_answer_line)
    except Exception as e:  # noqa: BLE001  (one broken checker call must not end a long run)
        return Verdict(False, f"checker error: {type(e).__name__}: {e}"[:300], None, {})


def _grade_task(problem: Problem, text: str, options: CheckOptions) -> dict:
    return grade(problem, text, options).to_dict()


def _done_keys(path: Path) -> set[tuple[str, int]]:
    """Keys already in the output, after cutting off a last line torn by a kill."""
    if not path.exists():
        return set()
    cut_torn_tail(path)
    done = set()
    for lineno, row in iter_jsonl(path):
        done.add(_sample_key(row, f"{path}:{lineno}"))
    return done


class _Stats:
    def __init__(self) -> None:
        self.by_domain: dict[str, list[int]] = {}

    def add(self, domain: str, correct: bool) -> None:
        c = self.by_domain.setdefault(domain, [0, 0])
        c[0] += int(correct)
        c[1] += 1

    def lines(self) -> list[str]:
        return [f"  {d:8s} {c}/{n} correct ({100.0 * c / n:.1f}%)" for d, (c, n) in sorted(self.by_domain.items())]


def verify_file(input_path: str | Path, problems_path: str | Path, output_path: str | Path, *,
                workers: int = 1, options: CheckOptions = CheckOptions(), log=print) -> dict:
    """Grade every sample of input_path not yet in output_path; returns counts."""
    input_path, output_path = Path(input_path), Path(output_path)
    problems = load_problems(problems_path)
    if any(p.kind == "code" for p in problems.values()):
        check_sandbox(SandboxPolicy(unsafe=options.unsafe_sandbox))  # refuse before grading anything
    # Validate the whole input before grading anything: a bad row 10,000 lines in should not surface
    # after an hour of work.
    total = 0
    for lineno, row in iter_jsonl(input_path):
        _check_sample(row, f"{input_path}:{lineno}", problems)
        total += 1
    done = _done_keys(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    stats = _Stats()
    counts = {"samples": total, "skipped_done": 0, "skipped_duplicate": 0, "graded": 0}
    seen: set[tuple[str, int]] = set()
    t0 = time.monotonic()

    def todo() -> Iterator[tuple[dict, Problem]]:
        for lineno, row in iter_jsonl(input_path):
            key = _sample_key(row, f"{input_path}:{lineno}")
            if key in done:
                counts["skipped_done"] += 1
                continue
            if key in seen:
                counts["skipped_duplicate"] += 1
                continue
            seen.add(key)
            yield row, problems[key[0]]

    with output_path.open("a", encoding="utf-8") as out:
        def write(row: dict, problem: Problem, verdict: dict) -> None:
            record = dict(row)
            if problem.problem and "prompt" not in record:
                record.setdefault("problem", problem.problem)  # what export needs to rebuild the user turn
            record.update(domain=problem.domain, check=problem.kind, **verdict)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            stats.add(problem.domain, verdict["correct"])
            counts["graded"] += 1
            if counts["graded"] % 100 == 0:
                log(f"verify: {counts['graded']} graded ({time.monotonic() - t0:.0f} s)")

        if workers <= 1:
            for row, problem in todo():
                write(row, problem, _grade_task(problem, row["text"], options))
        else:
            ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads and helper pipes
            # A worker dies with this process (PR_SET_PDEATHSIG), and its sandboxed programs with it.
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                pending: dict = {}
                items = todo()
                exhausted = False
                try:
                    while pending or not exhausted:
                        while not exhausted and len(pending) < 2 * workers:
                            nxt = next(items, None)
                            if nxt is None:
                                exhausted = True
                                break
                            row, problem = nxt
                            pending[pool.submit(_grade_task, problem, row["text"], options)] = (row, problem)
                        if not pending:
                            break
                        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            row, problem = pending.pop(fut)
                            write(row, problem, fut.result())
                except BrokenProcessPool:
                    raise RuntimeError(f"a verification worker died; {counts['graded']} verdicts are saved in "
                                       f"{output_path}, run again to resume") from None
                except (KeyboardInterrupt, SystemExit):
                    _kill_workers(pool)  # do not wait for running checks (and their programs) to finish
                    raise
    counts["seconds"] = round(time.monotonic() - t0, 2)
    log(f"verify: {counts['graded']} graded, {counts['skipped_done']} already in {output_path}, "
        f"{counts['skipped_duplicate']} duplicates skipped, {counts['seconds']} s")
    for line in stats.lines():
        log(line)
    counts["by_domain"] = {d: {"correct": c, "total": n} for d, (c, n) in stats.by_domain.items()}
    return counts


def add_answer_line_argument(parser) -> None:
    parser.add_argument("--math-answer-line", action="store_true",
                        help="math: grade a response without a \\boxed{} by its final 'The answer is X' / "
                             "'Final Answer: ...' line (off: Sky-T1's traces always box)")


def add_unsafe_sandbox_argument(parser) -> None:
    parser.add_argument("--unsafe-sandbox", action="store_true",
                        help="run code even where the kernel lacks a required sandbox layer (Landlock, "
                             "seccomp, PID namespace); without it such a machine refuses code problems")


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL the pool's workers now (their sandboxed programs die with them). Python 3.14 has
    ProcessPoolExecutor.kill_workers(); before it, the workers are only in the private _processes."""
    kill = getattr(pool, "kill_workers", None)
    if kill is not None:
        kill()
    else:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)  # after: shutdown forgets the processes


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the same clean-up as Ctrl-C


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="samples JSONL: id, sample_index, text")
    parser.add_argument("--problems", required=True, help="problems JSONL: id, problem, domain, answer|tests")
    parser.add_argument("--output", required=True, help="verified JSONL (appended to; resumable)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="grading processes (1 = in this process)")
    parser.add_argument("--math-timeout", type=float, default=5.0, help="seconds per math comparison")
    add_answer_line_argument(parser)
    parser.add_argument("--code-timeout", type=float, default=6.0, help="CPU seconds per code test")
    add_unsafe_sandbox_argument(parser)
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit of a code test")


def main(args: argparse.Namespace) -> int:
    for name in ("math_timeout", "code_timeout"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if args.memory_mb <= 0:
        raise SystemExit("--memory-mb must be positive")
    options = CheckOptions(math_timeout_s=args.math_timeout, code_timeout_s=args.code_timeout,
                           memory_mb=args.memory_mb, math_answer_line=args.math_answer_line,
                           unsafe_sandbox=args.unsafe_sandbox)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        verify_file(args.input, args.problems, args.output, workers=args.workers, options=options,
                    log=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
