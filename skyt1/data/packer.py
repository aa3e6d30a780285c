"""The packer: each optimizer step's samples, packed into micro-batches of at most `token_budget` tokens,
the same number of micro-batches on every rank, tokens balanced across them.

An epoch is a seeded permutation of the documents cut into steps of `samples_per_step` (the last step
holds the remainder unless drop_last), so the samples of every step are what an unpacked run with the
same seed would see; packing only changes how a step's samples are laid out on the ranks.

Opt-in (step_tokens > 0): a step is a run of consecutive documents of the permutation holding about
step_tokens tokens. The epoch's tokens are cut into ceil(total / step_tokens) steps (the same count in
every epoch) at the documents where the running sum crosses each multiple of total / steps. A step of
k x world x budget tokens then fills close to k micro-batches per rank however many ranks there are,
where a fixed sample count leaves each rank fewer samples, and fewer micro-batches to pack them into,
as ranks are added (bench/packing.py measures both).

Per step: best-fit decreasing gives the fewest bins it can (m); the bin count is rounded up to a
multiple of world_size (M). Then the step is re-packed into exactly M bins by longest-processing-time
(each document, longest first, into the least-loaded bin), which balances the bins whenever it fits the
budget; when it does not, the best-fit bins are kept and evened out by moving documents from the fullest
bin to the emptiest. Bins are dealt to ranks in "slots" (the j-th micro-batch of every rank), heaviest
slot first, each slot's heaviest bin to the rank with the fewest tokens so far. Balance matters per slot
and not only per rank: under FSDP the ranks run the j-th micro-batches in lockstep (every layer's
all-gather), so a step costs the sum over slots of the slowest rank's micro-batch.
"""
from __future__ import annotations

import heapq
from bisect import bisect_left
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepPlan:
    epoch: int
    step: int
    doc_ids: np.ndarray                                  # (S,) the step's documents, in epoch order
    micro_batches: tuple[tuple[np.ndarray, ...], ...]    # [rank][j] -> document ids; empty = filler
    loss_tokens: int                                     # loss tokens of the whole step, all ranks
    tokens: int                                          # tokens of the whole step, all ranks

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per rank (the same on every rank)."""
        return len(self.micro_batches[0])


def pack_step(lengths: list[int], token_budget: int, world_size: int) -> list[list[list[int]]]:
    """Pack documents of the given lengths into per-rank micro-batches.

    Returns plan[rank][j] = list of indices into `lengths`; every rank gets the same number of
    micro-batches, each holding at most token_budget tokens (a list may be empty when there are fewer
    documents than micro-batch slots). Deterministic: ties are broken by index.
    """
    n = len(lengths)
    if n == 0:
        return [[[]] for _ in range(world_size)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    if lengths[order[0]] > token_budget:
        raise ValueError(f"a document of {lengths[order[0]]} tokens exceeds the token budget {token_budget}")
    bins = _best_fit_decreasing(lengths, order, token_budget)
    # Best fit decreasing lands on the volume bound or one bin above it; a swap-based repair and
    # randomised re-orderings were tried and saved almost none of those bins at these lengths.
    m = -(-len(bins) // world_size) * world_size
    packed = _lpt(lengths, order, token_budget, m)
    if packed is None:
        packed = bins + [[] for _ in range(m - len(bins))]
        _even_out(packed, lengths, token_budget)
    return _deal_to_ranks(packed, lengths, world_size)


def _best_fit_decreasing(lengths: list[int], order: list[int], budget: int) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []   # sorted free space of open bins
    ids: list[int] = []    # bin index for each entry of `free`
    for i in order:
        length = lengths[i]
        k = bisect_left(free, length)  # the tightest bin it fits in
        if k == len(free):
            b, room = len(bins), budget - length
            bins.append([i])
        else:
            b, room = ids[k], free[k] - length
            del free[k], ids[k]
            bins[b].append(i)
        if room > 0:
            k = bisect_left(free, room)
            free.insert(k, room)
            ids.insert(k, b)
    return bins


def _lpt(lengths: list[int], order: list[int], budget: int, m: int) -> list[list[int]] | None:
    heap = [(0, b) for b in range(m)]
    bins: list[list[int]] = [[] for _ in range(m)]
    for i in order:
        load, b = heap[0]
        if load + lengths[i] > budget:
            return None  # the least-loaded bin cannot take it, so none can
        bins[b].append(i)
        heapq.heapreplace(heap, (load + lengths[i], b))
    return bins


def _even_out(bins: list[list[int]], lengths: list[int], budget: int) -> None:
    """Move documents from the fullest to the emptiest bin while that lowers the fullest load."""
    loads = [sum(lengths[i] for i in b) for b in bins]
    for _ in range(4 * sum(len(b) for b in bins)):
        h = max(range(len(bins)), key=lambda b: (loads[b], -b))
        g = min(range(len(bins)), key=lambda b: (loads[b], b))
        gap = loads[h] - loads[g]
        best = None
        for pos, i in enumerate(bins[h]):
            d = lengths[i]
            # A move helps when the doc is shorter than the gap; the best leaves the two loads closest.
            if d < gap and loads[g] + d <= budget and (best is None or abs(gap - 2 * d) < abs(gap - 2 * best[1])):
                best = (pos, d)
        if best is None:
            return
        i = bins[h].pop(best[0])
        bins[g].append(i)
        loads[h] -= best[1]
        loads[g] += best[1]


def _deal_to_ranks(bins: list[list[int]], lengths: list[int], world_size: int) -> list[list[list[int]]]:
    loads = [sum(lengths[i] for i in b) for b in bins]
    order = sorted(range(len(bins)), key=lambda b: (-loads[b], bins[b][0] if bins[b] else len(lengths)))
    plan: list[list[list[int]]] = [[] for _ in range(world_size)]
    rank_tokens = [0] * world_size
    for s in range(0, len(order), world_size):
        ranks = sorted(range(world_size), key=lambda r: (rank_tokens[r], r))
        for r, b in zip(ranks, order[s:s + world_size]):
            plan[r].append(bins[b])
            rank_tokens[r] += loads[b]
    return plan


class Packer:
    """Plans every step of every epoch for one dataset; identical on all ranks (no communication).

    lengths (N,) and loss_tokens (N,) per document; seed and epoch fix the order.
    """

    def __init__(self, lengths: np.ndarray, loss_tokens: np.ndarray, *, seed: int, samples_per_step: int,
                 token_budget: int, world_size: int = 1, drop_last: bool = False, step_tokens: int = 0):
        self.lengths = np.asarray(lengths, dtype=np.int64)       # (N,)
        self.loss_tokens = np.asarray(loss_tokens, dtype=np.int64)  # (N,)
        n = len(self.lengths)
        if self.loss_tokens.shape != (n,):
            raise ValueError(f"loss_tokens has shape {self.loss_tokens.shape}, lengths ({n},)")
        for name, v in (("samples_per_step", samples_per_step), ("token_budget", token_budget),
                        ("world_size", world_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if n and self.lengths.max() > token_budget:
            i = int(self.lengths.argmax())
            raise ValueError(f"document {i} has {int(self.lengths[i])} tokens, more than token_budget "
                             f"{token_budget}; rebuild the dataset with --max-seq-len <= {token_budget} "
                             "or raise the budget")
        self.seed, self.samples_per_step, self.token_budget = int(seed), int(samples_per_step), int(token_budget)
        self.world_size, self.drop_last = int(world_size), bool(drop_last)
        if not isinstance(step_tokens, (int, np.integer)) or step_tokens < 0:
            raise ValueError(f"step_tokens must be a non-negative integer, got {step_tokens!r}")
        self.step_tokens = int(step_tokens)
        if self.step_tokens:
            self.steps_per_epoch = min(n, -(-int(self.lengths.sum()) // self.step_tokens))
        else:
            self.steps_per_epoch = n // self.samples_per_step if drop_last else -(-n // self.samples_per_step)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} documents make no step of {samples_per_step} samples (drop_last={drop_last})")
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._bounds_cache: tuple[int, np.ndarray] | None = None

    def step_bounds(self, epoch: int) -> np.ndarray:
        """(steps + 1,) offsets into epoch_order(epoch): step s holds order[bounds[s]:bounds[s + 1]]."""
        k = self.steps_per_epoch
        if not self.step_tokens:
            s = self.samples_per_step
            return np.minimum(np.arange(k + 1, dtype=np.int64) * s, len(self.lengths))
        if self._bounds_cache is None or self._bounds_cache[0] != epoch:
            cs = np.cumsum(self.lengths[self.epoch_order(epoch)])  # (N,)
            targets = np.arange(1, k, dtype=np.float64) * (cs[-1] / k)  # (k-1,)
            cuts = np.searchsorted(cs, targets, side="left") + 1       # the document crossing a target closes it
            n, prev = len(cs), 0
            for i in range(k - 1):  # never an empty step, and enough documents left for the steps after
                cuts[i] = prev = min(max(int(cuts[i]), prev + 1), n - (k - 1 - i))
            self._bounds_cache = (epoch, np.concatenate([[0], cuts, [n]]).astype(np.int64))
        return self._bounds_cache[1]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) the seeded permutation of document ids for this epoch."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, int(epoch)])
            self._order_cache = (epoch, rng.permutation(len(self.lengths)))
        return self._order_cache[1]

    def step_docs(self, epoch: int, step: int) -> np.ndarray:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} out of range [0, {self.steps_per_epoch})")
        b = self.step_bounds(epoch)
        return self.epoch_order(epoch)[b[step]:b[step + 1]]

    def plan(self, epoch: int, step: int) -> StepPlan:
        docs = self.step_docs(epoch, step)            # (S,)
        lengths = self.lengths[docs]                  # (S,)
        per_rank = pack_step(lengths.tolist(), self.token_budget, self.world_size)
        mbs = tuple(tuple(docs[np.asarray(b, dtype=np.int64)] for b in rank) for rank in per_rank)
        return StepPlan(epoch, step, docs, mbs, int(self.loss_tokens[docs].sum()), int(lengths.sum()))

    def plan_epoch(self, epoch: int) -> list[StepPlan]:
        return [self.plan(epoch, s) for s in range(self.steps_per_epoch)]


def packing_report(plans: list[StepPlan], lengths: np.ndarray, token_budget: int) -> dict:
    """Efficiency figures of planned steps.

    slot_efficiency: real tokens / (micro-batches x budget), what padding every micro-batch to the budget
    would waste. lockstep_efficiency: real tokens / (world_size x sum over slots of the largest micro-batch
    in that slot), the fraction of rank-time doing real tokens when ranks run slots in lockstep.
    """
    tokens = mbs = filler = 0
    lockstep = 0
    world = len(plans[0].micro_batches)
    for p in plans:
        tokens += p.tokens
        k = p.num_micro_batches
        mbs += k * world
        for j in range(k):
            loads = [int(lengths[p.micro_batches[r][j]].sum()) for r in range(world)]
            filler += sum(1 for r in range(world) if len(p.micro_batches[r][j]) == 0)
            lockstep += max(loads)
    samples = sum(len(p.doc_ids) for p in plans)
    return {
        "steps": len(plans), "samples": samples, "tokens": tokens, "micro_batches": mbs,
        "micro_batches_unpacked": samples, "filler_micro_batches": filler,
        "slot_efficiency": tokens / (mbs * token_budget), "lockstep_efficiency": tokens / (world * lockstep),
        "micro_batches_per_rank_per_step": mbs / world / len(plans),
    }
