"""The training step at full size on fake tensors: torch's measured peak per GPU next to the plan.

    python -m skyt1.train --config configs/sky_t1_32b.toml --dry-run --gpus 8 [--data.token_budget 32768]

Runs the real path of one rank of a `gpus`-rank job on any machine, in seconds to minutes, allocating
nothing: the model built on the meta device and sharded by skyt1.parallel (the LM head as a LossHead,
activation checkpointing, fully_shard per block, LM head unit, root) over a fake process group of that
world size (torch.testing._internal.distributed.fake_pg), materialised under FakeTensorMode; the
optimizer of skyt1.optim; skyt1.train.step_gradients (forward, fused loss, backward, reduce-scatters,
clipping) on micro-batches of the configured token budget, then the optimizer step. torch's
FSDPMemTracker counts every tensor by category (sharded / unsharded parameters and gradients, optimizer
state, activations, temporaries, all-gather and reduce-scatter buffers) and keeps the peak.

What it shows and what it cannot:
- Attention is skyt1::varlen_attn (skyt1/attention.py), whose fake implementation allocates what the
  GPU kernels do (output + fp32 log-sum-exp, no T x T mask); flash-attn's backward also keeps an fp32
  dq accumulator (T x Hq x D x 4 B, 0.3 GiB at 16K tokens) that this does not count.
- The fused loss and AdamW run through their public entry points (install_loss_head, build_optimizer).
  Where those ops have no fake implementation of their own, their CPU PyTorch path runs on the fake
  tensors: the optimizer's per-parameter temporaries are the same, but the loss's CPU row reference
  upcasts each logits chunk to fp32 (a few GiB of temporaries the GPU kernel, which works in place,
  never holds). That only matters where the loss phase is the peak (few layers, short micro-batches);
  at the 32B recipe the peak is the backward of the last block, long after the loss.
- The optimizer state exists in every step but the first: one untracked optimizer step on zero
  gradients creates it before the tracked step (as the second step of a run sees it).
- The tracker sees torch's allocations only: the CUDA context, NCCL's buffers and the caching
  allocator's fragmentation are the plan's "runtime reserve", shown beside it, not compared.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from skyt1.config import ModelConfig, TrainConfig
from skyt1.data.batch import PackedBatch
from skyt1.memplan import CATEGORIES, GiB, MemoryPlan

MICRO_BATCHES = 2  # the second one accumulates into the gradients the first left: the steady state
# Document lengths: log-normal around Sky-T1's reasoning traces (median ~4K tokens, a long tail cut at
# the token budget), packed until the micro-batch is full, the last one cut to fit: the fullest
# micro-batch the packer can produce, with realistic boundaries. Memory does not depend on them (no
# T x T anything), only the attention kernel's time does.
DOC_LEN_MEDIAN, DOC_LEN_SIGMA = 4000, 0.8


@dataclass(frozen=True)
class DryRunResult:
    measured: dict[str, float]     # bytes per plan category at torch's peak
    measured_raw: dict[str, float]  # bytes per tracker category at the peak
    peak: float                    # torch's peak (bytes)
    plan: MemoryPlan
    doc_lengths: tuple[int, ...]   # of the first micro-batch
    seconds: float

    @property
    def error(self) -> float:
        """(plan's tracked peak - measured peak) / measured peak."""
        return (self.plan.tracked_peak - self.peak) / self.peak


def synthetic_micro_batch(vocab: int, tokens: int, seed: int) -> PackedBatch:
    rng = np.random.default_rng(seed)
    lens: list[int] = []
    while sum(lens) < tokens:
        n = int(np.clip(rng.lognormal(np.log(DOC_LEN_MEDIAN), DOC_LEN_SIGMA), 64, tokens))
        lens.append(min(n, tokens - sum(lens)))
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)  # (B+1,)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (tokens,), generator=gen)      # (T,)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)   # (T,)
    pos = torch.cat([torch.arange(n) for n in lens])             # (T,)
    return PackedBatch(ids, labels, pos, cu, max(lens))


def _peak_tracker_class():
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class PeakTracker(FSDPMemTracker):
        """FSDPMemTracker keeping only the global peak: the per-module peaks it also keeps cost a pass over
        every tracked module at every op, which makes a 64-layer step several times slower and is not
        used here. Falls back to the full bookkeeping on a torch whose tracker lacks these fields."""

        def _update_peak_stats(self, peak_state) -> None:
            curr = getattr(self, "_curr_mem_snap", None)
            if curr is None or not hasattr(self, "_peak_mem") or not hasattr(self, "_peak_mem_snap"):
                return super()._update_peak_stats(peak_state)
            for dev, snap in curr.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return PeakTracker


def _category_name(key) -> str:
    return getattr(key, "value", key)  # the tracker's enum members are str-valued


def dry_run(cfg: TrainConfig, mcfg: ModelConfig, gpus: int, gpu_mem_gib: float) -> DryRunResult:
    """One training step of rank 0 of `gpus` ranks on fake tensors; returns measured vs planned."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from skyt1.kernels.adamw import param_dtype_for
    from skyt1.optim import AdamWConfig, build_lr_schedule, build_optimizer
    from skyt1.context_parallel import make_cp_attention, shard_batch
    from skyt1.parallel import DTYPES, DistEnv, build_mesh, build_sharded_meta_model
    from skyt1.train import make_attention, memory_plan, mesh_shape, step_gradients

    if dist.is_initialized():
        raise RuntimeError("dry_run needs its own (fake) process group; one is already initialised")
    t0 = time.perf_counter()
    plan, _ = memory_plan(cfg, mcfg, gpus, gpu_mem_gib)
    compute = DTYPES[cfg.model.dtype]
    T = cfg.data.token_budget  # the micro-batch of one data-parallel group (its cp ranks share it)
    shape = mesh_shape(cfg, gpus)
    batches = [synthetic_micro_batch(mcfg.vocab_size, T, seed=cfg.data.seed + i) for i in range(MICRO_BATCHES)]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        env = DistEnv(rank=0, world_size=gpus, local_rank=0, device=torch.device("cpu"))
        mesh = build_mesh(env, shape)  # HSDP's 2-D mesh and the CP groups, over the fake process group
        doc_lengths = tuple(batches[0].cu_seqlens.diff().tolist())
        if shape.cp > 1:  # rank 0's zigzag share of each micro-batch, as the CP loader hands it
            batches = [shard_batch(mb, shape.cp, mesh.cp_rank) for mb in batches]
        # build_parallel_model's steps up to sharding, outside the fake mode (the device mesh must be
        # real); materialising then happens inside it, where to_empty allocates nothing. No init: the
        # values of fake tensors do not exist. No compile: memory is the eager step's.
        model = build_sharded_meta_model(
            mcfg, env, param_dtype=param_dtype_for(cfg.optim.master), compute_dtype=compute,
            activation_checkpointing=cfg.train.activation_checkpointing, cpu_offload=cfg.train.cpu_offload,
            z_loss=cfg.train.z_loss, mesh=mesh.fsdp)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device=env.device)
            model.tie_weights()
            optimizer = build_optimizer(model.parameters(), AdamWConfig(
                lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                master=cfg.optim.master, seed=cfg.train.seed))
            scheduler = build_lr_schedule(optimizer, 1000, warmup_ratio=cfg.optim.warmup_ratio,
                                          kind=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio)
            for p in model.parameters():  # the optimizer state of a run's second step onwards
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            backend = None if cfg.train.attention == "auto" else cfg.train.attention
            attention = (make_cp_attention(backend, mesh.cp_group) if shape.cp > 1
                         else make_attention(backend, env.device, compute))
            tracker = _peak_tracker_class()(mod=model, optm=optimizer)

            def micro_batches():
                for i, mb in enumerate(batches):
                    if i:  # the tracker refuses a second forward of the root unless its module stats restart
                        tracker.reset_mod_stats()
                    yield mb

            with tracker:
                step_gradients(model, micro_batches(), T * shape.dp_size, device=env.device, world_size=gpus,
                               clip=cfg.optim.clip, attention=attention)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            snap = tracker.get_tracker_snapshot("peak")
    finally:
        dist.destroy_process_group()
    raw = {_category_name(k): float(v) for k, v in next(iter(snap.values())).items()} if snap else {}
    peak = raw.pop("Total", 0.0)
    measured = {label: sum(raw.get(n, 0.0) for n in names) for label, names in CATEGORIES}
    return DryRunResult(measured, raw, peak, plan, doc_lengths, time.perf_counter() - t0)


def format_dry_run(res: DryRunResult, title: str) -> str:
    planned = res.plan.peak_breakdown()
    lines = [title, f"  {'GiB per GPU':<44}{'measured':>9}{'plan':>9}{'plan - measured':>17}"]
    for label, _ in CATEGORIES:
        m, p = res.measured[label], planned[label]
        lines.append(f"  {label:<44}{m / GiB:9.2f}{p / GiB:9.2f}{(p - m) / GiB:+17.2f}")
    lines.append(f"  {'peak tracked by torch':<44}{res.peak / GiB:9.2f}{res.plan.tracked_peak / GiB:9.2f}"
                 f"{(res.plan.tracked_peak - res.peak) / GiB:+11.2f} ({res.error:+.1%})")
    lines.append(f"  {'runtime reserve (CUDA context, NCCL, fragm.)':<44}{'':>9}{res.plan.reserve / GiB:9.2f}")
    verdict = "fits" if res.plan.fits else "DOES NOT FIT"
    lines.append(f"  {'plan peak':<44}{'':>9}{res.plan.peak / GiB:9.2f}   at {res.plan.peak_phase}; capacity "
                 f"{res.plan.capacity / GiB:.2f}: {verdict}")
    lines.append(f"  ({len(res.doc_lengths)} documents in a micro-batch, {min(res.doc_lengths)}-"
                 f"{max(res.doc_lengths)} tokens; {res.seconds:.0f} s)")
    return "\n".join(lines)


def dry_run_record(res: DryRunResult, cfg: TrainConfig, mcfg: ModelConfig, gpus: int) -> dict:
    from skyt1.train import mesh_shape

    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    planned = res.plan.peak_breakdown()
    return {
        "bench": "dryrun", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads (fake tensors: no device)",
        "gpus": gpus, "layers": mcfg.num_hidden_layers, "hidden": mcfg.hidden_size, "params": mcfg.num_params(),
        "token_budget": cfg.data.token_budget, "mesh": mesh_shape(cfg, gpus).describe(),
        "micro_batches": MICRO_BATCHES, "master": cfg.optim.master,
        "activation_checkpointing": cfg.train.activation_checkpointing, "compute_dtype": cfg.model.dtype,
        "doc_lengths": list(res.doc_lengths), "seconds": round(res.seconds, 1),
        "gib": {label: {"measured": round(res.measured[label] / GiB, 3), "plan": round(planned[label] / GiB, 3)}
                for label, _ in CATEGORIES},
        "tracker_categories_gib": {k: round(v / GiB, 3) for k, v in res.measured_raw.items()},
        "measured_peak_gib": round(res.peak / GiB, 3), "plan_tracked_peak_gib": round(res.plan.tracked_peak / GiB, 3),
        "plan_error": round(res.error, 4), "plan_reserve_gib": round(res.plan.reserve / GiB, 3),
        "plan_peak_gib": round(res.plan.peak / GiB, 3), "plan_peak_phase": res.plan.peak_phase,
        "capacity_gib": round(res.plan.capacity / GiB, 2), "fits": res.plan.fits,
    }
