"""The engine (requests in, tokens out, one step at a time) and the offline `LLM` API.

    from skyt1.sample import LLM, SamplingParams
    llm = LLM("path/to/hf_folder", dtype=torch.bfloat16)            # or LLM(model, tokenizer) in memory
    outs = llm.generate(["Hello", [151644, 872, 198]], SamplingParams(temperature=0.7, n=4, seed=1))
    outs[0].outputs[2].text, .token_ids, .finish_reason, .logprobs

LLMEngine.step() schedules, runs the model once, samples, and returns what changed per sample (the
text delta for streaming). Finished sequences free their blocks immediately, so waiting ones join the
next step (continuous batching).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence as Seq

import torch

from skyt1.model import Transformer
from skyt1.sample.block_manager import BlockManager
from skyt1.sample.model_runner import ModelRunner, kv_bytes_per_block
from skyt1.sample.params import SamplingParams, as_params_list, sample_seed
from skyt1.sample.sampling import Sampler, prompt_logprobs
from skyt1.sample.scheduler import Scheduler
from skyt1.sample.sequence import Request, Sequence, TextState
from skyt1.sample.structured import grammar_accept, new_grammar_matcher

# Qwen2.5's generation_config.json: <|im_end|> and <|endoftext|>.
QWEN_EOS_IDS = (151645, 151643)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 256               # sequences per step
    max_num_batched_tokens: int = 8192    # tokens per step (prefill chunk budget)
    max_model_len: int | None = None      # prompt + output; None: the model's max_position_embeddings
    block_size: int | None = None         # tokens per KV block; None: 256 on CUDA, 16 on CPU
    num_kv_blocks: int | None = None      # None: from free GPU memory (CUDA) / max(max_model_len, 16K) tokens (CPU)
    gpu_memory_utilization: float = 0.90  # fraction of the GPU the process may fill, KV pool included
    enforce_eager: bool = False           # no CUDA graphs
    enable_prefix_caching: bool = True
    decode_backend: str | None = None     # "triton" | "triton-page" | "flash" | "sdpa" | "torch"; None: best
    prefill_backend: str | None = None    # "gather" | "torch-paged" | "flash-paged"; None: best available
    seed: int = 0                         # the engine's RNG, used by requests without a seed

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"engine option {name!r} must be a positive integer, got {v!r}")
        for name in ("max_model_len", "block_size", "num_kv_blocks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"engine option {name!r} must be a positive integer or None, got {v!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"engine option 'gpu_memory_utilization' must be in (0, 1], got "
                             f"{self.gpu_memory_utilization!r}")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None        # "stop" | "length" | "abort" | None while running
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": [[id, logprob], ...]}


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0       # prompt tokens served from the prefix cache (first sample)
    prompt_logprobs: list[dict | None] | None = None  # SamplingParams.prompt_logprobs (sampling.prompt_logprobs)


@dataclass
class StepUpdate:
    """What one step did to one sample (streaming)."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str                        # new text (empty without incremental detokenization)
    finished: bool
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig = EngineConfig(),
                 eos_token_ids: Seq[int] | None = None, tp=None):
        """tp: a skyt1.sample.tp.TPGroup when `model` is this rank's tensor-parallel shard (tp.build_tp_model);
        every rank of the group builds the same engine, rank 0 drives it."""
        self.model = model.eval()
        self.tp = tp
        self.tokenizer = tokenizer
        self.config = config
        mcfg = model.cfg
        p = next(model.parameters())
        self.device = p.device
        max_len = config.max_model_len or mcfg.max_position_embeddings
        if max_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                             f"{mcfg.max_position_embeddings}")
        self.max_model_len = max_len
        self.block_size = config.block_size or (256 if self.device.type == "cuda" else 16)
        if eos_token_ids is None:
            eos_token_ids = getattr(tokenizer, "eos_token_ids", None) or QWEN_EOS_IDS
        self.eos_token_ids = tuple(t for t in eos_token_ids if 0 <= t < mcfg.vocab_size)
        num_blocks = config.num_kv_blocks or self._default_num_blocks()
        if tp is not None:  # the scheduler on rank 0 hands out blocks every rank must have
            from skyt1.sample.tp import min_over_group

            num_blocks = min_over_group(tp, num_blocks)
        if num_blocks * self.block_size < max_len:
            raise ValueError(f"the KV pool ({num_blocks} blocks x {self.block_size} tokens) cannot hold one sequence "
                             f"of max_model_len={max_len} tokens; lower max_model_len or add blocks")
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   max(config.max_num_batched_tokens, config.max_num_seqs))
        self.runner = ModelRunner(model, block_size=self.block_size, num_blocks=num_blocks,
                                  max_num_seqs=config.max_num_seqs, max_model_len=max_len,
                                  enforce_eager=config.enforce_eager, decode_backend=config.decode_backend,
                                  prefill_backend=config.prefill_backend, tp=tp)
        self.sampler = Sampler(mcfg.vocab_size, self.device, config.seed)
        self.requests: dict[str, Request] = {}
        self._next_seq_id = 0
        self.num_generated_tokens = 0
        self.num_prefill_tokens = 0  # tokens fed in prefill chunks (prompts and recomputes)

    def describe_kv(self) -> str:
        """The KV budget and the largest batch, for the start-up message."""
        blocks, bs = self.block_manager.num_blocks, self.block_size
        tokens = blocks * bs
        gib = blocks * kv_bytes_per_block(self.model, bs, next(self.model.parameters()).dtype) / 2**30
        tp = self.tp.size if self.tp is not None else 1
        full = tokens // self.max_model_len
        return (f"KV cache: {blocks:,} blocks x {bs} tokens = {tokens:,} tokens ({gib:.2f} GiB"
                + (f" on each of {tp} tensor-parallel ranks" if tp > 1 else "") + "); largest batch: "
                f"{self.config.max_num_seqs} sequences (max_num_seqs), {full} at once at max_model_len "
                f"{self.max_model_len}")

    # -- pool sizing -------------------------------------------------------------------------------
    def _default_num_blocks(self) -> int:
        per_block = kv_bytes_per_block(self.model, self.block_size, next(self.model.parameters()).dtype)
        if self.device.type != "cuda":
            return math.ceil(max(self.max_model_len, 16384) / self.block_size)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        transient = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
        budget = total * self.config.gpu_memory_utilization - (total - free) - transient
        blocks = int(budget // per_block)
        if blocks < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB at "
                               f"gpu_memory_utilization={self.config.gpu_memory_utilization})")
        return blocks

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """The largest step the engine will run: a full prefill budget, then logits and a top-p sampling
        pass over max_num_seqs rows, so the peak transient memory is measured before the pool is sized."""
        cfg = self.config
        tokens = max(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        lens = []
        while sum(lens) < tokens:
            lens.append(min(self.max_model_len, tokens - sum(lens)))
        ids = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=self.device)
        hidden = self.model(ids, pos, cu, max(lens))
        rows = min(cfg.max_num_seqs, tokens)
        logits = self.model.logits(hidden[:rows]).float()
        probs = torch.softmax(logits, -1)
        probs.sort(dim=-1, descending=True)
        torch.empty_like(probs).exponential_()
        del hidden, logits, probs
        torch.cuda.synchronize(self.device)
        # Hand the cached blocks back, so mem_get_info's "used" is weights + context only and the transient
        # peak is not counted twice.
        torch.cuda.empty_cache()

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, sample_indices: Seq[int] | None = None,
                    stream: bool = False) -> Request:
        """Queue a prompt; sample_indices picks which of the n samples to make (default all: 0..n-1),
        e.g. to redo only missing samples on resume (each sample's seed depends on its index)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        V = self.model.cfg.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"request {request_id!r}: prompt token ids out of range [0, {V}): {bad[:5]}")
        budget = self.max_model_len - len(prompt_token_ids)
        if budget < 1 or (params.max_tokens is not None and params.max_tokens > budget):
            raise ValueError(
                f"request {request_id!r}: prompt ({len(prompt_token_ids)} tokens) + max_tokens "
                f"({params.max_tokens}) exceeds the context length max_model_len={self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop strings need a tokenizer")
        if params.logprobs is not None and params.logprobs > V:
            raise ValueError(f"request {request_id!r}: logprobs={params.logprobs} exceeds the vocabulary ({V})")
        if any(t >= V for t, _ in params.logit_bias):
            raise ValueError(f"request {request_id!r}: logit_bias token ids must be in [0, {V})")
        eos = frozenset() if params.ignore_eos else frozenset(self.eos_token_ids)
        stop_ids = frozenset(params.stop_token_ids) | eos
        req = Request(request_id, prompt_token_ids, params, prompt, arrival=time.monotonic())
        if params.prompt_logprobs is not None:  # one dense forward over the prompt, before it is queued
            req.prompt_logprobs = prompt_logprobs(self.model, prompt_token_ids, params.prompt_logprobs)
        indices = range(params.n) if sample_indices is None else sample_indices
        for i in indices:
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(sample_seed(params.seed, i))
            text = None
            if self.tokenizer is not None and (params.stop or stream):
                text = TextState(self._decoder(params), params.stop, params.include_stop_str_in_output)
            seq = Sequence(self._next_seq_id, req, i, params, stop_ids, gen, text)
            if params.grammar is not None:
                seq.grammar_matcher = new_grammar_matcher(params.grammar)
            self._next_seq_id += 1
            req.seqs.append(seq)
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def _decoder(self, params: SamplingParams) -> Callable[[list[int]], str]:
        tok, skip = self.tokenizer, params.skip_special_tokens
        return lambda ids: tok.decode(ids, skip_special_tokens=skip)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[StepUpdate]:
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        logits, seqs = self.runner.execute(batch)
        for seq, n in batch.items():
            seq.num_computed_tokens += n
        self.num_prefill_tokens += sum(n for _, n in batch.prefills)
        if not seqs:
            return []
        res = self.sampler(logits, seqs)
        ids = res.token_ids.tolist()  # the one device->host sync of the step
        lps = None
        if res.logprobs is not None:
            lps = (res.logprobs.tolist(), res.top_ids.tolist() if res.top_ids is not None else None,
                   res.top_logprobs.tolist() if res.top_logprobs is not None else None)
        updates = []
        for j, seq in enumerate(seqs):
            tok = ids[j]
            seq.token_ids.append(tok)
            self.num_generated_tokens += 1
            new_lp = []
            if seq.logprobs is not None:
                k = seq.params.logprobs
                top = [[a, b] for a, b in zip(lps[1][j][:k], lps[2][j][:k])] if k else []
                new_lp = [{"token_id": tok, "logprob": lps[0][j], "top": top}]
                seq.logprobs.extend(new_lp)
            reason = None
            grammar_done = seq.grammar_matcher is not None and grammar_accept(seq.grammar_matcher, tok)
            if tok in seq.stop_ids or grammar_done:
                reason = "stop"
            elif seq.text_state is not None and seq.text_state.append(
                    tok, check_stop=seq.num_output_tokens > seq.params.min_tokens):  # vLLM's min_tokens rule
                reason = "stop"
            if reason is None:
                limit = seq.params.max_tokens
                if (limit is not None and seq.num_output_tokens >= limit) or seq.num_tokens >= self.max_model_len:
                    reason = "length"
            text = ""
            if reason is not None:
                self._finish(seq, reason)
            if seq.text_state is not None:
                text = seq.text_state.take_delta(final=reason is not None)
            updates.append(StepUpdate(seq.request.request_id, seq.index, [tok], text, reason is not None,
                                      reason, new_lp))
        return updates

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        if seq.text_state is not None:
            seq.text_state.finish()
        req = seq.request
        if req.finished:
            self.requests.pop(req.request_id, None)

    # -- results -----------------------------------------------------------------------------------
    def sample_text(self, seq: Sequence) -> str:
        if seq.text_state is not None:
            return seq.text_state.text
        if self.tokenizer is None:
            return ""
        ids = seq.output_token_ids
        if seq.finish_reason == "stop" and ids and ids[-1] in seq.stop_ids:
            ids = ids[:-1]  # the stop token is in token_ids, not in the text
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)

    def request_output(self, req: Request) -> RequestOutput:
        outs = [CompletionOutput(s.index, self.sample_text(s), s.output_token_ids, s.finish_reason, s.logprobs)
                for s in req.seqs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             req.seqs[0].num_cached_tokens if req.seqs else 0, req.prompt_logprobs)

    def stream_samples(self, requests: Iterator[tuple[Any, Request]], window: int | None = None
                       ) -> Iterator[tuple[Any, Sequence]]:
        """Run requests pulled lazily from `requests`, yielding (key, sequence) as each sample finishes.

        `requests` yields (key, request) and adds each request with add_request as it is pulled, so only
        `window` requests (default 4 * max_num_seqs: full batches, bounded memory) are queued at a time,
        however long the input.
        """
        window = window or 4 * self.config.max_num_seqs
        live: dict[str, tuple[Any, Request]] = {}
        exhausted = False
        while True:
            while not exhausted and len(live) < window:
                item = next(requests, None)
                if item is None:
                    exhausted = True
                    break
                live[item[1].request_id] = item
            if not live:
                return
            done = set()
            for u in self.step():
                if not u.finished or u.request_id not in live:
                    continue
                key, req = live[u.request_id]
                yield key, next(s for s in req.seqs if s.index == u.index)
                if req.finished:
                    done.add(u.request_id)  # removed after the step: its other samples may finish in it too
            for rid in done:
                del live[rid]


def read_eos_token_ids(model_dir: str | Path) -> tuple[int, ...] | None:
    """eos_token_id of the checkpoint's generation_config.json (an int or a list), if there is one."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a valid generation_config.json ({e})") from None
    if eos is None:
        return None
    eos = [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
        raise ValueError(f"{path}: field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
    return tuple(eos)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(names)}")
    return names[dtype]


class LLM:
    """Offline batched generation. `model`: a HF checkpoint folder or an in-memory Transformer;
    `tokenizer`: a ChatTokenizer, a folder / tokenizer.json path, or None (then the model folder's
    tokenizer.json if present; without a tokenizer prompts must be token ids and texts are empty)."""

    def __init__(self, model: str | Path | Transformer, tokenizer=None, *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, eos_token_ids: Seq[int] | None = None,
                 tensor_parallel_size: int = 1, **engine_options):
        """tensor_parallel_size=N > 1 (a checkpoint folder only): the model split over N ranks (skyt1/sample/tp.py),
        this process being rank 0 and starting the other N - 1, or, under torchrun, joining its group; on a
        non-zero rank of a torchrun group the constructor follows rank 0's steps until rank 0 closes."""
        from skyt1.tokenizer import ChatTokenizer

        device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        self._tp_spawned = None
        self._counter = 0
        if tensor_parallel_size != 1:
            self._init_tensor_parallel(model, tokenizer, dtype, device, eos_token_ids, tensor_parallel_size,
                                       engine_options)
            return
        if isinstance(model, (str, Path)):
            from skyt1.checkpoint import load_pretrained

            model_dir = Path(model)
            model = load_pretrained(model_dir, dtype=resolve_dtype(dtype, device), device=device)
            if tokenizer is None and (model_dir / "tokenizer.json").is_file():
                tokenizer = model_dir
            if eos_token_ids is None:
                eos_token_ids = read_eos_token_ids(model_dir)
        elif not isinstance(model, Transformer):
            raise TypeError(f"model must be a checkpoint folder or a skyt1 Transformer, got {type(model).__name__}")
        elif dtype is not None or device.type != next(model.parameters()).device.type:
            model = model.to(device=device, dtype=resolve_dtype(dtype, device) if dtype else None)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = ChatTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, EngineConfig(**engine_options), eos_token_ids)

    def _init_tensor_parallel(self, model, tokenizer, dtype, device, eos_token_ids, size: int,
                              engine_options: dict) -> None:
        import atexit
        import dataclasses

        from skyt1.checkpoint import load_config
        from skyt1.sample import tp
        from skyt1.tokenizer import ChatTokenizer

        if not isinstance(model, (str, Path)):
            raise ValueError("tensor_parallel_size > 1 reads each rank's shard from a checkpoint folder; pass the "
                             "folder, not an in-memory model")
        model_dir = Path(model)
        tp.local_config(load_config(model_dir), size)  # a clear error before any process starts
        config = EngineConfig(**engine_options)
        dtype = resolve_dtype(dtype, device)
        if eos_token_ids is None:
            eos_token_ids = read_eos_token_ids(model_dir)
        if tokenizer is None and (model_dir / "tokenizer.json").is_file():
            tokenizer = model_dir
        if tp.launched_world() is not None:
            group = tp.init_launched(size, device)
        else:
            self._tp_spawned = tp.SpawnedGroup(size, model_dir, dtype, device, dataclasses.asdict(config),
                                               eos_token_ids)
            group = self._tp_spawned.group
        try:
            shard = tp.build_tp_model(model_dir, group, dtype, device)
            if group.rank != 0:
                self.tokenizer = None
                self.engine = LLMEngine(shard, None, config, eos_token_ids, tp=group)
                tp.worker_loop(self.engine)
                return
            if isinstance(tokenizer, (str, Path)):
                tokenizer = ChatTokenizer.from_pretrained(tokenizer)
            self.tokenizer = tokenizer
            self.engine = LLMEngine(shard, tokenizer, config, eos_token_ids, tp=group)
        except BaseException:
            if self._tp_spawned is not None:  # its workers would wait for this rank forever
                self._tp_spawned.close(None)
            raise
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (no-op on one device); the engine cannot step afterwards."""
        eng = getattr(self, "engine", None)
        group = eng.tp if eng is not None else None
        if group is None or group.rank != 0 or getattr(self, "_closed", False):
            return
        self._closed = True
        if self._tp_spawned is not None:
            self._tp_spawned.close(eng)
        else:
            from skyt1.sample.tp import broadcast_plan

            broadcast_plan(group, None)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or a tokenizer")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts: Seq[str] | Seq[list[int]] | str,
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 on_finish: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, raw: no chat template; or token ids); outputs in prompt order.
        on_finish is called with each request's output as soon as it completes."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = as_params_list(params, len(prompts))
        reqs = []
        try:
            for prompt, p in zip(prompts, plist):
                rid = f"gen-{self._counter}"
                self._counter += 1
                reqs.append(self.engine.add_request(rid, self.encode(prompt), p,
                                                    prompt if isinstance(prompt, str) else None))
            return self._run(reqs, on_finish)
        except BaseException:
            # A bad prompt (or an interrupt) fails the whole call: the prompts already queued must not
            # run on as orphans inside the next generate().
            for r in reqs:
                self.engine.abort(r.request_id)
            raise

    def chat(self, conversations: Seq[list[dict]], params: SamplingParams | Seq[SamplingParams] | None = None,
             system: str | None = None,
             on_finish: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Generate the assistant turn of each conversation (Qwen2.5 ChatML via ChatTokenizer.encode_prompt)."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        ids = [self.tokenizer.encode_prompt(c, system=system) for c in conversations]
        return self.generate(ids, params, on_finish)

    def _run(self, reqs: list[Request], on_finish) -> list[RequestOutput]:
        pending = {r.request_id for r in reqs}
        by_id = {r.request_id: r for r in reqs}
        while pending:
            if not self.engine.has_unfinished():
                raise RuntimeError("engine idle with unfinished requests")  # an engine bug, never expected
            for u in self.engine.step():
                if u.finished and u.request_id in pending and by_id[u.request_id].finished:
                    pending.discard(u.request_id)
                    if on_finish is not None:
                        on_finish(self.engine.request_output(by_id[u.request_id]))
        return [self.engine.request_output(r) for r in reqs]
