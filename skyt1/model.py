"""The Qwen2-family decoder on packed input.

Packed: the batch is one row of T tokens holding several documents; cu_seqlens (B+1,) marks where each
document starts and position_ids restart at 0 for each one, so RoPE and attention both see documents
as if alone. Parameter names follow Hugging Face's Qwen2 (without its leading "model."), so checkpoints
map one to one. Nothing here knows about FSDP, activation checkpointing or fused kernels: parallel.py
applies them from outside, and the fused loss reads lm_head.weight directly.

Shapes: T tokens, H hidden, Hq/Hkv heads, D head_dim, I intermediate, V vocab.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from skyt1.attention import resolve_attention
from skyt1.config import ModelConfig

# attn(layer_idx, q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, D)) -> (T, Hq, D); q and k already rotated.
AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the input dtype; scale applied after casting back (as HF does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (T, D/2) for each token's position; computed in fp32, then cast."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)                           # (D/2,)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]      # (T, D/2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D) rotated pairwise (i, i + D/2): the rotate_half convention of HF/Qwen."""
    x1, x2 = x.chunk(2, dim=-1)                 # (T, heads, D/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)     # (T, Hq, D)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attn(self.layer_idx, q, k, v)                           # (T, Hq, D)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))  # (T, H)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (T, I) -> (T, H)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)  # (T, H)
        return x + self.mlp(self.post_attention_layernorm(x))           # (T, H)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Re-tie lm_head to the embedding (needed again after to_empty() or loading with assign=True)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,     # (T,) int64
        position_ids: torch.Tensor,  # (T,) int64, restarting at 0 per document
        cu_seqlens: torch.Tensor,    # (B+1,) int32
        max_seqlen: int | None = None,
        attn: AttnFn | None = None,
    ) -> torch.Tensor:               # (T, H) after the final norm
        x = self.embed_tokens(input_ids)  # (T, H)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)  # (T, D/2)
        if attn is None:
            if max_seqlen is None:
                # One host sync; the data loader passes max_seqlen so training never pays it.
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            # Resolved here, once per forward: a block (compiled or not) only ever calls a plain function.
            fn = resolve_attention(None, x.device, x.dtype)
            attn = lambda _i, q, k, v: fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)  # noqa: E731
        for layer in self.layers:
            x = layer(x, cos, sin, attn)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (T, V)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Random init (HF's Qwen2 scheme): normal(0, std) matrices and embeddings, zero biases, unit norms."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        self.tie_weights()  # first, so a tied matrix is drawn once whatever state to_empty() left
        for module in self.modules():
            if module is self.lm_head and self.cfg.tie_word_embeddings:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.randn(module.weight.shape, generator=gen, dtype=torch.float32) * std
                module.weight.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> Transformer:
    """Build the model. On "meta" no memory is touched (materialise later with to_empty + load/init)."""
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    return model
