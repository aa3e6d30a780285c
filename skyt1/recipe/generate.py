"""Teacher traces for a problem file: n samples per problem, local engine or OpenAI-compatible endpoint, resumable.

    python -m skyt1.recipe generate --problems problems.jsonl --output traces.jsonl --n 1 \\
        --base-url http://127.0.0.1:8000/v1 --model QwQ-32B-Preview        # any OpenAI-compatible endpoint
    python -m skyt1.recipe generate --problems problems.jsonl --output traces.jsonl \\
        --local-model /ckpt/QwQ-32B-Preview                                # skyt1.sample's engine in-process

Problem rows (JSONL): id (string or integer, unique), problem (text), domain (math | code | science), and
the reference the verifier needs (answer for math/science, tests for code). Optional: prompt (the exact
user message, instead of the one built here), starter_code and fn_name (call-based code problems).

User messages follow Sky-T1's data: math and science start with "Return your final response within
\\boxed{}. "; code asks for a Python program (stdin/stdout) or a function completing the starter code.

Output rows (JSONL, one per sample, appended and flushed as each finishes): id, sample_index, domain,
problem, prompt (the user message sent), text, finish_reason, usage {prompt_tokens, completion_tokens},
model. References stay in the problem file, which verify reads beside the samples. A rerun skips every
(id, sample_index) already in the output, so a killed run loses only the samples in flight.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from skyt1.recipe.jobs import (Progress, ResumableJsonl, add_client_arguments, bounded_gather, client_from_args,
                               iter_jsonl, row_id)

DOMAINS = ("math", "code", "science")
BOXED_PREFIX = "Return your final response within \\boxed{}. "
STDIN_INSTRUCTION = ("Write a complete Python 3 program for the problem below. It reads the input from standard "
                     "input and prints the answer to standard output. Give the final program in a single "
                     "```python code block.\n\n")
CALL_INSTRUCTION = ("Write a Python 3 function for the problem below, completing the given starter code. It is "
                    "called with the test arguments and its return value is checked. Give the final code in a "
                    "single ```python code block.\n\n")


def build_user_prompt(row: dict) -> str:
    """The user message for one problem row (its own `prompt` field wins)."""
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return row["prompt"]
    problem = row["problem"].strip()
    if row["domain"] == "code":
        starter = row.get("starter_code") or ""
        tests = row.get("tests")
        fn_name = row.get("fn_name") or (tests.get("fn_name") if isinstance(tests, dict) else None)
        if starter.strip() or fn_name:
            text = CALL_INSTRUCTION + problem
            if starter.strip():
                text += f"\n\n```python\n{starter.rstrip()}\n```"
            return text
        return STDIN_INSTRUCTION + problem
    return BOXED_PREFIX + problem


def load_problems(path: str | Path) -> list[dict]:
    """Validated problem rows; errors name the file, line and field."""
    problems: list[dict] = []
    seen: dict[str, int] = {}
    for lineno, row in iter_jsonl(path):
        pid = row_id(row, path, lineno)
        if pid in seen:
            raise ValueError(f"{path}:{lineno}: id {pid!r} repeats line {seen[pid]}")
        seen[pid] = lineno
        if not isinstance(row.get("problem"), str) or not row["problem"].strip():
            raise ValueError(f"{path}:{lineno}: field 'problem' must be a non-empty string")
        domain = row.get("domain")
        if domain not in DOMAINS:
            raise ValueError(f"{path}:{lineno}: field 'domain' must be one of {list(DOMAINS)}, got {domain!r}")
        if domain == "code" and row.get("tests") in (None, "", [], {}):
            raise ValueError(f"{path}:{lineno}: a code problem needs field 'tests' for verification")
        if domain != "code" and row.get("answer") in (None, ""):
            raise ValueError(f"{path}:{lineno}: a {domain} problem needs field 'answer' for verification")
        if "starter_code" in row and not isinstance(row["starter_code"], (str, type(None))):
            raise ValueError(f"{path}:{lineno}: field 'starter_code' must be a string")
        problems.append({**row, "_id": pid, "_line": lineno})
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def sample_key(row: dict) -> tuple[str, int]:
    return (str(row["id"]), int(row["sample_index"]))


def derived_seed(seed: int | None, pid: str, sample_index: int | None = None) -> int | None:
    """A per-(problem, sample) seed that does not depend on the order or on what ran before."""
    if seed is None:
        return None
    text = f"{seed}:{pid}" + ("" if sample_index is None else f":{sample_index}")
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF


def output_row(problem: dict, sample_index: int, prompt: str, text: str, finish_reason: str | None,
               prompt_tokens: int, completion_tokens: int, model: str) -> dict:
    row = {"id": problem["id"], "sample_index": sample_index, "domain": problem["domain"], "prompt": prompt,
           "text": text, "finish_reason": finish_reason,
           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}, "model": model,
           "problem": problem["problem"]}
    return row


# --------------------------------------------------------------------------------------- local engine


def generate_local(llm: Any, items: list[tuple[Any, list[int], list[int]]], params_for: Callable[[Any], Any],
                   on_sample: Callable[[Any, int, str, str | None, int, int], None], window: int | None = None,
                   log: Callable[[str], None] = lambda m: None) -> None:
    """Run prompts through skyt1.sample's engine, calling on_sample as each sample finishes.

    items: (key, prompt token ids, sample indices still to make); params_for(key): its SamplingParams
    (n = samples per prompt, seed = None or the prompt's seed). Each sample's seed depends on its
    index (the engine derives it), so redoing only the missing ones on resume gives what a full run would.
    on_sample(key, sample_index, text, finish_reason, prompt_tokens, completion_tokens).
    max_tokens is clipped to the context left after the prompt, as a long prompt would otherwise be refused.
    """
    engine = llm.engine

    def requests() -> Iterator[tuple[Any, Any]]:
        for counter, (key, ids, indices) in enumerate(items):
            p = params_for(key)
            budget = engine.max_model_len - len(ids)
            if budget < 1:
                log(f"skipping {key}: prompt of {len(ids)} tokens fills the context ({engine.max_model_len})")
                continue
            if p.max_tokens is None or p.max_tokens > budget:
                p = p.replace(max_tokens=budget)
            yield key, engine.add_request(f"req-{counter}", ids, p, sample_indices=indices)

    for key, seq in engine.stream_samples(requests(), window):
        on_sample(key, seq.index, engine.sample_text(seq), seq.finish_reason, seq.num_prompt_tokens,
                  seq.num_output_tokens)


def build_local_llm(args: argparse.Namespace) -> Any:
    import torch

    from skyt1.sample import LLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = {k: v for k, v in {
        "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens, "num_kv_blocks": args.num_kv_blocks,
        "gpu_memory_utilization": args.gpu_memory_utilization}.items() if v is not None}
    return LLM(args.local_model, args.tokenizer, dtype=args.dtype, device=device, **options)


# --------------------------------------------------------------------------------------------- runs


def _todo(problems: list[dict], n: int, out: ResumableJsonl) -> list[tuple[dict, list[int]]]:
    todo = []
    for p in problems:
        missing = [s for s in range(n) if (p["_id"], s) not in out]
        if missing:
            todo.append((p, missing))
    return todo


def _messages(system: str | None, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": prompt}]


def run_local(args: argparse.Namespace, problems: list[dict], out: ResumableJsonl, system: str | None) -> int:
    from skyt1.sample import SamplingParams

    todo = _todo(problems, args.n, out)
    log = lambda m: print(f"[generate] {m}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"{sum(len(m) for _, m in todo)} samples to generate for {len(todo)} problems -> {out.path}")
    if not todo:
        return 0
    llm = build_local_llm(args)
    if llm.tokenizer is None:
        raise ValueError(f"--local-model {args.local_model}: no tokenizer.json there; pass --tokenizer")
    model_name = Path(args.local_model).name
    by_id = {p["_id"]: p for p in problems}
    progress = Progress(sum(len(m) for _, m in todo), "generate")
    items = []
    prompts = {}
    for p, missing in todo:
        prompt = build_user_prompt(p)
        prompts[p["_id"]] = prompt
        items.append((p["_id"], llm.tokenizer.encode_prompt(_messages(None, prompt), system=system), missing))

    def on_sample(pid, index, text, finish_reason, n_prompt, n_out):
        out.append(output_row(by_id[pid], index, prompts[pid], text, finish_reason, n_prompt, n_out, model_name))
        progress.step()

    base = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    # A seed per problem (from --seed and the id) keeps samples reproducible whatever else the batch holds.
    generate_local(llm, items, lambda pid: base.replace(seed=derived_seed(args.seed, pid)), on_sample, log=log)
    return 0


async def run_endpoint(args: argparse.Namespace, problems: list[dict], out: ResumableJsonl,
                       system: str | None) -> int:
    import openai

    log = lambda m: print(f"[generate] {m}", file=sys.stderr, flush=True)  # noqa: E731
    todo = [(p, s) for p, missing in _todo(problems, args.n, out) for s in missing]
    log(f"{len(todo)} samples to generate for {len({p['_id'] for p, _ in todo})} problems -> {out.path}")
    if not todo:
        return 0
    client = client_from_args(args, args.model, log=log)
    progress = Progress(len(todo), "generate")
    failed = 0

    async def one(p: dict, s: int) -> None:
        nonlocal failed
        prompt = build_user_prompt(p)
        try:
            r = await client.complete(_messages(system, prompt), temperature=args.temperature,
                                      max_tokens=args.max_tokens, top_p=args.top_p,
                                      seed=derived_seed(args.seed, p["_id"], s))
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError):
            raise  # wrong key, model or URL: every request would fail the same way
        except Exception as e:  # noqa: BLE001 - one problem's failure must not stop the others
            failed += 1
            log(f"id {p['_id']} sample {s}: failed ({type(e).__name__}: {str(e)[:200]}); rerun to retry it")
            return
        out.append(output_row(p, s, prompt, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens,
                              r.model))
        progress.step()

    try:
        await bounded_gather([lambda p=p, s=s: one(p, s) for p, s in todo], limit=2 * args.concurrency)
    finally:
        await client.close()
        log(client.totals.summary(args.model, with_cost=False))
    if failed:
        log(f"{failed} samples failed; rerun the same command to retry only those")
        return 1
    return 0


def read_system(args: argparse.Namespace) -> str | None:
    if getattr(args, "system_file", None):
        path = Path(args.system_file)
        if not path.is_file():
            raise ValueError(f"--system-file {path}: no such file")
        return path.read_text(encoding="utf-8").strip()
    return getattr(args, "system", None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problems", required=True, help="problem JSONL: id, problem, domain, answer or tests")
    p.add_argument("--output", required=True, help="trace JSONL (appended; a rerun resumes)")
    p.add_argument("--n", type=int, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=16384, help="new tokens per sample")
    p.add_argument("--seed", type=int, default=None, help="base seed; each (problem, sample) gets its own")
    sys_group = p.add_mutually_exclusive_group()
    sys_group.add_argument("--system", default=None, help="system prompt for the teacher")
    sys_group.add_argument("--system-file", default=None, help="file holding the system prompt")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems (a trial run)")
    g = p.add_argument_group("teacher: an OpenAI-compatible endpoint")
    g.add_argument("--model", default=None, help="model name at the endpoint")
    add_client_arguments(g, default_model=None, default_concurrency=64, default_timeout=3600.0)
    g = p.add_argument_group("teacher: a local checkpoint through skyt1.sample")
    g.add_argument("--local-model", default=None, help="HF checkpoint folder")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: the model's)")
    g.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)


def main(args: argparse.Namespace) -> int:
    if (args.local_model is None) == (args.model is None):
        raise ValueError("give either --model NAME (with --base-url for a non-OpenAI endpoint) or --local-model DIR")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    system = read_system(args)
    problems = load_problems(args.problems)
    if args.limit is not None:
        problems = problems[:args.limit]
    known = {p["_id"] for p in problems}
    with ResumableJsonl(args.output, sample_key) as out:
        if out.repaired_bytes:
            print(f"[generate] {args.output}: removed a torn last line ({out.repaired_bytes} bytes)", file=sys.stderr)
        stray = [k for k in out.keys if k[0] not in known]
        if stray and args.limit is None:
            raise ValueError(f"{args.output}: holds ids not in {args.problems} (e.g. {stray[0][0]!r}); "
                             f"is it the output of another problem file?")
        if args.local_model is not None:
            return run_local(args, problems, out, system)
        return asyncio.run(run_endpoint(args, problems, out, system))
