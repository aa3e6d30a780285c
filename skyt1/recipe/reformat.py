r"""Rewrite teacher traces into Sky-T1's thought/solution format with an OpenAI-compatible model, resumable.

    python -m skyt1.recipe reformat --input traces.jsonl --output reformatted.jsonl            # gpt-4o-mini
    python -m skyt1.recipe reformat --input traces.jsonl --output reformatted.jsonl \
        --base-url http://127.0.0.1:8000/v1 --model my-model                                   # skyt1-sample serve

Why: a reasoning model's raw trace wanders; Sky-T1 found that taking the last code block of QwQ's raw
output passed ~25% of APPS, and over 90% after an LLM rewrote each trace into one thought section
(the reasoning kept nearly verbatim) and one clean solution section.

The rewrite prompt is a data file (skyt1/recipe/prompts/reformat.txt) that --prompt-file replaces. It may
use three placeholders, filled in one pass (so text inside a trace is never re-expanded):
  {trace}        the teacher's answer (required)
  {problem}      the problem statement (the row's `problem`, else its `prompt`)
  {domain_rule}  what the solution section must end with for this domain (DOMAIN_RULES below)

Input rows: id, text (the trace), domain; sample_index (default 0), problem or prompt, and anything else,
all carried over. Output rows: the input row with `text` replaced by the rewrite, plus `source_text`
(the trace), `format_ok`, `format_reason` and `reformat` {model, finish_reason, usage, attempts}. A rewrite
that lacks a section, has them out of order, was cut off, has no \boxed{} answer (math) or not exactly one
code block (code) is written with format_ok false and the reason, never silently kept: export drops it.

Resumable: each finished (id, sample_index) is appended and flushed at once; a rerun skips those. A request
that still fails after its retries is not written (so the next run retries it) and makes the exit code 1.
Token usage and cost are printed at the end (price table in jobs.PRICES_PER_MTOK, or --price-*).
"""
from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

from skyt1.recipe.jobs import (Progress, ResumableJsonl, add_client_arguments, bounded_gather, client_from_args,
                               iter_jsonl, resolve_prices, row_id)

BEGIN_THOUGHT, END_THOUGHT = "<|begin_of_thought|>", "<|end_of_thought|>"
BEGIN_SOLUTION, END_SOLUTION = "<|begin_of_solution|>", "<|end_of_solution|>"
MARKERS = (BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION)
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_SYSTEM = ("You convert a model's long answer into a fixed two-section format, keeping its reasoning "
                  "word for word.")
DOMAIN_RULES = {
    "math": "End the solution with the final answer written once as \\boxed{...}; it must be the last "
            "\\boxed{} in your output.",
    "code": "The solution must contain exactly one fenced code block (```python ... ```) holding the complete "
            "final program that the reasoning settled on; no other code blocks anywhere in the solution.",
    "science": "End the solution with the final answer written once as \\boxed{...}; for a multiple-choice "
               "question, box the letter of the chosen option.",
}
PLACEHOLDERS = re.compile(r"\{(trace|problem|domain_rule)\}")
_FENCE_RE = re.compile(r"^[ \t]*```", re.M)


def default_prompt_path() -> Path:
    return Path(str(resources.files("skyt1.recipe").joinpath("prompts/reformat.txt")))


def load_prompt(path: str | Path | None) -> str:
    path = Path(path) if path is not None else default_prompt_path()
    if not path.is_file():
        raise ValueError(f"--prompt-file {path}: no such file")
    template = path.read_text(encoding="utf-8")
    if "{trace}" not in template:
        raise ValueError(f"{path}: the prompt must contain the placeholder {{trace}} (where the trace goes); "
                         f"optional: {{problem}}, {{domain_rule}}")
    return template


def render_prompt(template: str, trace: str, problem: str, domain: str) -> str:
    values = {"trace": trace, "problem": problem, "domain_rule": DOMAIN_RULES.get(domain, DOMAIN_RULES["science"])}
    return PLACEHOLDERS.sub(lambda m: values[m.group(1)], template)


def count_code_blocks(text: str) -> int:
    """Fenced blocks: an opening ``` line and its closing ``` line count as one block."""
    return len(_FENCE_RE.findall(text)) // 2


def check_format(text: str, domain: str, finish_reason: str | None = None) -> tuple[bool, str, str]:
    """(ok, reason, cleaned text). Cleaned: the span from the first marker to the last, so chatter the
    model put around the sections ("Here is the rewrite:") is dropped; the sections themselves are kept
    byte for byte."""
    if finish_reason == "length":
        return False, "rewrite cut off at max_tokens (finish_reason=length)", text
    counts = {m: text.count(m) for m in MARKERS}
    missing = [m for m, c in counts.items() if c == 0]
    if missing:
        return False, f"missing {', '.join(missing)}", text
    repeated = [m for m, c in counts.items() if c > 1]
    if repeated:
        return False, f"repeated {', '.join(repeated)}", text
    pos = [text.index(m) for m in MARKERS]
    if pos != sorted(pos):
        return False, "sections out of order (expected thought, then solution)", text
    cleaned = text[pos[0]:pos[3] + len(END_SOLUTION)]
    thought = text[pos[0] + len(BEGIN_THOUGHT):pos[1]].strip()
    solution = text[pos[2] + len(BEGIN_SOLUTION):pos[3]].strip()
    between = text[pos[1] + len(END_THOUGHT):pos[2]].strip()
    if not thought:
        return False, "empty thought section", cleaned
    if not solution:
        return False, "empty solution section", cleaned
    if between:
        return False, f"text between the sections ({between[:40]!r})", cleaned
    if domain == "math":
        from skyt1.recipe.math_grader import extract_boxed

        if extract_boxed(solution) is None:
            return False, "no complete \\boxed{} answer in the solution", cleaned
    elif domain == "code":
        blocks = count_code_blocks(solution)
        if blocks != 1:
            return False, f"solution has {blocks} code blocks, expected exactly one", cleaned
    return True, "ok", cleaned


def sample_key(row: dict) -> tuple[str, int]:
    return (str(row["id"]), int(row.get("sample_index", 0)))


def load_traces(path: str | Path) -> list[dict]:
    rows, seen = [], {}
    for lineno, row in iter_jsonl(path):
        pid = row_id(row, path, lineno)
        if not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{lineno}: field 'text' (the trace) must be a string")
        s = row.get("sample_index", 0)
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"{path}:{lineno}: field 'sample_index' must be an integer >= 0, got {s!r}")
        domain = row.get("domain", "math")
        if domain not in DOMAIN_RULES:
            raise ValueError(f"{path}:{lineno}: field 'domain' must be one of {list(DOMAIN_RULES)}, got {domain!r}")
        key = (pid, s)
        if key in seen:
            raise ValueError(f"{path}:{lineno}: (id {pid!r}, sample_index {s}) repeats line {seen[key]}")
        seen[key] = lineno
        rows.append(row)
    return rows


async def reformat_rows(args: argparse.Namespace, rows: list[dict], out: ResumableJsonl, template: str) -> int:
    import openai

    log = lambda m: print(f"[reformat] {m}", file=sys.stderr, flush=True)  # noqa: E731
    todo, skipped_truncated = [], 0
    for r in rows:
        if sample_key(r) in out:
            continue
        if args.skip_truncated and r.get("finish_reason") == "length":
            skipped_truncated += 1
            continue
        todo.append(r)
    log(f"{len(todo)} of {len(rows)} traces to rewrite with {args.model} -> {out.path} "
        f"({len(rows) - len(todo) - skipped_truncated} already done"
        + (f", {skipped_truncated} truncated traces skipped" if skipped_truncated else "") + ")")
    client = client_from_args(args, args.model, log=log)
    progress = Progress(len(todo), "reformat")
    verdicts: Counter = Counter()
    failed = 0

    async def one(r: dict) -> None:
        nonlocal failed
        problem = r.get("problem") or r.get("prompt") or ""
        domain = r.get("domain", "math")
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": render_prompt(template, r["text"], problem, domain)}]
        try:
            res = await client.complete(messages, temperature=args.temperature, max_tokens=args.max_tokens)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError):
            raise  # wrong key, model or URL: every request would fail the same way
        except Exception as e:  # noqa: BLE001 - one failure must not stop the rest
            failed += 1
            log(f"id {r['id']} sample {r.get('sample_index', 0)}: failed ({type(e).__name__}: {str(e)[:200]})")
            return
        ok, reason, cleaned = check_format(res.text, domain, res.finish_reason)
        verdicts[reason] += 1
        out.append({**r, "text": cleaned, "source_text": r["text"], "format_ok": ok, "format_reason": reason,
                    "reformat": {"model": res.model, "finish_reason": res.finish_reason, "usage": res.usage(),
                                 "attempts": res.attempts}})
        progress.step()

    try:
        await bounded_gather([lambda r=r: one(r) for r in todo], limit=2 * args.concurrency)
    finally:
        await client.close()
        price_in, price_out = resolve_prices(args.model, args.price_input, args.price_output)
        print(f"[reformat] usage: {client.totals.summary(args.model, price_in, price_out)}", flush=True)
        if verdicts:
            flagged = sum(v for k, v in verdicts.items() if k != "ok")
            detail = "; ".join(f"{k}: {v}" for k, v in verdicts.most_common() if k != "ok")
            print(f"[reformat] format: {verdicts.get('ok', 0)} ok, {flagged} flagged"
                  + (f" ({detail})" if detail else ""), flush=True)
    if failed:
        log(f"{failed} requests failed after retries and were not written; rerun the same command to retry them")
        return 1
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="trace JSONL (from generate): id, sample_index, domain, text, ...")
    p.add_argument("--output", required=True, help="JSONL of rewrites (appended; a rerun resumes)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"rewriting model (default {DEFAULT_MODEL})")
    p.add_argument("--prompt-file", default=None, help="rewrite prompt template (default: the shipped one)")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system message ('' for none)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--skip-truncated", action="store_true",
                   help="do not rewrite traces the teacher left unfinished (finish_reason=length)")
    p.add_argument("--limit", type=int, default=None, help="only the first N traces (a trial run)")
    p.add_argument("--price-input", type=float, default=None, help="USD per 1M prompt tokens (overrides the table)")
    p.add_argument("--price-output", type=float, default=None, help="USD per 1M completion tokens")
    add_client_arguments(p, default_model=DEFAULT_MODEL, default_concurrency=16, default_timeout=600.0)


def main(args: argparse.Namespace) -> int:
    template = load_prompt(args.prompt_file)
    rows = load_traces(args.input)
    if args.limit is not None:
        rows = rows[:args.limit]
    with ResumableJsonl(args.output, sample_key) as out:
        if out.repaired_bytes:
            print(f"[reformat] {args.output}: removed a torn last line ({out.repaired_bytes} bytes)", file=sys.stderr)
        return asyncio.run(reformat_rows(args, rows, out, template))
