"""Fused linear + cross-entropy: the loss of the LM head without ever holding (T, V) logits.

    x      = hidden @ weight.T (+ bias)                        (T, V), one chunk of rows at a time
    x      = softcap * tanh(x / softcap)                       optional (Gemma-style logit capping)
    loss_t = (1 - eps) * w[y_t] * (lse_t - x_t[y_t])           w: class weights (default 1)
           + eps / V * sum_c w[c] * (lse_t - x_t[c])           eps: label smoothing (default 0)
           + z_loss * lse_t**2                                 the z-loss (PaLM; Liger's lse_square_scale)
    for tokens with labels[t] != ignore_index (0 for the others), then reduced:
      "sum"  sum_t loss_t (our default: the trainer divides by the whole step's token count itself)
      "mean" the cross-entropy part / sum_t w[y_t] + the z-loss part / number of counted tokens
             (F.cross_entropy's and Liger's convention; NaN with zero gradients when nothing is counted)
      "none" the (T,) per-token losses
    Defaults beside our peers': torch's F.linear_cross_entropy and Liger's
    LigerFusedLinearCrossEntropyLoss default to reduction="mean"; we default to "sum". The z-loss is
    not class-weighted (as in Liger). return_z_loss=True also returns the z-loss part, reduced the same
    way and detached, for logging (it is already inside the loss).

Design (per chunk of `rows` tokens, so extra memory is O(rows x V), never O(T x V)):
  1. logits_c = h_c @ W^T                      cuBLAS, written into one reused (rows, V) buffer
  2. one Triton program per token row: online max / sum-of-exp over V in fp32 (pass 1), then the loss
     and the softmax gradient written back over the logits in place (pass 2): the row is read twice and
     written once, and no second (rows, V) buffer exists
  3. dh_c = dlogits_c @ W                      cuBLAS, straight into the rows of grad_hidden
     dW  += dlogits_c^T @ h_c                  cuBLAS, fp32 accumulation inside every GEMM
For "sum" and "mean" the gradients are finished in the forward; the backward only scales them by
grad_output (once, in place), so the logits are never recomputed: three GEMMs of 2*T*H*V flops each,
the minimum for this loss. reduction="none" cannot do that (each token's upstream gradient is only
known in the backward), so its forward computes losses only and its backward re-runs the chunks with
each row's dlogits scaled by its upstream gradient: one GEMM more, the price of per-token losses.

Numerics
- Softmax statistics, loss and per-token losses are fp32 whatever the input dtype; the loss returned is
  fp32. The logits chunk and dlogits are held in the parameter dtype (as PyTorch's own unfused bf16
  path does), the gradients are written in the parameters' dtype.
- The softmax gradient is exp(x - m) / s from the row max m and the sum s = sum exp(x - m), not
  exp(x - lse): lse = m + log(s) rounded to fp32 carries an absolute error of half an ulp of lse, which
  at |lse| ~ 1000 (logit std 250) is 3e-5 and became the relative error of every softmax value. The loss
  is (m - x_y) + log(s) for the same reason. The running max starts at -inf and is replaced by 0
  wherever it is still -inf, so a row whose logits are all below -1e30 (or -inf in the padded lanes)
  never computes -inf - -inf.
- dW across chunks: an fp32 accumulator of W's size costs V*H*4 bytes (3 GiB at V=152064, H=5120), far
  above the <1 GiB extra-memory budget at the 32B shape. So dW accumulates in fp32 when that buffer is
  at most FP32_DW_ACCUM_MAX_BYTES (small models, all CPU tests), and otherwise directly in the parameter
  dtype with beta=1 GEMMs: each chunk's GEMM still sums its tokens in fp32 and adds the running sum in
  fp32, then rounds once, so the error grows like sqrt(number of chunks) roundings (8 at the 32B shape).
  Measured on CPU (T=8192, H=256, V=4096, bf16, 8 chunks, relative Frobenius error of dW vs float64):
  PyTorch unfused 2.8e-3, fp32 accumulation 2.7e-3, bf16 accumulation 4.1e-3 (32 chunks: 7.0e-3).
  `fp32_accum=True/False` overrides the choice; tests check both against the 2x-of-PyTorch rule.
- int64 offsets: a row's base offset is row * stride in int64 (rows x V passes 2^31 once a chunk holds
  more than 14,122 rows of V=152064); within a row offsets stay below V < 2^31.

As a torch op: the forward is the custom op torch.ops.skyt1.fused_linear_ce (and the per-token
backward torch.ops.skyt1.fused_linear_ce_backward), with fake implementations and an autograd
registration, so FakeTensorMode, torch.compile(fullgraph=True) and the profiler see one op. The fake
implementation allocates what the GPU path allocates (outputs, the (rows, V) logits buffer, the fp32 dW
accumulator when used), so a fake-tensor memory tracker sees its peak. Under autocast, hidden, weight
and bias are cast to the autocast dtype first (as F.linear would be), and the op itself runs with
autocast off.

Where it runs: the Triton row kernel on CUDA tensors, and on CPU tensors when Triton runs in
interpreter mode (TRITON_INTERPRET=1 set before import, as the tests do); otherwise on CPU the same
chunked algorithm runs with `cross_entropy_rows_torch`, the PyTorch reference of the row kernel.
`impl="triton"|"torch"` forces one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor

# Bytes allowed for the reused (rows, V) logits buffer: 640 MiB gives 2048-token chunks at V=152064 in
# bf16 (8 chunks at T=16384), which keeps the extra memory at the 32B shape near 0.6 GiB while the
# GEMMs' reduction dimension (2048 for dW) stays long enough for cuBLAS to run at full speed.
LOGITS_CHUNK_BYTES = 640 * 2**20
# dW accumulates in an fp32 buffer when that buffer is at most this big (see the module docstring).
FP32_DW_ACCUM_MAX_BYTES = 2**30
# Vocabulary tile of the row kernel; 8 warps x 32 lanes x 16 elements, 32-byte vector loads in bf16.
MAX_BLOCK_V = 4096
NUM_WARPS = 8

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("sum", "mean", "none")


def _empty(shape, dtype, device) -> torch.Tensor:
    # Every output buffer of the fused path comes from here, so tests can hand out poisoned buffers.
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class LossOptions:
    """What the row kernel computes beyond the plain cross-entropy (all off by default)."""

    ignore_index: int = -100
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    softcap: float = 0.0  # 0: no capping


# --------------------------------------------------------------------------------------------------
# PyTorch reference of the whole op (unfused: full logits)
# --------------------------------------------------------------------------------------------------
def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    bias: torch.Tensor | None = None,
    reduction: str = "sum",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    return_z_loss: bool = False,
):
    """matmul (+ softcap) + F.cross_entropy (+ z_loss * logsumexp^2), in the inputs' dtype; the oracle.

    Returns fp32 for fp32/bf16/fp16 inputs and float64 for float64 ones."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden, weight, bias)  # (T, V)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    cw = class_weight.to(logits.dtype) if class_weight is not None else None
    ce = F.cross_entropy(logits, labels.long(), weight=cw, ignore_index=ignore_index,
                         reduction="none" if reduction == "none" else "sum",
                         label_smoothing=label_smoothing).to(acc)
    valid = labels != ignore_index  # (T,)
    zl = torch.where(valid, z_loss * torch.logsumexp(logits.to(acc), dim=-1) ** 2, 0.0)  # (T,)
    if reduction == "none":
        loss, z = ce + zl, zl
    elif reduction == "sum":
        loss, z = ce + zl.sum(), zl.sum()
    else:
        wsum = cw[labels[valid].long()].sum().to(acc) if cw is not None else valid.sum()
        z = zl.sum() / valid.sum()
        loss = ce / wsum + z
    return (loss, z.detach()) if return_z_loss else loss


# --------------------------------------------------------------------------------------------------
# The row kernel: loss and dlogits of a chunk of rows, in place
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(u):
    # Neither tl nor the interpreter has tanh: (1 - e) / (1 + e) with e = exp(-2|u|), and a Taylor
    # series below 0.125 where 1 - e would cancel (its error there is < 3e-10 relative).
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.125, series, t)
    return tl.where(u < 0, -t, t)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # (rows, V) param dtype; overwritten with dlogits when HAS_GRAD
    stride_row,
    labels_ptr,  # (rows,) int32/int64
    bias_ptr,  # (V,) param dtype, read only when HAS_BIAS
    cw_ptr,  # (V,) fp32 class weights, read only when HAS_CW
    row_scale_ptr,  # (rows,) fp32 upstream gradient per row, read only when HAS_ROW_SCALE
    zscale_ptr,  # () fp32 factor on the z-loss gradient, read only when HAS_ZSCALE
    loss_ptr,  # (rows,) fp32
    z_ptr,  # (rows,) fp32 z-loss part, written only when HAS_Z_OUT
    V,
    ignore_index,
    z_loss,
    smoothing,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_CW: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_ZSCALE: tl.constexpr,
    HAS_Z_OUT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BF16_RTNE_BY_HAND: tl.constexpr,
):
    # int64 row offset: rows * V passes 2^31 for large chunks of a 152K vocabulary.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: per-lane online max / sum-of-exp in fp32, merged once at the end (no per-tile
    # reduction). The max starts at -inf; where it is still -inf it is replaced by 0 in the
    # exponents, so no lane ever computes exp(-inf - -inf).
    m_vec = tl.full([BLOCK_V], -float("inf"), tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    sx_vec = tl.zeros([BLOCK_V], tl.float32)  # label smoothing: sum_c w_c x_c
    sw_vec = tl.zeros([BLOCK_V], tl.float32)  # label smoothing: sum_c w_c
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = tl.where(mask, softcap * _tanh(x / softcap), -float("inf"))
        m_new = tl.maximum(m_vec, x)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
        m_vec = m_new
        if HAS_SMOOTH:
            if HAS_CW:
                w = tl.load(cw_ptr + offs, mask=mask, other=0.0)
            else:
                w = tl.where(mask, 1.0, 0.0)
            sx_vec += w * tl.where(mask, x, 0.0)  # no 0 * -inf in the padded lanes
            sw_vec += w
    m = tl.max(m_vec, axis=0)
    m = tl.where(m == -float("inf"), 0.0, m)
    s = tl.sum(s_vec * tl.exp(m_vec - m), axis=0)
    log_s = tl.log(s)
    lse = m + log_s

    is_ignored = label == ignore_index
    valid = (label >= 0) & (label < V) & (~is_ignored)
    # A label outside [0, V) that is not ignore_index (only possible with check_labels=False) gives a
    # NaN loss instead of an out-of-bounds read.
    safe_label = tl.where(valid, label, 0)
    x_label = tl.load(row_ptr + safe_label).to(tl.float32)
    if HAS_BIAS:
        x_label += tl.load(bias_ptr + safe_label).to(tl.float32)
    if HAS_SOFTCAP:
        x_label = softcap * _tanh(x_label / softcap)
    if HAS_CW:
        w_label = tl.load(cw_ptr + safe_label)
    else:
        w_label = 1.0
    ce = (m - x_label) + log_s  # lse - x_y without rounding lse first
    if HAS_SMOOTH:
        # sum_c w_c (lse - x_c) = lse * sum_c w_c - sum_c w_c x_c
        sw = tl.sum(sw_vec, axis=0)
        loss = (1.0 - smoothing) * w_label * ce + (smoothing / V) * (lse * sw - tl.sum(sx_vec, axis=0))
    else:
        loss = w_label * ce
    z_term = z_loss * lse * lse
    loss += z_term
    fill = tl.where(is_ignored, 0.0, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, fill))
    if HAS_Z_OUT:
        tl.store(z_ptr + row, tl.where(valid, z_term, fill))

    if HAS_GRAD:
        # d loss / d x_j = p_j * coef - hot * [j == y] - (eps / V) * w_j, p = exp(x - m) / s, with
        # coef = (1 - eps) w_y + eps/V * sum_c w_c + 2 z lse and hot = (1 - eps) w_y
        zg = z_loss
        if HAS_ZSCALE:
            zg = zg * tl.load(zscale_ptr)
        coef = w_label * (1.0 - smoothing) + 2.0 * zg * lse
        if HAS_SMOOTH:
            coef += (smoothing / V) * sw
        hot = w_label * (1.0 - smoothing)
        if HAS_ROW_SCALE:
            r = tl.load(row_scale_ptr + row)
            coef *= r
            hot *= r
        coef = coef / s
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            # -inf in the padded lanes: exp(x - m) = 0 there, never exp(0 - m) = inf for a row below 0
            x = tl.load(row_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                x = softcap * t
            g = tl.exp(x - m) * coef - tl.where(offs == label, hot, 0.0)
            if HAS_SMOOTH:
                if HAS_CW:
                    w = tl.load(cw_ptr + offs, mask=mask, other=0.0)
                else:
                    w = 1.0
                ws = w * (smoothing / V)
                if HAS_ROW_SCALE:
                    ws = ws * r
                g -= ws
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)  # d(c tanh(u / c)) / du
            g = tl.where(valid, g, 0.0)
            if BF16_RTNE_BY_HAND:
                # Interpreter only: its fp32->bf16 cast truncates (and can drop a carry), while GPUs
                # round to nearest even; round by hand so CPU tests see the GPU's numerics.
                bits = g.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                g_out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                g_out = g.to(logits_ptr.dtype.element_ty)
            tl.store(row_ptr + offs, g_out, mask=mask)


def _require(ok: bool, what: str) -> None:
    # A launcher's layout contract, checked with a raise (an assert vanishes under python -O).
    if not ok:
        raise ValueError(f"cross_entropy_rows_triton: {what}")


def cross_entropy_rows_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    opts: LossOptions,
    need_grad: bool,
    class_weight: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    z_scale: torch.Tensor | None = None,
    z_out: torch.Tensor | None = None,
) -> None:
    """Per-row loss into loss_out (rows,) fp32; dlogits over `logits` (rows, V) in place if need_grad.

    class_weight (V,) fp32; row_scale (rows,) fp32 multiplies each row's dlogits; z_scale () fp32
    multiplies the z-loss gradient; z_out (rows,) fp32 receives the z-loss part of each row's loss."""
    rows, V = logits.shape
    if rows == 0:
        return
    _require(logits.stride(1) == 1, f"logits need a unit column stride, got strides {logits.stride()}")
    for name, t, n in (("labels", labels, rows), ("loss_out", loss_out, rows), ("bias", bias, V),
                       ("class_weight", class_weight, V), ("row_scale", row_scale, rows), ("z_out", z_out, rows)):
        if t is not None:
            _require(t.is_contiguous() and t.shape == (n,), f"{name} must be a contiguous ({n},) tensor, "
                     f"got shape {tuple(t.shape)} and strides {t.stride()}")
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    f32 = loss_out  # a placeholder pointer for the inputs a constexpr flag turns off
    _ce_rows_kernel[(rows,)](
        logits,
        logits.stride(0),
        labels,
        bias if bias is not None else logits,
        class_weight if class_weight is not None else f32,
        row_scale if row_scale is not None else f32,
        z_scale if z_scale is not None else f32,
        loss_out,
        z_out if z_out is not None else f32,
        V,
        opts.ignore_index,
        float(opts.z_loss),
        float(opts.label_smoothing),
        float(opts.softcap),
        HAS_BIAS=bias is not None,
        HAS_GRAD=need_grad,
        HAS_CW=class_weight is not None,
        HAS_SMOOTH=opts.label_smoothing != 0.0,
        HAS_SOFTCAP=opts.softcap != 0.0,
        HAS_ROW_SCALE=row_scale is not None,
        HAS_ZSCALE=z_scale is not None,
        HAS_Z_OUT=z_out is not None,
        BLOCK_V=block_v,
        BF16_RTNE_BY_HAND=_interpreted() and logits.dtype == torch.bfloat16,
        num_warps=NUM_WARPS,
    )


def cross_entropy_rows_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    opts: LossOptions,
    need_grad: bool,
    class_weight: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    z_scale: torch.Tensor | None = None,
    z_out: torch.Tensor | None = None,
) -> None:
    """PyTorch reference of `_ce_rows_kernel`, same numerics (fp32 stats, dlogits rounded once)."""
    rows, V = logits.shape
    if rows == 0:
        return
    # An fp32 chunk whose gradient overwrites it is worked on in place: on CPU this path is the trainer's
    # loss, bound by passes over (rows, V), and in place it makes about half as many as out of place.
    own = need_grad and logits.dtype == torch.float32
    x = logits if own else logits.float()  # (rows, V)
    if bias is not None:
        x = x.add_(bias.float()) if own else x + bias.float()
    if opts.softcap:
        t = torch.tanh(x / opts.softcap)  # (rows, V)
        x = x.copy_(t).mul_(opts.softcap) if own else opts.softcap * t
    m = x.amax(dim=-1)  # (rows,)
    m = torch.where(m == -math.inf, 0.0, m)
    labels = labels.long()  # (rows,)
    is_ignored = labels == opts.ignore_index
    valid = (labels >= 0) & (labels < V) & ~is_ignored  # (rows,)
    safe = torch.where(valid, labels, 0)  # (rows,)
    x_label = x.gather(1, safe[:, None])[:, 0]  # (rows,)
    eps = opts.label_smoothing
    if eps:
        cw = class_weight if class_weight is not None else torch.ones(V, device=x.device)  # (V,)
        sw = cw.sum()
        x_cw = x @ cw  # (rows,), before x becomes exp(x - m)
    e = x.sub_(m[:, None]).exp_() if own else torch.exp(x - m[:, None])  # (rows, V)
    s = e.sum(dim=-1)  # (rows,)
    log_s = torch.log(s)
    lse = m + log_s  # (rows,)
    w_label = class_weight[safe] if class_weight is not None else torch.ones_like(lse)  # (rows,)
    loss = w_label * ((m - x_label) + log_s)
    if eps:
        loss = (1.0 - eps) * loss + (eps / V) * (lse * sw - x_cw)
    z_term = opts.z_loss * lse * lse
    loss = loss + z_term
    fill = torch.where(is_ignored, 0.0, torch.full_like(loss, math.nan))
    loss_out.copy_(torch.where(valid, loss, fill))
    if z_out is not None:
        z_out.copy_(torch.where(valid, z_term, fill))
    if need_grad:
        zg = opts.z_loss * z_scale if z_scale is not None else opts.z_loss
        coef = w_label * (1.0 - eps) + 2.0 * zg * lse  # (rows,)
        if eps:
            coef = coef + (eps / V) * sw
        hot = w_label * (1.0 - eps)  # (rows,)
        if row_scale is not None:
            coef, hot = coef * row_scale, hot * row_scale
        g = e.mul_((coef / s)[:, None]) if own else e * (coef / s)[:, None]  # (rows, V)
        g.scatter_add_(1, safe[:, None], -hot[:, None])
        if eps:
            ws = cw[None, :] * (eps / V)  # (1, V)
            g -= ws * row_scale[:, None] if row_scale is not None else ws
        if opts.softcap:
            g *= 1.0 - t * t
        g.masked_fill_(~valid[:, None], 0.0)  # (NaN-safe: a row of -inf logits has 0/0 here)
        if not own:
            logits.copy_(g)


# --------------------------------------------------------------------------------------------------
# The chunked driver
# --------------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    # triton.jit picks the interpreter at decoration time, so ask the kernel object what it became.
    return type(_ce_rows_kernel).__name__ == "InterpretedFunction"


_INTERPRETED = _interpreted()  # a constant for torch.compile to read


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or _INTERPRETED


def default_chunk_rows(num_tokens: int, vocab: int, itemsize: int) -> int:
    """Token rows per chunk: balanced chunks whose logits fit in LOGITS_CHUNK_BYTES, rounded to 128."""
    max_rows = max(1, LOGITS_CHUNK_BYTES // max(1, vocab * itemsize))
    if num_tokens <= max_rows:
        return max(1, num_tokens)
    n_chunks = math.ceil(num_tokens / max_rows)
    rows = math.ceil(math.ceil(num_tokens / n_chunks) / 128) * 128
    return min(rows, max_rows)


def _work_buffers(T, H, V, dt, w_dtype, dev, *, rows, fp32_accum, need_dh, need_dw, need_db):
    """Every buffer the chunked driver allocates (real and fake implementations share this).

    Returns (dh, dw_acc, db_acc, logits_buf, acc32); unneeded ones are None."""
    dh = _empty((T, H), dt, dev) if need_dh else None  # (T, H)
    # fp32 accumulation only matters (and only costs) for low-precision parameters.
    acc32 = need_dw and fp32_accum and w_dtype != torch.float32
    dw_acc = None
    if acc32 or (need_dw and T == 0):
        dw_acc = torch.zeros((V, H), dtype=torch.float32 if acc32 else w_dtype, device=dev)  # (V, H)
    elif need_dw:
        dw_acc = _empty((V, H), w_dtype, dev)  # (V, H), the first chunk's GEMM writes all of it
    db_acc = torch.zeros((V,), dtype=torch.float32, device=dev) if need_db else None  # (V,)
    logits_buf = _empty((min(rows, T), V), dt, dev) if T > 0 else None  # (rows, V)
    return dh, dw_acc, db_acc, logits_buf, acc32


def _chunked(
    hidden: torch.Tensor,  # (T, H)
    weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (T,)
    bias: torch.Tensor | None,  # (V,)
    *,
    opts: LossOptions,
    rows: int,
    fp32_accum: bool,
    use_triton: bool,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    class_weight: torch.Tensor | None = None,  # (V,) fp32
    row_scale: torch.Tensor | None = None,  # (T,) fp32
    z_scale: torch.Tensor | None = None,  # () fp32
    z_rows: torch.Tensor | None = None,  # (T,) fp32 out
):
    """Per-token losses (T,) fp32 and the gradients (dh, dW, db) of sum_t row_scale[t] * loss_t."""
    T, H = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    need_grad = need_dh or need_dw or need_db
    rows_fn = cross_entropy_rows_triton if use_triton else cross_entropy_rows_torch
    loss_rows = _empty((T,), torch.float32, dev)  # (T,)
    dh, dw_acc, db_acc, logits_buf, acc32 = _work_buffers(
        T, H, V, dt, weight.dtype, dev, rows=rows, fp32_accum=fp32_accum, need_dh=need_dh, need_dw=need_dw,
        need_db=need_db)
    cuda_out_dtype = acc32 and dev.type == "cuda"

    for start in range(0, T, rows):
        end = min(start + rows, T)
        h_c = hidden[start:end]  # (r, H)
        logits = logits_buf[: end - start]  # (r, V)
        torch.mm(h_c, weight.t(), out=logits)
        rows_fn(logits, labels[start:end], loss_rows[start:end], bias=bias, opts=opts, need_grad=need_grad,
                class_weight=class_weight, row_scale=None if row_scale is None else row_scale[start:end],
                z_scale=z_scale, z_out=None if z_rows is None else z_rows[start:end])
        if not need_grad:
            continue
        dlogits = logits  # (r, V), overwritten in place by the row kernel
        if need_dh:
            torch.mm(dlogits, weight, out=dh[start:end])
        if need_dw:
            if cuda_out_dtype:
                # bf16/fp16 operands, fp32 output and fp32 running sum: one buffer, no fp32 copies.
                torch.addmm(dw_acc, dlogits.t(), h_c, out_dtype=torch.float32, out=dw_acc)
            elif acc32:
                # CPU has no mixed-dtype GEMM: upcast the chunk (CPU runs are small).
                dw_acc.addmm_(dlogits.t().float(), h_c.float())
            elif start == 0:
                torch.mm(dlogits.t(), h_c, out=dw_acc)
            else:
                # beta=1 GEMM into the parameter-dtype gradient: fp32 inside, one rounding per chunk.
                dw_acc.addmm_(dlogits.t(), h_c)
        if need_db:
            db_acc += dlogits.sum(dim=0, dtype=torch.float32)

    dw = dw_acc.to(weight.dtype) if need_dw else None
    db = db_acc.to(bias.dtype) if need_db else None
    return loss_rows, dh, dw, db


# --------------------------------------------------------------------------------------------------
# The torch ops: forward (loss and, for sum/mean, the finished gradients) and the per-token backward
# --------------------------------------------------------------------------------------------------
def _denominators(labels, class_weight, ignore_index):
    """(sum of counted tokens' class weights, number of counted tokens), fp32 device scalars."""
    valid = labels != ignore_index  # (T,)
    count = valid.sum(dtype=torch.float32)
    if class_weight is None:
        return count, count
    safe = torch.where(valid, labels.long(), 0)
    return torch.where(valid, class_weight[safe], 0.0).sum(), count


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    # 1/d where d > 0, else 0: with nothing counted every gradient is zero, as F.cross_entropy's.
    return torch.where(d > 0, 1.0 / d.clamp_min(1e-30), 0.0)


# The ops take their scalar options packed in three lists: a custom op's Python dispatch costs time per
# schema argument and call (torch/_library/utils.py fill_defaults walks the schema once per argument),
# which at 17 separate arguments was 0.6 ms of host time per call.
#   scalars = [z_loss, label_smoothing, softcap (0: off)]      ints = [ignore_index, rows per chunk]
#   flags   = [fp32_accum, use_triton, need_dh, need_dw, need_db] (+ [want_z] for the forward)
def _unpack(scalars, ints):
    return LossOptions(int(ints[0]), *scalars), int(ints[1])


@torch.library.custom_op("skyt1::fused_linear_ce", mutates_args=())
def _fused_linear_ce_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
    class_weight: torch.Tensor | None, reduction: str, scalars: list[float], ints: list[int], flags: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z-loss part, dh, dW, db, backward scale): loss () or (T,) for "none"; the gradients (of
    the reduced loss with upstream gradient 1, before the backward scale) only for sum/mean."""
    opts, rows = _unpack(scalars, ints)
    fp32_accum, use_triton, need_dh, need_dw, need_db, want_z = flags
    with torch.autocast(hidden.device.type, enabled=False):
        mean = reduction == "mean"
        split_z = mean and class_weight is not None and opts.z_loss != 0.0  # two denominators
        wsum, count = _denominators(labels, class_weight, opts.ignore_index) if mean else (None, None)
        z_scale = wsum * _safe_inverse(count) if split_z else None
        z_rows = _empty((hidden.shape[0],), torch.float32, hidden.device) if (want_z or split_z) else None
        grads = reduction != "none"
        loss_rows, dh, dw, db = _chunked(
            hidden, weight, labels, bias, opts=opts, rows=rows, fp32_accum=fp32_accum, use_triton=use_triton,
            need_dh=grads and need_dh, need_dw=grads and need_dw, need_db=grads and need_db,
            class_weight=class_weight, z_scale=z_scale, z_rows=z_rows)
        if reduction == "none":
            loss, z, scale = loss_rows, z_rows, None
        elif reduction == "sum":
            loss, z, scale = loss_rows.sum(), None if z_rows is None else z_rows.sum(), None
        else:
            z = None if z_rows is None else z_rows.sum() / count
            loss = (loss_rows.sum() - z_rows.sum()) / wsum + z if split_z else loss_rows.sum() / wsum
            scale = _safe_inverse(wsum)
    # scale: the backward's factor on the finished gradients, "mean" only (sum needs none)
    return (loss, *_or_empty(hidden, z if want_z else None, dh, dw, db, scale))


def _or_empty(like: torch.Tensor, *ts):
    # "no tensor" as a fresh empty one each: custom ops cannot return None, nor one tensor twice.
    return tuple(like.new_empty((0,), dtype=torch.float32) if t is None else t for t in ts)


def _fake_grads(hidden, weight, bias, rows, fp32_accum, need_dh, need_dw, need_db):
    """Fake (dh, dW, db), allocating on the way what the real chunked driver allocates (its work
    buffers, the (T,) loss rows), so a fake-tensor memory tracker sees the op's peak."""
    T, H = hidden.shape
    dh, dw_acc, db_acc, logits_buf, acc32 = _work_buffers(
        T, H, weight.shape[0], hidden.dtype, weight.dtype, hidden.device, rows=rows, fp32_accum=fp32_accum,
        need_dh=need_dh, need_dw=need_dw, need_db=need_db)
    loss_rows = hidden.new_empty((T,), dtype=torch.float32)
    del logits_buf
    dw = None if dw_acc is None else (dw_acc.to(weight.dtype) if acc32 else dw_acc)
    db = None if db_acc is None else db_acc.to(bias.dtype)
    return loss_rows, dh, dw, db


@_fused_linear_ce_op.register_fake
def _(hidden, weight, labels, bias, class_weight, reduction, scalars, ints, flags):
    fp32_accum, _use_triton, need_dh, need_dw, need_db, want_z = flags
    grads = reduction != "none"
    loss_rows, dh, dw, db = _fake_grads(hidden, weight, bias, int(ints[1]), fp32_accum, grads and need_dh,
                                        grads and need_dw, grads and need_db)
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss = loss_rows if reduction == "none" else hidden.new_empty(shape, dtype=torch.float32)
    z = hidden.new_empty(shape, dtype=torch.float32) if want_z else None
    scale = hidden.new_empty((), dtype=torch.float32) if reduction == "mean" else None
    return (loss, *_or_empty(hidden, z, dh, dw, db, scale))


@torch.library.custom_op("skyt1::fused_linear_ce_backward", mutates_args=())
def _fused_linear_ce_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
    class_weight: torch.Tensor | None, grad_rows: torch.Tensor, scalars: list[float], ints: list[int],
    flags: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db) of sum_t grad_rows[t] * loss_t: the backward of reduction="none"."""
    opts, rows = _unpack(scalars, ints)
    fp32_accum, use_triton, need_dh, need_dw, need_db = flags
    with torch.autocast(hidden.device.type, enabled=False):
        _, dh, dw, db = _chunked(
            hidden, weight, labels, bias, opts=opts, rows=rows, fp32_accum=fp32_accum, use_triton=use_triton,
            need_dh=need_dh, need_dw=need_dw, need_db=need_db, class_weight=class_weight,
            row_scale=grad_rows.float().contiguous())
    return _or_empty(hidden, dh, dw, db)


@_fused_linear_ce_backward_op.register_fake
def _(hidden, weight, labels, bias, class_weight, grad_rows, scalars, ints, flags):
    fp32_accum, _use_triton, need_dh, need_dw, need_db = flags
    _, dh, dw, db = _fake_grads(hidden, weight, bias, int(ints[1]), fp32_accum, need_dh, need_dw, need_db)
    return _or_empty(hidden, dh, dw, db)


def _traced(t: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or is_fake(t) or isinstance(t, FunctionalTensor)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, class_weight, reduction, scalars, ints, flags = inputs
    _loss, _z, dh, dw, db, scale = output
    ctx.reduction = reduction
    ctx.need = tuple(flags[2:5])  # need_dh, need_dw, need_db
    ctx.consumed = False
    if reduction == "none":
        ctx.args = (scalars, ints, list(flags[:5]))
        ctx.has_bias, ctx.has_cw = bias is not None, class_weight is not None
        saved = [hidden, weight, labels] + [t for t in (bias, class_weight) if t is not None]
        ctx.save_for_backward(*saved)
    else:
        # The finished gradients are results: backward scales them in place and hands them over, so
        # autograd can adopt the dW buffer as weight.grad without a copy.
        ctx.save_for_backward(dh, dw, db, scale)


def _backward(ctx, grad_loss, _gz, _gdh, _gdw, _gdb, _gscale):
    if ctx.consumed:
        raise RuntimeError(
            "fused_linear_cross_entropy: backward ran twice through the same call; its gradients are "
            "computed in the forward and consumed by the first backward (call the loss again)"
        )
    ctx.consumed = True
    need_dh, need_dw, need_db = ctx.need
    if ctx.reduction == "none":
        hidden, weight, labels, *rest = ctx.saved_tensors
        bias = rest.pop(0) if ctx.has_bias else None
        cw = rest.pop(0) if ctx.has_cw else None
        dh, dw, db = torch.ops.skyt1.fused_linear_ce_backward(hidden, weight, labels, bias, cw, grad_loss, *ctx.args)
    else:
        dh, dw, db, scale = ctx.saved_tensors
        # grad_loss is a 0-d fp32 tensor: in-place scaling keeps the param dtype and needs no host sync.
        # While AOTAutograd traces (torch.compile, opcheck) the scaling is out of place: a traced
        # backward may not mutate a forward output (the compiler can re-inplace it).
        g = grad_loss * scale if ctx.reduction == "mean" else grad_loss
        traced = _traced(grad_loss)
        dh, dw, db = ((t * g if traced else t.mul_(g)) if need else None
                      for t, need in ((dh, need_dh), (dw, need_dw), (db, need_db)))
    return (dh if need_dh else None, dw if need_dw else None, None, db if need_db else None,
            None, None, None, None, None)


torch.library.register_autograd("skyt1::fused_linear_ce", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, labels, bias, class_weight, ignore_index, z_loss, label_smoothing, softcap,
                  reduction, chunk_size, impl):
    where = "fused_linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"{where}: hidden must be 2-D (T, H), got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{where}: hidden dtype must be one of {_FLOAT_DTYPES}, got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"{where}: weight must be (V, H) with V >= 1 and H = hidden.shape[1] = {hidden.shape[1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{where}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if not weight.is_contiguous():
        raise ValueError(f"{where}: weight must be contiguous (strides {weight.stride()})")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"{where}: labels must be 1-D of length T = {hidden.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in _INT_DTYPES:
        raise ValueError(f"{where}: labels dtype must be int64 or int32, got {labels.dtype}")
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != hidden.device:
            raise ValueError(f"{where}: {name} is on {t.device} but hidden is on {hidden.device}")
    V = weight.shape[0]
    for name, t, dtypes in (("bias", bias, (weight.dtype,)), ("class_weight", class_weight, _FLOAT_DTYPES)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (V,):
            raise ValueError(f"{where}: {name} must be a tensor of shape ({V},), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in dtypes or t.device != weight.device:
            raise ValueError(f"{where}: {name} must be on {weight.device} with dtype in {dtypes}, "
                             f"got ({t.dtype}, {t.device})")
        if not t.is_contiguous():
            raise ValueError(f"{where}: {name} must be contiguous (strides {t.stride()})")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"{where}: ignore_index must be an int, got {ignore_index!r}")
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"{where}: z_loss must be a finite float >= 0, got {z_loss!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{where}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{where}: softcap must be a finite float > 0 or None, got {softcap!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{where}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"{where}: impl must be 'auto', 'triton' or 'torch', got {impl!r}")


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))  # (T,)
    # One host sync per call; pass check_labels=False in a hot loop whose labels are already checked.
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"fused_linear_cross_entropy: labels[{pos}] = {int(labels[pos])} is outside [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )


def _has_values(t: torch.Tensor) -> bool:
    # No label check while tracing (torch.compile) or on fake / meta tensors: there are no values.
    return not (torch.compiler.is_compiling() or t.is_meta or is_fake(t))


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    class_weight: torch.Tensor | None = None,
    return_z_loss: bool = False,
    check_labels: bool = True,
    chunk_size: int | None = None,
    fp32_accum: bool | None = None,
    impl: str = "auto",
):
    """Cross-entropy of hidden @ weight.T (+ bias) against labels, never materialising the (T, V) logits.

    hidden (T, H), weight (V, H) contiguous, labels (T,) int64/int32, bias (V,) or None, all one
    float dtype (under autocast, hidden/weight/bias are cast to the autocast dtype first). Arguments as
    torch's F.linear_cross_entropy (its `linear_bias` is our `bias`, its `weight` our `class_weight`)
    plus Liger's: z_loss (Liger's lse_square_scale), softcap, return_z_loss. reduction "sum" (our
    default; torch and Liger default to "mean"), "mean" or "none" (see the module docstring for the
    formula). Returns the fp32 loss, differentiable with respect to hidden, weight and bias, or
    (loss, z_loss part) with return_z_loss=True. A second backward through one call raises (in eager
    mode; a compiled graph is not checked).
    check_labels: verify labels lie in [0, V) or equal ignore_index (one host sync; skipped while
    tracing); with False a bad label yields a NaN loss, never an out-of-bounds access. chunk_size:
    token rows per chunk (default: logits chunk <= LOGITS_CHUNK_BYTES). fp32_accum: accumulate dW in
    fp32 (default: when V*H*4 <= FP32_DW_ACCUM_MAX_BYTES). impl: "triton" | "torch" | "auto" (Triton
    on CUDA or under the interpreter).
    """
    dev_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(dev_type):
        dt = torch.get_autocast_dtype(dev_type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    _check_inputs(hidden, weight, labels, bias, class_weight, ignore_index, z_loss, label_smoothing, softcap,
                  reduction, chunk_size, impl)
    T, H = hidden.shape
    V = weight.shape[0]
    if check_labels and T > 0 and _has_values(labels):
        _check_label_range(labels, V, ignore_index)
    hidden = hidden.contiguous()
    labels = labels.contiguous()
    cw = class_weight.float() if class_weight is not None else None
    rows = chunk_size if chunk_size is not None else default_chunk_rows(T, V, hidden.element_size())
    if fp32_accum is None:
        fp32_accum = V * H * 4 <= FP32_DW_ACCUM_MAX_BYTES
    use_triton = impl == "triton" or (impl == "auto" and _use_triton(hidden.device))
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    loss, z, *_ = torch.ops.skyt1.fused_linear_ce(
        hidden, weight, labels, bias, cw, reduction, [float(z_loss), float(label_smoothing), float(softcap or 0.0)],
        [ignore_index, rows], [bool(fp32_accum), use_triton, need_dh, need_dw, need_db, bool(return_z_loss)],
    )
    return (loss, z.detach()) if return_z_loss else loss
