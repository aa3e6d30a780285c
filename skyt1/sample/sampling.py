"""Batched sampling over the sequences that produce a token this step.

Order of operations (as vLLM v1's Sampler): a response_format grammar's mask -> min_tokens and logit_bias -> penalties -> temperature ->
min-p -> top-k / top-p -> draw. Greedy rows (temperature below SAMPLING_EPS) take the argmax after the
penalties, as vLLM's.
- min_tokens: a sequence with fewer output tokens than its min_tokens has its stop ids (end-of-sequence
  and stop_token_ids) masked to -inf; logit_bias adds each (token, bias) to that row's logits.
- Penalties: repetition (HF/CTRL: over prompt and output tokens, l/p if l > 0 else l*p), presence and
  frequency (OpenAI: over output tokens). Each penalised sequence keeps a (V,) count tensor on the device,
  updated from the sampled ids without a host round trip; sequences without penalties cost nothing.
- Draw: argmax(probs / E) with E ~ Exponential(1) i.i.d. per token, which samples from probs (the
  exponential race, equivalent to Gumbel-max) without a cumulative sum or a host sync.
- Seeds: a seeded sample draws its E from its own torch.Generator, one (V,) draw per generated token,
  so its tokens depend only on its seed and its own logits, not on the batch it runs in. Unseeded rows
  share one batched draw from the engine's generator.
- Logprobs (when asked): log_softmax of the raw logits (the model's distribution, before bias, penalties
  and temperature: vLLM's default "raw_logprobs"), for the sampled token and the top k.
All per-row parameters go to the device as one small tensor per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skyt1.sample.sequence import Sequence
from skyt1.sample.structured import apply_grammar_masks


@dataclass
class SampleResult:
    token_ids: torch.Tensor              # (B,) int64
    logprobs: torch.Tensor | None        # (B,) fp32 logprob of the sampled token
    top_ids: torch.Tensor | None         # (B, K) int64
    top_logprobs: torch.Tensor | None    # (B, K) fp32


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._stacked: torch.Tensor | None = None  # (R, V) counts of this step's penalised rows

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits (B, V) for seqs (one row each, in order) -> sampled ids (B,) on the device."""
        B, V = logits.shape
        logits = apply_grammar_masks(logits.float(), seqs)  # response_format: before everything, as vLLM v1
        params = [s.params for s in seqs]
        want_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        lp_result = None
        if want_logprobs:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)

        logits = _mask_and_bias(logits, seqs)
        penalised = [i for i, p in enumerate(params) if p.uses_penalties]
        if penalised:
            logits = self._apply_penalties(logits, [seqs[i] for i in penalised], penalised)

        if all(p.greedy for p in params):
            ids = logits.argmax(dim=-1)  # (B,)
        else:
            # One host->device copy for all per-row parameters.
            table = torch.tensor(
                [[1.0 if p.greedy else p.temperature, p.top_p, float(p.top_k or V), p.min_p, float(p.greedy)]
                 for p in params], dtype=torch.float32).to(self.device, non_blocking=True)  # (B, 5)
            temp, top_p, top_k, min_p, greedy = table.unbind(1)
            scaled = logits / temp[:, None]  # (B, V)
            if any(p.min_p > 0 for p in params):  # min-p before top-k / top-p, as vLLM
                probs = torch.softmax(scaled, dim=-1)
                floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # (B, 1)
                scaled = scaled.masked_fill(probs < floor, float("-inf"))
            if any(p.top_p < 1.0 for p in params):
                scaled = _top_k_top_p(scaled, top_k.long(), top_p)
            elif any(0 < p.top_k < V for p in params):
                max_k = max(p.top_k for p in params if 0 < p.top_k < V)
                scaled = _top_k_only(scaled, top_k.long(), max_k)
            probs = torch.softmax(scaled, dim=-1)  # (B, V)
            noise = torch.empty_like(probs).exponential_(generator=self.generator)  # (B, V)
            for i, s in enumerate(seqs):
                if s.generator is not None:
                    noise[i].exponential_(generator=s.generator)
            ids = (probs / noise).argmax(dim=-1)  # (B,)
            if any(p.greedy for p in params):
                ids = torch.where(greedy.bool(), logits.argmax(dim=-1), ids)

        if penalised:
            self._count(seqs, penalised, ids)
        if want_logprobs:
            k = max(want_logprobs)
            chosen = raw_logprobs.gather(1, ids[:, None]).squeeze(1)  # (B,)
            top_lp, top_ids = raw_logprobs.topk(k, dim=-1) if k else (None, None)
            lp_result = (chosen, top_ids, top_lp)
        if lp_result is None:
            return SampleResult(ids, None, None, None)
        return SampleResult(ids, *lp_result)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
        V = logits.shape[1]
        for s in seqs:
            if s.penalty_counts is None:  # first sample of this sequence: count its history once
                out = torch.tensor(s.output_token_ids, dtype=torch.long).to(self.device)
                s.penalty_counts = torch.zeros(V, dtype=torch.int32, device=self.device).index_add_(
                    0, out, torch.ones_like(out, dtype=torch.int32))
                s.prompt_mask = torch.zeros(V, dtype=torch.bool, device=self.device)
                s.prompt_mask[torch.tensor(s.token_ids[:s.num_prompt_tokens], dtype=torch.long).to(self.device)] = True
        counts = torch.stack([s.penalty_counts for s in seqs])  # (R, V) int32
        seen = torch.stack([s.prompt_mask for s in seqs]) | (counts > 0)  # (R, V)
        table = torch.tensor([[s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty]
                              for s in seqs], dtype=torch.float32).to(self.device, non_blocking=True)  # (R, 3)
        rep, presence, frequency = table[:, 0:1], table[:, 1:2], table[:, 2:3]
        idx = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        sub = logits.index_select(0, idx)  # (R, V)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - presence * (counts > 0).float() - frequency * counts.float()
        logits = logits.clone()
        logits.index_copy_(0, idx, sub)
        self._stacked = counts
        return logits

    def _count(self, seqs: list[Sequence], rows: list[int], ids: torch.Tensor) -> None:
        """Add the sampled ids to the penalised sequences' counts (on the device, no sync)."""
        counts = self._stacked  # (R, V), built by _apply_penalties this step
        self._stacked = None
        idx = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        counts.scatter_add_(1, ids.index_select(0, idx)[:, None],
                            torch.ones(len(rows), 1, dtype=torch.int32, device=self.device))
        for j, r in enumerate(rows):
            seqs[r].penalty_counts = counts[j]


def _mask_and_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """min_tokens (stop ids -> -inf while too short) and logit_bias, as one scatter each; rows without
    either cost nothing and the common batch (none) returns logits untouched."""
    V = logits.shape[1]
    mask_rows, mask_cols, bias_rows, bias_cols, bias_vals = [], [], [], [], []
    for i, s in enumerate(seqs):
        if s.params.min_tokens and s.num_output_tokens < s.params.min_tokens:
            cols = [t for t in s.stop_ids if t < V]
            mask_rows += [i] * len(cols)
            mask_cols += cols
        for t, b in s.params.logit_bias:
            bias_rows.append(i)
            bias_cols.append(t)
            bias_vals.append(b)
    if not mask_rows and not bias_rows:
        return logits
    logits = logits.clone()
    dev = logits.device
    if bias_rows:
        idx = (torch.tensor(bias_rows).to(dev), torch.tensor(bias_cols).to(dev))
        logits.index_put_(idx, torch.tensor(bias_vals, dtype=logits.dtype).to(dev), accumulate=True)
    if mask_rows:
        idx = (torch.tensor(mask_rows).to(dev), torch.tensor(mask_cols).to(dev))
        logits.index_put_(idx, torch.tensor(float("-inf"), dtype=logits.dtype, device=dev))
    return logits


def _top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Keep each row's top_k[b] logits (top_k = V: keep all); ties at the threshold are kept."""
    V = logits.shape[1]
    top = logits.topk(max_k, dim=-1).values  # (B, max_k) descending
    kth = top.gather(1, (top_k.clamp(max=max_k) - 1)[:, None])  # (B, 1)
    kth = torch.where(top_k[:, None] >= V, torch.full_like(kth, float("-inf")), kth)
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """One descending sort for both: rank >= k dropped, then the tail beyond mass top_p (the token that
    crosses top_p is kept, so at least one token always survives)."""
    V = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of strictly better tokens
    # rows with top_p = 1 keep everything (a float32 cumsum may pass 1.0 before the tail)
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


@torch.no_grad()
def prompt_logprobs(model, token_ids: list[int], k: int, chunk: int = 1024) -> list[dict | None]:
    """vLLM's prompt_logprobs for one prompt: None for the first token (nothing precedes it), then per
    token {"token_id", "logprob", "rank", "top": [[id, logprob], ...]} under the model's raw distribution
    given the tokens before it; rank is 1 + the number of tokens more likely than it.

    One dense forward over the prompt (outside the paged cache, so the running batch is untouched);
    logits are made `chunk` rows at a time so a long prompt never holds a (T, V) fp32 matrix."""
    device = next(model.parameters()).device
    T = len(token_ids)
    ids = torch.tensor(token_ids, dtype=torch.long).to(device)  # (T,)
    hidden = model(ids, torch.arange(T, device=device), torch.tensor([0, T], dtype=torch.int32).to(device), T)
    out: list[dict | None] = [None]
    for start in range(0, T - 1, chunk):
        end = min(T - 1, start + chunk)
        lp = torch.log_softmax(model.logits(hidden[start:end]).float(), dim=-1)  # (C, V) predicts start+1..end
        nxt = ids[start + 1:end + 1]  # (C,)
        chosen = lp.gather(1, nxt[:, None])  # (C, 1)
        rank = (lp > chosen).sum(dim=1) + 1  # (C,)
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], nxt[:, None][:, :0])
        # one device->host copy per chunk, not per token
        for t, c, r, ti, tl in zip(nxt.tolist(), chosen[:, 0].tolist(), rank.tolist(), top_ids.tolist(),
                                   top_lp.tolist()):
            out.append({"token_id": t, "logprob": c, "rank": r, "top": [[a, b] for a, b in zip(ti, tl)]})
    return out
