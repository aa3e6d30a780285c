"""Tensor parallelism for the sampler: Megatron's layout, applied from outside the model.

Each of the N ranks of a tensor-parallel group holds
- q/k/v_proj and gate/up_proj: its rows (its attention heads, its KV heads, its slice of the MLP), column-parallel;
- o_proj and down_proj: the matching columns, row-parallel, their outputs summed by an all-reduce;
- the embedding and the LM head: a contiguous slice of the vocabulary (padded to a multiple of N); the
  embedding's rows are summed by an all-reduce, the head's logits gathered to the full vocabulary;
- its own KV heads' cache (the model it runs is built from a config with H/N heads and Hkv/N KV heads, so
  the model file and the model runner see an ordinary, smaller model).
Weights are read shard by shard from the safetensors files (parallel.load_sharded_weights with a slicer):
no rank ever holds a whole tensor.

Rank 0 of the group runs the whole engine (scheduler, block manager, sampler); every step it broadcasts
the step's plan (token ids, positions, slots, block tables: host data, over a gloo group) and all ranks run
the same forward; the logits reach every rank, rank 0 samples. The other ranks build the same engine (so the
pool sizing, the profiling run and the CUDA-graph captures run the same collectives in the same order) and
then only follow plans (worker_loop).

Two ways to start a group:
- spawned: LLM(..., tensor_parallel_size=N) in one process starts N - 1 worker processes
  (`python -m skyt1.sample.tp`), rendezvous through a file; rank 0 is the calling process;
- launched: under torchrun with WORLD_SIZE = D x N, ranks [r N, (r + 1) N) form replica r; its first rank
  runs the command (generate / serve / eval), the others run worker_main_from_args. D > 1 replicas split
  the work like the data-parallel replicas of `torchrun ... generate`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from skyt1.config import ModelConfig

# A worker waits for the next step however long the server is idle; the leader's exit ends it.
_WAIT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class TPGroup:
    rank: int                       # rank inside the group (0: runs the engine)
    size: int
    group: object | None            # device collectives (NCCL on CUDA, gloo on CPU); None: the default group
    cpu_group: object | None        # gloo group of the step-plan broadcast; None: the default group
    src: int                        # global rank of the group's rank 0 (broadcast source)
    replica: int = 0                # data-parallel replica index of the group
    num_replicas: int = 1
    replicas_group: object | None = None  # gloo group of the replicas' rank 0s (launched with D > 1)


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The per-rank model's config: heads, KV heads and the MLP split N ways (a clear error otherwise)."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    for field, what in (("num_key_value_heads", "KV heads"), ("num_attention_heads", "attention heads"),
                        ("intermediate_size", "MLP intermediate size")):
        v = getattr(cfg, field)
        if v % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide the model's {what} ({field}={v}); "
                             f"use a tensor_parallel_size that divides {v}")
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp,
                               num_key_value_heads=cfg.num_key_value_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp)


# -- the parallel modules -----------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + Vp) of the embedding; ids outside give zeros, the all-reduce sums the ranks."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.per_rank = math.ceil(vocab_size / tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:   # (T,) -> (T, H)
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        x = F.embedding(torch.where(inside, local, 0), self.weight) * inside[:, None].to(self.weight.dtype)
        dist.all_reduce(x, group=self.tp.group)
        return x


class VocabParallelLMHead(nn.Module):
    """Rows [start, start + Vp) of the LM head: local logits (T, Vp), gathered to (T, V) on every rank."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.per_rank = math.ceil(vocab_size / tp.size)
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:   # (T, H) -> (T, V)
        local = F.linear(hidden, self.weight).contiguous()      # (T, Vp)
        parts = [torch.empty_like(local) for _ in range(self.tp.size)]
        dist.all_gather(parts, local, group=self.tp.group)
        return torch.cat(parts, dim=-1)[:, :self.vocab_size]    # padding columns dropped


def _all_reduce_output(group):
    def hook(_module, _inputs, out):
        dist.all_reduce(out, group=group)
        return out
    return hook


# HF name suffix -> dim each rank holds a slice of (None: replicated).
_SPLIT_DIM = {"q_proj.weight": 0, "q_proj.bias": 0, "k_proj.weight": 0, "k_proj.bias": 0, "v_proj.weight": 0,
              "v_proj.bias": 0, "o_proj.weight": 1, "gate_proj.weight": 0, "up_proj.weight": 0,
              "down_proj.weight": 1, "embed_tokens.weight": 0, "lm_head.weight": 0}


def tp_slicer(full_cfg: ModelConfig, tp: TPGroup):
    """parallel.load_sharded_weights' slicer: this rank's rows or columns of each HF tensor."""
    V = full_cfg.vocab_size

    def slicer(hf_name: str, p: torch.Tensor):
        dim = next((d for suffix, d in _SPLIT_DIM.items() if hf_name.endswith(suffix)), None)
        if dim is None:
            return p.data, tuple(p.shape), 0, 0
        full = list(p.shape)
        vocab = hf_name.endswith(("embed_tokens.weight", "lm_head.weight"))
        full[dim] = V if vocab else p.shape[dim] * tp.size
        return p.data, tuple(full), dim, tp.rank * p.shape[dim]

    return slicer


def build_tp_model(path: str | Path, tp: TPGroup, dtype: torch.dtype, device: torch.device):
    """This rank's shard of the checkpoint at `path`, read slice by slice from its safetensors files."""
    from skyt1.checkpoint import load_config
    from skyt1.model import build_model
    from skyt1.parallel import load_sharded_weights

    cfg = load_config(path)
    lcfg = local_config(cfg, tp.size)
    model = build_model(lcfg, device="meta", dtype=dtype)
    with torch.device("meta"):
        model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp).to(dtype)
        model.lm_head = VocabParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp).to(dtype)
    for layer in model.layers:
        layer.self_attn.o_proj.register_forward_hook(_all_reduce_output(tp.group))
        layer.mlp.down_proj.register_forward_hook(_all_reduce_output(tp.group))
    model.to_empty(device=device)
    model.tie_weights()
    load_sharded_weights(model, path, slicer=tp_slicer(cfg, tp))
    return model.eval()


# -- the step plan ---------------------------------------------------------------------------------
def broadcast_plan(tp: TPGroup, plan=None):
    """Rank 0 sends `plan` (any picklable host object; None ends the workers' loop); others receive it."""
    box = [plan]
    dist.broadcast_object_list(box, src=tp.src, group=tp.cpu_group)
    return box[0]


def min_over_group(tp: TPGroup, value: int) -> int:
    """The smallest `value` over the group (each rank's KV pool must have the same number of blocks)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.cpu_group)
    return int(t.item())


def worker_loop(engine) -> None:
    """A non-zero rank: run each broadcast step plan until rank 0 sends None."""
    runner = engine.runner
    while True:
        plan = broadcast_plan(runner.tp)
        if plan is None:
            return
        runner.run_plan(plan)


# -- starting a group ------------------------------------------------------------------------------
def launched_world() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) under torchrun (or any launcher that sets them), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def is_worker_rank(tp_size: int) -> bool:
    """Under a launcher with tensor parallelism: whether this process is a non-zero rank of its group."""
    w = launched_world()
    return tp_size > 1 and w is not None and w[0] % tp_size != 0


def replica_of(tp_size: int) -> tuple[int, int]:
    """(this process's data-parallel replica, number of replicas) under a launcher (0, 1 without one)."""
    w = launched_world()
    if w is None:
        return 0, 1
    rank, world = w
    if world % tp_size:
        raise ValueError(f"WORLD_SIZE={world} is not a multiple of tensor_parallel_size={tp_size}")
    return rank // tp_size, world // tp_size


def init_launched(tp_size: int, device: torch.device) -> TPGroup:
    """Join torchrun's world as D replicas of tp_size ranks; every rank creates every group (a collective)."""
    rank, world = launched_world()
    replica, num_replicas = replica_of(tp_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=_WAIT, **kwargs)
    group = cpu_group = replicas_group = None
    for r in range(num_replicas):
        ranks = list(range(r * tp_size, (r + 1) * tp_size))
        g = dist.new_group(ranks, timeout=_WAIT)
        cg = dist.new_group(ranks, backend="gloo", timeout=_WAIT)
        if r == replica:
            group, cpu_group = g, cg
    if num_replicas > 1:
        replicas_group = dist.new_group([r * tp_size for r in range(num_replicas)], backend="gloo", timeout=_WAIT)
    return TPGroup(rank % tp_size, tp_size, group, cpu_group, replica * tp_size, replica, num_replicas,
                   replicas_group)


def _init_spawned(rank: int, size: int, init_method: str, device: torch.device) -> TPGroup:
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=_WAIT, **kwargs)
    cpu_group = dist.new_group(list(range(size)), backend="gloo", timeout=_WAIT) if backend != "gloo" else None
    return TPGroup(rank, size, None, cpu_group, 0)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r of a spawned group on CUDA uses the device r places after rank 0's."""
    if device.type != "cuda":
        return device
    index = (device.index if device.index is not None else torch.cuda.current_device()) + rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"tensor parallelism from {device} needs cuda:{index}, but only "
                         f"{torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


class SpawnedGroup:
    """Rank 0 in this process, ranks 1..N-1 as `python -m skyt1.sample.tp` worker processes."""

    def __init__(self, size: int, model_dir: str | Path, dtype: torch.dtype, device: torch.device,
                 engine_options: dict, eos_token_ids):
        if dist.is_initialized():
            raise RuntimeError("tensor_parallel_size > 1 starts its own process group, but one is already "
                               "initialised in this process; under torchrun, run the skyt1-sample command itself "
                               "with WORLD_SIZE = data_parallel_size x tensor_parallel_size")
        self._dir = tempfile.mkdtemp(prefix="skyt1-tp-")
        init_method = Path(self._dir, "rendezvous").as_uri()
        spec = {"size": size, "init_method": init_method, "model": str(model_dir), "dtype": str(dtype).split(".")[-1],
                "device": str(device), "engine_options": engine_options,
                "eos_token_ids": list(eos_token_ids) if eos_token_ids is not None else None}
        env = dict(os.environ)
        if device.type == "cpu" and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // size))
        self.procs = [subprocess.Popen([sys.executable, "-m", "skyt1.sample.tp", json.dumps({**spec, "rank": r})],
                                       env=env) for r in range(1, size)]
        self.closed = False
        threading.Thread(target=self._watch, daemon=True).start()
        self.group = _init_spawned(0, size, init_method, device)

    def _watch(self) -> None:
        """A worker that dies (a bad shard, out of memory) would leave rank 0 waiting in a collective for
        days: stop the whole group instead, saying which rank failed."""
        while not self.closed:
            for r, p in enumerate(self.procs, 1):
                code = p.poll()
                if code is not None and code != 0:
                    time.sleep(3.0)  # rank 0 may be failing on the same input: let it raise its own error
                if code is not None and code != 0 and not self.closed:
                    print(f"error: tensor-parallel rank {r} exited with code {code}; stopping", file=sys.stderr,
                          flush=True)
                    for q in self.procs:
                        if q.poll() is None:
                            q.kill()
                    os._exit(1)
            time.sleep(0.5)

    def close(self, engine=None) -> None:
        """With the engine built: tell the workers to stop and wait for them; without (a failed start): kill them."""
        if self.closed:
            return
        self.closed = True
        if engine is not None:
            broadcast_plan(self.group, None)
        deadline = time.monotonic() + (60 if engine is not None else 0)
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        for f in Path(self._dir).glob("*"):
            f.unlink(missing_ok=True)
        os.rmdir(self._dir)


def _exit_with_parent() -> None:
    """A spawned worker stops when its rank 0 process is gone (killed before it could say so)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _spawned_worker(spec: dict) -> int:
    from skyt1.sample.engine import EngineConfig, LLMEngine

    _exit_with_parent()
    device = rank_device(torch.device(spec["device"]), spec["rank"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = _init_spawned(spec["rank"], spec["size"], spec["init_method"], device)
    model = build_tp_model(spec["model"], tp, getattr(torch, spec["dtype"]), device)
    engine = LLMEngine(model, None, EngineConfig(**spec["engine_options"]), spec["eos_token_ids"], tp=tp)
    worker_loop(engine)
    dist.destroy_process_group()
    return 0


def worker_main_from_args(args: argparse.Namespace) -> int:
    """A non-zero rank of a launched group: build this rank's shard and engine as rank 0 does
    (cli.llm_from_args), then follow its plans."""
    from skyt1.sample.cli import llm_from_args

    llm_from_args(args)  # builds the shard and the engine; returns once rank 0 has sent None
    return 0


# -- the 32B plan ----------------------------------------------------------------------------------
def plan_table(cfg: ModelConfig, gpus_gib=(("80 GB (H100)", 79.6), ("141 GB (H200)", 139.8)), tps=(1, 2, 4, 8),
               lengths=(16384, 32768), utilization: float = 0.90, reserve_gib: float = 4.0,
               dtype_bytes: int = 2) -> list[dict]:
    """How many sequences of each length fit at once: (GPU x utilization - this rank's weights - a reserve
    for activations, the CUDA context, NCCL and graphs) / this rank's KV bytes per token. Arithmetic only."""
    per_block_params = cfg.num_params(include_embedding=False) - (0 if cfg.tie_word_embeddings
                                                                  else cfg.vocab_size * cfg.hidden_size)
    rows = []
    for gpu, gib in gpus_gib:
        for tp in tps:
            if cfg.num_key_value_heads % tp or cfg.num_attention_heads % tp:
                continue
            vocab_rows = math.ceil(cfg.vocab_size / tp) * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
            weights = (per_block_params / tp + vocab_rows) * dtype_bytes
            kv_per_token = 2 * cfg.num_hidden_layers * (cfg.num_key_value_heads // tp) * cfg.head_dim * dtype_bytes
            budget = gib * 2**30 * utilization - weights - reserve_gib * 2**30
            tokens = max(0, int(budget // kv_per_token))
            row = {"gpu": gpu, "tp": tp, "weights_gib": weights / 2**30, "kv_gib": max(0.0, budget) / 2**30,
                   "kv_tokens": tokens}
            for n in lengths:
                row[f"seqs_{n // 1024}k"] = tokens // n
            rows.append(row)
    return rows


def format_plan(cfg: ModelConfig, name: str, **kw) -> str:
    rows = plan_table(cfg, **kw)
    lengths = [k for k in rows[0] if k.startswith("seqs_")] if rows else []
    out = [f"KV-cache plan for {name} (bf16 weights and cache, gpu_memory_utilization 0.90, 4 GiB reserve per GPU)",
           "| GPU | TP | weights / GPU (GiB) | KV cache / GPU (GiB) | KV tokens | "
           + " | ".join(f"{k[5:].upper()} seqs" for k in lengths) + " |",
           "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in lengths) + " |"]
    for r in rows:
        out.append(f"| {r['gpu']} | {r['tp']} | {r['weights_gib']:.1f} | {r['kv_gib']:.1f} | {r['kv_tokens']:,} | "
                   + " | ".join(str(r[k]) for k in lengths) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(_spawned_worker(json.loads(sys.argv[1])))
