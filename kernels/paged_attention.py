"""Paged decode attention: one query token per sequence over a paged KV cache.

The KV cache of one layer is a pool of pages (num_blocks, block_size, Hkv, D); a sequence owns the pages
listed in its row of block_tables, in order, and its first context_lens[b] tokens are valid. The query of
sequence b (its newest token, already written into the cache) attends to all of them.

Triton kernel (flash-decoding):
- One program per (sequence, KV head, split). All query heads of a KV group are handled by the same
  program, so each K/V tile is read from memory once per group, not once per query head (GQA aware).
- Split-KV: a long context is cut into NUM_SPLITS contiguous ranges processed by separate programs, each
  writing a normalised partial output and its log-sum-exp; a second small kernel merges them. This keeps
  the GPU full when batch x KV heads is small. NUM_SPLITS is a launch constant chosen from the batch size
  (not from the current lengths) so a CUDA graph captured for a batch size stays valid as contexts grow.
- Two ways to address a tile of BLOCK_N tokens, selected by one_page_tiles (both tested; bench/sampler.py
  times both on CUDA, with their register counts):
  gather (default): tokens are gathered one by one through the block table, so any block_size works and a
  tile may span pages; the price is an int64 offset per token, a 2-D tensor of 64-bit pointers per tile
  (255 registers per thread at the 32B shape);
  one page per tile: BLOCK_N divides the page size, so a tile lies in one page: one int64 page base per
  tile and int32 offsets inside it.
- paged_decode_attention_op (torch.ops.skyt1.paged_decode_attention) wraps the launcher as a torch custom
  op with a fake implementation, so FakeTensorMode, torch.compile(fullgraph=True) and the profiler see it
  as one op; the sampler calls it.
- Offsets into the cache are int64: page * page_stride passes 2^31 elements for large pools.
- Softmax statistics and accumulators are fp32; P is rounded to the cache dtype for the P @ V product
  (as flash-attention does). Under the Triton interpreter (CPU tests) operands are upcast to fp32
  before tl.dot, since the interpreter's bf16 dot is wrong; fp32 operands use IEEE precision, not tf32.

paged_decode_attention_ref is the PyTorch reference; paged_decode_attention_sdpa (the same gather, one
fused SDPA call) is the CPU path of the sampler.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def paged_decode_attention_ref(
    q: torch.Tensor,             # (B, Hq, D) one query per sequence
    k_cache: torch.Tensor,       # (N, S, Hkv, D) pages
    v_cache: torch.Tensor,       # (N, S, Hkv, D)
    block_tables: torch.Tensor,  # (B, M) int32 page ids
    context_lens: torch.Tensor,  # (B,) int32 valid tokens per sequence (0: padding row, output 0)
    scale: float | None = None,
) -> torch.Tensor:               # (B, Hq, D)
    B, Hq, D = q.shape
    page = k_cache.shape[1]
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    M = block_tables.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    pages = block_tables.long()
    k = k_cache[pages].reshape(B, M * page, Hkv, D)          # (B, L, Hkv, D), L = M * page
    v = v_cache[pages].reshape(B, M * page, Hkv, D)          # (B, L, Hkv, D)
    qg = q.view(B, Hkv, G, D).float()                         # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale  # (B, Hkv, G, L)
    valid = torch.arange(M * page, device=q.device)[None, :] < context_lens.long()[:, None]  # (B, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)     # rows with no key: all zeros
    out = torch.einsum("bhgl,blhd->bhgd", probs, v.float())   # (B, Hkv, G, D)
    return out.reshape(B, Hq, D).to(q.dtype)


def paged_decode_attention_sdpa(
    q: torch.Tensor,             # (B, Hq, D)
    k_cache: torch.Tensor,       # (N, S, Hkv, D)
    v_cache: torch.Tensor,       # (N, S, Hkv, D)
    block_tables: torch.Tensor,  # (B, M) int32
    context_lens: torch.Tensor,  # (B,) int32 (0: padding row, output 0)
    scale: float | None = None,
    mask: tuple[torch.Tensor, torch.Tensor] | None = None,  # sdpa_decode_mask(...): the same for every layer
) -> torch.Tensor:               # (B, Hq, D)
    """The CPU path: the same gather as the reference, then one fused SDPA call instead of
    two einsums, a masked softmax and a nan_to_num; about 3x faster on CPU (bench/sampler.py CPU mode)."""
    B, Hq, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    M = block_tables.shape[1]
    pages, valid, has_keys = mask or sdpa_decode_mask(block_tables, context_lens, page)
    # index_select over whole pages: ~8x faster on CPU than advanced indexing with a 2-D index
    k = k_cache.index_select(0, pages).view(B, M * page, Hkv, D).transpose(1, 2)  # (B, Hkv, L, D)
    v = v_cache.index_select(0, pages).view(B, M * page, Hkv, D).transpose(1, 2)  # (B, Hkv, L, D)
    # The G query heads of a KV head as G query rows of one attention (same position, so no causal mask):
    # ~30% faster on CPU than SDPA's enable_gqa over single-row queries.
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(B, Hkv, Hq // Hkv, D), k, v, attn_mask=valid, scale=scale)  # (B, Hkv, G, D)
    out = out.reshape(B, Hq, D)
    return out * has_keys.to(out.dtype)  # (B, Hq, D)


def sdpa_decode_mask(block_tables: torch.Tensor, context_lens: torch.Tensor, page: int):
    """(int64 page ids (B * M,), key mask (B, 1, 1, M * page), has-keys (B, 1, 1)) for
    paged_decode_attention_sdpa; computed once per step, not once per layer."""
    lens = context_lens.long()
    valid = torch.arange(block_tables.shape[1] * page, device=lens.device)[None, :] < lens[:, None]  # (B, L)
    # A padding row (no keys) attends to its first slot instead of nothing (SDPA would give NaN); its
    # output is zeroed, as the reference's.
    valid[:, 0] |= lens == 0
    return block_tables.long().reshape(-1), valid[:, None, None, :], (lens > 0)[:, None, None]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2,
    stride_qb, stride_qh,
    stride_kn, stride_kt, stride_kh,
    stride_vn, stride_vt, stride_vh,
    stride_btb,
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ONE_PAGE_TILES: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    # Each split covers a whole number of BLOCK_N tiles; late splits of short contexts are empty.
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g                                      # (G,) query heads of this KV head
    q_off = b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (G, D)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM_PAD), tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n                                             # (N,) token positions
        n_mask = pos < end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        if ONE_PAGE_TILES:
            # BLOCK_N divides PAGE and tiles start at multiples of BLOCK_N: the whole tile is in one page.
            # One int64 page base per tile (a scalar), int32 offsets inside the page (PAGE x stride < 2^31).
            page = tl.load(bt_row + n0 // PAGE).to(tl.int64)
            slot = (n0 % PAGE + offs_n)[:, None]                      # (N, 1) int32
            k = tl.load(k_ptr + page * stride_kn + kvh * stride_kh + (slot * stride_kt + offs_d[None, :]),
                        mask=kv_mask, other=0.0)                      # (N, D)
            v = tl.load(v_ptr + page * stride_vn + kvh * stride_vh + (slot * stride_vt + offs_d[None, :]),
                        mask=kv_mask, other=0.0)                      # (N, D)
        else:
            # Tokens gathered one by one: any page size, a tile may span pages; a 64-bit offset per token.
            page = tl.load(bt_row + pos // PAGE, mask=n_mask, other=0).to(tl.int64)  # (N,)
            slot = pos % PAGE
            k_off = page * stride_kn + slot * stride_kt + kvh * stride_kh       # (N,) int64
            k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
            v_off = page * stride_vn + slot * stride_vt + kvh * stride_vh
            v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (G, N) fp32, log2 domain
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                         # finite: each tile has a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])                               # (G, N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (G, D)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]                # (G, D), zeros for empty ranges
    o_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        o_off = b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # partial buffers are contiguous (B, Hq, NUM_SPLITS, HEAD_DIM) and (B, Hq, NUM_SPLITS)
        row = (b.to(tl.int64) * NUM_HEADS + heads) * NUM_SPLITS + split  # (G,)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=o_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    row = (b.to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS + offs_s     # (S,)
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))  # (S,)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)                          # a padding row: every split empty
    w = tl.exp2(lse - m)                                              # (S,) 0 for empty splits
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # (S, D)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # (D,)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int,
                      min_tokens_per_split: int = 256, max_splits: int = 32) -> int:
    """Splits per sequence: enough programs to fill ~2 waves of SMs, never splits shorter than
    min_tokens_per_split at the longest context. Depends only on launch-time constants, so one CUDA
    graph per batch size stays valid while contexts grow."""
    programs = max(1, batch * num_kv_heads)
    want = triton.cdiv(2 * num_sms, programs)
    return max(1, min(want, triton.cdiv(max_context, min_tokens_per_split), max_splits))


def decode_kernel_resources(*args, **kwargs) -> dict:
    """Registers and spills per thread of the decode kernel compiled for paged_decode_attention(*args,
    **kwargs) (CUDA; the bench records them beside the timings of both variants)."""
    kernel = paged_decode_attention(*args, **kwargs, _compile_only=True)
    if hasattr(kernel, "_init_handles"):
        kernel._init_handles()  # n_regs / n_spills are filled when the binary is loaded
    return {"registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None)}


def page_tile(page: int, block_n: int = 64) -> int | None:
    """The one-page-per-tile variant's tile: the largest power of two <= block_n dividing the page, if it is
    at least 16 (tl.dot's minimum); None when the page size does not allow the variant."""
    t = min(block_n, page & -page)  # page & -page: the largest power of two dividing the page
    return t if t >= 16 else None


def paged_decode_attention(
    q: torch.Tensor,             # (B, Hq, D)
    k_cache: torch.Tensor,       # (N, S, Hkv, D)
    v_cache: torch.Tensor,       # (N, S, Hkv, D)
    block_tables: torch.Tensor,  # (B, M) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float | None = None,
    num_splits: int = 1,
    block_n: int | None = None,
    out: torch.Tensor | None = None,  # (B, Hq, D) written in place when given
    one_page_tiles: bool = False,
    _compile_only: bool = False,      # return the compiled decode kernel without running it (register counts)
) -> torch.Tensor:
    """one_page_tiles: the variant whose tiles never cross a page (needs a page of >= 16 tokens with a
    power-of-two tile dividing it, see page_tile); its addresses are one int64 page base per tile plus int32
    offsets, where the default gathers a 64-bit offset per token (255 registers per thread at the 32B shape)."""
    B, Hq, D = q.shape
    N, page, Hkv, Dk = k_cache.shape
    # The launcher checks what the kernel assumes instead of reading out of bounds.
    assert Dk == D and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert Hq % Hkv == 0, f"query heads {Hq} not a multiple of KV heads {Hkv}"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B and block_tables.stride(1) == 1
    assert context_lens.shape == (B,) and block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    assert k_cache.dtype == v_cache.dtype == q.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert num_splits >= 1
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    if B == 0:
        return out
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group_pad = max(16, triton.next_power_of_2(G))  # tl.dot needs M >= 16
    d_pad = max(16, triton.next_power_of_2(D))
    block_n = block_n or (64 if d_pad <= 128 else 32)
    if one_page_tiles:
        block_n = page_tile(page, block_n)
        assert block_n is not None, f"one_page_tiles needs a page of >= 16 tokens split by a power of two, got {page}"
    upcast = _interpreting()
    if num_splits == 1:
        part_out = part_lse = out  # unused by the kernel
    else:
        part_out = torch.empty(B, Hq, num_splits, D, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(B, Hq, num_splits, device=q.device, dtype=torch.float32)
    launch = _paged_decode_kernel.warmup if _compile_only else _paged_decode_kernel[(B, Hkv, num_splits)]
    kernel = launch(
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_HEADS=Hq, GROUP=G, GROUP_PAD=group_pad, HEAD_DIM=D, HEAD_DIM_PAD=d_pad,
        PAGE=page, BLOCK_N=block_n, NUM_SPLITS=num_splits, UPCAST=upcast, ONE_PAGE_TILES=one_page_tiles,
        # fp32 operands: full precision rather than tf32 (bf16/fp16 operands are exact in any mode)
        PRECISION="ieee" if (upcast or q.dtype == torch.float32) else None,
        num_warps=4, **({"grid": (B, Hkv, num_splits)} if _compile_only else {}),
    )
    if _compile_only:
        return kernel
    if num_splits > 1:
        _merge_splits_kernel[(B, Hq)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=Hq, HEAD_DIM=D, HEAD_DIM_PAD=d_pad,
            NUM_SPLITS=num_splits, SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
            num_warps=1,
        )
    return out


# -- the paged decode as one torch op ----------------------------------------------------------------
# FakeTensorMode, torch.compile(fullgraph=True) and the profiler see skyt1::paged_decode_attention as one
# op: Dynamo does not trace into the Triton launcher, and the fake implementation gives the output's shape
# and dtype without running anything.
@torch.library.custom_op("skyt1::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, context_lens: torch.Tensor, num_splits: int = 1,
                              one_page_tiles: bool = False) -> torch.Tensor:
    return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, num_splits=num_splits,
                                  one_page_tiles=one_page_tiles)


@paged_decode_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, num_splits=1, one_page_tiles=False):
    return torch.empty_like(q)  # (B, Hq, D)
