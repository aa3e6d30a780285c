"""Per-rank loader of packed micro-batches, one optimizer step at a time.

    loader = build_loader(data_dir, seed=0, samples_per_step=96, token_budget=16384, rank=r, world_size=w)
    for epoch in range(loader.epoch, epochs):
        for step in loader.epoch_iter(epoch):
            step.loss_tokens          # global loss-token count of the step, known before any micro-batch
            for mb in step.micro_batches:   # PackedBatch, pinned when CUDA is available
                mb = mb.to("cuda", non_blocking=True)
        ...
    state = loader.state_dict()          # {"epoch", "step"}: the next step to yield; save with the checkpoint
    loader.load_state_dict(state)        # epoch_iter(state["epoch"]) then resumes at state["step"]

Every rank builds the same plan from (seed, epoch) with no communication and keeps its own slice. A
background thread assembles and pins the next steps while the current one trains.

Context parallelism (cp > 1): rank / world_size are the data-parallel rank and size (ParallelMesh.dp_rank,
MeshShape.dp_size); the cp ranks of a group get the same micro-batches, each split into its zigzag
share (skyt1.context_parallel.shard_batch), so token_budget is the group's budget and each rank holds
about token_budget / cp tokens.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from skyt1.context_parallel import shard_batch, zigzag_chunks
from skyt1.data.batch import IGNORE_INDEX, PackedBatch, filler_batch, pack_arrays
from skyt1.data.dataset import TokenDataset
from skyt1.data.packer import Packer, StepPlan


@dataclass(frozen=True)
class StepBatch:
    """This rank's share of one optimizer step."""

    epoch: int
    step: int                          # index within the epoch
    loss_tokens: int                   # loss tokens of the whole step across all ranks: the loss denominator
    num_samples: int                   # samples in the whole step
    micro_batches: list[PackedBatch]   # this rank's; the same count on every rank
    tokens: int                        # tokens in this rank's micro-batches (fillers excluded)
    doc_lengths: np.ndarray            # (S,) lengths of the whole step's documents, all ranks (for FLOP counts)


class PackedLoader:
    def __init__(self, dataset: TokenDataset, *, seed: int, samples_per_step: int, token_budget: int,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, pin_memory: bool | None = None,
                 prefetch: int = 2, ignore_index: int = IGNORE_INDEX, cp: int = 1, cp_rank: int = 0,
                 step_tokens: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if not 0 <= cp_rank < cp:
            raise ValueError(f"cp_rank {cp_rank} is not in [0, cp={cp})")
        max_seq_len = dataset.meta["options"]["max_seq_len"]
        if max_seq_len > token_budget:
            raise ValueError(f"{dataset.path} was built with max_seq_len {max_seq_len} > token_budget {token_budget}: "
                             f"a document may not fit a micro-batch; rebuild with --max-seq-len <= {token_budget}")
        self.dataset = dataset
        self.packer = Packer(dataset.lengths, dataset.loss_tokens, seed=seed, samples_per_step=samples_per_step,
                             token_budget=token_budget, world_size=world_size, drop_last=drop_last,
                             step_tokens=step_tokens)
        self.rank, self.world_size = rank, world_size
        self.cp, self.cp_rank = cp, cp_rank
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch = max(1, prefetch)
        self.ignore_index = ignore_index
        self.epoch, self.step = 0, 0   # the next step to yield

    @property
    def steps_per_epoch(self) -> int:
        return self.packer.steps_per_epoch

    def state_dict(self) -> dict:
        p = self.packer
        return {"epoch": self.epoch, "step": self.step, "seed": p.seed, "samples_per_step": p.samples_per_step,
                "num_docs": len(p.lengths), "drop_last": p.drop_last, "step_tokens": p.step_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Resume at (epoch, step). The sample order depends on seed, samples_per_step, the dataset and
        drop_last, which must match; world size and token budget may change (same samples per step)."""
        mine = self.state_dict()
        for k in ("seed", "samples_per_step", "num_docs", "drop_last", "step_tokens"):
            if state.get(k, 0 if k == "step_tokens" else mine[k]) != mine[k]:
                raise ValueError(f"loader state has {k}={state[k]!r}, this loader {mine[k]!r}: "
                                 "resuming would not replay the same samples")
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise ValueError(f"loader state step {step} is not in [0, {self.steps_per_epoch}) or epoch {epoch} < 0")
        self.epoch, self.step = epoch, step

    def plan(self, epoch: int, step: int) -> StepPlan:
        return self.packer.plan(epoch, step)

    def make_step(self, epoch: int, step: int) -> StepBatch:
        """Assemble this rank's micro-batches of one step (what the prefetch thread runs)."""
        plan = self.packer.plan(epoch, step)
        mbs, tokens = [], 0
        for doc_ids in plan.micro_batches[self.rank]:
            if len(doc_ids) == 0:
                mb = filler_batch(self.dataset.pad_id, self.ignore_index)
            else:
                toks, mask, lengths = self.dataset.gather(doc_ids)
                mb = pack_arrays(toks, mask, lengths, self.ignore_index)
                tokens += mb.num_tokens if self.cp == 1 else sum(
                    e - a for n in lengths.tolist() for a, e in zigzag_chunks(n, self.cp)[self.cp_rank])
            if self.cp > 1:
                mb = shard_batch(mb, self.cp, self.cp_rank, self.dataset.pad_id, self.ignore_index)
            mbs.append(mb.pin_memory() if self.pin_memory else mb)
        return StepBatch(epoch, step, plan.loss_tokens, len(plan.doc_ids), mbs, tokens,
                         self.packer.lengths[plan.doc_ids])

    def epoch_iter(self, epoch: int) -> Iterator[StepBatch]:
        """Steps of `epoch`, from the saved position when it is the current epoch, else from step 0."""
        if epoch == self.epoch:
            start = self.step
        else:
            start = 0
            self.epoch, self.step = epoch, 0
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for s in range(start, self.steps_per_epoch):
                    item = self.make_step(epoch, s)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_END)
            except BaseException as e:  # hand the failure to the consumer
                q.put(_Failure(e))

        worker = threading.Thread(target=produce, name=f"skyt1-loader-r{self.rank}", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                # Advance first: a checkpoint taken after this step trains must resume at the next one.
                self.epoch, self.step = (epoch, item.step + 1) if item.step + 1 < self.steps_per_epoch else (epoch + 1, 0)
                yield item
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

    def iter_steps(self, epochs: int) -> Iterator[StepBatch]:
        """Every remaining step from the current position up to the end of epoch `epochs - 1`."""
        while self.epoch < epochs:
            yield from self.epoch_iter(self.epoch)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def build_loader(data_dir: str | Path, *, seed: int, samples_per_step: int, token_budget: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, pin_memory: bool | None = None, prefetch: int = 2,
                 ignore_index: int = IGNORE_INDEX, expect_tokenizer_hash: str | None = None, cp: int = 1,
                 cp_rank: int = 0, step_tokens: int = 0) -> PackedLoader:
    """Open a built dataset and return this rank's loader. expect_tokenizer_hash (ChatTokenizer.hash) makes a
    dataset built with another tokenizer an error instead of silent garbage."""
    ds = TokenDataset(data_dir, expect_tokenizer_hash=expect_tokenizer_hash)
    return PackedLoader(ds, seed=seed, samples_per_step=samples_per_step, token_budget=token_budget, rank=rank,
                        world_size=world_size, drop_last=drop_last, pin_memory=pin_memory, prefetch=prefetch,
                        ignore_index=ignore_index, cp=cp, cp_rank=cp_rank, step_tokens=step_tokens)


def loss_token_count(batch: PackedBatch, ignore_index: int = IGNORE_INDEX) -> int:
    """Labels that count in a micro-batch (a host sync: for tests and logging, not the hot loop)."""
    return int((batch.labels != ignore_index).sum())

