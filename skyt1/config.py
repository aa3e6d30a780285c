"""Configuration as frozen dataclasses.

ModelConfig is read from a Hugging Face checkpoint's config.json (Qwen2 family). Anything the model
would need to behave differently from what skyt1 implements is refused with a message naming the field,
rather than silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2",)


class ConfigError(ValueError):
    """A configuration that is malformed or asks for something skyt1 does not support."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2 always has q/k/v biases (no o_proj bias)
    max_position_embeddings: int = 32768
    # Kept only to write config.json back faithfully; they do not change the model.
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple "
                f"of 'num_key_value_heads' ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config field 'head_dim' must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model config field 'rope_theta' must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"model config field 'rms_norm_eps' must be positive, got {self.rms_norm_eps!r}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self, include_embedding: bool = True) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        block = attn + 3 * h * i + 2 * h
        total = self.num_hidden_layers * block + h
        emb = v * h
        head = 0 if self.tie_word_embeddings else v * h
        return total + head + (emb if include_embedding else 0)

    def num_matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (blocks + LM head; not the embedding lookup)."""
        h, i = self.hidden_size, self.intermediate_size
        per_block = h * self.q_size + 2 * h * self.kv_size + self.q_size * h + 3 * h * i
        return self.num_hidden_layers * per_block + self.vocab_size * h

    # ---- HF config.json --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        def need(key: str):
            if key not in d:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return d[key]

        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: field 'model_type' is {model_type!r}; skyt1 supports {list(SUPPORTED_MODEL_TYPES)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is "
                              "not supported")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"{source}: field 'layer_types' asks for {sorted(set(layer_types))}; only "
                              "'full_attention' is supported")
        # transformers < 5 writes rope_theta / rope_scaling at top level; 5.x writes rope_parameters.
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: field 'rope_parameters.rope_type' is {rope_type!r}; only default "
                              "RoPE is supported (no scaling)")
        if d.get("rope_scaling") not in (None, {}):
            scaling = d["rope_scaling"]
            kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
            if kind != "default":
                raise ConfigError(f"{source}: field 'rope_scaling' is {scaling!r}; RoPE scaling is not supported")
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = d.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                                         and heads else 0)
        try:
            return cls(
                vocab_size=need("vocab_size"),
                hidden_size=hidden,
                intermediate_size=need("intermediate_size"),
                num_hidden_layers=need("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                rope_theta=float(rope_theta),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", True)),
                max_position_embeddings=d.get("max_position_embeddings", 32768),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' Qwen2 (4.x and 5.x) reads back to the same model."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Shapes users ask for by name (bench/, tests): the published Qwen2.5 configs.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, head_dim=128),
    "qwen2.5-32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, head_dim=128),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], "rope_theta": 1_000_000.0, **overrides})
