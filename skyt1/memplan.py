"""Per-GPU memory plan of a training run: what FSDP2 + activation checkpointing + the fused loss hold.

An estimate from first principles, itemised so each line can be checked against a measurement
(bench/throughput.py reports the real peak). Conventions: T tokens per micro-batch, H hidden, I MLP
width, V vocab, L layers, W ranks, c bytes of the compute dtype, p bytes of a stored parameter.

Persistent, sharded over W ranks: parameters (p), gradients (p: FSDP2 keeps sharded gradients in the
parameter dtype), AdamW moments (fp32, 8 bytes) and the Kahan buffer (bf16_kahan, 2 bytes).

Transient, per phase; the peak is the largest phase:
- loss: the checkpointed input of every block (L x T x H x c, full AC) + the final norm's saved input
  + the gathered LM head (V x H x c) and what the fused loss holds (one logits chunk, dhidden, dW)
- backward of the last block: the checkpointed inputs + one block's working set (the recomputed
  forward's saved tensors, dominated by 4 x T x I MLP intermediates, plus the gradients in flight) +
  FSDP2's buffers (the gathered block, the prefetched next one, the block's unsharded gradient) + the
  LM head's fp32 reduce-scatter input, which FSDP2 frees only at the next reduce-scatter (for a middle
  block: the previous block's)
- backward of the embedding: gathered embedding, its gradient and fp32 reduce-scatter input
A fixed runtime reserve (CUDA context, NCCL buffers) and 5% allocator fragmentation of the transient
part are added on top.

The mesh (skyt1.parallel.MeshShape): with dp_replicate > 1 (HSDP) the persistent state is sharded over
a replica group of gpus / dp_replicate ranks only, not over all of them. With cp > 1 (context
parallelism) every per-token activation term is counted at T / cp tokens (T stays the micro-batch's
token_budget, split over the CP group), plus the K/V exchange of the block being run: the all-gathered
K/V of the whole micro-batch, the rows each rank's queries read (about T x (1 + 1 / 2cp)), and their
gradients in backward (skyt1.context_parallel).
"""
from __future__ import annotations

from dataclasses import dataclass

from skyt1.config import ModelConfig

GiB = 2**30
RUNTIME_RESERVE = 1.5 * GiB      # CUDA context (~0.5 GiB) + NCCL communicators and buffers (~1 GiB)
FRAGMENTATION = 0.05             # of the transient peak
LOGITS_CHUNK_BYTES = 640 * 2**20  # skyt1.kernels.fused_linear_ce.LOGITS_CHUNK_BYTES
FP32_DW_ACCUM_MAX_BYTES = 2**30   # skyt1.kernels.fused_linear_ce.FP32_DW_ACCUM_MAX_BYTES
H100_80GB_GIB = 81559 * 2**20 / GiB  # what an "80GB" H100 reports: 79.6 GiB


# What is alive at a phase's peak, in the categories torch's FSDPMemTracker counts (the dry run,
# skyt1/dryrun.py, measures the same categories): tracker names on the right.
CATEGORIES = (
    ("sharded parameters", ("Sharded Param",)),
    ("sharded gradients", ("Sharded Grad",)),
    ("optimizer state", ("OptState",)),
    ("saved activations", ("Activation", "Inputs", "Buffer")),
    ("gathered parameters", ("Unsharded Param", "All Gather")),
    # Autograd's weight gradients are temporaries until FSDP's post-backward takes them as unsharded
    # gradients, so the two are one category here.
    ("block working set and unsharded gradients", ("Temp", "Unsharded Grad")),
    ("reduce-scatter input (fp32)", ("Reduce Scatter",)),
)


@dataclass(frozen=True)
class MemoryPlan:
    items: tuple[tuple[str, float, str], ...]  # (label, bytes, how it was counted)
    phases: tuple[tuple[str, float], ...]      # (phase, transient bytes)
    persistent: float
    reserve: float
    peak: float
    peak_phase: str
    capacity: float
    host_bytes: float                          # per rank, with CPU offload
    # (phase, ((category, bytes), ...)): persistent + transient by CATEGORIES, reserve excluded
    breakdown: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()

    @property
    def tracked_peak(self) -> float:
        """The peak without the runtime reserve: what a memory tracker of torch's allocations sees."""
        return self.peak - self.reserve

    def peak_breakdown(self) -> dict[str, float]:
        """Bytes per category at the peak phase (sums to tracked_peak)."""
        return dict(dict(self.breakdown)[self.peak_phase])

    @property
    def headroom(self) -> float:
        return self.capacity - self.peak

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


def block_params(cfg: ModelConfig) -> int:
    h, i = cfg.hidden_size, cfg.intermediate_size
    attn = h * cfg.q_size + 2 * h * cfg.kv_size + cfg.q_size * h
    attn += (cfg.q_size + 2 * cfg.kv_size) if cfg.attention_bias else 0
    return attn + 3 * h * i + 2 * h


def block_saved_bytes_per_token(cfg: ModelConfig, c: int) -> int:
    """Bytes per token the recomputed forward of one block saves for its backward."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    norm = h * 4 + 2 * h * c                 # fp32 copy of the input, normalised x, scaled output
    qkv = (q + 2 * kv) * c                   # projections
    rope = (q + kv) * c                      # rotated q, k
    attn = q * c + cfg.num_attention_heads * 4  # output + fp32 log-sum-exp (flash)
    # o_proj's output, the residual sums and down_proj's output are saved by nothing (an add saves no
    # input): counting them overstated the block by 3 x H x c per token against the dry run's tracker.
    mlp = 4 * i * c                          # gate, up, silu(gate), product
    return 2 * norm + qkv + rope + attn + mlp


def plan_memory(cfg: ModelConfig, *, gpus: int, gpu_mem_gib: float, token_budget: int, master: str = "bf16_sr",
                compute_dtype: str = "bfloat16", activation_checkpointing: str = "full",
                cpu_offload: bool = False, dp_replicate: int = 1, cp: int = 1,
                dense_attention: bool = False) -> MemoryPlan:
    """dense_attention: attention runs as SDPA with a T x T mask (skyt1.attention "sdpa": fp32 on CUDA,
    where the varlen kernels take only fp16/bf16), whose mask, scores and probabilities the block holds."""
    # W: ranks the state is sharded over (a replica group); T: tokens each rank's activations hold.
    W, T = gpus // dp_replicate, -(-token_budget // cp)
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    c = 2 if compute_dtype == "bfloat16" else 4
    p = 4 if master == "fp32" else 2
    N = cfg.num_params()
    items: list[tuple[str, float, str]] = []

    # ---- persistent, sharded -------------------------------------------------------------------
    state_bytes = {"parameters (sharded)": N * p / W, "gradients (sharded)": N * p / W,
                   "AdamW moments (fp32, sharded)": N * 8 / W}
    if master == "bf16_kahan":
        state_bytes["Kahan compensation (bf16, sharded)"] = N * 2 / W
    host = 0.0
    for label, b in state_bytes.items():
        if cpu_offload:
            host += b
            items.append((label + " -> host", 0.0, f"{b / GiB:.2f} GiB in pinned host memory"))
        else:
            items.append((label, b, f"{N / 1e9:.2f}B x {b * W / N:.0f} B / {W}"))
    persistent = sum(b for _, b, _ in items)

    # ---- transient pieces ----------------------------------------------------------------------
    Pb = block_params(cfg)
    saved_tok = block_saved_bytes_per_token(cfg, c)
    if activation_checkpointing == "full":
        ckpt = L * T * H * c
        ckpt_how = f"{L} x {T} x {H} x {c} B"
        # At the peak (the MLP's backward, measured by the dry run): the recomputed block's saved tensors,
        # two (T, I) gradients in flight and down_proj's weight gradient, the block's first.
        working = T * saved_tok + 2 * T * I * c + H * I * c
    elif activation_checkpointing == "selective":
        non_mlp = saved_tok - 4 * I * c
        ckpt = L * T * (non_mlp + H * c)
        ckpt_how = f"{L} blocks x {T} tokens x {non_mlp + H * c} B (all but the MLP)"
        working = T * 4 * I * c + 2 * T * I * c + 2 * T * H * c + Pb * c
    else:
        ckpt = L * T * saved_tok
        ckpt_how = f"{L} blocks x {T} tokens x {saved_tok} B"
        working = 2 * T * I * c + 2 * T * H * c + Pb * c
    if cp > 1:
        kv_rows = token_budget * 2 * cfg.kv_size * c  # one copy of the micro-batch's K and V
        exchange = 2 * kv_rows * (2 + 1 / (2 * cp))   # gathered + rows read, and their gradients
        working += exchange
    final_norm = T * H * (4 + 2 * c)
    if dense_attention:
        # The bool mask, and per query head fp32-or-c scores and probabilities (saved) plus their gradient.
        working += T * T + 3 * cfg.num_attention_heads * T * T * c
    gathered = 2 * Pb * c                           # gathered block + the prefetched next one's all-gather output
    head = 0 if cfg.tie_word_embeddings else V * H * c
    # A tied embedding / LM head lives in the root unit, which FSDP2 keeps gathered through the step.
    root = V * H * c if cfg.tie_word_embeddings else 0
    rows = min(T, max(1, LOGITS_CHUNK_BYTES // (V * c)))
    dw_fp32 = V * H * 4 if (V * H * 4 <= FP32_DW_ACCUM_MAX_BYTES and c != 4) else 0
    loss = rows * V * c + T * 4 + T * H * c + V * H * c + dw_fp32
    head_rs = V * H * 4  # the LM head's (or tied root's) fp32 reduce-scatter input, alive until the next one
    embed_bwd = V * H * c * 2 + V * H * 4

    items += [
        ("activations: checkpointed block inputs" if activation_checkpointing == "full" else
         "activations: saved for backward", ckpt, ckpt_how),
        ("activations: one block's working set", working, f"{T} x ({saved_tok} B saved + MLP grads) + weight grads"
         + (f" + CP K/V exchange {exchange / GiB:.2f} GiB" if cp > 1 else "")),
        ("FSDP: gathered block + prefetched next", gathered, f"block of {Pb / 1e6:.0f}M params x {c} B x 2"),
        ("FSDP: fp32 reduce-scatter input in flight", max(head_rs, Pb * 4), "LM head's, or one block's"),
        ("LM head gathered through the loss" if not cfg.tie_word_embeddings else
         "tied embedding / LM head gathered (root unit)", head + root, f"{V} x {H} x {c} B"),
        ("fused loss (logits chunk, dhidden, dW)", loss, f"{rows}-token chunks of {V} logits"),
    ]
    # Each phase by category; `hidden` (T x H x c), the model's output, stays referenced through backward.
    hidden = T * H * c
    by_phase = {
        "loss": {"saved activations": ckpt + final_norm + hidden,
                 # the LM head, its all-gather output (FSDP2 keeps the last one until the next all-gather)
                 # and the last block, kept gathered for its backward
                 "gathered parameters": root + 2 * head + Pb * c,
                 "block working set and unsharded gradients": loss},
        "backward of the last block": {"saved activations": ckpt + hidden,
                                       "gathered parameters": root + gathered,
                                       "block working set and unsharded gradients": working,
                                       "reduce-scatter input (fp32)": head_rs},
        "backward of a middle block": {"saved activations": ckpt + hidden,
                                       "gathered parameters": root + gathered,
                                       "block working set and unsharded gradients": working,
                                       "reduce-scatter input (fp32)": Pb * 4},
        "backward of the embedding": {"saved activations": hidden,
                                      "gathered parameters": embed_bwd - V * H * c - V * H * 4,
                                      "block working set and unsharded gradients": V * H * c,
                                      "reduce-scatter input (fp32)": V * H * 4 + Pb * 4},
    }
    phases = tuple((name, float(sum(parts.values()))) for name, parts in by_phase.items())
    peak_phase, transient = max(phases, key=lambda x: x[1])
    persistent_by_cat = {"sharded parameters": state_bytes["parameters (sharded)"],
                         "sharded gradients": state_bytes["gradients (sharded)"],
                         "optimizer state": sum(b for k, b in state_bytes.items()
                                                if k.startswith(("AdamW", "Kahan")))}
    if cpu_offload:
        persistent_by_cat = dict.fromkeys(persistent_by_cat, 0.0)
    breakdown = tuple(
        (name, tuple((cat, float(persistent_by_cat.get(cat, 0.0) + parts.get(cat, 0.0))) for cat, _ in CATEGORIES))
        for name, parts in by_phase.items())
    reserve = RUNTIME_RESERVE + FRAGMENTATION * transient
    items.append(("runtime reserve (CUDA context, NCCL, fragmentation)", reserve,
                  f"{RUNTIME_RESERVE / GiB:.1f} GiB + {FRAGMENTATION:.0%} of the transient peak"))
    peak = persistent + transient + reserve
    return MemoryPlan(tuple(items), phases, persistent, reserve, peak, peak_phase, gpu_mem_gib * GiB, host, breakdown)


def cp_degree_needed(cfg: ModelConfig, *, gpus: int, gpu_mem_gib: float, token_budget: int, dp_replicate: int = 1,
                     **knobs) -> int | None:
    """The smallest context-parallel degree whose plan fits: the CP degree a micro-batch of token_budget
    tokens (at least the longest document) needs on this mesh; None when no degree up to the replica
    group's size fits."""
    group = gpus // dp_replicate
    for cp in range(1, group + 1):
        if group % cp or (cp > 1 and token_budget % (2 * cp)):
            continue
        if plan_memory(cfg, gpus=gpus, gpu_mem_gib=gpu_mem_gib, token_budget=token_budget, dp_replicate=dp_replicate,
                       cp=cp, **knobs).fits:
            return cp
    return None


def suggest_knob(*, master: str, activation_checkpointing: str, cpu_offload: bool,
                 token_budget: int, cp_needed: int | None = None, cp: int = 1) -> str:
    if activation_checkpointing != "full":
        return "set --train.activation_checkpointing full"
    if master in ("fp32", "bf16_kahan"):
        return "set --optim.master bf16_sr (12 bytes per parameter instead of 16 / 14)"
    if cp_needed is not None and cp_needed > cp:
        return f"set --parallel.cp {cp_needed} (split each micro-batch's {token_budget} tokens over {cp_needed} GPUs)"
    if not cpu_offload:
        return "set --train.cpu_offload true (optimizer state and parameters in host memory), or use more GPUs"
    return f"lower --data.token_budget (now {token_budget}) or use more GPUs"


def format_plan(plan: MemoryPlan, title: str) -> str:
    lines = [title]
    width = max(len(label) for label, _, _ in plan.items) + 2
    for label, b, how in plan.items:
        lines.append(f"  {label:<{width}}{b / GiB:8.2f} GiB   {how}")
    lines.append("  transient by phase: " + ", ".join(f"{name} {b / GiB:.2f} GiB" for name, b in plan.phases))
    lines.append(f"  {'peak per GPU':<{width}}{plan.peak / GiB:8.2f} GiB   persistent {plan.persistent / GiB:.2f} + "
                 f"{plan.peak_phase} + reserve")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'capacity':<{width}}{plan.capacity / GiB:8.2f} GiB   headroom {plan.headroom / GiB:.2f} GiB: "
                 f"{verdict}")
    if plan.host_bytes:
        lines.append(f"  host memory per rank (CPU offload): {plan.host_bytes / GiB:.2f} GiB")
    return "\n".join(lines)


def total_params_str(cfg: ModelConfig) -> str:
    return f"{cfg.num_params() / 1e9:.2f}B" if cfg.num_params() >= 1e9 else f"{cfg.num_params() / 1e6:.2f}M"


__all__ = ["CATEGORIES", "MemoryPlan", "plan_memory", "format_plan", "suggest_knob", "cp_degree_needed",
           "total_params_str", "H100_80GB_GIB", "GiB"]
