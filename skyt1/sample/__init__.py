"""The batched sampler: paged KV cache, continuous batching, chunked prefill, prefix sharing, CUDA graphs.

    from skyt1.sample import LLM, SamplingParams
"""
from skyt1.sample.engine import (CompletionOutput, EngineConfig, LLM, LLMEngine, RequestOutput, StepUpdate,
                                 read_eos_token_ids)
from skyt1.sample.params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "StepUpdate",
           "read_eos_token_ids"]
