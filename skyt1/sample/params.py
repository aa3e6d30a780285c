"""Per-request sampling parameters (a frozen dataclass, validated on construction)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): logits / 1e-37 overflow float32 to inf,
# and inf - inf in the softmax is NaN, so such a "temperature" cannot mean anything but argmax.
SAMPLING_EPS = 1e-5
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1                          # samples per prompt; they share the prompt's KV blocks
    temperature: float = 1.0            # 0 (or below SAMPLING_EPS): greedy
    top_p: float = 1.0                  # nucleus: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0                      # keep the k most likely tokens; 0 or -1: off
    min_p: float = 0.0                  # drop tokens whose probability is below min_p x the top one
    repetition_penalty: float = 1.0     # HF/CTRL style over prompt and output tokens: l/p if l > 0 else l*p
    presence_penalty: float = 0.0       # OpenAI style over output tokens: l -= presence * [count > 0]
    frequency_penalty: float = 0.0      #                                  l -= frequency * count
    seed: int | None = None             # per-request seed: the same result whatever else is in the batch
    max_tokens: int | None = None       # None: until the context (max_model_len) is full
    min_tokens: int = 0                 # stop tokens and stop strings are not allowed before this many tokens
    stop: tuple[str, ...] = ()          # stop strings: the text is cut before the first one found
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens (on top of the model's end-of-sequence ids)
    ignore_eos: bool = False            # do not stop on the model's end-of-sequence ids
    logprobs: int | None = None         # None: off; k >= 0: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob and the top k
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits before sampling
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True    # leave special tokens out of the text (token ids keep them)
    # A compiled xgrammar grammar (the server's response_format): each sample must match it and ends when
    # it is complete. Not compared or hashed: two params differing only here are the same sampling setup.
    grammar: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Accept lists / a single string from callers and JSON; store tuples so the dataclass stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        bias = self.logit_bias
        if isinstance(bias, Mapping):
            bias = bias.items()
        try:
            object.__setattr__(self, "logit_bias", tuple(sorted((int(t), b) for t, b in (bias or ()))))
        except (TypeError, ValueError):
            raise ValueError(f"sampling parameter 'logit_bias' must map token ids to numbers, got {self.logit_bias!r}"
                             ) from None
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

        def bad(field: str, why: str, value: Any) -> ValueError:
            return ValueError(f"sampling parameter {field!r} {why}, got {value!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1", self.n)
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0", self.temperature)
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 or -1: off)", self.top_k)
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]", self.min_p)
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a finite number > 0", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_num(value) or not -2 <= value <= 2:
                raise bad(name, "must be a number in [-2, 2]", value)
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise bad("seed", "must be a 64-bit signed integer or null", self.seed)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or null", self.max_tokens)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})", self.min_tokens)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings", self.stop)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers", self.stop_token_ids)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be an integer in [0, 20] or null", self.logprobs)
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", "must be an integer in [0, 20] or null", self.prompt_logprobs)
        for t, b in self.logit_bias:
            if t < 0 or not _is_num(b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                raise bad("logit_bias", f"must map token ids >= 0 to numbers in [-{MAX_LOGIT_BIAS:g}, "
                          f"{MAX_LOGIT_BIAS:g}]", {t: b})

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    """A finite number: NaN and infinities (JSON's Infinity, 1e400) are refused, not sampled with."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float range
        return False


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
