"""python -m skyt1.data {build, stats, synth, tiny-tokenizer}"""
from __future__ import annotations

import argparse
import json
import sys

from skyt1.tokenizer import QWEN25_DEFAULT_SYSTEM


def _build(a: argparse.Namespace) -> int:
    from skyt1.data.build import BuildOptions, build_dataset

    system = None if a.no_default_system else (a.system if a.system is not None else QWEN25_DEFAULT_SYSTEM)
    opts = BuildOptions(max_seq_len=a.max_seq_len, end_token=a.end_token, on_overflow=a.on_overflow,
                        skip_bad_rows=a.skip_bad_rows, default_system=system)
    res = build_dataset(a.input, a.tokenizer, a.output, opts, workers=a.workers, overwrite=a.overwrite,
                        progress=not a.quiet)
    if res.rebuilt:
        c = res.meta["counts"]
        print(f"{res.path}: {c['documents']:,} documents, {c['tokens']:,} tokens, {c['loss_tokens']:,} loss tokens; "
              f"{c['truncated']} truncated, {c['dropped_too_long']} dropped as too long, "
              f"{c['dropped_no_loss']} dropped with no loss token, {c['skipped_rows']} bad rows skipped "
              f"({res.meta['build_seconds']:.1f} s)")
        for msg in res.meta["skipped_examples"]:
            print(f"  skipped: {msg}", file=sys.stderr)
    return 0


def _stats(a: argparse.Namespace) -> int:
    import numpy as np

    from skyt1.data.dataset import TokenDataset

    ds = TokenDataset(a.dir)
    m = ds.meta
    pct = {f"p{q}": float(v) for q, v in zip((1, 10, 50, 90, 99), np.percentile(ds.lengths, [1, 10, 50, 90, 99]))}
    out = {"path": str(ds.path), "documents": ds.num_docs, "tokens": ds.num_tokens,
           "loss_tokens": int(ds.loss_tokens.sum()), "mean_length": float(ds.lengths.mean()),
           "max_length": int(ds.lengths.max()), **pct,
           **{k: m["counts"][k] for k in ("rows", "skipped_rows", "truncated", "dropped_too_long", "dropped_no_loss")},
           "max_seq_len": m["options"]["max_seq_len"], "end_token": m["options"]["end_token"],
           "tokenizer_sha256": m["tokenizer"]["sha256"],
           "sources": [{k: s[k] for k in ("path", "rows", "documents", "skipped")} for s in m["sources"]]}
    if a.budget:
        from skyt1.data.packer import Packer, packing_report

        p = Packer(ds.lengths, ds.loss_tokens, seed=a.seed, samples_per_step=a.samples_per_step,
                   token_budget=a.budget, world_size=a.world_size)
        out["packing_epoch0"] = packing_report(p.plan_epoch(0), ds.lengths, a.budget)
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    for k, v in out.items():
        if k == "sources":
            for s in v:
                print(f"source  {s['path']}: {s['rows']:,} rows, {s['documents']:,} documents, {s['skipped']} skipped")
        elif isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk:32s} {vv:,.4f}" if isinstance(vv, float) else f"  {kk:32s} {vv:,}")
        else:
            print(f"{k:20s} {v:,.1f}" if isinstance(v, float) else f"{k:20s} {v:,}" if isinstance(v, int) else
                  f"{k:20s} {v}")
    return 0


def _synth(a: argparse.Namespace) -> int:
    from skyt1.data.synthetic import write_arithmetic_json

    print(write_arithmetic_json(a.output, a.n, a.seed, a.max_digits))
    return 0


def _tiny_tokenizer(a: argparse.Namespace) -> int:
    from skyt1.data.synthetic import build_tiny_tokenizer, make_arithmetic_rows

    rows = None
    if a.rows:
        from skyt1.data.readers import iter_rows
        rows = [r for _, r in iter_rows(a.rows)]
    else:
        rows = make_arithmetic_rows(2000, a.seed)
    print(build_tiny_tokenizer(a.output, a.vocab_size, rows) / "tokenizer.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skyt1.data", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="tokenize JSON / JSONL rows into a memory-mapped dataset")
    b.add_argument("--input", nargs="+", required=True, help="Sky-T1 JSON array, ShareGPT JSONL or OpenAI messages JSONL")
    b.add_argument("--tokenizer", required=True, help="folder with tokenizer.json, or the file")
    b.add_argument("--output", required=True)
    b.add_argument("--max-seq-len", type=int, default=16384)
    b.add_argument("--end-token", choices=("im_end", "endoftext"), default="im_end")
    b.add_argument("--on-overflow", choices=("truncate", "drop"), default="truncate",
                   help="samples longer than --max-seq-len: keep the first max-seq-len tokens (Sky-T1) or drop")
    b.add_argument("--skip-bad-rows", action="store_true", help="skip and count rows that fail, instead of stopping")
    b.add_argument("--workers", type=int, default=1)
    b.add_argument("--overwrite", action="store_true", help="replace an output built with another tokenizer")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--system", help="system prompt for rows without one (default: Qwen2.5's)")
    g.add_argument("--no-default-system", action="store_true", help="rows without a system prompt get no system turn")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=_build)

    s = sub.add_parser("stats", help="documents, tokens, loss tokens, length percentiles, truncations")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--budget", type=int, default=0, help="also plan epoch 0 at this token budget and report packing")
    s.add_argument("--samples-per-step", type=int, default=96)
    s.add_argument("--world-size", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_stats)

    y = sub.add_parser("synth", help="write an arithmetic chat set in Sky-T1's JSON format")
    y.add_argument("--output", required=True)
    y.add_argument("--n", type=int, default=1000)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--max-digits", type=int, default=4)
    y.set_defaults(fn=_synth)

    t = sub.add_parser("tiny-tokenizer", help="train a tiny byte-level BPE with Qwen's chat special tokens")
    t.add_argument("--output", required=True)
    t.add_argument("--rows", help="train on these rows (JSON/JSONL) instead of synthetic arithmetic")
    t.add_argument("--vocab-size", type=int, default=512)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_tiny_tokenizer)

    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError, KeyError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or unwritable output
        from skyt1.train_checkpoint import describe_os_error
        print(f"error: {describe_os_error(e, f'python -m skyt1.data {a.cmd}')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
