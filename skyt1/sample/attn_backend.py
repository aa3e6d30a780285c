"""The attention callable the sampler hands to Transformer.forward: paged KV cache in, attention out.

Per layer it first writes the step's new K/V into their cache slots (slot_mapping), then attends:
- decode tokens (the first num_decodes of the batch, one per sequence) over their paged context:
    "triton": our split-KV kernel (kernels/paged_attention.py), the CUDA default;
    "triton-page": the same kernel with tiles that never cross a page (block sizes with a power-of-two
              divisor >= 16): fewer registers; bench/sampler.py times both on CUDA;
    "flash":  flash-attn's flash_attn_with_kvcache (pages must be multiples of 256 tokens);
    "sdpa":   the reference's gather + one fused SDPA call (the CPU default);
    "torch":  the PyTorch reference;
- prefill chunks (the rest) through varlen attention with bottom-right causality, keys = cached prefix
  + new tokens:
    "gather": when some sequence has a cached prefix, its K/V are gathered from the cache into a packed
              tensor for skyt1.attention.varlen_attention; otherwise the new K/V are used directly;
    "torch-paged": torch's varlen_attn reading pages through block_table (torch >= 2.13, CUDA);
    "flash-paged": flash-attn's varlen function with block_table (pages of 256 tokens).
Writing all new K/V of a layer before any attention of that layer reads is what lets two sequences of
the same step share a block (see block_manager.py).
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass

import torch

from skyt1.attention import varlen_attention
from skyt1.kernels.paged_attention import (page_tile, paged_decode_attention_ref, paged_decode_attention_sdpa,
                                           sdpa_decode_mask)

DECODE_BACKENDS = ("triton", "triton-page", "flash", "sdpa", "torch")
PREFILL_BACKENDS = ("gather", "torch-paged", "flash-paged")


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor                        # (T,) int64 cache slot of each new token
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None   # (Bd, M) int32
    decode_context_lens: torch.Tensor | None = None   # (Bd,) int32, including the new token
    decode_num_splits: int = 1
    num_prefills: int = 0
    cu_seqlens_q: torch.Tensor | None = None          # (Bp+1,) int32 over the prefill tokens
    cu_seqlens_k: torch.Tensor | None = None          # (Bp+1,) int32 cached prefix + new tokens
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    has_prefix: bool = False                          # some prefill sequence has keys already cached
    kv_gather_slots: torch.Tensor | None = None       # (Tk,) int64, "gather" with a prefix
    prefill_block_tables: torch.Tensor | None = None  # (Bp, M) int32, paged prefill with a prefix
    prefill_seqused_k: torch.Tensor | None = None     # (Bp,) int32
    decode_sdpa_mask: tuple | None = None             # "sdpa": built by the first layer, reused by the others


@functools.cache
def flash_kvcache_fn():
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except Exception:  # not installed, or built for another torch/CUDA
        return None, None
    return flash_attn_with_kvcache, flash_attn_varlen_func


@functools.cache
def torch_paged_varlen_fn():
    """torch's varlen_attn when it takes block_table (torch >= 2.13), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if "block_table" in params and "seqused_k" in params else None


def available_decode_backends(device: torch.device, block_size: int) -> list[str]:
    """Usable decode backends, best first. On CPU "triton" is offered only under the Triton interpreter
    (tests run the kernel inside the engine that way)."""
    out = []
    if device.type == "cuda":
        if flash_kvcache_fn()[0] is not None and block_size % 256 == 0:
            out.append("flash")
    triton = ["triton"] + (["triton-page"] if page_tile(block_size) else [])
    if device.type == "cuda":
        out += triton
    out += ["sdpa", "torch"]
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        out += triton
    return out


def available_prefill_backends(device: torch.device, block_size: int) -> list[str]:
    out = []
    if device.type == "cuda":
        if flash_kvcache_fn()[1] is not None and block_size % 256 == 0:
            out.append("flash-paged")
        if torch_paged_varlen_fn() is not None:
            out.append("torch-paged")
    out.append("gather")
    return out


class PagedAttention:
    def __init__(self, kv_cache: torch.Tensor, decode_backend: str, prefill_backend: str,
                 varlen_backend: str | None = None):
        # kv_cache (2, L, N, S, Hkv, D): K and V pages of every layer
        self.kv_cache = kv_cache
        self.decode_backend = decode_backend
        self.prefill_backend = prefill_backend
        self.varlen_backend = varlen_backend
        self.md: AttnMetadata | None = None  # set by the model runner before each forward

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        md = self.md
        k_cache, v_cache = self.kv_cache[0, layer], self.kv_cache[1, layer]  # (N, S, Hkv, D)
        Hkv, D = k.shape[1], k.shape[2]
        k_cache.view(-1, Hkv, D).index_copy_(0, md.slot_mapping, k)
        v_cache.view(-1, Hkv, D).index_copy_(0, md.slot_mapping, v)
        nd = md.num_decodes
        if md.num_prefills == 0:
            return self._decode(q, k_cache, v_cache, md)
        if nd == 0:
            return self._prefill(q, k, v, k_cache, v_cache, md)
        out = torch.empty_like(q)  # (T, Hq, D)
        out[:nd] = self._decode(q[:nd], k_cache, v_cache, md)
        out[nd:] = self._prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, md)
        return out

    def _decode(self, q, k_cache, v_cache, md: AttnMetadata) -> torch.Tensor:
        bt, lens = md.decode_block_tables, md.decode_context_lens
        if self.decode_backend in ("triton", "triton-page"):
            return torch.ops.skyt1.paged_decode_attention(q, k_cache, v_cache, bt, lens, md.decode_num_splits,
                                                          self.decode_backend == "triton-page")
        if self.decode_backend == "flash":
            fn = flash_kvcache_fn()[0]
            return fn(q[:, None], k_cache, v_cache, cache_seqlens=lens, block_table=bt, causal=True)[:, 0]
        if self.decode_backend == "sdpa":
            if md.decode_sdpa_mask is None:
                md.decode_sdpa_mask = sdpa_decode_mask(bt, lens, k_cache.shape[1])
            return paged_decode_attention_sdpa(q, k_cache, v_cache, bt, lens, mask=md.decode_sdpa_mask)
        return paged_decode_attention_ref(q, k_cache, v_cache, bt, lens)

    def _prefill(self, q, k, v, k_cache, v_cache, md: AttnMetadata) -> torch.Tensor:
        if not md.has_prefix:  # keys are exactly the new tokens
            return varlen_attention(q, k, v, md.cu_seqlens_q, md.max_seqlen_q, backend=self.varlen_backend)
        if self.prefill_backend == "torch-paged":
            fn = torch_paged_varlen_fn()
            return fn(q, k_cache, v_cache, md.cu_seqlens_q, None, md.max_seqlen_q, md.max_seqlen_k,
                      window_size=(-1, 0), enable_gqa=q.shape[1] != k_cache.shape[2],
                      seqused_k=md.prefill_seqused_k, block_table=md.prefill_block_tables)
        if self.prefill_backend == "flash-paged":
            fn = flash_kvcache_fn()[1]
            return fn(q, k_cache, v_cache, md.cu_seqlens_q, md.cu_seqlens_k, md.max_seqlen_q, md.max_seqlen_k,
                      causal=True, block_table=md.prefill_block_tables)
        Hkv, D = k_cache.shape[2], k_cache.shape[3]
        keys = k_cache.view(-1, Hkv, D).index_select(0, md.kv_gather_slots)    # (Tk, Hkv, D)
        values = v_cache.view(-1, Hkv, D).index_select(0, md.kv_gather_slots)  # (Tk, Hkv, D)
        return varlen_attention(q, keys, values, md.cu_seqlens_q, md.max_seqlen_q, md.cu_seqlens_k,
                                md.max_seqlen_k, backend=self.varlen_backend)


# -- start-up checks ---------------------------------------------------------------------------------
# A fast path that fails or disagrees on this GPU / build (a flash-attn wheel for another CUDA, a page size a
# kernel does not take, a torch whose paged varlen path has other semantics) is found at start-up on a small
# random case and never used, instead of failing or corrupting a long run.
def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def check_decode_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int, num_heads: int,
                         num_kv_heads: int, head_dim: int) -> str | None:
    """None when backend `name` matches the PyTorch reference on a small paged case, else the reason."""
    gen = torch.Generator().manual_seed(0)
    lens = [1, block_size + 3, 2 * block_size + 5]
    need = [-(-n // block_size) for n in lens]
    pages = sum(need) + 1
    k_cache = torch.randn(pages, block_size, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(pages, block_size, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    order = torch.randperm(pages, generator=gen).tolist()
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    start = 0
    for r, m in enumerate(need):
        tables[r, :m] = torch.tensor(order[start:start + m], dtype=torch.int32)
        start += m
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(device, dtype)
    md = AttnMetadata(slot_mapping=None, num_decodes=len(lens), decode_block_tables=tables.to(device),
                      decode_context_lens=torch.tensor(lens, dtype=torch.int32, device=device), decode_num_splits=2)
    try:
        out = PagedAttention(None, name, "gather")._decode(q, k_cache, v_cache, md)
    except Exception as e:  # any failure means: do not use it
        return f"{type(e).__name__}: {e}"
    ref = paged_decode_attention_ref(q, k_cache, v_cache, md.decode_block_tables, md.decode_context_lens)
    err = (out.float() - ref.float()).abs().max().item()
    return None if err <= _tolerance(dtype) else f"max abs error {err:.3g} against the reference"


def check_prefill_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int, num_heads: int,
                          num_kv_heads: int, head_dim: int) -> str | None:
    """None when backend `name` matches SDPA over gathered keys on chunks with a cached prefix."""
    gen = torch.Generator().manual_seed(1)
    cached, new = [block_size + 2, 0], [3, 5]
    total = [c + n for c, n in zip(cached, new)]
    need = [-(-t // block_size) for t in total]
    pages = sum(need) + 1
    k_cache = torch.randn(pages, block_size, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(pages, block_size, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    order = torch.randperm(pages, generator=gen).tolist()
    tables = torch.zeros(2, max(need), dtype=torch.int32)
    slots = []
    start = 0
    for r, m in enumerate(need):
        tables[r, :m] = torch.tensor(order[start:start + m], dtype=torch.int32)
        start += m
        slots += [int(tables[r, p // block_size]) * block_size + p % block_size for p in range(total[r])]
    q = torch.randn(sum(new), num_heads, head_dim, generator=gen).to(device, dtype)
    cu_q = torch.tensor([0, new[0], sum(new)], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, total[0], sum(total)], dtype=torch.int32, device=device)
    md = AttnMetadata(slot_mapping=None, num_prefills=2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(new),
                      max_seqlen_k=max(total), has_prefix=True,
                      kv_gather_slots=torch.tensor(slots, dtype=torch.int64, device=device),
                      prefill_block_tables=tables.to(device),
                      prefill_seqused_k=torch.tensor(total, dtype=torch.int32, device=device))
    try:
        out = PagedAttention(None, "torch", name)._prefill(q, None, None, k_cache, v_cache, md)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    keys = k_cache.view(-1, num_kv_heads, head_dim)[md.kv_gather_slots]
    values = v_cache.view(-1, num_kv_heads, head_dim)[md.kv_gather_slots]
    ref = varlen_attention(q, keys, values, cu_q, max(new), cu_k, max(total), backend="sdpa")
    err = (out.float() - ref.float()).abs().max().item()
    return None if err <= _tolerance(dtype) else f"max abs error {err:.3g} against SDPA"
