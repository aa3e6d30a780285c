"""One varlen attention call over packed documents, several backends.

Every backend computes the same function: documents are given by cumulative lengths (cu_seqlens), a
query attends only to keys of its own document, causally. When a document has more keys than queries
(chunked prefill over a KV cache), causality is aligned bottom-right, as in flash-attn: query i of a
document with lq queries and lk keys sees keys j <= lk - lq + i.

Backends, resolved once per model or batch (resolve_attention), never inside a block, so that
torch.compile traces one op per block and no import or availability probe:
  "flash": flash-attn's flash_attn_varlen_func (CUDA, fp16/bf16, when importable)
  "torch": torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16; GQA natively from torch 2.12, by
           repeating K/V before)
  "cpu":   the custom op skyt1::varlen_attn: causal attention document by document with torch's CPU flash
           kernel (no T x T mask), out + fp32 log-sum-exp saved for its backward op, as the GPU kernels do.
           Its fake implementation allocates exactly that, so FakeTensorMode (the dry run) and
           torch.compile see one op that holds what the GPU backend holds.
  "sdpa":  scaled_dot_product_attention with an explicit block-diagonal causal mask: the reference, any
           device and dtype (fp32 on CUDA, where the varlen kernels take only fp16/bf16). Its mask and
           scores are O(Tq x Tk): fine for tests and small runs, not for 16K-token batches.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "torch", "cpu", "sdpa")
# The GPU varlen kernels (flash-attn, torch's varlen_attn in torch 2.11) take only these.
HALF_DTYPES = (torch.float16, torch.bfloat16)

# attention(q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, D), cu_q, cu_k, max_q, max_k, causal) -> (Tq, Hq, D)
VarlenFn = Callable[..., torch.Tensor]


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a build that does not match this torch/CUDA
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def available_backends(device: torch.device | str, dtype: torch.dtype | None = None) -> list[str]:
    """Backends that run on `device` for `dtype` (None: any dtype), fastest first."""
    device = torch.device(device)
    out = []
    if device.type == "cuda" and (dtype is None or dtype in HALF_DTYPES):
        if _flash_varlen() is not None:
            out.append("flash")
        if _torch_varlen()[0] is not None:
            out.append("torch")
    if device.type == "cpu":
        out.append("cpu")
    out.append("sdpa")
    return out


def default_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    return available_backends(device, dtype)[0]


def resolve_attention(backend: str | None, device: torch.device | str, dtype: torch.dtype) -> VarlenFn:
    """The attention function of one backend (None: the fastest for this device and dtype), checked once."""
    backend = backend or default_backend(device, dtype)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
    if backend not in available_backends(device, dtype):
        raise ValueError(f"attention backend {backend!r} is not available on {torch.device(device)} for {dtype}; "
                         f"available: {available_backends(device, dtype)}")
    if backend == "flash":
        flash = _flash_varlen()
        return lambda q, k, v, cu_q, cu_k, max_q, max_k, causal=True: flash(  # noqa: E731
            q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)
    if backend == "torch":
        return _torch_attention
    if backend == "cpu":
        return cpu_varlen_attention
    return lambda q, k, v, cu_q, cu_k, max_q, max_k, causal=True: sdpa_varlen_attention(  # noqa: E731
        q, k, v, cu_q, cu_k, causal=causal)


def varlen_attention(
    q: torch.Tensor,                 # (Tq, Hq, D)
    k: torch.Tensor,                 # (Tk, Hkv, D)
    v: torch.Tensor,                 # (Tk, Hkv, D)
    cu_seqlens_q: torch.Tensor,      # (B+1,) int32
    max_seqlen_q: int,
    cu_seqlens_k: torch.Tensor | None = None,  # (B+1,) int32; None: same as q
    max_seqlen_k: int | None = None,
    *,
    causal: bool = True,
    backend: str | None = None,
) -> torch.Tensor:                   # (Tq, Hq, D)
    """One call, backend resolved here: for callers outside compiled code (the sampler, tests)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (tokens, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens_q, max_seqlen_q
    fn = resolve_attention(backend, q.device, q.dtype)
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)


def _torch_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True):
    fn, params = _torch_varlen()
    kwargs = {}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1]:
        # torch < 2.12: no GQA in varlen_attn; repeat each KV head for its query group.
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # (Tk, Hq, D)
        v = v.repeat_interleave(group, dim=1)  # (Tk, Hq, D)
    if "is_causal" in params:  # torch 2.10-2.11 spelling
        kwargs["is_causal"] = causal
    elif causal:
        kwargs["window_size"] = (-1, 0)
    return fn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, **kwargs)


def document_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int,
                  causal: bool = True) -> torch.Tensor:
    """(Tq, Tk) bool: True where query token may attend key token. No host sync."""
    dev = cu_seqlens_q.device
    cu_q = cu_seqlens_q.long()
    cu_k = cu_seqlens_k.long()
    tq = torch.arange(total_q, device=dev)
    tk = torch.arange(total_k, device=dev)
    doc_q = torch.searchsorted(cu_q[1:], tq, right=True)  # (Tq,)
    doc_k = torch.searchsorted(cu_k[1:], tk, right=True)  # (Tk,)
    mask = doc_q[:, None] == doc_k[None, :]               # (Tq, Tk)
    if causal:
        num_docs = cu_q.numel() - 1
        shift = (cu_k[1:] - cu_k[:-1]) - (cu_q[1:] - cu_q[:-1])   # (B,) lk - lq per document
        pos_q = tq - cu_q[doc_q.clamp(max=num_docs - 1)]         # (Tq,)
        pos_k = tk - cu_k[doc_k.clamp(max=num_docs - 1)]         # (Tk,)
        limit = pos_q + shift[doc_q.clamp(max=num_docs - 1)]      # (Tq,)
        mask &= pos_k[None, :] <= limit[:, None]
    return mask


def sdpa_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = True) -> torch.Tensor:
    """The reference: SDPA over all tokens with a block-diagonal (causal) mask."""
    mask = document_mask(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], causal)  # (Tq, Tk)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),   # (H, T, D)
        attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)  # (Tq, Hq, D)


# ------------------------------------------------------------------------------------------------
# "cpu": skyt1::varlen_attn, document by document with torch's CPU flash kernel
# ------------------------------------------------------------------------------------------------
def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _doc_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    """(L, Hkv, D) -> (1, Hq, L, D), each KV head repeated for its query group (torch 2.11's CPU kernel
    takes equal head counts; the copy is one document's K or V)."""
    if group > 1:
        x = x.repeat_interleave(group, dim=1)  # (L, Hq, D)
    return x.transpose(0, 1)[None]


def _doc_causality(lq: int, lk: int, causal: bool, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """(additive mask or None, is_causal) for one document: the kernel's own causal flag when queries and
    keys align; a small lq x lk bottom-right mask when the document has more keys than queries."""
    if not causal:
        return None, False
    if lq == lk:
        return None, True
    keep = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)               # (lq, lk)
    return torch.zeros(lq, lk, dtype=dtype).masked_fill_(~keep, float("-inf")), False


def _doc_ranges(cu_q: torch.Tensor, cu_k: torch.Tensor):
    # Host lists of boundaries: these ops run on CPU tensors, where reading them syncs with nothing.
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        if bq[i + 1] > bq[i]:
            yield bq[i], bq[i + 1], bk[i], bk[i + 1]


@torch.library.custom_op("skyt1::varlen_attn", mutates_args=(), device_types="cpu")
def _varlen_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    Tq, Hq, _ = q.shape
    group = Hq // k.shape[1]
    out = torch.empty_like(q)                                             # (Tq, Hq, D)
    lse = torch.empty(Hq, Tq, dtype=_lse_dtype(q.dtype))                  # (Hq, Tq)
    for qs, qe, ks, ke in _doc_ranges(cu_q, cu_k):
        mask, is_causal = _doc_causality(qe - qs, ke - ks, causal, q.dtype)
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[qs:qe].transpose(0, 1)[None], _doc_heads(k[ks:ke], group), _doc_heads(v[ks:ke], group),
            0.0, is_causal, attn_mask=mask)                                # (1, Hq, lq, D), (1, Hq, lq)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l[0]
    return out, lse


@_varlen_attn_op.register_fake
def _varlen_attn_fake(q, k, v, cu_q, cu_k, causal):
    # What the GPU kernels allocate: the output and an fp32 log-sum-exp per query and head; no mask.
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("skyt1::varlen_attn_backward", mutates_args=(), device_types="cpu")
def _varlen_attn_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    group = Hq // Hkv
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs, qe, ks, ke in _doc_ranges(cu_q, cu_k):
        mask, is_causal = _doc_causality(qe - qs, ke - ks, causal, q.dtype)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout[qs:qe].transpose(0, 1)[None], q[qs:qe].transpose(0, 1)[None], _doc_heads(k[ks:ke], group),
            _doc_heads(v[ks:ke], group), out[qs:qe].transpose(0, 1)[None], lse[None, :, qs:qe], 0.0, is_causal,
            attn_mask=mask)                                                # (1, Hq, l, D) each
        dq[qs:qe] = gq[0].transpose(0, 1)
        # A KV head's gradient is the sum over the query heads of its group.
        dk[ks:ke] = gk[0].view(Hkv, group, ke - ks, D).sum(1).transpose(0, 1)
        dv[ks:ke] = gv[0].view(Hkv, group, ke - ks, D).sum(1).transpose(0, 1)
    return dq, dk, dv


@_varlen_attn_backward_op.register_fake
def _varlen_attn_backward_fake(dout, q, k, v, out, lse, cu_q, cu_k, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_attn_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.causal = causal


def _varlen_attn_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.skyt1.varlen_attn_backward(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.causal)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("skyt1::varlen_attn", _varlen_attn_backward, setup_context=_varlen_attn_setup)


def cpu_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                         causal: bool = True) -> torch.Tensor:
    """The "cpu" backend: (Tq, Hq, D) from skyt1::varlen_attn (the max lengths are not needed)."""
    return torch.ops.skyt1.varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, causal)[0]
