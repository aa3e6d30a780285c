"""`torchrun --nproc_per_node 8 -m skyt1.train --config configs/sky_t1_32b.toml`: the training loop.

Also runs as plain `python -m skyt1.train --config configs/tiny.toml` (one process, gloo on CPU).
`--plan [--gpus 8 --gpu-mem 79.6]` prints the per-GPU memory plan and exits. Any other argument is a
config override: `--optim.lr 2e-5 --train.max_steps 20`.

One optimizer step (train_step): every micro-batch of this rank runs forward, the fused linear
cross-entropy (summed over its labelled tokens) divided by the number of labelled tokens in the whole
step across all ranks, and backward; FSDP2 reduce-scatters the gradients; then global-norm clipping,
one host sync for the loss and the norm (a non-finite value stops the run before the update, so the
model and the last checkpoint stay good), the optimizer and the schedule.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from skyt1.attention import resolve_attention
from skyt1.config import ConfigError, ModelConfig, TrainConfig, load_train_config, preset_config
from skyt1.flops import train_flops
from skyt1.optim import clip_grad_norm_
from skyt1.train_checkpoint import ResumePlan

CONFIG_FILE = "train_config.toml"
METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm."""


# ------------------------------------------------------------------------------------------------
# the step
# ------------------------------------------------------------------------------------------------
def make_attention(backend: str | None, device: torch.device | str, dtype: torch.dtype):
    """attn(layer, q, k, v) for one micro-batch's documents; backend None picks the fastest available for
    the device and compute dtype. The backend is resolved here, once per run, never inside a block.
    (skyt1.context_parallel.make_cp_attention is the same for a context-parallel rank's share.)"""
    fn = resolve_attention(backend, device, dtype)

    def for_batch(mb):
        return lambda _layer, q, k, v: fn(q, k, v, mb.cu_seqlens, mb.cu_seqlens, mb.max_seqlen, mb.max_seqlen)
    return for_batch


def step_gradients(model, micro_batches, loss_tokens: int, *, device: torch.device, world_size: int, clip: float,
                   attention) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches, the reduce-scatters, clipping and the loss
    all-reduce: (2,) fp32 [loss per labelled token, grad norm] on the device, no host sync (the dry run
    runs exactly this on fake tensors)."""
    # FSDP2 averages gradients over ranks; scaling each rank's loss by world_size makes that average
    # the sum over ranks, so the gradient is d(sum of token losses) / (labelled tokens of the step).
    scale = world_size / max(1, loss_tokens)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for mb in micro_batches:
        mb = mb.to(device, non_blocking=True)
        hidden = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, attention(mb))  # (T, H)
        loss = model.lm_head(hidden, mb.labels) * scale             # fused linear CE, fp32 scalar
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = clip_grad_norm_(model.parameters(), clip if clip > 0 else None)  # global norm, on device
    dist.all_reduce(loss_sum)
    return torch.stack([loss_sum / world_size, grad_norm.to(loss_sum.device, torch.float32)])


def train_step(model, optimizer, scheduler, micro_batches, loss_tokens: int, *, device: torch.device,
               world_size: int, clip: float, attention) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches; returns (loss per labelled token, grad norm)."""
    stats = step_gradients(model, micro_batches, loss_tokens, device=device, world_size=world_size, clip=clip,
                           attention=attention)
    loss_value, norm_value = stats.tolist()  # the step's one host sync
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss {loss_value} / gradient norm {norm_value}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


# ------------------------------------------------------------------------------------------------
# configuration checks, all before any work
# ------------------------------------------------------------------------------------------------
def resolve_model_config(cfg: TrainConfig, need_path: bool = True) -> ModelConfig:
    """The model's shape: config.json of model.path (checked against model.preset / model.shape when both
    are given), else the preset or the inline shape. need_path=False (the planner) lets a missing
    model.path fall back to the preset / shape."""
    m = cfg.model
    declared = preset_config(m.preset) if m.preset else m.shape
    if m.path and (Path(m.path).is_dir() or need_path or declared is None):
        path = Path(m.path)
        if not path.is_dir():
            raise ConfigError(f"model.path = {m.path!r}: no such folder (a HF checkpoint: config.json + "
                              "safetensors)")
        mcfg = ModelConfig.from_json(path)
        if declared is not None:
            keep = ("bos_token_id", "eos_token_id", "max_position_embeddings")
            diff = [f"{f}: {getattr(mcfg, f)!r} vs {getattr(declared, f)!r}" for f in declared.__dataclass_fields__
                    if f not in keep and getattr(mcfg, f) != getattr(declared, f)]
            if diff:
                what = f"model.preset {m.preset!r}" if m.preset else "[model.shape]"
                raise ConfigError(f"model.path = {m.path!r}: its config.json does not match {what} "
                                  f"({'; '.join(diff[:4])})")
    else:
        mcfg = declared
    if m.layers:
        if m.layers > mcfg.num_hidden_layers:
            raise ConfigError(f"model.layers = {m.layers}: the model has only {mcfg.num_hidden_layers} layers")
        mcfg = mcfg.replace(num_hidden_layers=m.layers)
    return mcfg


def tokenizer_dir(cfg: TrainConfig) -> Path | None:
    if cfg.model.tokenizer:
        return Path(cfg.model.tokenizer)
    if cfg.data.synthetic:
        return Path(cfg.data.path).parent / "tokenizer"
    if cfg.model.path:
        return Path(cfg.model.path)
    return None


@dataclass(frozen=True)
class Preflight:
    model_cfg: ModelConfig
    resume_from: Path | None
    resume_plan: ResumePlan | None = None  # resume_from and the older fallbacks, checked again in run()


def preflight(cfg: TrainConfig) -> Preflight:
    """Every check that needs no process group: paths, the output folder, the resume point."""
    from skyt1.checkpoint import checkpoint_files
    from skyt1.data.dataset import read_meta
    from skyt1.train_checkpoint import check_writable, plan_resume

    mcfg = resolve_model_config(cfg)
    mesh_shape(cfg)  # a mesh that does not fit the world size is an error before any work
    if cfg.train.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("train.cpu_offload = true: offloading moves GPU state to host memory, and this "
                          "machine has no GPU; set it to false")
    if cfg.model.path:
        checkpoint_files(cfg.model.path)  # raises naming the folder when it has no safetensors
    tok = tokenizer_dir(cfg)
    if tok is not None and not (tok / "tokenizer.json").is_file() and not (cfg.data.synthetic and not cfg.model.tokenizer):
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        raise ConfigError(f"{key} = {str(tok)!r}: no tokenizer.json there")
    data = Path(cfg.data.path)
    if cfg.data.synthetic:
        if data.name != "dataset":
            raise ConfigError(f"data.path = {cfg.data.path!r}: a synthetic dataset is built as <folder>/dataset "
                              "(beside <folder>/tokenizer and <folder>/rows.json); end data.path with /dataset")
    elif not data.exists():
        raise ConfigError(f"data.path = {cfg.data.path!r}: no such folder; build the dataset first with "
                          "`python -m skyt1.data build --input ... --tokenizer ... --output ...`")
    else:
        meta = read_meta(data)  # a DataError naming the folder if it is not a complete dataset
        max_len = meta["options"]["max_seq_len"]
        if max_len > cfg.data.token_budget:
            raise ConfigError(f"data.token_budget = {cfg.data.token_budget} is below the max_seq_len {max_len} "
                              f"that {cfg.data.path} was built with: a document might not fit a micro-batch; "
                              f"raise data.token_budget or rebuild with --max-seq-len {cfg.data.token_budget}")

    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir = {cfg.train.output_dir!r} exists and is not a folder")
    check_writable(out, "train.output_dir")
    if cfg.data.synthetic and not (data / "meta.json").is_file():
        check_writable(data.parent, "data.path")
    plan = plan_resume(cfg, mcfg)
    return Preflight(mcfg, plan.candidates[0] if plan.candidates else None, plan)


def mesh_shape(cfg: TrainConfig, world_size: int | None = None):
    """The [parallel] mesh on this launch's ranks (torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE)."""
    from skyt1.parallel import resolve_mesh

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None
    return resolve_mesh(cfg.parallel, world, token_budget=cfg.data.token_budget, local_world_size=local)


def samples_per_step(cfg: TrainConfig, dp_size: int, is_main: bool) -> int:
    """data.samples_per_step, rounded up to a multiple of the data-parallel size (with a warning) when it
    has fewer samples than ranks: a rank with no sample would run only filler micro-batches."""
    s = cfg.data.samples_per_step
    if cfg.data.step_tokens or s >= dp_size:
        return s
    rounded = -(-s // dp_size) * dp_size
    if is_main:
        print(f"warning: data.samples_per_step = {s} is fewer than the {dp_size} data-parallel ranks; using "
              f"{rounded} samples per step (or set data.step_tokens for steps defined by tokens)", flush=True)
    return rounded


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: resident set peak


class MetricsLog:
    """metrics.jsonl (every step), console lines with a progress bar and ETA, optional TensorBoard."""

    def __init__(self, output_dir: Path, *, enabled: bool, log_every: int, total: int, start: int,
                 tensorboard: bool):
        self.enabled, self.log_every, self.total, self.start = enabled, log_every, total, start
        self.path = output_dir / METRICS_FILE
        self.t0 = time.perf_counter()
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                print("train.tensorboard: the tensorboard package is not installed; metrics go to "
                      f"{self.path} only", flush=True)

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after `step` (a resumed run redoes them), and a last line torn by a kill
        mid-write; the file is replaced atomically, so a kill here loses nothing either."""
        from skyt1.recipe.jobs import cut_torn_tail

        if not self.enabled or not self.path.is_file():
            return
        torn = cut_torn_tail(self.path)
        if torn:
            print(f"{self.path}: cut a torn last line ({torn} bytes, a write cut short by a kill)", flush=True)
        keep = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                print(f"{self.path}: line {lineno} is not a metrics record ({e}); dropped", flush=True)
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.writer is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, rec["step"])
        step = rec["step"]
        if step % self.log_every and step != self.total:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, done) * (self.total - step)
        frac = step / self.total
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        print(f"[{bar}] {step}/{self.total} eta {_fmt_time(eta)} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
              f"gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s_per_gpu']:,.0f} tok/s/gpu | "
              f"mfu {rec['mfu']:.2%} | mem {rec['peak_mem_gib']:.2f} GiB | {rec['step_time_s']:.2f} s/step",
              flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def prepare_synthetic(cfg: TrainConfig, is_main: bool) -> None:
    """Build the demo's data (tiny tokenizer + arithmetic chats) when data.synthetic asks and it is absent."""
    data = Path(cfg.data.path)
    if is_main:
        from skyt1.data.synthetic import make_synthetic_dataset

        if not (data / "meta.json").is_file():
            print(f"building the synthetic dataset: {cfg.data.synthetic} arithmetic chats -> {data}", flush=True)
        tok = Path(cfg.model.tokenizer) if cfg.model.tokenizer else None
        # A no-op when the folder already holds this exact build (same rows, tokenizer and options).
        make_synthetic_dataset(data.parent, n=cfg.data.synthetic, seed=cfg.data.seed, tokenizer=tok,
                               max_seq_len=min(1024, cfg.data.token_budget))
    dist.barrier()


def export_model(model, mcfg: ModelConfig, out_dir: Path, tok_dir: Path | None, dtype: torch.dtype,
                 is_main: bool) -> Path:
    """HF checkpoint, streaming: full tensors are gathered one at a time; rank 0 writes them."""
    from skyt1.checkpoint import save_tensors
    from skyt1.parallel import iter_full_hf_tensors

    tensors = iter_full_hf_tensors(model, dtype)
    if is_main:
        save_tensors(tensors, mcfg, out_dir, tokenizer_dir=tok_dir, dtype=dtype)
    else:
        for _ in tensors:  # the gathers are collectives: take part, keep nothing
            pass
    dist.barrier()
    return out_dir


def run(cfg: TrainConfig, pre: Preflight) -> dict:
    from skyt1.data.loader import build_loader
    from skyt1.kernels.adamw import param_dtype_for
    from skyt1.optim import AdamWConfig, build_lr_schedule, build_optimizer
    from skyt1.parallel import DTYPES, build_mesh, build_parallel_model, init_distributed
    from skyt1.tokenizer import ChatTokenizer
    from skyt1.train_checkpoint import load_checkpoint, save_checkpoint, select_intact

    env = init_distributed()
    main = env.is_main
    out = Path(cfg.train.output_dir)
    mcfg = pre.model_cfg
    say = (lambda msg: print(msg, flush=True)) if main else (lambda _msg: None)
    shape = mesh_shape(cfg, env.world_size)
    mesh = build_mesh(env, shape)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"# skyt1.train: {env.world_size} rank(s) on {env.device.type} ({shape.describe()}), "
              f"torch {torch.__version__}\n" + cfg.to_toml(), flush=True)
        (out / CONFIG_FILE).write_text(cfg.to_toml())
    resume_from = pre.resume_from
    for note in pre.resume_plan.notes if pre.resume_plan is not None else ():
        say(note)
    if pre.resume_plan is not None and pre.resume_plan.candidates:
        # Every file's checksum, read by all ranks together; a damaged newest checkpoint falls back.
        resume_from = select_intact(list(pre.resume_plan.candidates), pre.resume_plan.explicit, env.rank,
                                    env.world_size, say)
    if cfg.data.synthetic:
        prepare_synthetic(cfg, main)

    # ---- data ----
    tok_dir = tokenizer_dir(cfg)
    tok_hash = None
    if tok_dir is not None:
        tok = ChatTokenizer.from_pretrained(tok_dir)
        tok_hash = tok.hash
        if tok.vocab_size > mcfg.vocab_size:
            raise ConfigError(f"the tokenizer in {tok_dir} has {tok.vocab_size} tokens, more than the model's "
                              f"vocab_size {mcfg.vocab_size}")
    loader = build_loader(cfg.data.path, seed=cfg.data.seed,
                          samples_per_step=samples_per_step(cfg, shape.dp_size, main), token_budget=cfg.data.token_budget, rank=mesh.dp_rank, world_size=shape.dp_size,
                          expect_tokenizer_hash=tok_hash, cp=shape.cp, cp_rank=mesh.cp_rank,
                          step_tokens=cfg.data.step_tokens)
    ds = loader.dataset
    max_id = int(ds.tokens.max()) if ds.num_tokens else 0
    if max_id >= mcfg.vocab_size:  # labels are not checked again in the hot loop
        raise ConfigError(f"data.path = {cfg.data.path!r} holds token id {max_id}, outside the model's vocab_size "
                          f"{mcfg.vocab_size}")
    total_steps = loader.steps_per_epoch * cfg.train.epochs
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps

    # ---- memory: refuse a run that cannot fit before allocating anything big ----
    if env.device.type == "cuda":
        from skyt1.memplan import GiB, format_plan

        capacity = torch.cuda.get_device_properties(env.device).total_memory / GiB
        plan, knob = memory_plan(cfg, mcfg, env.world_size, capacity)
        if main:
            print(format_plan(plan, "memory plan per GPU:"), flush=True)
        if not plan.fits:
            raise ConfigError(f"the run needs ~{plan.peak / GiB:.1f} GiB per GPU, the GPUs have {capacity:.1f} GiB: "
                              + knob)

    # ---- model, optimizer, schedule ----
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = build_parallel_model(
        mcfg, env, param_dtype=param_dtype_for(cfg.optim.master), compute_dtype=DTYPES[cfg.model.dtype],
        activation_checkpointing=cfg.train.activation_checkpointing, compile=cfg.train.compile,
        cpu_offload=cfg.train.cpu_offload, z_loss=cfg.train.z_loss,
        # Resuming: the checkpoint overwrites every parameter, so neither read the HF weights nor draw.
        init="none" if resume_from is not None else ("load" if cfg.model.path else "random"),
        weights=cfg.model.path or None, init_seed=cfg.model.init_seed, allow_extra_layers=cfg.model.layers > 0,
        mesh=mesh.fsdp)
    optimizer = build_optimizer(model.parameters(), AdamWConfig(
        lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
        master=cfg.optim.master, seed=cfg.train.seed))
    scheduler = build_lr_schedule(optimizer, total_steps, warmup_ratio=cfg.optim.warmup_ratio,
                                  kind=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio)
    step = 0
    last_ckpt = None
    if resume_from is not None:
        step = load_checkpoint(resume_from, model, optimizer, scheduler, loader, env.rank, env.device, say)
        last_ckpt = resume_from
        if main:
            print(f"resumed from {resume_from} at step {step}", flush=True)
    metrics = MetricsLog(out, enabled=main, log_every=cfg.train.log_every, total=stop_at, start=step,
                         tensorboard=cfg.train.tensorboard)
    if step:
        metrics.truncate_after(step)
    elif main and (out / METRICS_FILE).exists():
        (out / METRICS_FILE).unlink()  # a run that never checkpointed: start its log afresh

    # ---- the loop ----
    backend = None if cfg.train.attention == "auto" else cfg.train.attention
    attention = make_attention(backend, env.device, DTYPES[cfg.model.dtype])
    if shape.cp > 1:
        from skyt1.context_parallel import make_cp_attention
        attention = make_cp_attention(backend, mesh.cp_group)
    peak = cfg.train.peak_tflops * 1e12
    steps = loader.iter_steps(cfg.train.epochs)
    t_prev = time.perf_counter()
    first_loss = last_loss = None
    try:
        while step < stop_at:
            batch = next(steps)
            lr = scheduler.get_last_lr()[0]
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(env.device)
            try:
                loss, grad_norm = train_step(model, optimizer, scheduler, batch.micro_batches, batch.loss_tokens,
                                             device=env.device, world_size=env.world_size, clip=cfg.optim.clip,
                                             attention=attention)
            except TrainingDiverged as e:
                where = (f"the last good checkpoint is {last_ckpt} (resume with --train.resume {last_ckpt}, "
                         "perhaps with a lower --optim.lr)" if last_ckpt else "no checkpoint was written yet")
                raise TrainingDiverged(f"step {step + 1}: non-finite {e}; stopped before the update, nothing "
                                       f"was saved; {where}") from None
            step += 1
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            # Global counts from the step's documents, on the host: attention cost does not depend on packing.
            doc_lens = batch.doc_lengths.astype(np.float64)
            tokens = float(doc_lens.sum())
            flops = train_flops(mcfg, tokens, float((doc_lens ** 2).sum()))
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            metrics.log({
                "step": step, "epoch": batch.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": int(tokens), "loss_tokens": batch.loss_tokens,
                "tokens_per_s_per_gpu": tokens / dt / env.world_size,
                "tflops_per_gpu": flops / dt / env.world_size / 1e12,
                "mfu": flops / dt / env.world_size / peak,
                "peak_mem_gib": _peak_memory_gib(env.device), "step_time_s": dt,
            })
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < stop_at:
                last_ckpt = save_checkpoint(out, step, model, optimizer, scheduler, loader, cfg, env.rank,
                                            env.world_size, env.device, mcfg)
                t_prev = time.perf_counter()  # the save is not the next step's time
        if last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}"):
            last_ckpt = save_checkpoint(out, step, model, optimizer, scheduler, loader, cfg, env.rank,
                                        env.world_size, env.device, mcfg)
        export_dir = None
        if cfg.train.export:
            export_dir = export_model(model, mcfg, out / "export", tok_dir, DTYPES[cfg.train.export_dtype], main)
            if main:
                print(f"exported a HF checkpoint ({cfg.train.export_dtype}) to {export_dir}", flush=True)
    finally:
        steps.close()  # stops the loader's prefetch thread
        metrics.close()
    return {"step": step, "first_loss": first_loss, "last_loss": last_loss, "checkpoint": str(last_ckpt),
            "export": str(export_dir) if export_dir else None}


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def dense_attention_on_cuda(cfg: TrainConfig) -> bool:
    """fp32 compute on CUDA: the varlen kernels take fp16/bf16 only, so attention is SDPA with a T x T mask."""
    if cfg.model.dtype != "float32":
        return False
    from skyt1.attention import default_backend

    backend = default_backend("cuda", torch.float32) if cfg.train.attention == "auto" else cfg.train.attention
    return backend == "sdpa"


def check_fp32_on_cuda(cfg: TrainConfig, mcfg: ModelConfig) -> None:
    """Refuse, before any work, fp32 training on this machine's GPUs when its dense attention cannot fit."""
    if (not torch.cuda.is_available() or os.environ.get("SKYT1_DEVICE") == "cpu"
            or not dense_attention_on_cuda(cfg)):
        return
    from skyt1.memplan import GiB

    capacity = torch.cuda.get_device_properties(0).total_memory / GiB
    plan, _ = memory_plan(cfg, mcfg, int(os.environ.get("WORLD_SIZE", "1")), capacity)
    if not plan.fits:
        raise ConfigError(
            f"model.dtype = 'float32' on CUDA: the GPU varlen attention kernels take bfloat16/float16 only, so "
            f"attention would run as SDPA with a dense {cfg.data.token_budget} x {cfg.data.token_budget} mask, and "
            f"the run needs ~{plan.peak / GiB:.1f} GiB per GPU of the {capacity:.1f} available; set --model.dtype "
            "bfloat16 or lower --data.token_budget")


def _plan_args(cfg: TrainConfig, gpus: int, gpu_mem: float):
    """(mesh shape, plan_memory keywords but cp, knobs) of this run's settings on `gpus` GPUs."""
    shape = mesh_shape(cfg, gpus)
    knobs = dict(master=cfg.optim.master, activation_checkpointing=cfg.train.activation_checkpointing,
                 cpu_offload=cfg.train.cpu_offload)
    kw = dict(gpus=gpus, gpu_mem_gib=gpu_mem, token_budget=cfg.data.token_budget, compute_dtype=cfg.model.dtype,
              dp_replicate=shape.dp_replicate, dense_attention=dense_attention_on_cuda(cfg), **knobs)
    return shape, kw, knobs


def memory_plan(cfg: TrainConfig, mcfg: ModelConfig, gpus: int, gpu_mem: float):
    """The per-GPU memory plan of this run's settings, and the knob to turn if it does not fit."""
    from skyt1.memplan import cp_degree_needed, plan_memory, suggest_knob

    shape, kw, knobs = _plan_args(cfg, gpus, gpu_mem)
    plan = plan_memory(mcfg, cp=shape.cp, **kw)
    cp_needed = None if plan.fits else cp_degree_needed(mcfg, **kw)
    return plan, suggest_knob(token_budget=cfg.data.token_budget, cp_needed=cp_needed, cp=shape.cp, **knobs)


def print_plan(cfg: TrainConfig, mcfg: ModelConfig, gpus: int, gpu_mem: float) -> bool:
    from skyt1.memplan import cp_degree_needed, format_plan, total_params_str

    plan, knob = memory_plan(cfg, mcfg, gpus, gpu_mem)
    shape, kw, _ = _plan_args(cfg, gpus, gpu_mem)
    title = (f"memory plan per GPU: {total_params_str(mcfg)} parameters ({mcfg.num_hidden_layers} layers, hidden "
             f"{mcfg.hidden_size}), {gpus} GPUs x {gpu_mem:.1f} GiB ({shape.describe()}), {cfg.data.token_budget} "
             f"tokens per micro-batch, optim.master {cfg.optim.master}, activation checkpointing "
             f"{cfg.train.activation_checkpointing}, compute {cfg.model.dtype}")
    print(format_plan(plan, title))
    need = cp_degree_needed(mcfg, **kw)
    print(f"  micro-batches (and documents) of {cfg.data.token_budget} tokens need "
          + (f"parallel.cp >= {need}" if need else "more than this mesh's context parallelism") + " on this mesh")
    if not plan.fits:
        print("does not fit: " + knob)
    return plan.fits


def run_dry(cfg: TrainConfig, mcfg: ModelConfig, gpus: int, gpu_mem: float, record: str | None) -> int:
    from skyt1.dryrun import dry_run, dry_run_record, format_dry_run
    from skyt1.memplan import total_params_str

    res = dry_run(cfg, mcfg, gpus, gpu_mem)
    print(format_dry_run(res, f"dry run, rank 0 of {gpus} ({mesh_shape(cfg, gpus).describe()}; fake tensors, "
                              "fake process group): "
                              f"{total_params_str(mcfg)} parameters ({mcfg.num_hidden_layers} layers, hidden "
                              f"{mcfg.hidden_size}), {cfg.data.token_budget} tokens per micro-batch, optim.master "
                              f"{cfg.optim.master}, activation checkpointing {cfg.train.activation_checkpointing}"))
    if record:
        Path(record).parent.mkdir(parents=True, exist_ok=True)
        Path(record).write_text(json.dumps(dry_run_record(res, cfg, mcfg, gpus), indent=1) + "\n")
        print(f"wrote {record}")
    return 0 if res.plan.fits else 1


def main(argv: list[str] | None = None) -> int:
    from skyt1.checkpoint import CheckpointError
    from skyt1.data.readers import DataError
    from skyt1.memplan import H100_80GB_GIB

    ap = argparse.ArgumentParser(prog="python -m skyt1.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML file (configs/tiny.toml, configs/sky_t1_32b.toml); required to train")
    ap.add_argument("--verify-checkpoint", metavar="DIR",
                    help="check a checkpoint (or every step_* in an output folder) against its manifest and exit")
    ap.add_argument("--plan", action="store_true", help="print the per-GPU memory plan and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="run one full-size training step on fake tensors over a fake process group of --gpus "
                         "ranks (any machine), print torch's measured peak per GPU beside the plan, and exit")
    ap.add_argument("--dry-run-record", metavar="FILE", help="with --dry-run: also write the figures as JSON")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs for --plan / --dry-run (default 8)")
    ap.add_argument("--gpu-mem", type=float, default=H100_80GB_GIB,
                    help=f"GiB per GPU for --plan (default {H100_80GB_GIB:.1f}: what an 80GB H100 reports)")
    args, overrides = ap.parse_known_args(argv)
    if args.verify_checkpoint:
        from skyt1.train_checkpoint import verify_command
        return verify_command(args.verify_checkpoint)
    if not args.config:
        ap.error("the following arguments are required: --config")
    quiet = int(os.environ.get("RANK", "0")) != 0
    try:
        cfg = load_train_config(args.config, overrides)
        if args.plan:
            return 0 if print_plan(cfg, resolve_model_config(cfg, need_path=False), args.gpus, args.gpu_mem) else 1
        if args.dry_run:
            return run_dry(cfg, resolve_model_config(cfg, need_path=False), args.gpus, args.gpu_mem,
                           args.dry_run_record)
        pre = preflight(cfg)
        check_fp32_on_cuda(cfg, pre.model_cfg)
    except (ConfigError, CheckpointError, DataError) as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(cfg, pre)
    except (ConfigError, CheckpointError, DataError, TrainingDiverged) as e:
        if not quiet:  # every rank raises the same error
            print(f"error: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # the operator's file-system faults (full disk, read-only) outside the checkpoint
        from skyt1.train_checkpoint import describe_os_error
        print(f"error: rank {os.environ.get('RANK', '0')}: {describe_os_error(e, 'training stopped')}",
              file=sys.stderr)
        return 3
    finally:
        from skyt1.parallel import destroy_distributed
        destroy_distributed()
    if not quiet and result["first_loss"] is not None:
        print(f"done: {result['step']} steps, loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}; "
              f"checkpoint {result['checkpoint']}", flush=True)
    elif not quiet:
        print(f"nothing to train: {result['checkpoint']} is already at step {result['step']} (raise "
              "--train.epochs or --train.max_steps to go on)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
