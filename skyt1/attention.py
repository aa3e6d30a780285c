"""One varlen attention call over packed documents, several backends.

Every backend computes the same function: documents are given by cumulative lengths (cu_seqlens), a
query attends only to keys of its own document, causally. When a document has more keys than queries
(chunked prefill over a KV cache), causality is aligned bottom-right, as in flash-attn: query i of a
document with lq queries and lk keys sees keys j <= lk - lq + i.

Backends, picked at run time unless asked for:
  "flash": flash-attn's flash_attn_varlen_func (CUDA, when importable)
  "torch": torch.nn.attention.varlen.varlen_attn (CUDA; GQA natively from torch 2.12, by repeating K/V before)
  "sdpa":  scaled_dot_product_attention with an explicit block-diagonal causal mask: the CPU path and the
           reference. Its mask is O(Tq x Tk), fine for tests and CPU runs, not for 16K-token GPU batches.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "torch", "sdpa")


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


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        if _flash_varlen() is not None:
            out.append("flash")
        if _torch_varlen()[0] is not None:
            out.append("torch")
    out.append("sdpa")
    return out


def default_backend(device: torch.device | str) -> str:
    return available_backends(device)[0]


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
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (tokens, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens_q, max_seqlen_q
    backend = backend or default_backend(q.device)
    if backend not in available_backends(q.device):
        raise ValueError(f"attention backend {backend!r} is not available on {q.device}; "
                         f"available: {available_backends(q.device)}")
    if backend == "flash":
        return _flash_varlen()(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal)
    if backend == "torch":
        return _torch_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    return sdpa_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal)


def _torch_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal):
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
