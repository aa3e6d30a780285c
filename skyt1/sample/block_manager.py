"""KV block manager: a fixed pool of blocks, reference counts, and a hash-based prefix cache.

A full block is identified by the chained hash of its tokens and of every token before it
(hash(previous block's hash, its tokens)), so two sequences with the same prefix find the same blocks.
A block whose reference count drops to 0 goes to the free list but keeps its hash: it can be reused by
a later request with the same prefix (or by a preempted sequence recomputing itself) until the pool
hands it out again, oldest-freed first.

A block's hash is registered when it is scheduled to become full. Its K/V is written during that same
step; another sequence of the same step may already read it, which is safe because every layer writes
all new K/V into the cache before any attention of that layer reads it.

Only blocks strictly before the last prompt token are reused: the last token must be computed to get
the logits of the next one, and never writing into a shared block keeps shared blocks immutable.
"""
from __future__ import annotations

from collections import OrderedDict

from skyt1.sample.sequence import Sequence


def block_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks        # registered hash of a full block
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # its tokens, to rule out collisions
        self.cached: dict[int, int] = {}                           # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.num_prefix_hits = 0  # blocks reused from the cache since start (statistics)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation --------------------------------------------------------------------------------
    def _take(self) -> int:
        bid, _ = self.free.popitem(last=False)
        h = self.hashes[bid]
        if h is not None:  # evict its cache entry: the block gets new content
            if self.cached.get(h) == bid:
                del self.cached[h]
            self.hashes[bid] = None
            self.tokens[bid] = None
        self.ref_counts[bid] = 1
        return bid

    def _release(self, bid: int) -> None:
        self.ref_counts[bid] -= 1
        assert self.ref_counts[bid] >= 0, f"block {bid} released more often than taken"
        if self.ref_counts[bid] == 0:
            self.free[bid] = None

    def match_prefix(self, seq: Sequence) -> int:
        """For a sequence with no blocks: take every cached block of its prefix (never the block holding
        its last token). Sets num_computed_tokens and returns how many tokens were found."""
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        prev = None
        for j in range((seq.num_tokens - 1) // bs):
            toks = tuple(seq.token_ids[j * bs:(j + 1) * bs])
            h = block_hash(prev, toks)
            bid = self.cached.get(h)
            if bid is None or self.tokens[bid] != toks:
                break
            if self.ref_counts[bid] == 0:
                del self.free[bid]
            self.ref_counts[bid] += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(h)
            prev = h
        self.num_prefix_hits += len(seq.block_table)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def grow(self, seq: Sequence, num_new: int, partial_ok: bool) -> int:
        """Make room for the next num_new tokens of seq. Returns how many fit: num_new, or with partial_ok
        as many as the free blocks hold (possibly 0), else 0 when not all fit (nothing taken)."""
        bs = self.block_size
        have = len(seq.block_table)
        need = self.blocks_for(seq.num_computed_tokens + num_new) - have
        if need > len(self.free):
            if not partial_ok:
                return 0
            num_new = min(num_new, (have + len(self.free)) * bs - seq.num_computed_tokens)
            if num_new <= 0:
                return 0
            need = self.blocks_for(seq.num_computed_tokens + num_new) - have
        for _ in range(max(0, need)):
            seq.block_table.append(self._take())
        self._register_full(seq, seq.num_computed_tokens + num_new)
        return num_new

    def _register_full(self, seq: Sequence, upto: int) -> None:
        """Hash the blocks of seq that are full once its first `upto` tokens are computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        prev = seq.block_hashes[-1] if seq.block_hashes else None
        for j in range(len(seq.block_hashes), upto // bs):
            toks = tuple(seq.token_ids[j * bs:(j + 1) * bs])
            h = block_hash(prev, toks)
            seq.block_hashes.append(h)
            bid = seq.block_table[j]
            if h not in self.cached:  # else an identical block exists already: keep that one cached
                self.cached[h] = bid
                self.hashes[bid] = h
                self.tokens[bid] = toks
            prev = h

    def free_seq(self, seq: Sequence) -> None:
        # Reverse order: the tail of a sequence is the least likely to be shared, so it is evicted first.
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
