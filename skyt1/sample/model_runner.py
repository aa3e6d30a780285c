"""Model runner: the KV pool, one step's inputs, the forward, and CUDA graphs for decode.

The pool is one tensor (2, layers, num_blocks + 1, block_size, Hkv, D); the extra last block is a
scratch page where the padding rows of a CUDA graph write their K/V, so no kernel needs a "skip" slot.
On CUDA its size comes from free memory after a profiling forward at the largest step (and a sampler
pass at max_num_seqs), times gpu_memory_utilization; on CPU it is given (or holds max_model_len tokens,
at least 16K).

Only each sequence's last token needs logits: the final hidden states (after model.norm) are indexed
at those rows before model.logits, so a 8K-token prefill step computes a handful of vocab rows.

A step is planned as host data only (plan(): token ids, positions, slots, block tables) and then run
(run_plan(): device tensors, forward, logits); with tensor parallelism rank 0 plans and broadcasts the plan,
and every rank runs it on its own shard (skyt1/sample/tp.py).

Pure-decode steps replay a CUDA graph captured per batch size (1, 2, 4, 8, then multiples of 16 up to
max_num_seqs); the batch is padded to the next captured size, padding rows have context length 0 and
write into the scratch page. Mixed or prefill steps run eagerly.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from skyt1.kernels.paged_attention import choose_num_splits
from skyt1.model import Transformer
from skyt1.sample.attn_backend import (AttnMetadata, PagedAttention, available_decode_backends,
                                       available_prefill_backends, check_decode_backend, check_prefill_backend)
from skyt1.sample.scheduler import ScheduledBatch
from skyt1.sample.sequence import Sequence


@dataclass
class StepPlan:
    """One step as host data only: what rank 0 broadcasts to the other tensor-parallel ranks."""
    md: AttnMetadata               # scalars filled, tensors None (built from `cpu` on each rank)
    cpu: dict                      # host tensors / arrays of the step
    sample_rows: list[int]         # rows of the hidden states to sample from
    use_graph: bool


@dataclass
class StepInputs:
    input_ids: torch.Tensor        # (T,) int64
    positions: torch.Tensor        # (T,) int64
    md: AttnMetadata
    sample_rows: torch.Tensor      # (B,) int64 rows of the hidden states to sample from
    sample_seqs: list[Sequence]
    cpu: dict                      # host copies the CUDA-graph path copies into its static buffers


def kv_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: Transformer, *, block_size: int, num_blocks: int, max_num_seqs: int,
                 max_model_len: int, enforce_eager: bool, decode_backend: str | None,
                 prefill_backend: str | None, varlen_backend: str | None = None, tp=None):
        self.model = model
        self.tp = tp  # tp.TPGroup: rank 0 broadcasts each step's plan to the others; None: one device
        self.cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        c = self.cfg
        decode_backend = self._pick_backend("decode", decode_backend,
                                            available_decode_backends(self.device, block_size), check_decode_backend)
        prefill_backend = self._pick_backend("prefill", prefill_backend,
                                             available_prefill_backends(self.device, block_size), check_prefill_backend)
        self.kv_cache = torch.zeros(2, c.num_hidden_layers, num_blocks + 1, block_size, c.num_key_value_heads,
                                    c.head_dim, device=self.device, dtype=self.dtype)
        self.scratch_slot = num_blocks * block_size  # first slot of the scratch page
        self.attn = PagedAttention(self.kv_cache, decode_backend, prefill_backend, varlen_backend)
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 1)
        self._pin = self.device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph | _EagerGraph] = {}
        self.graph_sizes: list[int] = []
        # The PyTorch decode paths gather every table column: fine eagerly, far too big at the fixed
        # max_model_len width a graph needs. Graphs are for the kernels.
        if self.device.type == "cuda" and not enforce_eager and decode_backend not in ("torch", "sdpa"):
            self.capture_cudagraphs()

    def _pick_backend(self, kind: str, asked: str | None, available: list[str], check) -> str:
        """The asked backend, or the first available one that passes its start-up check on CUDA (the CPU
        fallbacks are the references themselves). A backend asked for by name must pass, or we stop."""
        if asked is not None and asked not in available:
            raise ValueError(f"{kind} attention backend {asked!r} is not available on {self.device} with "
                             f"block_size {self.block_size}; available: {available}")
        c = self.cfg
        for name in [asked] if asked else available:
            if self.device.type != "cuda" or name in ("torch", "sdpa", "gather"):
                return name
            why = check(name, self.device, self.dtype, self.block_size, c.num_attention_heads,
                        c.num_key_value_heads, c.head_dim)
            if why is None:
                return name
            if asked:
                raise RuntimeError(f"{kind} attention backend {asked!r} failed its start-up check: {why}")
            print(f"warning: {kind} attention backend {name!r} failed its start-up check ({why}); trying the next",
                  file=sys.stderr)
        return available[-1]

    # -- inputs ------------------------------------------------------------------------------------
    def _to_device(self, data, dtype) -> torch.Tensor:
        t = torch.as_tensor(data, dtype=dtype)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def decode_num_splits(self, batch: int) -> int:
        if self.attn.decode_backend not in ("triton", "triton-page"):
            return 1
        return choose_num_splits(batch, self.cfg.num_key_value_heads, self.max_model_len, self.num_sms)

    def plan(self, batch: ScheduledBatch) -> tuple[StepPlan, list[Sequence]]:
        """The step's inputs as host data (rank 0), and the sequences that sample a token."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        md = AttnMetadata(slot_mapping=None)
        cpu: dict = {}
        # decodes: one token at position num_computed_tokens
        if batch.decodes:
            lens, tables = [], []
            for row, seq in enumerate(batch.decodes):
                p = seq.num_computed_tokens
                ids.append(seq.token_ids[p])
                pos.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
                lens.append(p + 1)
                tables.append(seq.block_table)
                sample_rows.append(row)
                sample_seqs.append(seq)
            cpu["block_tables"] = torch.from_numpy(_table_array(tables))
            cpu["context_lens"] = torch.tensor(lens, dtype=torch.int32)
            md.num_decodes = len(batch.decodes)
            md.decode_num_splits = self.decode_num_splits(md.num_decodes)
        # prefill chunks: tokens [c, c + n) of each sequence, keys [0, c + n)
        if batch.prefills:
            cu_q, cu_k = [0], [0]
            gather: list[np.ndarray] = []
            tables = []
            T = len(ids)
            for seq, n in batch.prefills:
                c = seq.num_computed_tokens
                ids.extend(seq.token_ids[c:c + n])
                p = np.arange(c, c + n)
                pos.extend(p.tolist())
                table = np.asarray(seq.block_table, dtype=np.int64)
                slots.extend((table[p // bs] * bs + p % bs).tolist())
                cu_q.append(cu_q[-1] + n)
                cu_k.append(cu_k[-1] + c + n)
                md.max_seqlen_q = max(md.max_seqlen_q, n)
                md.max_seqlen_k = max(md.max_seqlen_k, c + n)
                md.has_prefix |= c > 0
                pk = np.arange(c + n)
                gather.append(table[pk // bs] * bs + pk % bs)
                tables.append(seq.block_table)
                T += n
                if c + n == seq.num_tokens:  # the chunk ends the known tokens: sample the next one
                    sample_rows.append(T - 1)
                    sample_seqs.append(seq)
            md.num_prefills = len(batch.prefills)
            cpu["cu_seqlens_q"] = cu_q
            cpu["cu_seqlens_k"] = cu_k
            if md.has_prefix:
                if self.attn.prefill_backend == "gather":
                    cpu["kv_gather_slots"] = np.concatenate(gather)
                else:
                    cpu["prefill_block_tables"] = _table_array(tables)
                    cpu["prefill_seqused_k"] = np.diff(cu_k)
        cpu["input_ids"] = torch.tensor(ids, dtype=torch.int64)
        cpu["positions"] = torch.tensor(pos, dtype=torch.int64)
        cpu["slot_mapping"] = torch.tensor(slots, dtype=torch.int64)
        use_graph = bool(self.graphs) and not batch.prefills and len(batch.decodes) <= self.graph_sizes[-1]
        return StepPlan(md, cpu, sample_rows, use_graph), sample_seqs

    def inputs(self, plan: StepPlan) -> StepInputs:
        """The plan's device tensors (every rank)."""
        md, cpu = dataclasses.replace(plan.md), plan.cpu
        if md.num_prefills:
            md.cu_seqlens_q = self._to_device(cpu["cu_seqlens_q"], torch.int32)
            md.cu_seqlens_k = self._to_device(cpu["cu_seqlens_k"], torch.int32)
            if "kv_gather_slots" in cpu:
                md.kv_gather_slots = self._to_device(cpu["kv_gather_slots"], torch.int64)
            if "prefill_block_tables" in cpu:
                md.prefill_block_tables = self._to_device(cpu["prefill_block_tables"], torch.int32)
                md.prefill_seqused_k = self._to_device(cpu["prefill_seqused_k"], torch.int32)
        if not plan.use_graph:
            md.slot_mapping = self._to_device(cpu["slot_mapping"], torch.int64)
            if md.num_decodes:
                md.decode_block_tables = self._to_device(cpu["block_tables"], torch.int32)
                md.decode_context_lens = self._to_device(cpu["context_lens"], torch.int32)
        return StepInputs(
            input_ids=self._to_device(cpu["input_ids"], torch.int64),
            positions=self._to_device(cpu["positions"], torch.int64),
            md=md,
            sample_rows=self._to_device(plan.sample_rows, torch.int64),
            sample_seqs=[],
            cpu=cpu,
        )

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        plan, seqs = self.plan(batch)
        inp = self.inputs(plan)
        inp.sample_seqs = seqs
        return inp

    # -- forward -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step; logits (B, V) of the sequences that sample a token now, and those sequences.
        With tensor parallelism (rank 0) the plan goes to the other ranks first, which run it too."""
        plan, seqs = self.plan(batch)
        if self.tp is not None:
            from skyt1.sample.tp import broadcast_plan

            broadcast_plan(self.tp, plan)
        return self.run_plan(plan), seqs

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan) -> torch.Tensor:
        """The forward of one planned step: logits (B, V) of its sampling rows (every rank)."""
        inp = self.inputs(plan)
        if plan.use_graph:
            hidden = self._replay(inp)  # (Bd, H)
        else:
            self.attn.md = inp.md
            hidden = self.model(inp.input_ids, inp.positions, inp.md.cu_seqlens_q, attn=self.attn)  # (T, H)
        if not plan.sample_rows:
            return hidden.new_empty(0, self.cfg.vocab_size)
        if hidden.shape[0] != len(plan.sample_rows):
            hidden = hidden.index_select(0, inp.sample_rows)  # (B, H)
        return self.model.logits(hidden)  # (B, V)

    # -- CUDA graphs -------------------------------------------------------------------------------
    def capture_cudagraphs(self) -> None:
        """One graph per batch size over static buffers. Without CUDA (tests) each "graph" runs the same
        function eagerly on the same buffers, which exercises everything but the capture itself."""
        max_bs = self.max_num_seqs
        sizes = sorted({s for s in [1, 2, 4, 8, *range(16, max_bs + 1, 16), max_bs] if s <= max_bs})
        M = self.max_blocks_per_seq
        dev = self.device
        cuda = dev.type == "cuda"
        self._g_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._g_pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._g_slots = torch.full((max_bs,), self.scratch_slot, dtype=torch.int64, device=dev)
        self._g_tables = torch.zeros(max_bs, M, dtype=torch.int32, device=dev)
        self._g_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self._g_hidden = torch.zeros(max_bs, self.cfg.hidden_size, dtype=self.dtype, device=dev)
        pool = None
        with torch.inference_mode():
            for size in reversed(sizes):  # largest first, so smaller graphs reuse its memory pool
                md = AttnMetadata(slot_mapping=self._g_slots[:size], num_decodes=size,
                                  decode_block_tables=self._g_tables[:size], decode_context_lens=self._g_lens[:size],
                                  decode_num_splits=self.decode_num_splits(size))

                def run(size=size, md=md):
                    md.decode_sdpa_mask = None  # per-step state: the buffers' contents change between replays
                    self.attn.md = md
                    self._g_hidden[:size] = self.model(self._g_ids[:size], self._g_pos[:size], None, attn=self.attn)

                if not cuda:
                    self.graphs[size] = _EagerGraph(run)
                    continue
                run()  # warm-up: compiles the Triton kernels, settles allocations outside the graph
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    run()
                pool = graph.pool() if pool is None else pool
                self.graphs[size] = graph
        if cuda:
            torch.cuda.synchronize(dev)
        self.graph_sizes = sizes

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self._pin else t

    def _replay(self, inp: StepInputs) -> torch.Tensor:
        B = inp.md.num_decodes
        size = next(s for s in self.graph_sizes if s >= B)
        cpu = inp.cpu
        width = cpu["block_tables"].shape[1]
        self._g_ids[:B].copy_(inp.input_ids)
        self._g_pos[:B].copy_(inp.positions)
        self._g_slots[:B].copy_(self._host(cpu["slot_mapping"]), non_blocking=True)
        self._g_lens[:B].copy_(self._host(cpu["context_lens"]), non_blocking=True)
        # Columns past `width` keep stale ids: kernels read only the pages a context length covers.
        self._g_tables[:B, :width].copy_(self._host(cpu["block_tables"]), non_blocking=True)
        if size > B:  # padding rows: no keys, K/V written to the scratch page
            self._g_slots[B:size].fill_(self.scratch_slot)
            self._g_lens[B:size].zero_()
        self.graphs[size].replay()
        return self._g_hidden[:B]


def _table_array(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one (B, max len) int32 array, zero-padded."""
    width = max(map(len, tables))
    return np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)


class _EagerGraph:
    """The CPU stand-in for a captured graph: replay() reruns the function on the static buffers."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self) -> None:
        self.fn()
