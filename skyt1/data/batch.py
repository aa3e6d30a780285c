"""PackedBatch: several documents concatenated into one row, with their boundaries in cu_seqlens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ContextShard:
    """What a context-parallel rank needs beyond its tokens (skyt1.context_parallel.shard_batch): its
    queries are the segments of PackedBatch.cu_seqlens (zigzag chunks of documents); segment i attends
    causally, bottom-right aligned, to keys cu_seqlens_k[i]:cu_seqlens_k[i+1] of the K/V gathered from
    every CP rank and taken in kv_index order (each chunk's document prefix)."""

    kv_index: torch.Tensor      # (Tk,) int64 rows of the all-gathered (cp x T, ...) K/V
    cu_seqlens_k: torch.Tensor  # (B+1,) int32
    max_seqlen_k: int

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "ContextShard":
        return ContextShard(self.kv_index.to(device, non_blocking=non_blocking),
                            self.cu_seqlens_k.to(device, non_blocking=non_blocking), self.max_seqlen_k)

    def pin_memory(self) -> "ContextShard":
        return ContextShard(self.kv_index.pin_memory(), self.cu_seqlens_k.pin_memory(), self.max_seqlen_k)


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch of packed documents.

    labels[t] is the next token of the same document where that token is trained on, else ignore_index;
    the last position of every document is ignore_index, so no label crosses a document boundary.
    position_ids restart at 0 for each document; cu_seqlens is the only record of boundaries.
    """

    input_ids: torch.Tensor     # (T,) int64
    labels: torch.Tensor        # (T,) int64
    position_ids: torch.Tensor  # (T,) int64
    cu_seqlens: torch.Tensor    # (B+1,) int32
    max_seqlen: int
    cp: ContextShard | None = None  # set on a context-parallel rank's share of a micro-batch

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device, non_blocking=non_blocking),
                           self.labels.to(device, non_blocking=non_blocking),
                           self.position_ids.to(device, non_blocking=non_blocking),
                           self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen,
                           None if self.cp is None else self.cp.to(device, non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return PackedBatch(self.input_ids.pin_memory(), self.labels.pin_memory(), self.position_ids.pin_memory(),
                           self.cu_seqlens.pin_memory(), self.max_seqlen,
                           None if self.cp is None else self.cp.pin_memory())


def pack_arrays(tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray,
                ignore_index: int = IGNORE_INDEX) -> PackedBatch:
    """PackedBatch from documents already concatenated: tokens (T,), mask (T,) bool/uint8, lengths (B,)."""
    lengths = np.asarray(lengths, dtype=np.int64)  # (B,)
    total = int(lengths.sum())
    if tokens.shape != (total,) or mask.shape != (total,) or (lengths <= 0).any():
        raise ValueError(f"pack_arrays: tokens {tokens.shape} and mask {mask.shape} must both be "
                         f"(sum(lengths),) = ({total},) with every length > 0")
    cu = np.zeros(len(lengths) + 1, dtype=np.int64)  # (B+1,)
    np.cumsum(lengths, out=cu[1:])
    ids = tokens.astype(np.int64)  # (T,)
    labels = np.full(total, ignore_index, dtype=np.int64)  # (T,)
    # Shift inside the concatenation, then cut it at every document's last position.
    np.copyto(labels[:-1], ids[1:], where=mask[1:].astype(bool))
    labels[cu[1:] - 1] = ignore_index
    pos = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lengths)  # (T,)
    return PackedBatch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos),
                       torch.from_numpy(cu.astype(np.int32)), int(lengths.max()))


def pack_documents(docs: Sequence[tuple[Sequence[int], Sequence[bool]]],
                   ignore_index: int = IGNORE_INDEX) -> PackedBatch:
    """PackedBatch from a list of (token ids, loss mask) documents, e.g. ChatTokenizer.encode_chat outputs."""
    if not docs:
        raise ValueError("pack_documents: no documents")
    tokens = np.concatenate([np.asarray(t, dtype=np.int64) for t, _ in docs])
    mask = np.concatenate([np.asarray(m, dtype=bool) for _, m in docs])
    return pack_arrays(tokens, mask, np.array([len(t) for t, _ in docs]), ignore_index)


def filler_batch(pad_id: int, ignore_index: int = IGNORE_INDEX) -> PackedBatch:
    """A one-token micro-batch with no loss: what a rank runs when its step has fewer documents than
    micro-batch slots, so that every rank still takes part in the same number of FSDP collectives."""
    return PackedBatch(torch.tensor([pad_id], dtype=torch.int64), torch.tensor([ignore_index], dtype=torch.int64),
                       torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1], dtype=torch.int32), 1)
