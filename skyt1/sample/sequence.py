"""One sample being generated (a Sequence), the request that owns it, and its text.

A request with n samples becomes n Sequences with the same prompt; the block manager lets them share
the prompt's full KV blocks. A Sequence's tokens are prompt + generated; num_computed_tokens of them
have their K/V in the cache. It is "decoding" when exactly one token (the last sampled) is left to
feed, "prefilling" when more are (a new prompt, a later chunk, or a recompute after preemption).
"""
from __future__ import annotations

import enum
from typing import Callable

import torch

from skyt1.sample.params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    def __init__(self, seq_id: int, request: "Request", index: int, params: SamplingParams,
                 stop_ids: frozenset[int], generator: torch.Generator | None, text: "TextState | None"):
        self.seq_id = seq_id
        self.request = request
        self.index = index                      # sample index within the request
        self.params = params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0            # tokens whose K/V is in the cache
        self.num_cached_tokens = 0              # of those, found in the prefix cache at admission
        self.block_table: list[int] = []        # physical KV blocks, in order
        self.block_hashes: list[int] = []       # chained hashes of the full blocks, a prefix of block_table
        self.status = SeqStatus.WAITING
        self.stop_ids = stop_ids
        self.generator = generator              # per-sample RNG when the request has a seed
        self.text_state = text                  # incremental text (stop strings, streaming), or None
        self.finish_reason: str | None = None
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.penalty_counts: torch.Tensor | None = None  # (V,) output token counts, device (sampler-owned)
        self.prompt_mask: torch.Tensor | None = None     # (V,) bool, prompt tokens (repetition penalty)
        self.num_preemptions = 0
        self.grammar_matcher = None             # an xgrammar GrammarMatcher when params.grammar is set

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def num_remaining(self) -> int:
        """Tokens still to feed through the model before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id!r}, idx={self.index}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})")


class Request:
    """A prompt and its samples."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None, arrival: float = 0.0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.prompt = prompt
        self.params = params
        self.arrival = arrival
        self.seqs: list[Sequence] = []
        self.prompt_logprobs: list | None = None  # when params.prompt_logprobs is set

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class TextState:
    """Incremental detokenization with stop strings.

    Byte-level BPE tokens can end in the middle of a UTF-8 character, so new text is only emitted once
    the decoded window no longer ends in U+FFFD (the replacement char of an incomplete character). The
    window restarts at the last emitted token (prefix_offset) to keep each decode short. Stop strings
    are searched in the text around the newly added characters, so one that spans token boundaries is
    found as soon as its last character arrives; the text is cut exactly before it (or after it with
    include_stop_str_in_output). While running, the last len(longest stop) - 1 characters are held back
    from streaming, since they may be the start of a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...], include_stop: bool):
        self._decode = decode
        self.stop = stop
        self.include_stop = include_stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        self.streamed = 0  # characters of text already handed to a stream
        self.stopped = False

    def append(self, token_id: int, check_stop: bool = True) -> bool:
        """Add one generated token; True when a stop string has been found (text is then final).
        check_stop=False (the request's min_tokens not reached yet): the text grows, no stop is searched."""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.tokens[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return False  # an incomplete character: wait for the next token
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.tokens)
        start = max(0, len(self.text) - self._holdback)
        self.text += delta
        return check_stop and self._find_stop(start)

    def _find_stop(self, start: int) -> bool:
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
        self.stopped = True
        return True

    def finish(self) -> None:
        """Flush what is left at the end (an incomplete trailing character becomes U+FFFD)."""
        if self.stopped or self._read_offset == len(self.tokens):
            return
        prefix_text = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.tokens[self._prefix_offset:])
        start = max(0, len(self.text) - self._holdback)
        self.text += new_text[len(prefix_text):]
        self._read_offset = len(self.tokens)
        self._find_stop(start)

    def take_delta(self, final: bool) -> str:
        """Text not yet streamed; while running, holds back a possible stop-string prefix."""
        end = len(self.text) if (final or self.stopped) else max(self.streamed, len(self.text) - self._holdback)
        delta = self.text[self.streamed:end]
        self.streamed = end
        return delta
