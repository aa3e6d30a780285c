"""Fused linear + cross-entropy: the loss of the LM head without ever holding (T, V) logits.

    loss = sum over tokens t with labels[t] != ignore_index of
           lse_t - logit_t[labels[t]] + z_loss * lse_t**2,      logits = hidden @ weight.T (+ bias)

Design (per chunk of `rows` tokens, so extra memory is O(rows x V), never O(T x V)):
  1. logits_c = h_c @ W^T                      cuBLAS, written into one reused (rows, V) buffer
  2. one Triton program per token row: online logsumexp over V in fp32 (pass 1), then the loss and
     the softmax gradient written back over the logits in place (pass 2): the row is read twice and
     written once, and no second (rows, V) buffer exists
  3. dh_c = dlogits_c @ W                      cuBLAS, straight into the rows of grad_hidden
     dW  += dlogits_c^T @ h_c                  cuBLAS, fp32 accumulation inside every GEMM
The gradients are finished in the forward; the backward only scales them by grad_output, so the
logits are never recomputed: three GEMMs of 2*T*H*V flops each, the minimum for this loss.

Numerics
- Softmax statistics, loss and per-token losses are fp32 whatever the input dtype; the loss returned is
  an fp32 scalar. The logits chunk and dlogits are held in the parameter dtype (as PyTorch's own unfused
  bf16 path does), the gradients are written in the parameters' dtype.
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

Where it runs: the Triton row kernel on CUDA tensors, and on CPU tensors when Triton runs in
interpreter mode (TRITON_INTERPRET=1 set before import, as the tests do); otherwise on CPU the same
chunked algorithm runs with `cross_entropy_rows_torch`, the PyTorch reference of the row kernel.
`impl="triton"|"torch"` forces one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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


def _empty(shape, dtype, device) -> torch.Tensor:
    # Every output buffer of the fused path comes from here, so tests can hand out poisoned buffers.
    return torch.empty(shape, dtype=dtype, device=device)


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
) -> torch.Tensor:
    """matmul + F.cross_entropy (+ z_loss * logsumexp^2), in the inputs' dtype; the test oracle.

    Returns fp32 for fp32/bf16/fp16 inputs and float64 for float64 ones."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden, weight, bias)  # (T, V)
    loss = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum").to(acc)
    if z_loss != 0.0:
        valid = labels != ignore_index  # (T,)
        lse = torch.logsumexp(logits.to(acc), dim=-1)  # (T,)
        loss = loss + z_loss * torch.where(valid, lse * lse, 0.0).sum()
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum()
    return loss


# --------------------------------------------------------------------------------------------------
# The row kernel: loss and dlogits of a chunk of rows, in place
# --------------------------------------------------------------------------------------------------
@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # (rows, V) param dtype; overwritten with dlogits when HAS_GRAD
    stride_row,
    labels_ptr,  # (rows,) int32/int64
    bias_ptr,  # (V,) param dtype, read only when HAS_BIAS
    loss_ptr,  # (rows,) fp32
    V,
    ignore_index,
    z_loss,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BF16_RTNE_BY_HAND: tl.constexpr,
):
    # int64 row offset: rows * V passes 2^31 for large chunks of a 152K vocabulary.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: per-lane online max / sum-of-exp in fp32, merged once at the end (no per-tile
    # reduction). The running max starts finite so exp(m_old - m_new) never meets inf - inf.
    m_vec = tl.full([BLOCK_V], -1.0e30, tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        s_vec = s_vec * tl.exp(m_vec - m_new) + tl.exp(x - m_new)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0))

    is_ignored = label == ignore_index
    valid = (label >= 0) & (label < V) & (~is_ignored)
    # A label outside [0, V) that is not ignore_index (only possible with check_labels=False) gives a
    # NaN loss instead of an out-of-bounds read.
    safe_label = tl.where(valid, label, 0)
    x_label = tl.load(row_ptr + safe_label).to(tl.float32)
    if HAS_BIAS:
        x_label += tl.load(bias_ptr + safe_label).to(tl.float32)
    loss = lse - x_label + z_loss * lse * lse
    loss = tl.where(valid, loss, tl.where(is_ignored, 0.0, float("nan")))
    tl.store(loss_ptr + row, loss)

    if HAS_GRAD:
        # d/dx_j [lse - x_y + z lse^2] = softmax_j * (1 + 2 z lse) - [j == y]
        scale = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * scale - tl.where(offs == label, 1.0, 0.0)
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


def cross_entropy_rows_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    ignore_index: int,
    z_loss: float,
    need_grad: bool,
) -> None:
    """Per-row loss into loss_out (rows,) fp32; dlogits over `logits` (rows, V) in place if need_grad."""
    rows, V = logits.shape
    if rows == 0:
        return
    # The launcher owns the layout contract of the kernel: unit column stride, contiguous 1-D vectors.
    assert logits.stride(1) == 1 and labels.is_contiguous() and loss_out.is_contiguous()
    assert bias is None or bias.is_contiguous()
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    _ce_rows_kernel[(rows,)](
        logits,
        logits.stride(0),
        labels,
        bias if bias is not None else logits,
        loss_out,
        V,
        ignore_index,
        float(z_loss),
        HAS_BIAS=bias is not None,
        HAS_GRAD=need_grad,
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
    ignore_index: int,
    z_loss: float,
    need_grad: bool,
) -> None:
    """PyTorch reference of `_ce_rows_kernel`, same numerics (fp32 stats, dlogits rounded once)."""
    rows, V = logits.shape
    if rows == 0:
        return
    x = logits.float()  # (rows, V)
    if bias is not None:
        x = x + bias.float()
    lse = torch.logsumexp(x, dim=-1)  # (rows,)
    labels = labels.long()  # (rows,)
    is_ignored = labels == ignore_index
    valid = (labels >= 0) & (labels < V) & ~is_ignored  # (rows,)
    safe = torch.where(valid, labels, 0)  # (rows,)
    x_label = x.gather(1, safe[:, None])[:, 0]  # (rows,)
    loss = lse - x_label + z_loss * lse * lse
    nan = torch.full_like(loss, float("nan"))
    loss_out.copy_(torch.where(valid, loss, torch.where(is_ignored, 0.0, nan)))
    if need_grad:
        g = torch.exp(x - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None]  # (rows, V)
        g.scatter_add_(1, safe[:, None], torch.full_like(lse, -1.0)[:, None])
        g = torch.where(valid[:, None], g, 0.0)
        logits.copy_(g)


# --------------------------------------------------------------------------------------------------
# The chunked driver and its autograd wrapper
# --------------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    # triton.jit picks the interpreter at decoration time, so ask the kernel object what it became.
    return type(_ce_rows_kernel).__name__ == "InterpretedFunction"


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or _interpreted()


def default_chunk_rows(num_tokens: int, vocab: int, itemsize: int) -> int:
    """Token rows per chunk: balanced chunks whose logits fit in LOGITS_CHUNK_BYTES, rounded to 128."""
    max_rows = max(1, LOGITS_CHUNK_BYTES // max(1, vocab * itemsize))
    if num_tokens <= max_rows:
        return max(1, num_tokens)
    n_chunks = math.ceil(num_tokens / max_rows)
    rows = math.ceil(math.ceil(num_tokens / n_chunks) / 128) * 128
    return min(rows, max_rows)


def _chunked_forward(
    hidden: torch.Tensor,  # (T, H)
    weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (T,)
    bias: torch.Tensor | None,  # (V,)
    *,
    ignore_index: int,
    z_loss: float,
    rows: int,
    fp32_accum: bool,
    use_triton: bool,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
):
    T, H = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    need_grad = need_dh or need_dw or need_db
    rows_fn = cross_entropy_rows_triton if use_triton else cross_entropy_rows_torch
    loss_rows = _empty((T,), torch.float32, dev)  # (T,)
    dh = _empty((T, H), dt, dev) if need_dh else None  # (T, H)
    # fp32 accumulation only matters (and only costs) for low-precision parameters.
    acc32 = need_dw and fp32_accum and weight.dtype != torch.float32
    dw_acc = None
    if acc32 or (need_dw and T == 0):
        dw_acc = torch.zeros((V, H), dtype=torch.float32 if acc32 else weight.dtype, device=dev)  # (V, H)
    elif need_dw:
        dw_acc = _empty((V, H), weight.dtype, dev)  # (V, H), the first chunk's GEMM writes all of it
    db_acc = torch.zeros((V,), dtype=torch.float32, device=dev) if need_db else None  # (V,)
    logits_buf = _empty((min(rows, T), V), dt, dev) if T > 0 else None  # (rows, V)
    cuda_out_dtype = acc32 and dev.type == "cuda"

    for start in range(0, T, rows):
        end = min(start + rows, T)
        h_c = hidden[start:end]  # (r, H)
        logits = logits_buf[: end - start]  # (r, V)
        torch.mm(h_c, weight.t(), out=logits)
        rows_fn(logits, labels[start:end], loss_rows[start:end], bias=bias, ignore_index=ignore_index,
                z_loss=z_loss, need_grad=need_grad)
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

    loss = loss_rows.sum()
    dw = dw_acc.to(weight.dtype) if need_dw else None
    db = db_acc.to(bias.dtype) if need_db else None
    return loss, dh, dw, db


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Gradients are computed in forward; backward scales them by grad_output in place (once)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, z_loss, rows, fp32_accum, use_triton,
                need_dh, need_dw, need_db):
        loss, dh, dw, db = _chunked_forward(
            hidden, weight, labels, bias, ignore_index=ignore_index, z_loss=z_loss, rows=rows,
            fp32_accum=fp32_accum, use_triton=use_triton, need_dh=need_dh, need_dw=need_dw,
            need_db=need_db,
        )
        # Held as attributes, not saved tensors: they are results, and backward hands them to autograd
        # (which can then adopt the dW buffer as weight.grad without a copy).
        ctx.grads = (dh, dw, db)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice through the same call; its gradients "
                "are computed in the forward and consumed by the first backward (call the loss again)"
            )
        dh, dw, db = ctx.grads
        ctx.grads = None
        # grad_loss is a 0-d fp32 tensor: in-place scaling keeps the param dtype and needs no host sync.
        for g in (dh, dw, db):
            if g is not None:
                g.mul_(grad_loss)
        return dh, dw, None, db, None, None, None, None, None, None, None, None


def _check_inputs(hidden, weight, labels, bias, ignore_index, z_loss, reduction, chunk_size, impl):
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
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"{where}: bias must be a tensor of shape ({weight.shape[0]},)")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"{where}: bias must match weight's dtype and device ({weight.dtype}, {weight.device}), "
                f"got ({bias.dtype}, {bias.device})"
            )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"{where}: reduction must be 'sum' or 'mean', got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"{where}: ignore_index must be an int, got {ignore_index!r}")
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"{where}: z_loss must be a finite float >= 0, got {z_loss!r}")
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


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    bias: torch.Tensor | None = None,
    reduction: str = "sum",
    check_labels: bool = True,
    chunk_size: int | None = None,
    fp32_accum: bool | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Sum (or mean) over tokens with labels != ignore_index of the cross-entropy of hidden @ weight.T.

    hidden (T, H), weight (V, H) contiguous, labels (T,) int64/int32, bias (V,) or None; hidden,
    weight and bias share one float dtype. Returns an fp32 scalar, differentiable with respect to
    hidden, weight and bias. z_loss adds z_loss * logsumexp^2 per counted token. reduction="mean"
    divides by the number of counted tokens (NaN when there are none, like F.cross_entropy); the train
    loop should use the sum and divide by the global token count itself.
    check_labels: verify labels lie in [0, V) or equal ignore_index (one host sync); with False a bad
    label yields a NaN loss, never an out-of-bounds access. chunk_size: token rows per chunk (default:
    logits chunk <= LOGITS_CHUNK_BYTES). fp32_accum: accumulate dW in fp32 (default: when V*H*4 <=
    FP32_DW_ACCUM_MAX_BYTES). impl: "triton" | "torch" | "auto" (Triton on CUDA or under the interpreter).
    """
    _check_inputs(hidden, weight, labels, bias, ignore_index, z_loss, reduction, chunk_size, impl)
    T, H = hidden.shape
    V = weight.shape[0]
    if check_labels and T > 0:
        _check_label_range(labels, V, ignore_index)
    hidden = hidden.contiguous()
    labels = labels.contiguous()
    rows = chunk_size if chunk_size is not None else default_chunk_rows(T, V, hidden.element_size())
    if fp32_accum is None:
        fp32_accum = V * H * 4 <= FP32_DW_ACCUM_MAX_BYTES
    use_triton = impl == "triton" or (impl == "auto" and _use_triton(hidden.device))
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    loss = FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, bias, ignore_index, float(z_loss), rows, bool(fp32_accum), use_triton,
        need_dh, need_dw, need_db,
    )
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum()
    return loss
