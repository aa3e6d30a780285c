"""Structured output (OpenAI's response_format json_object / json_schema) through xgrammar, the
constrained-decoding library vLLM and SGLang use.

A grammar is compiled once per request from the tokenizer's vocabulary (each token's raw bytes, so
byte-level pieces of a UTF-8 character are matched exactly; special tokens are never allowed inside the
output, only the end-of-sequence ids once the value is complete). Each sample gets its own matcher:
before a step the sampler masks the tokens the grammar forbids (on the logits, so greedy, penalties and
logprobs all see the masked distribution, as in vLLM v1), and after it the engine feeds the sampled
token, finishing the sample ("stop") once the grammar is complete. xgrammar is imported only when a
request asks for structure (its import takes seconds).
"""
from __future__ import annotations

import json
import threading
from typing import Any

import torch

INSTALL_HINT = "pip install xgrammar (or skyt1[structured])"


class StructuredOutputs:
    """Compiles response_format grammars for one tokenizer and model vocabulary (thread-safe, lazy)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = [t for t in eos_token_ids if t < vocab_size]
        self._compiler = None
        self._lock = threading.Lock()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tok = self.tokenizer
                n = min(tok.vocab_size, self.vocab_size)
                # b"" marks a special token for xgrammar: never part of the text it matches.
                vocab = [b"" if i in tok.added_token_ids else tok.token_bytes(i) for i in range(n)]
                info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                         stop_token_ids=self.eos_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, response_format: dict) -> Any:
        """A CompiledGrammar for {"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"schema": {...}}}; ValueError naming what is wrong otherwise."""
        kind = response_format.get("type")
        if kind not in ("json_object", "json_schema"):
            raise ValueError(f"'response_format' type {kind!r} is not supported (text, json_object, json_schema)")
        try:
            compiler = self._get_compiler()
        except ImportError:
            raise ValueError(f"'response_format' {kind} needs the xgrammar package ({INSTALL_HINT})") from None
        if kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("'response_format' json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        try:
            return compiler.compile_json_schema(json.dumps(spec["schema"]))
        except Exception as e:  # xgrammar raises RuntimeError / InvalidJSONError on a schema it cannot use
            raise ValueError(f"'response_format' json_schema cannot be compiled: {e}") from None


def new_grammar_matcher(grammar: Any):
    import xgrammar as xgr

    return xgr.GrammarMatcher(grammar)


def grammar_accept(matcher, token_id: int) -> bool:
    """Feed the sampled token; True once the grammar is complete (the sample then stops)."""
    if not matcher.accept_token(token_id):  # the mask allows only accepted tokens: an engine bug
        raise RuntimeError(f"token {token_id} was sampled against its grammar")
    return matcher.is_terminated()


def apply_grammar_masks(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """Forbidden tokens -> -inf in the rows whose sequence has a grammar (in place); no-op otherwise."""
    rows = [i for i, s in enumerate(seqs) if s.grammar_matcher is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    B, V = logits.shape
    bitmask = xgr.allocate_token_bitmask(B, V)  # (B, ceil(V / 32)) int32, all allowed
    for i in rows:
        seqs[i].grammar_matcher.fill_next_token_bitmask(bitmask, i)
    logits = logits.clone()
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=V, indices=rows)
    return logits
