"""Continuous batching with chunked prefill and preemption by recompute.

Each step gets a token budget (max_num_batched_tokens) and at most max_num_seqs sequences:
1. every running sequence that is decoding gets its one token, oldest first; when the pool has no block
   for it, the newest running sequence is preempted (its blocks freed, back to the front of the queue,
   recomputed later: through the prefix cache, cheaply if its blocks were not reused meanwhile);
2. running sequences still prefilling get the next chunk of their prompt within the budget;
3. waiting sequences are admitted, oldest first, while budget, sequence slots and blocks allow.
A long prompt therefore never stalls decoding: it is fed chunk by chunk alongside the decodes.
The batch lists decodes first, then prefill chunks (the model runner relies on that order).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from skyt1.sample.block_manager import BlockManager
from skyt1.sample.sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)                 # one token each
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)    # (sequence, tokens this step)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def items(self) -> list[tuple[Sequence, int]]:
        return [(s, 1) for s in self.decodes] + self.prefills


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({max_num_seqs}) so every running sequence can decode in one step")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        while True:
            batch = self._schedule_once()
            if not batch.empty or not self.running:
                return batch
            # Every running sequence is mid-prefill and the pool is full: free the newest so the
            # others can finish (the pool holds any one sequence alone: checked at engine start).
            self._preempt(self.running[-1])

    def _schedule_once(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1. decodes
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.num_remaining != 1:
                i += 1
                continue
            while not self.bm.grow(seq, 1, partial_ok=False):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.decodes.append(seq)
                budget -= 1
                i += 1
                continue
            break  # seq preempted itself: it was the last running sequence
        # 2. running prefills (chunked)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_remaining > 1:
                n = self.bm.grow(seq, min(seq.num_remaining, budget), partial_ok=True)
                if n:
                    batch.prefills.append((seq, n))
                    budget -= n
        # 3. admissions
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.bm.match_prefix(seq)
            n = self.bm.grow(seq, min(seq.num_remaining, budget), partial_ok=False)
            if not n:
                self.bm.free_seq(seq)  # give back the prefix blocks it matched; wait for memory
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.prefills.append((seq, n))
            budget -= n
        return batch
