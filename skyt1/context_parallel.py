"""Context parallelism: the cp ranks of a group split every micro-batch's tokens and exchange K/V.

The split (host side, in the loader: shard_batch). Each document of length L is cut into 2 x cp
chunks whose boundaries are (i x L) // (2 cp); CP rank c takes chunks c and 2cp - 1 - c (the zigzag /
two-chunk split of Megatron-LM and torchtitan): causal attention costs grow along a document, so pairing
an early chunk with a late one gives every rank the same work, where a contiguous split would leave rank
0 only the cheap early positions. A rank's tokens keep their labels and position_ids (both computed on
the whole micro-batch before the split), so RoPE and the fused loss see exactly what one rank would.
Every rank's share is padded to the longest share of the group (a trailing segment of pad tokens with no
loss), because the exchange below needs equal sizes.

The exchange (device side, per layer: cp_attention). Each rank all-gathers K and V from its group (one
collective, K and V concatenated: (cp x T, 2 Hkv, D)); every query chunk then attends to its document's
prefix up to its own end, taken from the gathered rows by index (kv_index), with the varlen call's
bottom-right causal alignment: a chunk of lq queries over lk = chunk end keys lets query i see keys
j <= lk - lq + i, its own position. So each chunk is one (q segment, k segment) pair of
skyt1.attention.varlen_attention, on any backend (flash-attn, torch varlen, the SDPA reference on CPU).
The keys a rank reads total about L x (1 + 1 / (2 cp)) per document. Autograd: the gather's backward
is a reduce-scatter of dK/dV (sum), so every rank gets the gradients of its own K/V rows from all the
queries that read them; parameter gradients then need no further CP reduction beyond FSDP's (the CP
ranks are part of the FSDP shard group, and the train step's loss scaling already counts every rank).

All-gather instead of a ring: one collective per layer, simplest to get exact, and the K/V of a 32K
micro-batch (32768 x 2 x 1024 x 2 B = 128 MiB for Qwen2.5-32B) is small beside a block's activations;
memplan.py counts the buffers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from skyt1.attention import varlen_attention
from skyt1.data.batch import IGNORE_INDEX, ContextShard, PackedBatch


# ------------------------------------------------------------------------------------------------
# the split (host)
# ------------------------------------------------------------------------------------------------
def zigzag_chunks(length: int, cp: int) -> list[list[tuple[int, int]]]:
    """[rank] -> its two (start, end) chunks of a document of `length` tokens (possibly empty)."""
    b = [(i * length) // (2 * cp) for i in range(2 * cp + 1)]
    return [[(b[c], b[c + 1]), (b[2 * cp - 1 - c], b[2 * cp - c])] for c in range(cp)]


def shard_batch(mb: PackedBatch, cp: int, cp_rank: int, pad_id: int = 0,
                ignore_index: int = IGNORE_INDEX) -> PackedBatch:
    """CP rank cp_rank's share of a packed micro-batch (on the host; every rank of the group computes the
    same layout, so they agree on the padded length and on where each token lives)."""
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank {cp_rank} is not in [0, {cp})")
    cu = mb.cu_seqlens.to(torch.int64).numpy()  # (B+1,)
    lengths = np.diff(cu)
    # token indices (into the micro-batch) of every rank's share, and its query segments
    own: list[list[np.ndarray]] = [[] for _ in range(cp)]
    segs: list[list[tuple[int, int, int]]] = [[] for _ in range(cp)]  # (doc start, chunk start, chunk end)
    for d, length in enumerate(lengths.tolist()):
        for c, chunks in enumerate(zigzag_chunks(length, cp)):
            for a, e in chunks:
                if e > a:
                    own[c].append(np.arange(cu[d] + a, cu[d] + e))
                    segs[c].append((int(cu[d]), a, e))
    counts = [sum(len(x) for x in o) for o in own]
    T = max(counts)                                     # every rank's padded share
    gathered = np.empty(int(cu[-1]), dtype=np.int64)    # micro-batch token -> row of the gathered K/V
    for c in range(cp):
        if own[c]:
            gathered[np.concatenate(own[c])] = c * T + np.arange(counts[c])
    idx = np.concatenate(own[cp_rank]) if own[cp_rank] else np.zeros(0, dtype=np.int64)  # (n,)
    n, pad = counts[cp_rank], T - counts[cp_rank]
    kv, q_lens, k_lens = [], [], []
    for start, a, e in segs[cp_rank]:
        kv.append(gathered[start:start + e])  # the document's prefix up to this chunk's end
        q_lens.append(e - a)
        k_lens.append(e)
    if pad:
        # The pad tokens form a segment of their own that attends only to itself: finite, no loss.
        kv.append(cp_rank * T + n + np.arange(pad))
        q_lens.append(pad)
        k_lens.append(pad)
    t_idx = torch.from_numpy(idx)

    def take(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([x[t_idx], torch.full((pad,), fill, dtype=x.dtype)])  # (T,)

    cu_q = torch.from_numpy(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32))
    cu_k = torch.from_numpy(np.concatenate([[0], np.cumsum(k_lens)]).astype(np.int32))
    shard = ContextShard(torch.from_numpy(np.concatenate(kv).astype(np.int64)), cu_k, int(max(k_lens)))
    return PackedBatch(take(mb.input_ids, pad_id), take(mb.labels, ignore_index), take(mb.position_ids, 0), cu_q,
                       int(max(q_lens)), shard)


# ------------------------------------------------------------------------------------------------
# the exchange (device)
# ------------------------------------------------------------------------------------------------
# torch 2.13 renames reduce_scatter_tensor (deprecated there); 2.11 has only the old name.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherFromGroup(torch.autograd.Function):
    """all_gather along dim 0 in forward; reduce-scatter (sum) of the gradient in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))  # (cp x T, ...)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))  # (T, ...)
        _reduce_scatter(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """(T, ...) on each rank of `group` -> (group size x T, ...), rank-major; differentiable."""
    return _GatherFromGroup.apply(x, group)


# Under train.compile the blocks are compiled; the collectives stay outside the graph (a graph break).
@torch.compiler.disable
def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mb: PackedBatch, group,
                 backend: str | None = None) -> torch.Tensor:
    """Attention of this rank's queries over its group's keys (see the module docstring)."""
    hkv = k.shape[1]
    kv = gather_from_group(torch.cat([k, v], dim=1), group)          # (cp x T, 2 Hkv, D)
    # index_select per half: contiguous K and V, as the varlen kernels want them
    k_rows = kv[:, :hkv].index_select(0, mb.cp.kv_index)              # (Tk, Hkv, D)
    v_rows = kv[:, hkv:].index_select(0, mb.cp.kv_index)              # (Tk, Hkv, D)
    return varlen_attention(q, k_rows, v_rows, mb.cu_seqlens, mb.max_seqlen,
                            mb.cp.cu_seqlens_k, mb.cp.max_seqlen_k, backend=backend)  # (T, Hq, D)


def make_cp_attention(backend: str | None, group):
    """The CP counterpart of skyt1.train.make_attention: for_batch(mb) -> attn(layer, q, k, v)."""
    def for_batch(mb: PackedBatch):
        if mb.cp is None:
            raise ValueError("context parallelism needs micro-batches split by skyt1.context_parallel.shard_batch "
                             "(build_loader(..., cp=N, cp_rank=r))")
        return lambda _layer, q, k, v: cp_attention(q, k, v, mb, group, backend)
    return for_batch
