"""Fused AdamW update over one flat parameter shard: Triton kernel beside its PyTorch reference.

Four layouts of the parameter ("master" weights), all with fp32 Adam moments:

| master       | param | extra state          | bytes/param (param + grad + m + v + extra) |
| ------------ | ----- | -------------------- | ------------------------------------------ |
| "fp32"       | fp32  | -                    | 4 + 4 + 4 + 4 = 16 (grad in param dtype)   |
| "bf16_sr"    | bf16  | -                    | 2 + 2 + 4 + 4 = 12                         |
| "bf16_kahan" | bf16  | bf16 compensation    | 2 + 2 + 4 + 4 + 2 = 14                     |
| "bf16"       | bf16  | -                    | 12; round-to-nearest: loses updates below half a bf16 ulp (a baseline, not for training) |

The arithmetic is the same for all of them and runs in fp32 registers (torch.optim.AdamW's formula,
with the bias corrections folded into host-side scalars):

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g * g)
    u = step_size * (m / (sqrt(v) * inv_sqrt_bc2 + eps))      step_size = lr / (1 - beta1^t)
    p_new = p * (1 - lr * wd) - u                            decoupled weight decay

Only the write-back of p_new differs:
- bf16_sr: stochastic rounding. Adding 16 uniform random bits to the fp32 bit pattern and truncating
  the low half rounds away from zero with probability equal to the discarded fraction, so
  E[bf16(p_new)] = p_new and tiny updates survive on average. Random bits come from Philox keyed by
  (seed, global element index): the result does not depend on how the tensor is sharded.
- bf16_kahan: Kahan-compensated summation. c holds what the last bf16 rounding lost; it is added back
  into the next delta, so the sum of deltas is kept to ~16 mantissa bits even though c is bf16:
      y = c + delta;  s = p + y;  p' = bf16(s);  c' = bf16(y - (p' - p))
  (p' - p is exact in fp32: both are bf16 values of similar magnitude.)

Every function here updates its tensors in place and works on any shape (the kernel flattens
contiguous tensors); the optimizer in skyt1/optim.py hands it each rank's local FSDP2 shard. Gradients
may be fp32 or bf16 whatever the layout. Rounding to bf16 is done on the integer bits in the kernel, so
the compiled kernel and the Triton interpreter agree, and the interpreter reproduces the torch
reference bit for bit (fp32, bf16, bf16_kahan; bf16_sr draws other random bits). On GPU, FMA
contraction can move fp32 results by an ulp.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MASTERS = ("fp32", "bf16_sr", "bf16_kahan", "bf16")
_MODE = {"fp32": 0, "bf16": 0, "bf16_sr": 1, "bf16_kahan": 2}
_PARAM_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16_sr": torch.bfloat16, "bf16_kahan": torch.bfloat16}
BLOCK = 1024  # elements per program on GPU: memory-bound, 8 per thread with 4 warps
INTERPRET_BLOCK = 16384  # the interpreter runs programs one by one: fewer, larger blocks are faster


def param_dtype_for(master: str) -> torch.dtype:
    """The dtype the parameters must have for a master layout."""
    if master not in _PARAM_DTYPE:
        raise ValueError(f"master={master!r}: expected one of {MASTERS}")
    return _PARAM_DTYPE[master]


def adamw_scalars(*, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> dict:
    """Host-side scalars of one AdamW step (float64 on the host, rounded once to fp32 by the kernels).

    `step` is the 1-based count of updates including this one, as in torch.optim.AdamW.
    """
    if step < 1:
        raise ValueError(f"step={step}: the AdamW step count starts at 1")
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return {
        "beta1": beta1,
        "one_minus_beta1": 1.0 - beta1,
        "beta2": beta2,
        "one_minus_beta2": 1.0 - beta2,
        "eps": eps,
        "step_size": lr / bc1,
        "inv_sqrt_bc2": 1.0 / math.sqrt(bc2),
        "decay": 1.0 - lr * weight_decay,
        "lr_wd": lr * weight_decay,
    }


def _check(param, grad, exp_avg, exp_avg_sq, master, kahan_comp):
    want = param_dtype_for(master)
    if param.dtype != want:
        raise ValueError(f"master={master!r} needs {want} parameters, got {param.dtype} (shape {tuple(param.shape)})")
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != param shape {tuple(param.shape)}")
    if exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError(f"Adam moments must be fp32, got {exp_avg.dtype} and {exp_avg_sq.dtype}")
    if master == "bf16_kahan":
        if kahan_comp is None or kahan_comp.shape != param.shape or kahan_comp.dtype != torch.bfloat16:
            raise ValueError("master='bf16_kahan' needs kahan_comp: a bf16 tensor shaped like the parameter")


# ----------------------------------------------------------------------------------------------
# PyTorch reference (also the CPU path of the optimizer). Same fp32 operations in the same order
# as the kernel, so the Triton interpreter reproduces it bit for bit for fp32, bf16 and bf16_kahan.
# ----------------------------------------------------------------------------------------------


def _sr_random_bits(shape, device, seed: int, offset: int) -> torch.Tensor:
    # torch has no counter-based RNG: seed a generator from (seed, offset) instead. Same distribution
    # as the kernel's Philox bits, other values, and (unlike the kernel) they change with the sharding;
    # deterministic for a given (seed, offset), which is what exact resume needs.
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 0x9E3779B97F4A7C15 + offset) % (2**63))
    return torch.randint(0, 1 << 16, shape, generator=gen, device=device, dtype=torch.int32)


def stochastic_round_to_bf16(x: torch.Tensor, random_bits: torch.Tensor) -> torch.Tensor:
    """Round fp32 x to bf16, away from zero with probability (discarded low 16 bits) / 2**16.

    random_bits: int32 in [0, 2**16), shaped like x. NaN stays NaN; values past the bf16 range may
    round to inf, as round-to-nearest would.
    """
    bits = x.contiguous().view(torch.int32)  # the fp32 pattern; adding to it moves the magnitude up
    rounded = ((bits + random_bits) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000: keep the bf16 half
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)  # exact: low half is zero


@torch.no_grad()
def adamw_update_torch(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    master: str = "fp32",
    kahan_comp: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
) -> None:
    """One AdamW step in place on (param, exp_avg, exp_avg_sq[, kahan_comp]) with plain torch ops.

    seed/offset only matter for bf16_sr: offset is the global flat index of param's first element.
    """
    _check(param, grad, exp_avg, exp_avg_sq, master, kahan_comp)
    s = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    g = grad.float()
    exp_avg.mul_(s["beta1"]).add_(g * s["one_minus_beta1"])
    exp_avg_sq.mul_(s["beta2"]).add_((g * g).mul_(s["one_minus_beta2"]))
    # torch's CPU fp32 sqrt is not correctly rounded (about 1 in 5 results is 1 ulp off); the fp64
    # sqrt rounded once to fp32 is, and matches the kernel's sqrt_rn bit for bit.
    denom = exp_avg_sq.double().sqrt_().float().mul_(s["inv_sqrt_bc2"]).add_(s["eps"])
    upd = (exp_avg / denom).mul_(s["step_size"])  # fp32, shaped like param
    if master == "fp32":
        param.mul_(s["decay"]).sub_(upd)
        return
    p = param.float()
    if master == "bf16_kahan":
        delta = (p * s["lr_wd"]).add_(upd).neg_()
        y = kahan_comp.float().add_(delta)
        new = (p + y).to(torch.bfloat16)
        kahan_comp.copy_(y.sub_(new.float().sub_(p)))  # copy_ rounds to nearest bf16
        param.copy_(new)
        return
    new32 = p.mul_(s["decay"]).sub_(upd)
    if master == "bf16":
        param.copy_(new32)  # round to nearest even: the baseline that drops small updates
    else:
        param.copy_(stochastic_round_to_bf16(new32, _sr_random_bits(param.shape, param.device, seed, offset)))


# ----------------------------------------------------------------------------------------------
# Triton kernel: one pass over the shard, reading p, g, m, v (+c) once and writing them once.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_bf16(x, r):
    """fp32 -> fp32 holding a bf16 value: add r (uint32 < 2**16) to the bit pattern, drop the low half.

    Rounding is done in integer bits rather than by x.to(tl.bfloat16) so that the compiled kernel and
    the Triton interpreter (whose fp32->bf16 cast truncates) give the same bits.
    """
    bits = x.to(tl.uint32, bitcast=True) + r  # carries into the exponent give the next binade: correct
    rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)  # NaN stays NaN (its payload could carry past the sign)


@triton.jit
def _round_bf16_nearest(x):
    # round half to even: add 0x7FFF plus the lowest kept bit, as torch's fp32 -> bf16 cast does
    lsb = (x.to(tl.uint32, bitcast=True) >> 16) & 1
    return _round_bf16(x, lsb + 0x7FFF)


@triton.jit(do_not_specialize=["offset", "seed"])
def _adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, c_ptr,
    n, offset, seed,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2, decay, lr_wd,
    MODE: tl.constexpr,  # 0: write back in param dtype (round to nearest), 1: stochastic rounding, 2: Kahan
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64: a 32B shard's element index can pass 2**31 * BLOCK
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps  # sqrt_rn: IEEE sqrt, tl.sqrt may be approximate on GPU
    upd = (m / denom) * step_size
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if MODE == 2:
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        delta = -(p * lr_wd + upd)
        y = c + delta
        new = _round_bf16_nearest(p + y)
        c = _round_bf16_nearest(y - (new - p))
        tl.store(c_ptr + offs, c.to(tl.bfloat16), mask=mask)  # exact conversions: low halves are zero
        tl.store(p_ptr + offs, new.to(tl.bfloat16), mask=mask)
    elif MODE == 1:
        new = p * decay - upd
        r = tl.randint(seed, offs + offset) & 0xFFFF  # uint32 in [0, 2**16), Philox keyed by global index
        tl.store(p_ptr + offs, _round_bf16(new, r).to(tl.bfloat16), mask=mask)
    else:
        new = p * decay - upd
        if p_ptr.dtype.element_ty == tl.bfloat16:
            new = _round_bf16_nearest(new)
        tl.store(p_ptr + offs, new.to(p_ptr.dtype.element_ty), mask=mask)


def adamw_update_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    master: str = "fp32",
    kahan_comp: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
) -> None:
    """The fused kernel: same contract as adamw_update_torch. All tensors contiguous, on one device."""
    _check(param, grad, exp_avg, exp_avg_sq, master, kahan_comp)
    tensors = [param, grad, exp_avg, exp_avg_sq] + ([kahan_comp] if master == "bf16_kahan" else [])
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"adamw_update_triton needs contiguous tensors, got strides {t.stride()}")
        if t.device != param.device:
            raise ValueError(f"all tensors must be on {param.device}, got one on {t.device}")
    n = param.numel()
    if n == 0:  # an FSDP2 rank can own an empty shard of a small parameter
        return
    s = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    comp = kahan_comp if master == "bf16_kahan" else param  # never read unless MODE == 2
    block = INTERPRET_BLOCK if _interpreted() else BLOCK  # elementwise: the result does not depend on it
    grid = (triton.cdiv(n, block),)
    _adamw_kernel[grid](
        param, grad, exp_avg, exp_avg_sq, comp,
        n, offset, seed,
        s["beta1"], s["one_minus_beta1"], s["beta2"], s["one_minus_beta2"], s["eps"],
        s["step_size"], s["inv_sqrt_bc2"], s["decay"], s["lr_wd"],
        MODE=_MODE[master], BLOCK=block, num_warps=4,
    )


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_adamw_kernel, InterpretedFunction)


def triton_usable(device: torch.device) -> bool:
    """The kernel runs compiled on CUDA, or anywhere under the Triton interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or _interpreted()


@torch.library.custom_op("skyt1::adamw_update_", mutates_args=("param", "exp_avg", "exp_avg_sq", "kahan_comp"))
def _adamw_update_op(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    kahan_comp: torch.Tensor | None, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    step: int, master: str, seed: int, offset: int, backend: str,
) -> None:
    """One AdamW update in place, as one torch op (FakeTensorMode, torch.compile and the profiler see it
    whole); backend "triton" or "torch" (resolved by adamw_update)."""
    fn = adamw_update_triton if backend == "triton" else adamw_update_torch
    fn(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
       step=step, master=master, kahan_comp=kahan_comp, seed=seed, offset=offset)


@_adamw_update_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, kahan_comp, lr, beta1, beta2, eps, weight_decay, step, master, seed, offset,
      backend):
    # In place and elementwise: no new memory. The checks still run, so a fake run refuses what a real one would.
    _check(param, grad, exp_avg, exp_avg_sq, master, kahan_comp)


def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    master: str = "fp32",
    kahan_comp: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    backend: str = "auto",
) -> None:
    """Dispatch through the torch op skyt1::adamw_update_: backend "triton", "torch", or "auto" (Triton
    on CUDA, torch elsewhere)."""
    if backend == "auto":
        backend = "triton" if param.device.type == "cuda" else "torch"
    if backend == "triton":
        if not triton_usable(param.device):
            raise RuntimeError(
                f"backend='triton' on {param.device}: needs CUDA or TRITON_INTERPRET=1 set before skyt1.kernels.adamw is imported"
            )
    elif backend != "torch":
        raise ValueError(f"backend={backend!r}: expected 'auto', 'triton' or 'torch'")
    torch.ops.skyt1.adamw_update_(
        param, grad, exp_avg, exp_avg_sq, kahan_comp if master == "bf16_kahan" else None, float(lr), float(beta1),
        float(beta2), float(eps), float(weight_decay), int(step), master, int(seed), int(offset), backend)
