"""Sampler throughput: the nano-vllm workload through skyt1.sample and through transformers' generate,
and the decode step against the memory-bandwidth floor.

1. Workload (nano-vllm's bench.py): 256 sequences, prompt and output lengths uniform in [100, 1024], random
   prompt tokens, ignore EOS, temperature 0.6, on a Qwen2.5-0.5B-shaped model with random bf16 weights
   (--preset qwen2.5-7b / qwen2.5-32b where memory allows). Reported: output tokens/s over the whole run
   (wall clock, synchronised), as nano-vllm and vLLM report it. Published reference: vLLM ~17,700 tok/s
   for Qwen2.5-0.5B on an A800; the target on an H100 is >= 20,000.
2. The same requests through transformers' generate (sdpa attention, same weights, same device): requests
   sorted by output length and run in batches of --hf-batch-size, left-padded, each batch generating its
   longest output (min_new_tokens = max_new_tokens, so EOS never ends it early). Reported: requested
   output tokens / wall time (the padding waste is HF's cost, as it would be for a user).
0. CUDA only: the paged-decode kernel's two variants (gather / one page per tile) at the 32B shape per rank
   (TP 1 and 8), timed with their registers and spills per thread (--skip-kernels to leave out).
3. Decode step at batch 64 / 128 / 256 with every sequence at --decode-context tokens: the model step alone
   (CUDA-graph replay, device-event timing via triton.testing.do_bench, median) and the whole engine step
   (schedule-free: prepare + forward + logits + sampling + the one D2H copy), against the floor
   (weight bytes + KV bytes read per step) / measured copy bandwidth (a 1 GiB device copy, read + write).

On a machine without CUDA it runs a tiny model and tiny workload with wall-clock timing, prints "CPU SMOKE",
then the CPU comparison (4.), and writes bench/results/sampler_cpu_<date>.json. On CUDA it writes
bench/results/sampler_<gpu>_<date>.json.

4. CPU mode only: the CPU demo against transformers side by side: 32 prompts of 16-64 tokens, 64 greedy
   tokens each, one batch in transformers (its best case: no padding waste in the outputs), the whole set
   through LLM.generate; --cpu-reps alternating runs of each: median wall time, median process CPU time and
   the best wall time (the last two are what to read on a shared machine), and the outputs compared token
   for token. Reported: skyt1 tok/s /
   transformers tok/s (the target: >= 1.0).

    python bench/sampler.py                       # ~3-6 minutes on an H100 (transformers is the slow part)
    python bench/sampler.py --skip-hf --preset qwen2.5-7b
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skyt1.config import ModelConfig, preset_config  # noqa: E402
from skyt1.model import build_model  # noqa: E402
from skyt1.sample import LLM, SamplingParams  # noqa: E402
from skyt1.sample.scheduler import ScheduledBatch  # noqa: E402
from skyt1.sample.sequence import Request, Sequence  # noqa: E402

CPU_CONFIG = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outputs = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, outputs


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_ms(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(cuda: bool) -> float:
    """Bytes/s of a large device copy, counting read + write."""
    n = (2**30 if cuda else 2**26) // 2
    dev = "cuda" if cuda else "cpu"
    src = torch.empty(n, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), cuda)
    return 2 * src.numel() * 2 / (ms / 1e3)


def bench_ours(model, prompts, outputs, args, cuda: bool) -> dict:
    llm = LLM(model, None, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
              gpu_memory_utilization=args.gpu_memory_utilization, decode_backend=args.decode_backend,
              **({} if cuda else {"num_kv_blocks": 4 * args.max_model_len // 16}))
    eng = llm.engine
    llm.generate([[1] * 16] * 4, SamplingParams(temperature=0.6, max_tokens=8, ignore_eos=True))  # warm-up
    params = [SamplingParams(temperature=0.6, max_tokens=m, ignore_eos=True, seed=None) for m in outputs]
    sync(cuda)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(cuda)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(outputs), (n_out, sum(outputs))
    res = {
        "seconds": dt, "output_tokens": n_out, "output_tokens_per_s": n_out / dt,
        "total_tokens_per_s": (n_out + sum(map(len, prompts))) / dt,
        "kv_blocks": eng.block_manager.num_blocks, "block_size": eng.block_size,
        "kv_pool_tokens": eng.block_manager.num_blocks * eng.block_size,
        "preemptions": eng.scheduler.num_preemptions,
        "decode_backend": eng.runner.attn.decode_backend, "prefill_backend": eng.runner.attn.prefill_backend,
        "cuda_graphs": bool(eng.runner.graphs),
    }
    print(f"skyt1.sample: {n_out} output tokens in {dt:.2f} s = {n_out / dt:,.0f} tok/s "
          f"({res['decode_backend']} decode, graphs {res['cuda_graphs']}, {res['preemptions']} preemptions, "
          f"pool {res['kv_pool_tokens']:,} tokens)")
    res["decode"] = bench_decode_steps(llm, args, cuda)
    del llm, eng
    return res


def bench_decode_steps(llm: LLM, args, cuda: bool) -> list[dict]:
    eng = llm.engine
    runner, bm, cfg = eng.runner, eng.block_manager, eng.model.cfg
    bw = copy_bandwidth(cuda)
    elem = next(eng.model.parameters()).element_size()
    weight_bytes = sum(p.numel() for p in eng.model.parameters()) * elem  # a tied head counts once
    weight_bytes -= cfg.vocab_size * cfg.hidden_size * elem * (0 if cfg.tie_word_embeddings else 1)  # lookup: ~0
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    ctx = args.decode_context
    rows = []
    for B in args.decode_batches:
        if B > eng.config.max_num_seqs or bm.blocks_for(ctx) * B > bm.num_free:
            print(f"decode B={B}: skipped (pool or max_num_seqs too small)")
            continue
        seqs = []
        for i in range(B):
            tokens = [random.randrange(cfg.vocab_size) for _ in range(ctx)]
            req = Request(f"d{i}", tokens, SamplingParams(temperature=0.6))
            s = Sequence(i, req, 0, req.params, frozenset(), None, None)
            bm.grow(s, ctx, partial_ok=False)
            s.num_computed_tokens = ctx - 1  # decoding its last token
            seqs.append(s)
        batch = ScheduledBatch(decodes=seqs)
        model_ms = None
        if runner.graphs:
            inp = runner.prepare(batch)
            model_ms = time_ms(lambda: runner._replay(inp), cuda)

        def full_step():
            logits, ss = runner.execute(batch)
            eng.sampler(logits, ss).token_ids.tolist()

        step_ms = time_ms(full_step, cuda)
        floor_ms = (weight_bytes + B * ctx * kv_per_token) / bw * 1e3
        row = {"batch": B, "context": ctx, "model_step_ms": model_ms, "engine_step_ms": step_ms,
               "floor_ms": floor_ms, "copy_bandwidth_GBps": bw / 1e9,
               "model_vs_floor": model_ms / floor_ms if model_ms else None, "engine_vs_floor": step_ms / floor_ms}
        rows.append(row)
        print(f"decode B={B} ctx={ctx}: model {model_ms if model_ms is None else round(model_ms, 3)} ms, "
              f"engine step {step_ms:.3f} ms, floor {floor_ms:.3f} ms "
              f"(x{step_ms / floor_ms:.2f}" + (f", model x{model_ms / floor_ms:.2f})" if model_ms else ")"))
        for s in seqs:
            bm.free_seq(s)
    return rows


def bench_decode_kernels(args) -> list[dict]:
    """CUDA: both paged-decode variants (a token gather, one page per tile) at the 32B attention shape per
    rank (40 / TP query heads, 8 / TP KV heads, head_dim 128, bf16, pages of --block-size-kernel tokens),
    timed (do_bench median) with their registers and spills per thread, so a GPU session can keep the faster."""
    from skyt1.kernels.paged_attention import (choose_num_splits, decode_kernel_resources, page_tile,
                                               paged_decode_attention)

    dev = torch.device(args.kernel_device)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    page, ctx = args.kernel_page, args.kernel_context
    rows = []
    for tp in (1, 8):
        Hq, Hkv, D = 40 // tp, 8 // tp, 128
        for B in args.kernel_batches:
            per_seq = -(-ctx // page)
            kc = torch.randn(B * per_seq + 1, page, Hkv, D, device=dev, dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            tables = torch.randperm(B * per_seq, device=dev).to(torch.int32).view(B, per_seq)
            lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16)
            splits = choose_num_splits(B, Hkv, ctx, sms)
            row = {"tp": tp, "batch": B, "context": ctx, "page": page, "num_splits": splits,
                   "kv_bytes": 2 * B * ctx * Hkv * D * 2}
            for name, one in (("gather", False), ("one_page", True)):
                if one and page_tile(page) is None:
                    continue
                ms = time_ms(lambda: paged_decode_attention(q, kc, vc, tables, lens, num_splits=splits,
                                                            one_page_tiles=one), dev.type == "cuda")
                try:
                    res = decode_kernel_resources(q, kc, vc, tables, lens, num_splits=splits, one_page_tiles=one)
                except Exception as e:  # the record keeps the timing even if this triton hides the counts
                    res = {"registers": None, "spills": None, "error": f"{type(e).__name__}: {e}"}
                row[name] = {"ms": ms, "GBps": row["kv_bytes"] / (ms / 1e3) / 1e9, **res}
            rows.append(row)
            print(f"paged decode TP{tp} B={B} ctx={ctx} page={page}: " + ", ".join(
                f"{k} {row[k]['ms']:.3f} ms ({row[k]['GBps']:,.0f} GB/s, {row[k]['registers']} regs, "
                f"{row[k]['spills']} spills)" for k in ("gather", "one_page") if k in row))
    return rows


def bench_hf(model, prompts, outputs, args, cuda: bool) -> dict | None:
    try:
        import transformers
    except ImportError:
        print("transformers: not installed, skipped")
        return None
    dev = next(model.parameters()).device
    hf = hf_model_like(model)
    order = sorted(range(len(prompts)), key=lambda i: outputs[i])
    gen_cfg = dict(do_sample=True, temperature=0.6, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=None)
    sync(cuda)
    t0 = time.perf_counter()
    generated = 0
    for start in range(0, len(order), args.hf_batch_size):
        idx = order[start:start + args.hf_batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):  # left padding
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        new = max(outputs[i] for i in idx)
        with torch.no_grad():
            hf.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, min_new_tokens=new, **gen_cfg)
        generated += new * len(idx)
    sync(cuda)
    dt = time.perf_counter() - t0
    useful = sum(outputs)
    print(f"transformers generate: {useful} requested tokens ({generated} generated with padding) in {dt:.2f} s "
          f"= {useful / dt:,.0f} tok/s")
    del hf
    return {"seconds": dt, "output_tokens": useful, "generated_tokens_with_padding": generated,
            "output_tokens_per_s": useful / dt, "batch_size": args.hf_batch_size,
            "transformers": transformers.__version__}


def hf_model_like(model):
    """transformers' Qwen2ForCausalLM with our model's config and weights (same device and dtype)."""
    import transformers

    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in model.cfg.to_hf_dict().items()
                                         if k not in ("architectures", "model_type")})
    with torch.device(dev):  # built (and randomly initialised) on the device, then given our weights
        hf = transformers.Qwen2ForCausalLM(hf_cfg).to(dtype)
    sd = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.eval()


def bench_cpu_vs_hf(model, args) -> dict | None:
    """Item 4 of the docstring: the CPU demo workload, skyt1 and transformers alternating in one run."""
    try:
        import transformers
    except ImportError:
        print("transformers: not installed, CPU comparison skipped")
        return None
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    rng = random.Random(1)
    V = model.cfg.vocab_size
    prompts = [[rng.randrange(V) for _ in range(rng.randint(16, 64))] for _ in range(args.cpu_prompts)]
    new = args.cpu_new_tokens
    llm = LLM(model, None, max_num_seqs=len(prompts), max_model_len=256, num_kv_blocks=len(prompts) * 8 + 8)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    hf = hf_model_like(model)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # left padding
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    gen_cfg = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=new, min_new_tokens=new)

    def run_hf():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, **gen_cfg)[:, width:]

    run_ours = lambda: llm.generate(prompts, params)  # noqa: E731
    run_ours(), run_hf()  # warm-up
    # Wall time, and this process's CPU time: on a shared machine the wall clock also counts the time other
    # processes held the cores, which the CPU time does not.
    times = {"skyt1": ([], []), "transformers": ([], [])}
    results = {}
    for _ in range(args.cpu_reps):
        for name, fn in (("skyt1", run_ours), ("transformers", run_hf)):
            w0, c0 = time.perf_counter(), time.process_time()
            results[name] = fn()
            times[name][0].append(time.perf_counter() - w0)
            times[name][1].append(time.process_time() - c0)
    outs, ref = results["skyt1"], results["transformers"]
    same = sum(o.outputs[0].token_ids == ref[i].tolist() for i, o in enumerate(outs))
    tokens = len(prompts) * new
    rec = {"prompts": len(prompts), "new_tokens": new, "reps": args.cpu_reps, "threads": torch.get_num_threads(),
           "load_average": os.getloadavg()[0], "identical_outputs": same,
           "decode_backend": llm.engine.runner.attn.decode_backend, "transformers": transformers.__version__}
    for name, (wall, cpu) in times.items():
        rec[f"{name}_wall_seconds"], rec[f"{name}_cpu_seconds"] = wall, cpu
        rec[f"{name}_tokens_per_s"] = tokens / statistics.median(wall)
        rec[f"{name}_tokens_per_cpu_s"] = tokens / statistics.median(cpu)
    # best of N: timeit's statistic, the run the machine's other load disturbed least
    rec["ratio_best_wall"] = min(times["transformers"][0]) / min(times["skyt1"][0])
    rec["ratio_wall"] = rec["skyt1_tokens_per_s"] / rec["transformers_tokens_per_s"]
    rec["ratio_cpu"] = rec["skyt1_tokens_per_cpu_s"] / rec["transformers_tokens_per_cpu_s"]
    print(f"CPU demo vs transformers ({len(prompts)} prompts x {new} greedy tokens, median of {args.cpu_reps}, "
          f"load average {rec['load_average']:.1f}): skyt1 {rec['skyt1_tokens_per_s']:,.0f} tok/s "
          f"({rec['skyt1_tokens_per_cpu_s']:,.0f} per CPU second), "
          f"transformers {rec['transformers_tokens_per_s']:,.0f} "
          f"({rec['transformers_tokens_per_cpu_s']:,.0f}); ratio x{rec['ratio_wall']:.2f} wall, "
          f"x{rec['ratio_cpu']:.2f} CPU time, x{rec['ratio_best_wall']:.2f} best wall time; "
          f"{same}/{len(prompts)} outputs identical")
    return rec


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-0.5b", help="model shape (skyt1.config.MODEL_PRESETS)")
    ap.add_argument("--num-seqs", type=int, default=None, help="requests (default 256; CPU 8)")
    ap.add_argument("--min-len", type=int, default=None, help="shortest prompt / output (default 100; CPU 8)")
    ap.add_argument("--max-len", type=int, default=None, help="longest prompt / output (default 1024; CPU 32)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--decode-backend", default=None, help="engine's decode backend (e.g. triton-page; default: best)")
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--decode-context", type=int, default=None, help="tokens per sequence (default 1024; CPU 32)")
    ap.add_argument("--decode-batches", type=int, nargs="*", default=None, help="default 64 128 256; CPU 4")
    ap.add_argument("--kernel-page", type=int, default=256, help="decode kernels (CUDA): page size")
    ap.add_argument("--kernel-context", type=int, default=8192, help="decode kernels (CUDA): tokens per sequence")
    ap.add_argument("--kernel-batches", type=int, nargs="*", default=[8, 64], help="decode kernels (CUDA): batches")
    ap.add_argument("--skip-kernels", action="store_true", help="no decode-kernel comparison (CUDA)")
    ap.add_argument("--kernel-device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a smoke run of the code
    ap.add_argument("--cpu-prompts", type=int, default=32, help="CPU comparison: prompts")
    ap.add_argument("--cpu-new-tokens", type=int, default=64, help="CPU comparison: greedy tokens per prompt")
    ap.add_argument("--cpu-reps", type=int, default=5, help="CPU comparison: alternating runs of each")
    ap.add_argument("--cpu-threads", type=int, default=None, help="CPU comparison: torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="record path (default bench/results/sampler_<gpu>_<date>.json on GPU)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        cfg = preset_config(args.preset)
        dtype, dev = torch.bfloat16, torch.device("cuda")
        args.num_seqs = args.num_seqs or 256
        args.min_len, args.max_len = args.min_len or 100, args.max_len or 1024
        args.decode_context = args.decode_context or 1024
        args.decode_batches = args.decode_batches or [64, 128, 256]
        device_name = torch.cuda.get_device_name()
    else:
        print("CPU SMOKE: no GPU; tiny model, tiny workload, wall-clock timing; only the CPU comparison's ratio "
              "means something")
        cfg = ModelConfig(**CPU_CONFIG)
        dtype, dev = torch.float32, torch.device("cpu")
        args.num_seqs = args.num_seqs or 8
        args.min_len, args.max_len = args.min_len or 8, args.max_len or 32
        args.max_model_len = min(args.max_model_len, 256)
        args.max_num_seqs = min(args.max_num_seqs, 8)
        args.max_num_batched_tokens = min(args.max_num_batched_tokens, 256)
        args.decode_context = args.decode_context or 32
        args.decode_batches = args.decode_batches or [4]
        device_name = f"CPU only ({os.cpu_count()} cores, {platform.machine()}), no GPU"
    model = build_model(cfg, device="meta", dtype=dtype)
    model.to_empty(device=dev)
    model.init_weights(0)
    model.eval()
    prompts, outputs = workload(args.num_seqs, args.min_len, args.max_len, cfg.vocab_size)
    print(f"{device_name} | torch {torch.__version__} | {args.preset if cuda else 'cpu-smoke'} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {dtype}) | {args.num_seqs} requests, "
          f"lengths [{args.min_len}, {args.max_len}], {sum(outputs)} output tokens")
    kernels = bench_decode_kernels(args) if cuda and not args.skip_kernels else None
    ours = bench_ours(model, prompts, outputs, args, cuda)
    if cuda:
        torch.cuda.empty_cache()
    hf = None if args.skip_hf else bench_hf(model, prompts, outputs, args, cuda)
    if hf:
        print(f"speed-up over transformers: x{ours['output_tokens_per_s'] / hf['output_tokens_per_s']:.1f}")
    cpu_vs_hf = None if cuda or args.skip_hf else bench_cpu_vs_hf(model, args)
    record = {
        "benchmark": "bench/sampler.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(), "device": device_name, "torch": torch.__version__, "python": platform.python_version(),
        "model": args.preset if cuda else "cpu-smoke", "dtype": str(dtype),
        "workload": {"requests": args.num_seqs, "min_len": args.min_len, "max_len": args.max_len,
                     "temperature": 0.6, "ignore_eos": True, "output_tokens": sum(outputs),
                     "prompt_tokens": sum(map(len, prompts))},
        "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                   "max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager},
        "skyt1": ours, "transformers": hf, "cpu_demo_vs_transformers": cpu_vs_hf, "decode_kernels": kernels,
        "timing": "whole runs: wall clock with device synchronisation; decode steps: triton do_bench median (CUDA)",
    }
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    out = args.out
    if out is None:
        gpu = device_name.replace(" ", "_").replace("/", "_") if cuda else "cpu"
        out = ROOT / "bench" / "results" / f"sampler_{gpu}_{datetime.date.today().isoformat()}.json"
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"record: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
