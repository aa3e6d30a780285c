"""Verified samples to the Sky-T1 training file (a JSON array of system + conversations) and a statistics report.

    python -m skyt1.recipe export --input verified.jsonl --system-prompt system.txt --output data.json \\
        [--one-per-problem] [--report report.json] [--tokenizer DIR --cutoff 16384]

Output: one JSON array (as Sky-T1_data_17k is), each row
    {"system": <the file's text>, "conversations": [{"from": "user", "value": <prompt>},
                                                    {"from": "assistant", "value": <text>}]}
The system prompt comes from a file because a model trained on this data answers in the two-section
format only when it is given that same system prompt at inference.

A sample is kept when the verifier accepted it and its text is in the thought/solution format
(format_ok from reformat; rows without that field are checked here with the same rule). With
--one-per-problem only the lowest-sample_index kept sample of each problem is written (Sky-T1 kept one
trace per problem, 16,401 rows for 15,586 questions, so repeats are allowed by default).

The report (printed, and written as JSON with --report) counts rows in, kept and dropped with the reason,
per domain, and gives length statistics of the kept rows in characters and, with --tokenizer, in tokens
of the whole chat-formatted row (with how many exceed --cutoff, which the trainer truncates).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from skyt1.recipe.jobs import iter_jsonl, row_id


def verdict_of(row: dict) -> tuple[bool | None, str]:
    """(accepted, reason) from a verified row: top-level `correct`, or a `verdict` object; None if absent."""
    v = row.get("verdict")
    if isinstance(v, dict) and isinstance(v.get("correct"), bool):
        return v["correct"], str(v.get("reason", ""))
    if isinstance(row.get("correct"), bool):
        return row["correct"], str(row.get("reason", ""))
    return None, ""


def format_of(row: dict) -> tuple[bool, str]:
    if isinstance(row.get("format_ok"), bool):
        return row["format_ok"], str(row.get("format_reason", ""))
    from skyt1.recipe.reformat import check_format

    ok, reason, _ = check_format(row.get("text") or "", row.get("domain", "math"), None)
    return ok, reason


def user_prompt_of(row: dict) -> str | None:
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return row["prompt"]
    if isinstance(row.get("problem"), str) and row["problem"].strip() and row.get("domain") in ("math", "code", "science"):
        from skyt1.recipe.generate import build_user_prompt

        return build_user_prompt(row)
    return None


def length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=np.int64)  # (N,)
    return {"count": int(a.size), "min": int(a.min()), "mean": round(float(a.mean()), 1),
            "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": int(a.max()), "total": int(a.sum())}


def select_rows(path: str | Path, one_per_problem: bool) -> tuple[list[dict], dict]:
    """Kept rows (input order) and the counts of what was dropped and why."""
    dropped: Counter = Counter()
    by_domain: dict[str, Counter] = defaultdict(Counter)
    candidates: list[tuple[int, dict]] = []
    problems: set[str] = set()
    n_in = 0
    seen: set[tuple[str, int]] = set()
    for lineno, row in iter_jsonl(path):
        n_in += 1
        pid = row_id(row, path, lineno)
        domain = str(row.get("domain", "unknown"))
        problems.add(pid)
        by_domain[domain]["rows"] += 1
        key = (pid, int(row.get("sample_index", 0)))

        def drop(reason: str) -> None:
            dropped[reason] += 1
            by_domain[domain]["dropped: " + reason] += 1

        if key in seen:
            drop("repeated (id, sample_index)")
            continue
        seen.add(key)
        correct, _ = verdict_of(row)
        if correct is None:
            raise ValueError(f"{path}:{lineno}: no verdict (expected a boolean 'correct' or 'verdict': "
                             f"{{'correct': ...}}); is this the output of `python -m skyt1.recipe verify`?")
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            drop("empty text")
            continue
        ok, reason = format_of(row)
        if not ok:
            drop(f"format: {reason}")
            continue
        if not correct:
            drop("incorrect")
            continue
        prompt = user_prompt_of(row)
        if prompt is None:
            raise ValueError(f"{path}:{lineno}: no user prompt (needs 'prompt', or 'problem' with 'domain')")
        candidates.append((lineno, {"id": pid, "sample_index": key[1], "domain": domain, "prompt": prompt,
                                    "text": row["text"]}))
    kept: list[dict] = []
    if one_per_problem:
        best: dict[str, dict] = {}
        for _, r in candidates:
            if r["id"] not in best or r["sample_index"] < best[r["id"]]["sample_index"]:
                best[r["id"]] = r
        for _, r in candidates:
            if best[r["id"]] is r:
                kept.append(r)
            else:
                dropped["another sample of the problem kept"] += 1
                by_domain[r["domain"]]["dropped: another sample of the problem kept"] += 1
    else:
        kept = [r for _, r in candidates]
    for r in kept:
        by_domain[r["domain"]]["kept"] += 1
    counts = {"rows_in": n_in, "kept": len(kept), "dropped": sum(dropped.values()),
              "dropped_by_reason": dict(dropped.most_common()),
              "problems_in": len(problems), "problems_kept": len({r["id"] for r in kept}),
              "by_domain": {d: dict(c) for d, c in sorted(by_domain.items())}}
    return kept, counts


def write_json_array(rows: list[dict], path: Path) -> None:
    """One row per line inside the array (diffable, streamable); written to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("[\n")
        for i, r in enumerate(rows):
            f.write(json.dumps(r, ensure_ascii=False) + (",\n" if i + 1 < len(rows) else "\n"))
        f.write("]\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="verified JSONL (from verify)")
    p.add_argument("--system-prompt", required=True, help="file holding the system prompt of every row")
    p.add_argument("--output", required=True, help="training file: a JSON array of Sky-T1 rows")
    p.add_argument("--report", default=None, help="write the statistics as JSON here too")
    p.add_argument("--one-per-problem", action="store_true", help="keep one accepted sample per problem id")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder/json: report lengths in tokens too")
    p.add_argument("--end-token", choices=("im_end", "endoftext"), default="im_end",
                   help="end token used when counting tokens (as the trainer will)")
    p.add_argument("--cutoff", type=int, default=16384, help="count rows longer than this many tokens")


def main(args: argparse.Namespace) -> int:
    sp = Path(args.system_prompt)
    if not sp.is_file():
        raise ValueError(f"--system-prompt {sp}: no such file")
    system = sp.read_text(encoding="utf-8").strip()
    if not system:
        raise ValueError(f"--system-prompt {sp}: the file is empty")
    kept, report = select_rows(args.input, args.one_per_problem)
    rows = [{"system": system, "conversations": [{"from": "user", "value": r["prompt"]},
                                                 {"from": "assistant", "value": r["text"]}]} for r in kept]
    write_json_array(rows, Path(args.output))
    report["length_chars"] = {
        "assistant": length_stats([len(r["text"]) for r in kept]),
        "user": length_stats([len(r["prompt"]) for r in kept]),
    }
    by_domain_chars = defaultdict(list)
    for r in kept:
        by_domain_chars[r["domain"]].append(len(r["text"]))
    report["length_chars"]["assistant_by_domain"] = {d: length_stats(v) for d, v in sorted(by_domain_chars.items())}
    if args.tokenizer:
        from skyt1.tokenizer import ChatTokenizer, messages_from_row

        tok = ChatTokenizer.from_pretrained(args.tokenizer, end_token=args.end_token)
        lengths, loss_tokens = [], []
        for i, row in enumerate(rows):
            ids, mask = tok.encode_chat(messages_from_row(row, source=args.output, row_index=i))
            lengths.append(len(ids))
            loss_tokens.append(sum(mask))
        report["length_tokens"] = {"row": length_stats(lengths), "assistant": length_stats(loss_tokens),
                                   "cutoff": args.cutoff, "over_cutoff": sum(n > args.cutoff for n in lengths)}
    report["output"] = str(args.output)
    report["system_prompt"] = str(sp)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"[export] {len(rows)} rows -> {args.output}", file=sys.stderr)
    return 0
