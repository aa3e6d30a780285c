"""Per-request sampling parameters (a frozen dataclass, validated on construction)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1                          # samples per prompt; they share the prompt's KV blocks
    temperature: float = 1.0            # 0: greedy
    top_p: float = 1.0                  # nucleus: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0                      # keep the k most likely tokens; 0 or -1: off
    min_p: float = 0.0                  # drop tokens whose probability is below min_p x the top one
    repetition_penalty: float = 1.0     # HF/CTRL style over prompt and output tokens: l/p if l > 0 else l*p
    presence_penalty: float = 0.0       # OpenAI style over output tokens: l -= presence * [count > 0]
    frequency_penalty: float = 0.0      #                                  l -= frequency * count
    seed: int | None = None             # per-request seed: the same result whatever else is in the batch
    max_tokens: int | None = None       # None: until the context (max_model_len) is full
    stop: tuple[str, ...] = ()          # stop strings: the text is cut before the first one found
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens (on top of the model's end-of-sequence ids)
    ignore_eos: bool = False            # do not stop on the model's end-of-sequence ids
    logprobs: int | None = None         # None: off; k >= 0: the sampled token's logprob and the top k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True    # leave special tokens out of the text (token ids keep them)

    def __post_init__(self) -> None:
        # Accept lists / a single string from callers and JSON; store tuples so the dataclass stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

        def bad(field: str, why: str, value: Any) -> ValueError:
            return ValueError(f"sampling parameter {field!r} {why}, got {value!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1", self.n)
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0", self.temperature)
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 or -1: off)", self.top_k)
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]", self.min_p)
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a number > 0", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_num(value) or not -2 <= value <= 2:
                raise bad(name, "must be a number in [-2, 2]", value)
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or null", self.seed)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or null", self.max_tokens)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings", self.stop)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers", self.stop_token_ids)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be an integer in [0, 20] or null", self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


def sample_seed(seed: int, sample_index: int) -> int:
    """Seed of sample i of a request: distinct per sample, independent of what else runs (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + (sample_index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def as_params_list(params: "SamplingParams | Sequence[SamplingParams] | None", count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params[{i}] is {type(p).__name__}, expected SamplingParams")
    return params
