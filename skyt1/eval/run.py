"""Evaluate a model on a benchmark: sample, score every sample, report.

Samples come from skyt1.sample's engine in-process (a checkpoint folder) or from any OpenAI-compatible
endpoint (--base-url). Each finished sample is scored at once by the recipe's graders (math: last
\\boxed{} against the reference; multiple choice: the chosen letter; code: the last Python block against
every test in the sandbox), in a thread pool so the engine keeps running, and appended with its score to
the output JSONL: every sample can be audited, and a killed run resumes where it stopped. Rows carry a
fingerprint of the settings; resuming with different settings is refused rather than mixed.

The report (printed, and written to --report, by default <output>.report.json) gives accuracy as the mean
over all samples with a 95% confidence interval (bootstrap over problems, and the normal approximation),
unbiased pass@k when n > 1, breakdowns (subject / level / difficulty / ...), truncation rate and token
counts, and the published Sky-T1 / Qwen2.5-32B-Instruct / QwQ / o1-preview figures beside the measured.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from skyt1.eval.metrics import breakdown, summarize
from skyt1.eval.published import MODELS, published_for
from skyt1.eval.tasks import GROUP_KEYS, Problem, load_task
from skyt1.recipe.jobs import Progress, ResumableJsonl


@dataclass(frozen=True)
class EvalSettings:
    """What must match for two runs' samples to be pooled (n may grow: more samples, same settings)."""
    task: str
    model: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    system_sha256: str | None

    def fingerprint(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScoreOptions:
    math_timeout_s: float = 5.0
    code_timeout_s: float = 6.0     # per test, as LiveCodeBench's harness
    memory_mb: int = 1024
    math_answer_line: bool = False  # also read a final "The answer is X" line, as the benchmarks' graders do
    unsafe_sandbox: bool = False    # run code even where a required sandbox layer is missing


def score_sample(problem: Problem, text: str, options: ScoreOptions) -> dict:
    """{"score", "correct", "reason", "extracted", "details"}; a checker failure scores 0 with the error."""
    from skyt1.recipe.verify import CheckOptions, Problem as VerifyProblem, grade

    if problem.kind == "code":
        p = problem.reference
        tests = {"inputs": [t["input"] for t in p.tests], "outputs": [t["output"] for t in p.tests]}
        if p.func_name:
            tests["fn_name"] = p.func_name
        vp = VerifyProblem(problem.id, "code", "code", tests=tests)
    else:
        vp = VerifyProblem(problem.id, "math" if problem.kind == "math" else "science", problem.kind,
                           answer=str(problem.reference))
    verdict = grade(vp, text, CheckOptions(math_timeout_s=options.math_timeout_s,
                                           code_timeout_s=options.code_timeout_s, memory_mb=options.memory_mb,
                                           math_answer_line=options.math_answer_line,
                                           unsafe_sandbox=options.unsafe_sandbox))
    extracted = verdict.extracted
    if problem.kind == "code" and extracted is not None and len(extracted) > 20000:
        extracted = extracted[:20000] + "\n# ... (cut for the audit file)"
    return {"score": 1.0 if verdict.correct else 0.0, "correct": verdict.correct, "reason": verdict.reason,
            "extracted": extracted, "details": verdict.details}


def sample_key(row: dict) -> tuple[str, int]:
    return (str(row["id"]), int(row["sample_index"]))


class _Writer:
    """Scores in a thread pool and appends each scored sample under a lock (pool threads finish in any order)."""

    def __init__(self, out: ResumableJsonl, problems: dict[str, Problem], settings: EvalSettings,
                 options: ScoreOptions, workers: int, progress: Progress):
        self.out, self.problems, self.settings, self.options = out, problems, settings, options
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="skyt1-score")
        self.lock = threading.Lock()
        self.progress = progress
        self.futures: list[Future] = []
        self.errors: list[BaseException] = []

    def submit(self, pid: str, index: int, text: str, finish_reason: str | None, prompt_tokens: int,
               completion_tokens: int) -> None:
        self.futures.append(self.pool.submit(self._one, pid, index, text, finish_reason, prompt_tokens,
                                             completion_tokens))

    def _one(self, pid: str, index: int, text: str, finish_reason: str | None, prompt_tokens: int,
             completion_tokens: int) -> None:
        try:
            problem = self.problems[pid]
            scored = score_sample(problem, text, self.options)
            row = {"task": self.settings.task, "id": pid, "sample_index": index, "groups": problem.groups,
                   "reference": problem.reference_text, **scored, "finish_reason": finish_reason,
                   "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                   "prompt": problem.prompt, "response": text, "audit": problem.audit,
                   "run": self.settings.fingerprint()}
            with self.lock:
                self.out.append(row)
                self.progress.step()
        except BaseException as e:  # noqa: BLE001 - surfaced by close()
            self.errors.append(e)
            raise

    def close(self) -> None:
        for f in self.futures:
            f.exception()  # wait
        self.pool.shutdown(wait=True)
        if self.errors:
            raise self.errors[0]


def _check_resume(out: ResumableJsonl, settings: EvalSettings) -> None:
    want = settings.fingerprint()
    for key, row in out.rows.items():
        have = row.get("run")
        if have != want:
            if not isinstance(have, dict):
                raise ValueError(f"{out.path}: row {key} has no run settings; not an eval output? use another --output")
            diff = [f"{k}: {have.get(k)!r} there, {want[k]!r} now" for k in want if have.get(k) != want[k]]
            raise ValueError(f"{out.path}: holds samples from other settings ({'; '.join(diff)}); "
                             f"use another --output to keep runs apart")


def messages_for(problem: Problem, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": problem.prompt}]


def sample_local(llm: Any, todo: list[tuple[Problem, list[int]]], settings: EvalSettings, n: int,
                 system: str | None, writer: _Writer, log: Callable[[str], None]) -> None:
    from skyt1.recipe.generate import derived_seed, generate_local
    from skyt1.sample import SamplingParams

    if llm.tokenizer is None:
        raise ValueError("the model folder has no tokenizer.json; pass --tokenizer")
    # Sample i of a problem gets a seed derived from the problem's seed and i (the engine does this), so
    # the samples a resumed run fills in are the ones the full run would have made.
    base = SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p,
                          max_tokens=settings.max_tokens)
    items = [(p.id, llm.tokenizer.encode_prompt(messages_for(p, None), system=system), missing)
             for p, missing in todo]
    generate_local(llm, items, lambda pid: base.replace(seed=derived_seed(settings.seed, pid)), writer.submit,
                   log=log)


async def sample_endpoint(args: Any, todo: list[tuple[Problem, list[int]]], settings: EvalSettings,
                          system: str | None, writer: _Writer, log: Callable[[str], None]) -> int:
    import openai

    from skyt1.recipe.generate import derived_seed
    from skyt1.recipe.jobs import bounded_gather, client_from_args

    client = client_from_args(args, settings.model, log=log)
    failed = 0

    async def one(p: Problem, s: int) -> None:
        nonlocal failed
        try:
            r = await client.complete(messages_for(p, system), temperature=settings.temperature,
                                      top_p=settings.top_p, max_tokens=settings.max_tokens,
                                      seed=derived_seed(settings.seed, p.id, s))
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - reported; the sample is retried by the next run
            failed += 1
            log(f"{p.id} sample {s}: failed ({type(e).__name__}: {str(e)[:200]})")
            return
        writer.submit(p.id, s, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens)

    try:
        await bounded_gather([lambda p=p, s=s: one(p, s) for p, missing in todo for s in missing],
                             limit=2 * args.concurrency)
    finally:
        await client.close()
        log(client.totals.summary(settings.model, with_cost=False))
    return failed


def build_report(rows: list[dict], problems: list[Problem], settings: EvalSettings, n: int) -> dict:
    ids = {p.id for p in problems}
    rows = [r for r in rows if r["id"] in ids and r["sample_index"] < n]
    by_problem: dict[str, list[float]] = {}
    for r in sorted(rows, key=lambda r: (r["id"], r["sample_index"])):
        by_problem.setdefault(r["id"], []).append(float(r["score"]))
    report = {"settings": settings.fingerprint(), "n": n, "problems_in_task": len(problems),
              "overall": summarize(by_problem, seed=0)}
    complete = sum(1 for p in problems if len(by_problem.get(p.id, [])) == n)
    report["complete_problems"] = complete
    if rows:
        report["truncated_fraction"] = sum(r.get("finish_reason") == "length" for r in rows) / len(rows)
        report["mean_completion_tokens"] = sum(int(r.get("completion_tokens") or 0) for r in rows) / len(rows)
        reasons: dict[str, int] = {}
        for r in rows:
            if not r["correct"]:
                head = _reason_class(r.get("reason", ""))
                reasons[head] = reasons.get(head, 0) + 1
        report["wrong_by_reason"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    report["breakdown"] = {key: breakdown(rows, key) for key in GROUP_KEYS.get(settings.task, ())}
    report["published"] = published_for(settings.task)
    return report


def _reason_class(reason: str) -> str:
    """Coarse failure class for the report ("no \\boxed{} answer", "test 3: wrong answer" -> "wrong answer")."""
    r = reason.split(":", 1)[1].strip() if reason.startswith("test ") and ":" in reason else reason
    for stop in (":", " ("):
        if stop in r:
            r = r.split(stop, 1)[0]
    return r.strip()[:60] or "?"


def format_report(report: dict) -> str:
    s = report["settings"]
    o = report["overall"]
    lines = [f"task {s['task']} | model {s['model']} | {o['problems']} problems x {report['n']} samples "
             f"({o['samples']} scored; {report['complete_problems']}/{report['problems_in_task']} problems complete)",
             f"temperature {s['temperature']}, top_p {s['top_p']}, max_tokens {s['max_tokens']}, seed {s['seed']}, "
             f"system prompt {'sha256 ' + s['system_sha256'][:12] if s['system_sha256'] else 'default'}"]
    if o["samples"]:
        lo, hi = o["ci95_bootstrap"]
        nlo, nhi = o["ci95_normal"]
        lines.append(f"accuracy {100 * o['accuracy']:.2f}%  95% CI {100 * lo:.2f}-{100 * hi:.2f} (bootstrap over "
                     f"problems), {100 * nlo:.2f}-{100 * nhi:.2f} (normal)")
    if o.get("pass_at_k"):
        lines.append("  ".join(f"{k} {100 * v:.2f}" for k, v in o["pass_at_k"].items()))
    if "truncated_fraction" in report:
        lines.append(f"truncated at max_tokens: {100 * report['truncated_fraction']:.1f}% of samples; "
                     f"mean completion tokens {report['mean_completion_tokens']:.0f}")
    if report.get("wrong_by_reason"):
        lines.append("wrong: " + ", ".join(f"{k} {v}" for k, v in list(report["wrong_by_reason"].items())[:6]))
    for key, groups in report["breakdown"].items():
        if groups:
            lines.append(f"by {key}: " + "; ".join(f"{g} {100 * v['accuracy']:.1f}% ({v['problems']})"
                                                    for g, v in groups.items()))
    pub = report["published"]
    if pub:
        measured = {"all": o["accuracy"]}
        for g, v in report["breakdown"].get("difficulty", {}).items():
            measured[g] = v["accuracy"]
        header = f"{'published (%)':14s} {'measured':>9s} " + " ".join(f"{m:>21s}" for m in MODELS)
        lines.append(header)
        for label in (["all"] if "all" in pub else []) + [k for k in pub if k != "all"]:
            m = measured.get(label)
            mtext = f"{100 * m:9.2f}" if m is not None and m == m else f"{'-':>9s}"
            lines.append(f"{label:14s} {mtext} " + " ".join(f"{pub[label][mm]:21.2f}" for mm in MODELS))
        if "all" not in pub and o["samples"]:
            lines.append(f"{'all':14s} {100 * o['accuracy']:9.2f} (no published overall figure)")
    else:
        lines.append("no published Sky-T1 figure for this task")
    return "\n".join(lines)


def evaluate(args: Any, llm_factory: Callable[[], Any] | None) -> dict:
    """Run one evaluation from parsed CLI arguments; llm_factory builds the local engine (None: endpoint)."""
    log = lambda m: print(f"[eval] {m}", file=sys.stderr, flush=True)  # noqa: E731
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    system = None
    if args.system_file:
        sp = Path(args.system_file)
        if not sp.is_file():
            raise ValueError(f"--system-file {sp}: no such file")
        system = sp.read_text(encoding="utf-8").strip()
    problems = load_task(args.task, args.data)
    if args.limit is not None:
        problems = problems[:args.limit]
    model_name = args.model if args.base_url else Path(args.model).resolve().name
    settings = EvalSettings(task=args.task, model=model_name, temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed,
                            system_sha256=hashlib.sha256(system.encode()).hexdigest() if system is not None else None)
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)  # "org/model" -> one file
    output = Path(args.output or f"eval_{args.task}_{safe_name}.jsonl")
    options = ScoreOptions(math_timeout_s=args.math_timeout, code_timeout_s=args.code_timeout,
                           memory_mb=args.memory_mb, math_answer_line=getattr(args, "math_answer_line", False),
                           unsafe_sandbox=getattr(args, "unsafe_sandbox", False))
    if any(p.kind == "code" for p in problems):
        from skyt1.recipe.sandbox import SandboxPolicy, check_sandbox

        # Refuse before sampling anything: without it every sample would score 0 with the refusal as reason.
        check_sandbox(SandboxPolicy(unsafe=options.unsafe_sandbox))
    by_id = {p.id: p for p in problems}
    failed = 0
    t0 = time.monotonic()
    with ResumableJsonl(output, sample_key, keep_rows=True) as out:
        if out.repaired_bytes:
            log(f"{output}: removed a torn last line ({out.repaired_bytes} bytes)")
        _check_resume(out, settings)
        todo = []
        for p in problems:
            missing = [s for s in range(args.n) if (p.id, s) not in out]
            if missing:
                todo.append((p, missing))
        total = sum(len(m) for _, m in todo)
        log(f"{args.task}: {len(problems)} problems x {args.n} samples; {total} to sample -> {output}")
        if todo:
            progress = Progress(total, "eval")
            writer = _Writer(out, by_id, settings, options, args.workers, progress)
            try:
                if llm_factory is not None:
                    sample_local(llm_factory(), todo, settings, args.n, system, writer, log)
                else:
                    failed = asyncio.run(sample_endpoint(args, todo, settings, system, writer, log))
            finally:
                writer.close()
        rows = list(out.rows.values())
    report = build_report(rows, problems, settings, args.n)
    report["output"] = str(output)
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["failed_requests"] = failed
    report_path = Path(args.report or str(output) + ".report.json")
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_report(report))
    log(f"report -> {report_path}")
    if failed:
        log(f"{failed} samples failed and are missing; rerun the same command to fill them in")
    return report
