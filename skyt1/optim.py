"""AdamW for the 32B memory budget, the learning-rate schedule and global-norm gradient clipping.

The optimizer works on plain tensors and on FSDP2's DTensor parameters alike: its state is created
with zeros_like(param), so for a DTensor parameter every state tensor is a DTensor with the same
placements (torch.distributed.checkpoint can save and reshard it), and each rank's update touches only
its local shard (the fused kernel in skyt1/kernels/adamw.py). No collective runs in step().

    opt = build_optimizer(model.parameters(), AdamWConfig(lr=1e-5, master="bf16_sr"))
    sched = build_lr_schedule(opt, total_steps, warmup_ratio=0.1)     # HF get_cosine_schedule_with_warmup
    norm = clip_grad_norm_(model.parameters(), 1.0)   # global norm, a tensor: no host sync (None: measure only)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from skyt1.kernels.adamw import MASTERS, adamw_update, param_dtype_for

_BACKENDS = ("auto", "triton", "torch")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class AdamWConfig:
    """AdamW hyper-parameters. master picks the parameter layout (see skyt1/kernels/adamw.py):
    "fp32" (fp32 params), "bf16_sr" (bf16 params, stochastic rounding), "bf16_kahan" (bf16 params plus a
    bf16 compensation buffer), "bf16" (bf16 round-to-nearest: loses small updates, a baseline only)."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    master: str = "fp32"
    seed: int = 0  # keys the stochastic-rounding random bits (with step, parameter index, shard offset)
    backend: str = "auto"  # "auto": fused Triton kernel on CUDA, torch ops elsewhere

    def __post_init__(self):
        betas = tuple(float(b) for b in self.betas)  # TOML gives a list
        object.__setattr__(self, "betas", betas)
        _validate(self.lr, betas, self.eps, self.weight_decay, self.master, self.seed, self.backend)


def _validate(lr, betas, eps, weight_decay, master, seed, backend):
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"optim.lr={lr!r}: expected a number >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"optim.betas={betas!r}: expected two numbers in [0, 1)")
    if not eps > 0:
        raise ValueError(f"optim.eps={eps!r}: expected a number > 0")
    if not weight_decay >= 0:
        raise ValueError(f"optim.weight_decay={weight_decay!r}: expected a number >= 0")
    if master not in MASTERS:
        raise ValueError(f"optim.master={master!r}: expected one of {MASTERS}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"optim.seed={seed!r}: expected an integer >= 0")
    if backend not in _BACKENDS:
        raise ValueError(f"optim.backend={backend!r}: expected one of {_BACKENDS}")


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    # Under no_grad, DTensor.to_local() is the local shard itself: in-place updates land in the DTensor.
    return t.to_local() if isinstance(t, DTensor) else t


def _mix(*values: int) -> int:
    """splitmix64 over the values: a per-(seed, step, parameter) seed for the rounding random bits."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    # Odd and in [2**32, 2**62): always an int64 kernel argument, never specialised as divisible by 16.
    return ((h % (2**62 - 2**32)) + 2**32) | 1


def _shard_position(p: torch.Tensor) -> tuple[int, int]:
    """(flat global index of the local shard's first element, salt for the seed).

    With dim-0 sharding (FSDP2) the local shard is one contiguous run of the flattened parameter, so
    keying the random bits by global index makes the update independent of the number of ranks. Other
    layouts get a per-coordinate salt instead, so that no two ranks share random bits.
    """
    if not isinstance(p, DTensor):
        return 0, 0
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # Metadata only, from the (real) device mesh: torch computes it with small tensor ops whose values a
    # FakeTensorMode (the dry run, skyt1/dryrun.py) could not read, so it runs outside any fake mode.
    with unset_fake_temporarily():
        _, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    strides = [math.prod(p.shape[d + 1 :]) for d in range(p.dim())]
    flat = sum(o * s for o, s in zip(global_offset, strides))
    if all(type(pl) is Shard and pl.dim == 0 or pl.is_replicate() for pl in p.placements):
        return flat, 0
    coord = p.device_mesh.get_coordinate() or []
    return flat, _mix(*coord)


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (torch.optim.AdamW's arithmetic) with fp32 moments and a choice of
    parameter layout (`master`). State per parameter: step (CPU fp32 scalar tensor, as torch keeps it),
    exp_avg and exp_avg_sq (fp32, shaped like the parameter), kahan_comp (bf16, bf16_kahan only)."""

    def __init__(
        self,
        params,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        master: str = "fp32",
        seed: int = 0,
        backend: str = "auto",
    ):
        betas = tuple(float(b) for b in betas)
        _validate(lr, betas, eps, weight_decay, master, seed, backend)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, master=master)
        super().__init__(params, defaults)  # calls add_param_group, which checks every group
        self.seed = seed
        self.backend = backend
        self._positions: dict[int, tuple[int, int]] = {}
        # The step count kept on the host too: reading state["step"] back would need its value, which a
        # fake tensor (FakeTensorMode dry run) does not have. Refilled from the state after a load.
        self._steps: dict[int, int] = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group, gi = self.param_groups[-1], len(self.param_groups) - 1
        _validate(group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"], group["master"], 0, "auto")
        want = param_dtype_for(group["master"])
        for pi, p in enumerate(group["params"]):
            if p.dtype != want:
                raise ValueError(
                    f"param_groups[{gi}] parameter {pi} (shape {tuple(p.shape)}) is {p.dtype}; "
                    f"master={group['master']!r} needs {want} parameters (cast the model before sharding)"
                )

    def _next_step(self, p: torch.Tensor, state: dict) -> int:
        """The 1-based count of this update (state["step"] was just incremented)."""
        step = self._steps.get(id(p))
        step = int(state["step"]) if step is None else step + 1  # CPU tensor: no device sync
        self._steps[id(p)] = step
        return step

    def _init_state(self, p: torch.Tensor, state: dict, master: str) -> None:
        self._steps[id(p)] = 0
        state["step"] = torch.tensor(0.0, dtype=torch.float32)  # on CPU: reading it never syncs the GPU
        # zeros_like keeps DTensor-ness and placements, so checkpoints can reshard the state.
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if master == "bf16_kahan":
            state["kahan_comp"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1  # position over all groups: part of the rounding seed, stable across resumes
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            master = group["master"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"parameter {index} has a sparse gradient; AdamW here supports dense gradients only")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state, master)
                state["step"] += 1
                step = self._next_step(p, state)
                position = self._positions.get(id(p))
                if position is None:
                    position = self._positions[id(p)] = _shard_position(p)
                offset, salt = position
                adamw_update(
                    _local(p),
                    _local(p.grad),
                    _local(state["exp_avg"]),
                    _local(state["exp_avg_sq"]),
                    lr=float(group["lr"]),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=step,
                    master=master,
                    kahan_comp=_local(state.get("kahan_comp")),
                    seed=_mix(self.seed, step, index, salt),
                    offset=offset,
                    backend=self.backend,
                )
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if saved.get("master", group["master"]) != group["master"]:
                raise ValueError(
                    f"param_groups[{gi}]: the optimizer state was saved with master={saved['master']!r}, "
                    f"this run uses master={group['master']!r}"
                )
        super().load_state_dict(state_dict)
        self._steps.clear()  # re-read from the loaded state at the next step
        # torch casts every floating state tensor to the parameter's dtype, which would round the fp32
        # moments of bf16 parameters to bf16: put the saved full-precision values back.
        params = {pid: p for saved, group in zip(saved_groups, self.param_groups) for pid, p in zip(saved["params"], group["params"])}
        for pid, saved_state in state_dict["state"].items():
            p = params[pid]
            state = self.state[p]
            for key, value in saved_state.items():
                if key == "step":
                    state[key] = torch.as_tensor(value, dtype=torch.float32).detach().to("cpu")
                elif key in ("exp_avg", "exp_avg_sq"):
                    state[key] = value.to(device=p.device, dtype=torch.float32)
                elif key == "kahan_comp":
                    state[key] = value.to(device=p.device, dtype=torch.bfloat16)


def build_optimizer(params: Iterable, cfg: AdamWConfig) -> AdamW:
    """AdamW over `params` (tensors or param-group dicts) with the hyper-parameters of cfg."""
    return AdamW(
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        master=cfg.master,
        seed=cfg.seed,
        backend=cfg.backend,
    )


# ------------------------------------------------------------------------------------------------
# learning-rate schedule
# ------------------------------------------------------------------------------------------------

_SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class WarmupDecay:
    """LR multiplier at step t: linear warmup from 0, then cosine / linear decay to min_lr_ratio, or
    constant. The formulas are transformers' (get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup,
    get_constant_schedule_with_warmup), so a run matches HF Trainer's learning rates exactly."""

    kind: str
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        if self.kind == "constant":
            return 1.0
        span = float(max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            progress = float(step - self.warmup_steps) / span
            factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
        else:
            factor = max(0.0, float(self.total_steps - step) / span)
        return max(0.0, factor * (1 - self.min_lr_ratio) + self.min_lr_ratio)


def build_lr_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    kind: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A LambdaLR over the optimizer's lr. Warmup is warmup_steps, or ceil(total_steps * warmup_ratio)
    as HF TrainingArguments computes it; give at most one. Call .step() once per optimizer step."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: expected an integer >= 1")
    if kind not in _SCHEDULES:
        raise ValueError(f"kind={kind!r}: expected one of {_SCHEDULES}")
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError("give warmup_steps or warmup_ratio, not both")
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio={warmup_ratio!r}: expected a number in [0, 1]")
        warmup_steps = math.ceil(total_steps * warmup_ratio)
    warmup_steps = 0 if warmup_steps is None else warmup_steps
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps!r}: expected an integer in [0, total_steps={total_steps}]")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio!r}: expected a number in [0, 1]")
    return LambdaLR(optimizer, WarmupDecay(kind, warmup_steps, total_steps, float(min_lr_ratio)))


# ------------------------------------------------------------------------------------------------
# gradient clipping
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float | None, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale gradients in place so that their global norm is at most max_norm; return that norm
    (before clipping) as a 0-dim fp32 tensor on the gradients' device: no host sync.
    max_norm=None only measures the norm (for a run with clipping off that still logs it).

    DTensor gradients (FSDP2) are reduced over the mesh dimensions they are sharded on, one all-reduce
    per (mesh, sharded dims) group, so every rank gets the norm of the full gradient. Norms are
    accumulated in fp32 whatever the gradient dtype. A NaN/inf gradient gives a NaN/inf norm: the
    caller checks it (the train loop does, once per step).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    norm_type = float(norm_type)
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r}: expected a number > 0, or None to only measure the norm")
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type={norm_type!r}: expected 2.0 or inf")
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        mesh, dims = None, ()
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                raise ValueError(f"gradient with placements {g.placements}: reduce Partial gradients before clipping")
            mesh = g.device_mesh
            dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())
        local = _local(g)
        buckets.setdefault((mesh, dims, local.device), []).append(local)
    if not buckets:
        return torch.zeros((), dtype=torch.float32)
    out_device = next(iter(buckets))[2]
    total = None
    for (mesh, dims, _device), grads in buckets.items():
        norms = torch._foreach_norm(grads, norm_type, dtype=torch.float32)
        stacked = torch.stack(norms)  # (n_grads,)
        part = stacked.max() if norm_type == math.inf else stacked.square().sum()
        for d in dims:  # shards of one gradient live on different ranks of these mesh dims
            op = torch.distributed.ReduceOp.MAX if norm_type == math.inf else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(part, op=op, group=mesh.get_group(d))
        part = part.to(out_device, non_blocking=True)
        total = part if total is None else (torch.maximum(total, part) if norm_type == math.inf else total + part)
    total_norm = total if norm_type == math.inf else total.sqrt()
    if max_norm is None:
        return total_norm
    clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)  # same epsilon as torch's clip_grad_norm_
    for (_mesh, _dims, device), grads in buckets.items():
        torch._foreach_mul_(grads, clip_coef.to(device, non_blocking=True))
    return total_norm
