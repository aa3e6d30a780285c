"""`skyt1-sample eval`: score a checkpoint (or an OpenAI-compatible endpoint) on a benchmark.

    skyt1-sample eval --model DIR --task math500 --data math500.jsonl [--n 8 --temperature 0.7 --max-tokens 32768]
    skyt1-sample eval --base-url http://HOST:8000/v1 --model NAME --task gpqa_diamond --data gpqa_diamond.csv

Imported by skyt1.sample.cli (listed in its PLUGINS), which registers the subcommand.
"""
from __future__ import annotations

import argparse
import sys

from skyt1.eval.tasks import TASKS
from skyt1.recipe.jobs import add_client_arguments
from skyt1.recipe.verify import add_answer_line_argument, add_unsafe_sandbox_argument
from skyt1.sample.cli import add_engine_arguments, llm_from_args, register_subcommand


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--task", required=True, choices=sorted(TASKS))
    g.add_argument("--data", required=True, nargs="+",
                   help="the benchmark file(s) as published (several for LiveCodeBench releases)")
    g.add_argument("--limit", type=int, default=None, help="only the first N problems (a smoke run)")
    g.add_argument("--output", default=None, help="JSONL of every scored sample (default eval_<task>_<model>.jsonl); "
                                                  "a rerun resumes it")
    g.add_argument("--report", default=None, help="report JSON (default: <output>.report.json)")
    g.add_argument("--system-file", default=None,
                   help="system prompt file (Sky-T1's, for its thought/solution format; default: the chat "
                        "template's default)")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=8, help="samples per problem")
    g.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=32768,
                   help="new tokens per sample (clipped to the context left after the prompt)")
    g.add_argument("--seed", type=int, default=None, help="base seed (per-problem seeds derive from it)")
    g = p.add_argument_group("scoring")
    g.add_argument("--workers", type=int, default=4, help="scoring threads (code tests run in sandboxes)")
    g.add_argument("--math-timeout", type=float, default=5.0, help="seconds per math comparison")
    add_answer_line_argument(g)
    g.add_argument("--code-timeout", type=float, default=6.0, help="CPU seconds per code test")
    g.add_argument("--memory-mb", type=int, default=1024, help="address-space limit of a code test")
    add_unsafe_sandbox_argument(g)
    g = p.add_argument_group("endpoint (instead of a local checkpoint): --model is then the served name")
    add_client_arguments(g, default_model=None, default_concurrency=64, default_timeout=3600.0)
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from skyt1.eval.run import evaluate
    from skyt1.recipe.sandbox import SandboxUnavailable

    try:
        report = evaluate(args, None if args.base_url else (lambda: llm_from_args(args)))
    except SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if report.get("failed_requests") else 0


register_subcommand("eval", "score a model on a benchmark (math500, aime24, amc23, olympiadbench, "
                            "gpqa_diamond, livecodebench)", add_arguments, run)
