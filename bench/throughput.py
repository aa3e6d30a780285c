"""Throughput of the real train step: forward, fused loss, backward, clip, optimizer, as skyt1.train runs it.

    python bench/throughput.py --preset qwen2.5-32b --layers 4            # 32B width on one H100, 16K tokens
    python bench/throughput.py --config /models/Qwen2.5-7B/config.json     # any HF shape
    torchrun --nproc_per_node 8 bench/throughput.py --preset qwen2.5-32b  # the full model, FSDP over 8
    python bench/throughput.py                                             # no GPU: a tiny CPU smoke shape

The model is built and sharded by skyt1.parallel exactly as in training (meta device, activation
checkpointing, optional compile, fully_shard per block, LM head unit, root), with random weights; the
batch is one packed micro-batch of --tokens tokens made of documents of --doc-len tokens, every label
counted. Reported:
- tokens/s/GPU and step time of skyt1.train.train_step (median over --steps after --warmup steps);
- MFU by skyt1.flops.train_flops (6 x matmul params per token + causal attention per document:
  6 x layers x heads x head_dim x sum of squared document lengths), against the datasheet peak (989
  TFLOP/s dense bf16, H100 SXM) and against the peak measured here from a large bf16 matmul; and by
  torchtitan's convention (6N + 12 x layers x heads x head_dim x sequence length per token, no causal
  discount) for comparison;
- a breakdown of one step into forward, loss (the fused loss computes its gradients in its forward),
  backward and optimizer (clip + AdamW), timed with CUDA events on an instrumented copy of the step;
- peak memory (torch.cuda.max_memory_allocated).
Writes bench/results/throughput_<label>_<date>.json; the label is the GPU name, or "cpu-smoke".
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skyt1.config import ModelConfig, preset_config  # noqa: E402
from skyt1.data.batch import PackedBatch  # noqa: E402
from skyt1.flops import H100_BF16_PEAK, train_flops, train_flops_torchtitan  # noqa: E402
from skyt1.kernels.adamw import param_dtype_for  # noqa: E402
from skyt1.optim import AdamWConfig, build_lr_schedule, build_optimizer, clip_grad_norm_  # noqa: E402
from skyt1.parallel import build_parallel_model, destroy_distributed, init_distributed  # noqa: E402
from skyt1.train import make_attention, train_step  # noqa: E402

GiB = 2**30
CPU_SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)


def synthetic_batch(vocab: int, tokens: int, doc_len: int, gen: torch.Generator) -> PackedBatch:
    """One packed micro-batch: documents of doc_len tokens (the last one shorter), every label counted."""
    lens = [doc_len] * (tokens // doc_len) + ([tokens % doc_len] if tokens % doc_len else [])
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)  # (B+1,)
    ids = torch.randint(0, vocab, (tokens,), generator=gen)  # (T,)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)  # (T,)
    pos = torch.cat([torch.arange(n) for n in lens])  # (T,)
    return PackedBatch(ids, labels, pos, cu, max(lens))


class Timer:
    """Device-event timing on CUDA, wall clock on CPU (where every op is synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


def instrumented_step(model, optimizer, scheduler, mb: PackedBatch, loss_tokens: int, *, device, world_size: int,
                      clip: float, attention, timer: Timer) -> dict[str, float]:
    """skyt1.train.train_step's work on one micro-batch, with events between its phases."""
    mb = mb.to(device)
    t0 = timer.mark()
    hidden = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, attention(mb.cu_seqlens, mb.max_seqlen))
    t1 = timer.mark()
    loss = model.lm_head(hidden, mb.labels) * (world_size / loss_tokens)
    t2 = timer.mark()
    loss.backward()
    t3 = timer.mark()
    clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    t4 = timer.mark()
    return {"forward": timer.ms(t0, t1), "loss": timer.ms(t1, t2), "backward": timer.ms(t2, t3),
            "optimizer": timer.ms(t3, t4)}


def measured_matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large matmul in the training dtype, measured now (bf16 8192^3 on CUDA, fp32 on CPU)."""
    if device.type == "cuda":
        import triton.testing

        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
        return 2 * n**3 / (ms * 1e-3)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="qwen2.5-0.5b | qwen2.5-7b | qwen2.5-32b")
    ap.add_argument("--config", help="a HF config.json (or its folder)")
    ap.add_argument("--layers", type=int, default=0, help="keep only N blocks (full width and vocab)")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch")
    ap.add_argument("--doc-len", type=int, default=0, help="document length inside the micro-batch (default: one "
                                                              "document of --tokens)")
    ap.add_argument("--ac", choices=("full", "selective", "none"), default="full", help="activation checkpointing")
    ap.add_argument("--master", choices=("fp32", "bf16_sr", "bf16_kahan"), default="bf16_sr")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--attention", default="auto", choices=("auto", "flash", "torch", "cpu", "sdpa"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="record path (default bench/results/throughput_<label>_<date>.json)")
    args = ap.parse_args(argv)

    env = init_distributed()
    dev = env.device
    cuda = dev.type == "cuda"
    if args.config:
        cfg = ModelConfig.from_json(args.config)
        shape_name = str(args.config)
    elif args.preset:
        cfg = preset_config(args.preset)
        shape_name = args.preset
    else:
        cfg = preset_config("qwen2.5-32b") if cuda else ModelConfig(**CPU_SMOKE)
        shape_name = "qwen2.5-32b" if cuda else "cpu-smoke"
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    tokens = args.tokens if (cuda or args.preset or args.config) else min(args.tokens, 256)
    doc_len = args.doc_len or tokens
    master = args.master if cuda else "fp32"
    compute = torch.bfloat16 if cuda else torch.float32
    label = torch.cuda.get_device_name(dev).replace(" ", "-") if cuda else "cpu-smoke"

    torch.manual_seed(0)
    model = build_parallel_model(cfg, env, param_dtype=param_dtype_for(master), compute_dtype=compute,
                                 activation_checkpointing=args.ac, compile=args.compile, init_seed=0)
    optimizer = build_optimizer(model.parameters(), AdamWConfig(lr=1e-5, master=master))
    scheduler = build_lr_schedule(optimizer, 10**6, warmup_steps=0, kind="constant")
    attention = make_attention(None if args.attention == "auto" else args.attention, dev, compute)
    batch = synthetic_batch(cfg.vocab_size, tokens, doc_len, torch.Generator().manual_seed(0))
    if cuda:
        batch = batch.pin_memory()
    loss_tokens = tokens * env.world_size
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).double()
    flops = train_flops(cfg, tokens, float((lens ** 2).sum()))            # per rank
    flops_tt = train_flops_torchtitan(cfg, tokens, tokens)

    def step():
        return train_step(model, optimizer, scheduler, [batch], loss_tokens, device=dev, world_size=env.world_size,
                          clip=1.0, attention=attention)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    timer = Timer(dev)
    times = []
    for _ in range(args.steps):
        a = timer.mark()
        step()
        b = timer.mark()
        times.append(timer.ms(a, b))  # the step's host sync precedes the optimizer; the event waits for all
    step_ms = statistics.median(times)
    peak_mem = torch.cuda.max_memory_allocated(dev) / GiB if cuda else None
    parts = [instrumented_step(model, optimizer, scheduler, batch, loss_tokens, device=dev,
                               world_size=env.world_size, clip=1.0, attention=attention, timer=timer)
             for _ in range(max(3, args.steps // 2))]
    breakdown = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    peak_measured = measured_matmul_peak(dev)

    tps = tokens / (step_ms * 1e-3)
    achieved = flops / (step_ms * 1e-3)
    results = {
        "step_ms": step_ms, "tokens_per_s_per_gpu": tps, "tflops_per_gpu": achieved / 1e12,
        "mfu_datasheet": achieved / H100_BF16_PEAK, "mfu_measured_peak": achieved / peak_measured,
        "mfu_torchtitan_datasheet": flops_tt / (step_ms * 1e-3) / H100_BF16_PEAK,
        "measured_matmul_tflops": peak_measured / 1e12, "datasheet_tflops": H100_BF16_PEAK / 1e12,
        "peak_memory_gib": peak_mem, "breakdown_ms": breakdown,
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    device_name = (torch.cuda.get_device_name(dev) if cuda else
                   f"cpu ({platform.machine()}, {torch.get_num_threads()} threads; no GPU: smoke shape, timings "
                   "are not H100 figures)")
    record = {
        "bench": "throughput", "label": label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "commit": commit, "torch": torch.__version__, "device": device_name,
        "world_size": env.world_size,
        "shape": {"name": shape_name, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                  "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size, "heads": cfg.num_attention_heads,
                  "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                  "params": cfg.num_params(), "matmul_params": cfg.num_matmul_params()},
        "run": {"tokens": tokens, "doc_len": doc_len, "activation_checkpointing": args.ac, "master": master,
                "compute_dtype": str(compute).removeprefix("torch."), "compile": args.compile,
                "attention": args.attention, "steps": args.steps, "warmup": args.warmup},
        "flops_per_step": flops, "flops_per_step_torchtitan": flops_tt, "results": results,
    }
    if env.is_main:
        print(f"{label}: {shape_name} x{cfg.num_hidden_layers} layers, {tokens} tokens (docs of {doc_len}), "
              f"AC {args.ac}, {master}, torch {torch.__version__}, commit {commit}, {env.world_size} rank(s)")
        print(f"  step {step_ms:.1f} ms | {tps:,.0f} tokens/s/GPU | {achieved / 1e12:.1f} TFLOP/s | "
              f"MFU {results['mfu_datasheet']:.1%} of 989 TFLOP/s datasheet, {results['mfu_measured_peak']:.1%} of "
              f"{peak_measured / 1e12:.1f} TFLOP/s measured matmul | torchtitan convention "
              f"{results['mfu_torchtitan_datasheet']:.1%}")
        print("  breakdown (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items())
              + (f" | peak memory {peak_mem:.2f} GiB" if peak_mem is not None else ""))
        if not cuda:
            print("  CPU SMOKE: no GPU here; MFU against the H100 datasheet is meaningless on a CPU")
        date = datetime.date.today().isoformat()
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"throughput_{label}_{date}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"  wrote {out}")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
