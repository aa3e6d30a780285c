"""Throughput of the real train step: forward, fused loss, backward, clip, optimizer, as skyt1.train runs it.

    python bench/throughput.py --preset qwen2.5-32b --layers 4            # 32B width on one H100, 16K tokens
    python bench/throughput.py --config /models/Qwen2.5-7B/config.json     # any HF shape
    torchrun --nproc_per_node 8 bench/throughput.py --preset qwen2.5-32b  # the full model, FSDP over 8
    torchrun --nproc_per_node 8 bench/throughput.py --preset qwen2.5-32b --tokens 32768 --cp 2   # 32K, CP 2
    torchrun --nnodes 2 --nproc_per_node 8 ... bench/throughput.py --dp-replicate 2             # HSDP 2 x 8
    python bench/throughput.py                                             # no GPU: a tiny CPU smoke shape

The model is built and sharded by skyt1.parallel exactly as in training (meta device, activation
checkpointing, optional compile, fully_shard per block, LM head unit, root), with random weights; the
batch is one packed micro-batch of --tokens tokens made of documents of --doc-len tokens, every label
counted. The mesh is skyt1.parallel's (--dp-replicate, --dp-shard, --cp, as parallel.* in training): each
data-parallel group runs one micro-batch, split over its --cp ranks by the zigzag split; per-GPU figures
divide the group's tokens and FLOPs by cp, which is how skyt1.train counts them (global / world size).
Reported:
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

    python bench/throughput.py --cpu-compare      # CPU: skyt1's step vs a plain transformers + AdamW loop

CPU mode (--cpu-compare): on 2 threads, a 4-layer hidden-256 Qwen2 with the real 151936 vocabulary, one
packed micro-batch of 4096 tokens (documents of varied lengths), no activation checkpointing, fp32:
skyt1.train.train_step against transformers' Qwen2ForCausalLM + torch.optim.AdamW + clip on the same
documents, padded (one row per document, attention mask) and packed (one row, position_ids restarting
per document), the three interleaved step by step so that load on the machine hits them alike; the
load average is recorded. Writes bench/results/throughput_cpu-compare_<date>.json.
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
from skyt1.config import ParallelSection  # noqa: E402
from skyt1.context_parallel import make_cp_attention, shard_batch  # noqa: E402
from skyt1.parallel import (build_mesh, build_parallel_model, destroy_distributed, init_distributed,  # noqa: E402
                            resolve_mesh)
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
    hidden = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, attention(mb))
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


CPU_COMPARE = dict(vocab_size=151936, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
CPU_COMPARE_DOCS = [700, 300, 1200, 96, 800, 500, 500]  # 4096 tokens


def cpu_compare(steps: int, warmup: int, out: str | None) -> int:
    """skyt1's train step vs plain transformers loops on CPU, side by side (see the module docstring)."""
    import os

    import transformers

    torch.set_num_threads(2)
    cfg = ModelConfig(**CPU_COMPARE)
    lens = CPU_COMPARE_DOCS
    tokens = sum(lens)
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in lens]
    ids = torch.cat(docs)                                                      # (T,)
    pos = torch.cat([torch.arange(n) for n in lens])                           # (T,)
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)  # (B+1,)
    labels = ids.clone()
    labels[(cu[1:] - 1).long()] = -100                                         # no label across documents
    batch = PackedBatch(ids, labels, pos, cu, max(lens))
    loss_tokens = int((labels != -100).sum())

    env = init_distributed()
    model = build_parallel_model(cfg, env, param_dtype=torch.float32, compute_dtype=torch.float32,
                                 activation_checkpointing="none", init_seed=0)
    optimizer = build_optimizer(model.parameters(), AdamWConfig(lr=1e-5, master="fp32"))
    scheduler = build_lr_schedule(optimizer, 10**6, warmup_steps=0, kind="constant")
    attention = make_attention(None, env.device, torch.float32)

    def skyt1_step():
        train_step(model, optimizer, scheduler, [batch], loss_tokens, device=env.device, world_size=1, clip=1.0,
                   attention=attention)

    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, tie_word_embeddings=False,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).float().train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    width = max(lens)
    padded_ids = torch.zeros(len(lens), width, dtype=torch.int64)              # (B, Lmax)
    padded_mask = torch.zeros(len(lens), width, dtype=torch.int64)             # (B, Lmax)
    for i, d in enumerate(docs):
        padded_ids[i, :len(d)] = d
        padded_mask[i, :len(d)] = 1
    padded_labels = padded_ids.masked_fill(padded_mask == 0, -100)

    def hf_update(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def hf_padded():
        hf_update(hf(input_ids=padded_ids, attention_mask=padded_mask, labels=padded_labels).loss)

    def hf_packed():
        hf_update(hf(input_ids=ids[None], position_ids=pos[None], labels=ids[None]).loss)

    runs = {"skyt1": skyt1_step, "transformers_padded": hf_padded, "transformers_packed": hf_packed}
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + steps):
        for name, fn in runs.items():  # interleaved: a load spike costs each of them alike
            t = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    load_after = os.getloadavg()
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    record = {
        "bench": "throughput-cpu-compare", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "commit": commit, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in load_after]},
        "shape": CPU_COMPARE, "doc_lengths": lens, "tokens": tokens, "steps": steps, "warmup": warmup,
        "step_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "skyt1_vs_padded": round(tps["skyt1"] / tps["transformers_padded"], 3),
        "skyt1_vs_packed": round(tps["skyt1"] / tps["transformers_packed"], 3),
    }
    print(f"cpu compare ({tokens} tokens, {len(lens)} documents, 2 threads, load {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}): " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items())
          + f" | skyt1 / padded {record['skyt1_vs_padded']:.2f}x, / packed {record['skyt1_vs_packed']:.2f}x")
    date = datetime.date.today().isoformat()
    path = Path(out) if out else ROOT / "bench" / "results" / f"throughput_cpu-compare_{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"  wrote {path}")
    destroy_distributed()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-compare", action="store_true",
                    help="CPU: skyt1's step vs plain transformers + AdamW loops, side by side (see above)")
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
    ap.add_argument("--dp-replicate", type=int, default=1, help="replica groups (HSDP across nodes)")
    ap.add_argument("--dp-shard", type=int, default=0, help="ranks per shard group (0: the rest)")
    ap.add_argument("--cp", type=int, default=1, help="context-parallel ranks per micro-batch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="record path (default bench/results/throughput_<label>_<date>.json)")
    args = ap.parse_args(argv)
    if args.cpu_compare:
        return cpu_compare(args.steps, args.warmup, args.out)

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

    shape = resolve_mesh(ParallelSection(args.dp_replicate, args.dp_shard, args.cp), env.world_size,
                         token_budget=tokens)
    mesh = build_mesh(env, shape)
    torch.manual_seed(0)
    model = build_parallel_model(cfg, env, param_dtype=param_dtype_for(master), compute_dtype=compute,
                                 activation_checkpointing=args.ac, compile=args.compile, init_seed=0, mesh=mesh.fsdp)
    optimizer = build_optimizer(model.parameters(), AdamWConfig(lr=1e-5, master=master))
    scheduler = build_lr_schedule(optimizer, 10**6, warmup_steps=0, kind="constant")
    backend = None if args.attention == "auto" else args.attention
    attention = make_cp_attention(backend, mesh.cp_group) if shape.cp > 1 else make_attention(backend, dev, compute)
    batch = synthetic_batch(cfg.vocab_size, tokens, doc_len, torch.Generator().manual_seed(0))
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).double()
    if shape.cp > 1:
        batch = shard_batch(batch, shape.cp, mesh.cp_rank)
    if cuda:
        batch = batch.pin_memory()
    loss_tokens = tokens * shape.dp_size
    # Per GPU: the group's micro-batch over its cp ranks (the zigzag split balances the causal work).
    flops = train_flops(cfg, tokens, float((lens ** 2).sum())) / shape.cp
    flops_tt = train_flops_torchtitan(cfg, tokens, tokens) / shape.cp

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

    tps = tokens / shape.cp / (step_ms * 1e-3)
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
        "mesh": {"dp_replicate": shape.dp_replicate, "dp_shard": shape.dp_shard, "cp": shape.cp},
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
              f"AC {args.ac}, {master}, torch {torch.__version__}, commit {commit}, {env.world_size} rank(s) "
              f"({shape.describe()})")
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
