"""FLOP counts for MFU: what the hardware must do for one training token."""
from __future__ import annotations

from skyt1.config import ModelConfig

H100_BF16_PEAK = 989e12  # dense bf16 TFLOP/s, datasheet (SXM)


def train_flops(cfg: ModelConfig, num_tokens: int, sum_doc_len_sq: float) -> float:
    """Forward + backward FLOPs of one packed batch.

    6 x matmul parameters per token, plus causal attention per document: QK^T and PV are 2 x 2 x D
    FLOPs per (query, key) pair per head forward, x3 with backward; a causal document of length L has
    ~L^2/2 pairs, giving 6 x layers x heads x D x L^2 in all.
    """
    dense = 6.0 * cfg.num_matmul_params() * num_tokens
    attn = 6.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * sum_doc_len_sq
    return dense + attn


def train_flops_torchtitan(cfg: ModelConfig, num_tokens: int, seq_len: int) -> float:
    """torchtitan's convention: 6N + 12 x layers x heads x D x seq_len per token (full, non-causal attention,
    with the whole packed row as the sequence); N excludes the embedding."""
    per_token = 6.0 * cfg.num_matmul_params() + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return per_token * num_tokens
