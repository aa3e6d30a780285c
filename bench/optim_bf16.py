"""Does AdamW on bf16 parameters track the fp32-master loss curve at fine-tuning learning rates?

The set-up mirrors the 32B run in miniature. A tiny Qwen2-shaped skyt1.model is "pre-trained" in fp32 on
one Markov-chain language, rounded to bf16 (the released checkpoint is bf16), then fine-tuned on a
related language at lr 1e-5-scale with cosine decay and warmup, once per parameter layout:

  fp32        fp32 master weights; forward/backward from their bf16 copy, fp32 gradients (FSDP2 with
              MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32))
  bf16        bf16 weights, round-to-nearest updates: most updates are below half an ulp and vanish
  bf16_sr     bf16 weights, stochastic rounding
  bf16_kahan  bf16 weights plus a bf16 Kahan compensation buffer

It prints the held-out loss of each layout, its largest gap to the fp32 curve, and the share of the
fp32 run's loss drop it achieves; writes bench/results/optim_bf16_<device>.json. A second part times
one optimizer step per layout (Triton kernel on CUDA with do_bench; torch path on CPU, tiny shape).

    python bench/optim_bf16.py                 # CPU: about a minute
    python bench/optim_bf16.py --device cuda   # on a GPU machine
    python bench/optim_bf16.py --accum-study --micro-batches 4   # bf16 vs fp32 micro-batch gradient accumulation
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from skyt1.config import ModelConfig
from skyt1.kernels.adamw import MASTERS, adamw_update
from skyt1.model import build_model
from skyt1.optim import AdamW, build_lr_schedule, clip_grad_norm_

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("fp32", "bf16", "bf16_sr", "bf16_kahan")


def markov_language(vocab: int, seed: int, branching: int = 4) -> torch.Tensor:
    """A (vocab, vocab) transition matrix: each token is followed by one of `branching` tokens."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(vocab, vocab)
    nxt = torch.randint(0, vocab, (vocab, branching), generator=g)  # (V, K)
    w = torch.rand(vocab, branching, generator=g) + 0.1  # (V, K)
    probs.scatter_add_(1, nxt, w)
    return probs / probs.sum(1, keepdim=True)  # (V, V)


def sample_batch(probs: torch.Tensor, docs: int, length: int, g: torch.Generator, device):
    """A packed batch of `docs` documents of `length` tokens: input_ids, labels, positions, cu_seqlens."""
    seq = torch.empty(docs, length + 1, dtype=torch.int64)  # (B, L+1)
    seq[:, 0] = torch.randint(0, probs.shape[0], (docs,), generator=g)
    for t in range(length):
        seq[:, t + 1] = torch.multinomial(probs[seq[:, t]], 1, generator=g)[:, 0]
    input_ids = seq[:, :-1].reshape(-1).to(device)  # (T,)
    labels = seq[:, 1:].reshape(-1).to(device)  # (T,)
    position_ids = torch.arange(length).repeat(docs).to(device)  # (T,)
    cu_seqlens = (torch.arange(docs + 1, dtype=torch.int32) * length).to(device)  # (B+1,)
    return input_ids, labels, position_ids, cu_seqlens, length


def lm_loss(model, batch) -> torch.Tensor:
    input_ids, labels, position_ids, cu_seqlens, max_seqlen = batch
    hidden = model(input_ids, position_ids, cu_seqlens, max_seqlen)  # (T, H)
    return F.cross_entropy(model.logits(hidden).float(), labels)


class Run:
    """One layout: the optimizer's parameters (`master`) and the model that computes.

    The compute model holds bf16 values (FSDP2's param_dtype all-gather) but runs in fp32: bf16 matmuls
    are slow on CPU and the activations' precision is not what this benchmark compares. Gradients reach
    the optimizer in fp32 for the fp32 layout and in bf16 for the bf16 layouts, as FSDP2 hands them over
    with reduce_dtype=fp32 (cast to the parameter dtype).

    Several micro-batches per step (--micro-batches): FSDP2 reduce-scatters each micro-batch's gradient
    in fp32, casts it to the parameter dtype and adds it to the sharded gradient in that dtype
    (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py: `sharded_param.grad._local_tensor +=
    new_sharded_grad`), so a bf16 layout rounds once per micro-batch and once per addition.
    accum="param" reproduces that; accum="fp32" sums the micro-batches in fp32 and rounds once (what a
    fp32 accumulator outside FSDP2, or reduce_dtype and grad dtype fp32, would give).
    """

    def __init__(self, layout: str, cfg: ModelConfig, init: dict, args, total_steps: int, *, accum: str = "param",
                 opt_seed: int | None = None):
        self.layout = layout
        self.accum = accum
        self.compute = build_model(cfg, device=args.device, dtype=torch.float32)
        self.master = build_model(cfg, device=args.device, dtype=torch.float32 if layout == "fp32" else torch.bfloat16)
        self.master.load_state_dict(init)  # the bf16 "checkpoint"
        self.opt = AdamW(self.master.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                         master=layout, seed=args.seed if opt_seed is None else opt_seed)
        self.sched = build_lr_schedule(self.opt, total_steps, warmup_ratio=0.1)

    @torch.no_grad()
    def _gather(self):
        for c, m in zip(self.compute.parameters(), self.master.parameters()):
            c.copy_(m.to(torch.bfloat16))  # the all-gather in param_dtype=bf16

    def step(self, micro_batches: list, clip: float) -> torch.Tensor:
        self._gather()
        total = torch.zeros(())
        acc32 = None
        for mb in micro_batches:
            loss = lm_loss(self.compute, mb) / len(micro_batches)  # equal-size micro-batches: the step's mean
            loss.backward()
            total += loss.detach()
            grads = [c.grad for c in self.compute.parameters()]  # fp32: the reduce in reduce_dtype=fp32
            if self.accum == "fp32":
                acc32 = grads if acc32 is None else [a + g for a, g in zip(acc32, grads)]
            else:
                for m, g in zip(self.master.parameters(), grads):
                    g = g.to(m.dtype)  # handed over in the parameter dtype
                    m.grad = g if m.grad is None else m.grad + g  # added in the parameter dtype: a rounding
            for c in self.compute.parameters():
                c.grad = None
        if acc32 is not None:
            for m, g in zip(self.master.parameters(), acc32):
                m.grad = g.to(m.dtype)  # one rounding for the whole step
        clip_grad_norm_(self.master.parameters(), clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def eval_loss(self, batch) -> float:
        self._gather()
        return lm_loss(self.compute, batch).item()


# name -> (layout, gradient accumulation, optimizer seed offset) of the --accum-study runs
ACCUM_STUDY = {
    "fp32": ("fp32", "param", 0),
    "bf16_sr (FSDP2: bf16 accumulation)": ("bf16_sr", "param", 0),
    "bf16_sr, fp32 accumulation": ("bf16_sr", "fp32", 0),
    "bf16_sr, other rounding seed": ("bf16_sr", "param", 1),
    "bf16_kahan (FSDP2: bf16 accumulation)": ("bf16_kahan", "param", 0),
    "bf16_kahan, fp32 accumulation": ("bf16_kahan", "fp32", 0),
}


# Pairs of --accum-study runs whose largest eval-loss gap is reported: the effect of the bf16
# accumulation, next to the gap that another stochastic-rounding seed alone makes (the noise floor).
ACCUM_PAIRS = {
    "bf16_sr: bf16 vs fp32 accumulation": ("bf16_sr (FSDP2: bf16 accumulation)", "bf16_sr, fp32 accumulation"),
    "bf16_sr: rounding seed 0 vs 1 (noise floor)": ("bf16_sr (FSDP2: bf16 accumulation)", "bf16_sr, other rounding seed"),
    "bf16_kahan: bf16 vs fp32 accumulation": ("bf16_kahan (FSDP2: bf16 accumulation)", "bf16_kahan, fp32 accumulation"),
}


def accum_gaps(curves: dict) -> dict:
    """Largest |eval loss difference| over the evaluations, for each pair of ACCUM_PAIRS."""
    return {k: max(abs(x - y) for x, y in zip(curves[a]["eval_loss"], curves[b]["eval_loss"]))
            for k, (a, b) in ACCUM_PAIRS.items()}


def pretrain(cfg, args, probs) -> dict:
    """fp32 AdamW at a pre-training lr on language A; returns the bf16-rounded state dict."""
    model = build_model(cfg, device=args.device, dtype=torch.float32, seed=args.seed)
    opt = AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0, master="fp32")
    sched = build_lr_schedule(opt, args.pretrain_steps, warmup_ratio=0.05)
    g = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.pretrain_steps):
        loss = lm_loss(model, sample_batch(probs, args.docs, args.length, g, args.device))
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}


def loss_curves(args) -> dict:
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=args.hidden // 4, tie_word_embeddings=False)
    lang_a = markov_language(args.vocab, seed=args.seed)
    # language B: a third of the tokens get new successors; the rest is shared with A
    lang_b = lang_a.clone()
    changed = torch.randperm(args.vocab, generator=torch.Generator().manual_seed(args.seed + 2))[: args.vocab // 3]
    lang_b[changed] = markov_language(args.vocab, seed=args.seed + 3)[changed]
    t0 = time.perf_counter()
    init = pretrain(cfg, args, lang_a)
    pretrain_s = time.perf_counter() - t0
    magnitudes = torch.cat([v.float().abs().flatten() for k, v in init.items() if v.dim() == 2])
    ulp_ratio = (args.lr / (magnitudes * 2.0**-8)).median().item()  # update / half a bf16 ulp, median weight

    heldout = sample_batch(lang_b, args.docs * 4, args.length, torch.Generator().manual_seed(args.seed + 4), args.device)
    if args.accum_study:
        runs = {name: Run(layout, cfg, init, args, args.steps, accum=accum, opt_seed=args.seed + off)
                for name, (layout, accum, off) in ACCUM_STUDY.items()}
    else:
        runs = {name: Run(name, cfg, init, args, args.steps) for name in args.layouts}
    curves = {name: {"step": [0], "eval_loss": [r.eval_loss(heldout)], "train_loss": []} for name, r in runs.items()}
    g = torch.Generator().manual_seed(args.seed + 5)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        # the same micro-batches for every layout; the step holds args.docs documents in all
        mbs = [sample_batch(lang_b, args.docs // args.micro_batches, args.length, g, args.device)
               for _ in range(args.micro_batches)]
        for name, run in runs.items():
            curves[name]["train_loss"].append(run.step(mbs, clip=1.0))
        if step % args.eval_every == 0 or step == args.steps:
            for name, run in runs.items():
                curves[name]["step"].append(step)
                curves[name]["eval_loss"].append(run.eval_loss(heldout))
    finetune_s = time.perf_counter() - t0
    for c in curves.values():
        c["train_loss"] = torch.stack(c["train_loss"]).tolist()  # one host sync at the end

    ref = curves["fp32"]["eval_loss"] if "fp32" in curves else None
    summary = {}
    for name, c in curves.items():
        s = {"start_eval_loss": c["eval_loss"][0], "final_eval_loss": c["eval_loss"][-1]}
        if ref is not None:
            s["max_abs_gap_to_fp32"] = max(abs(a - b) for a, b in zip(c["eval_loss"], ref))
            drop = ref[0] - ref[-1]
            s["share_of_fp32_loss_drop"] = (c["eval_loss"][0] - c["eval_loss"][-1]) / drop if drop > 0 else float("nan")
        summary[name] = s
    extra = {"max_gap_between": accum_gaps(curves)} if args.accum_study else {}
    return {
        **extra,
        "model": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")},
        "params": sum(v.numel() for v in init.values()),
        "lr": args.lr,
        "schedule": "cosine to 0, warmup ratio 0.1",
        "steps": args.steps,
        "tokens_per_step": args.docs * args.length,
        "micro_batches_per_step": args.micro_batches,
        "median_update_over_half_ulp": ulp_ratio,
        "pretrain_seconds": pretrain_s,
        "finetune_seconds": finetune_s,
        "summary": summary,
        "curves": {name: {"step": c["step"], "eval_loss": c["eval_loss"]} for name, c in curves.items()},
    }


def step_timings(args) -> dict:
    """Time one update of an n-element shard per layout, and report the bytes it moves. On CUDA also
    check the compiled kernel against the torch reference (tests run the kernel under the interpreter)."""
    n = args.timing_numel
    dev = torch.device(args.device)
    # reads p, g, m, v (+c) and writes p, m, v (+c)
    bytes_per = {"fp32": 4 + 4 + 8 * 2 + 4, "bf16": 2 + 2 + 8 * 2 + 2, "bf16_sr": 2 + 2 + 8 * 2 + 2,
                 "bf16_kahan": 2 + 2 + 8 * 2 + 2 + 4}
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10)
    out, diffs = {}, {}
    for master in MASTERS:
        dtype = torch.float32 if master == "fp32" else torch.bfloat16
        gen = torch.Generator(device=dev).manual_seed(0)
        p = torch.randn(n, device=dev, generator=gen).to(dtype)
        g = torch.randn(n, device=dev, generator=gen).to(dtype)
        m = torch.randn(n, device=dev, generator=gen) * 1e-3
        v = torch.rand(n, device=dev, generator=gen) * 1e-6
        c = torch.zeros(n, device=dev, dtype=torch.bfloat16)
        backends = ["triton", "torch"] if dev.type == "cuda" else ["torch"]
        if dev.type == "cuda":
            states = {b: [t.clone() for t in (p, m, v, c)] for b in backends}
            for b, (p_, m_, v_, c_) in states.items():
                adamw_update(p_, g, m_, v_, master=master, kahan_comp=c_, seed=1, backend=b, **hp)
            (pt, mt, vt, ct), (pr, mr, vr, cr) = states["triton"], states["torch"]
            # FMA contraction on GPU: ulp-level differences, a bf16 ulp at most after rounding
            diffs[master] = {"param_max_abs": (pt.float() - pr.float()).abs().max().item(),
                             "exp_avg_sq_max_rel": ((vt - vr).abs() / vr.abs().clamp_min(1e-30)).max().item()}
        for backend in backends:
            def fn(backend=backend, master=master, p=p, g=g, m=m, v=v, c=c):
                adamw_update(p, g, m, v, master=master, kahan_comp=c, seed=1, backend=backend, **hp)

            if dev.type == "cuda":
                import triton.testing

                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            else:
                fn()
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                ms = sorted(ts)[len(ts) // 2] * 1e3
            out[f"{master}/{backend}"] = {"ms": ms, "GB_per_s": bytes_per[master] * n / (ms * 1e-3) / 1e9}
    return {"numel": n, "timings": out, "triton_vs_torch": diffs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=1e-5)  # the Sky-T1 recipe
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-numel", type=int, default=0, help="default: 2**26 on CUDA, 2**20 on CPU")
    ap.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step (must divide --docs)")
    ap.add_argument("--accum-study", action="store_true",
                    help="bf16 vs fp32 accumulation of the micro-batch gradients (ACCUM_STUDY runs)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.micro_batches < 1 or args.docs % args.micro_batches:
        ap.error(f"--micro-batches {args.micro_batches} must be >= 1 and divide --docs {args.docs}")
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add synchronisation (and spin on a busy host)
    args.timing_numel = args.timing_numel or (2**26 if dev.type == "cuda" else 2**20)

    t0 = time.perf_counter()
    curves = loss_curves(args)
    timings = step_timings(args)
    wall = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores; no GPU)"
    record = {
        "bench": "optim_bf16",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "torch": torch.__version__,
        "device": device_name,
        **curves,
        "optimizer_step": timings,
        "wall_seconds": wall,
    }
    print(f"device {device_name}, torch {torch.__version__}, commit {commit}")
    print(f"tiny Qwen2 model, {curves['params']} params; fine-tune {args.steps} steps at lr {args.lr} "
          f"(median update = {curves['median_update_over_half_ulp']:.3f} x half a bf16 ulp)")
    print(f"{'layout':<40}{'start':>8}{'final':>8}{'max gap':>9}{'share of fp32 drop':>20}")
    for name, s in curves["summary"].items():
        print(f"{name:<40}{s['start_eval_loss']:>8.4f}{s['final_eval_loss']:>8.4f}"
              f"{s.get('max_abs_gap_to_fp32', math.nan):>9.4f}{s.get('share_of_fp32_loss_drop', math.nan):>20.3f}")
    for k, gap in curves.get("max_gap_between", {}).items():
        print(f"  max eval-loss gap, {k}: {gap:.5f}")
    print(f"optimizer step over {timings['numel']} elements:")
    for k, t in timings["timings"].items():
        print(f"  {k:<20}{t['ms']:>9.3f} ms{t['GB_per_s']:>9.1f} GB/s")
    stem = "optim_bf16_microbatch" if args.accum_study else "optim_bf16"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{stem}_{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    for master, d in timings["triton_vs_torch"].items():
        print(f"  triton vs torch, {master}: param max |diff| {d['param_max_abs']:.3g}, "
              f"exp_avg_sq max rel diff {d['exp_avg_sq_max_rel']:.3g}")
    print(f"wrote {out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
