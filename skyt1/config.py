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


# ================================================================================================
# TrainConfig: what `python -m skyt1.train` runs, loaded from TOML and overridden by dotted flags
# ================================================================================================
# Every key is a field below; an unknown key or a value of the wrong type is an error naming the key,
# raised before any work starts. `load_train_config(path, ["--optim.lr", "2e-5"])` is the one entry.

DTYPE_NAMES = ("bfloat16", "float32")
ACTIVATION_CHECKPOINTING = ("full", "selective", "none")
ATTENTION_BACKENDS = ("auto", "flash", "torch", "cpu", "sdpa")
MASTER_LAYOUTS = ("fp32", "bf16_sr", "bf16_kahan")
SCHEDULES = ("cosine", "linear", "constant")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r}: expected one of {list(choices)}")


def _check_min(key: str, value: float, low: float, *, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise ConfigError(f"{key} = {value!r}: expected a number {'>' if strict else '>='} {low}")


@dataclass(frozen=True)
class ModelSection:
    """The model to train: a HF checkpoint folder (path), and/or its shape by preset name or inline table.

    path alone: fine-tune those weights. preset or shape alone: random init (benchmarks, the demo).
    path and preset: fine-tune, and the checkpoint's config.json must match the preset (the planner uses
    the preset when the folder is not there, e.g. `--plan` on a laptop)."""

    path: str = ""                    # HF folder (config.json + safetensors + tokenizer files) to fine-tune
    preset: str = ""                  # a MODEL_PRESETS name
    shape: ModelConfig | None = None  # an inline [model.shape] table of ModelConfig fields
    layers: int = 0                   # > 0: keep only the first N blocks, full width (smoke runs on one GPU)
    dtype: str = "bfloat16"           # compute dtype of forward/backward (FSDP's param_dtype)
    tokenizer: str = ""               # folder with tokenizer.json copied into the export; default: path
    init_seed: int = 0                # random init seed (preset / shape)

    def __post_init__(self) -> None:
        if self.preset and self.shape is not None:
            raise ConfigError("[model]: give model.preset or a [model.shape] table, not both")
        if not (self.path or self.preset or self.shape is not None):
            raise ConfigError("[model]: give model.path (a HF checkpoint folder), model.preset "
                              f"({sorted(MODEL_PRESETS)}) or a [model.shape] table")
        if self.preset and self.preset not in MODEL_PRESETS:
            raise ConfigError(f"model.preset = {self.preset!r}: expected one of {sorted(MODEL_PRESETS)}")
        _check_min("model.layers", self.layers, 0)
        _check_choice("model.dtype", self.dtype, DTYPE_NAMES)
        _check_min("model.init_seed", self.init_seed, 0)


@dataclass(frozen=True)
class DataSection:
    path: str = ""                    # dataset folder built by `python -m skyt1.data build` (one folder; a
                                      # build combines any number of source files)
    seed: int = 0                     # shuffling seed of the epochs
    samples_per_step: int = 96        # documents per optimizer step (global, all ranks)
    token_budget: int = 16384         # tokens per packed micro-batch
    synthetic: int = 0                # > 0: if data.path is absent, build a synthetic arithmetic chat set of
                                      # this many samples there (and its tiny tokenizer): the CPU demo
    step_tokens: int = 0              # > 0 (opt-in): a step is a run of documents of about this many tokens
                                      # instead of samples_per_step documents (skyt1.data.packer)

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data.path: give at least one dataset folder (build one with "
                              "`python -m skyt1.data build`)")
        _check_min("data.seed", self.seed, 0)
        _check_min("data.samples_per_step", self.samples_per_step, 1)
        _check_min("data.token_budget", self.token_budget, 1)
        _check_min("data.synthetic", self.synthetic, 0)
        _check_min("data.step_tokens", self.step_tokens, 0)


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    master: str = "bf16_sr"           # parameter layout: fp32 master | bf16 + stochastic rounding | bf16 + Kahan
    schedule: str = "cosine"          # warmup, then cosine / linear to min_lr_ratio, or constant
    warmup_ratio: float = 0.1         # warmup steps = ceil(total steps x ratio), as HF Trainer
    min_lr_ratio: float = 0.0
    clip: float = 1.0                 # max global gradient norm; 0 disables clipping (the norm is still logged)

    def __post_init__(self) -> None:
        _check_min("optim.lr", self.lr, 0.0)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas = {list(self.betas)}: expected two numbers in [0, 1)")
        _check_min("optim.eps", self.eps, 0.0, strict=True)
        _check_min("optim.weight_decay", self.weight_decay, 0.0)
        _check_choice("optim.master", self.master, MASTER_LAYOUTS)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"optim.warmup_ratio = {self.warmup_ratio!r}: expected a number in [0, 1]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio = {self.min_lr_ratio!r}: expected a number in [0, 1]")
        _check_min("optim.clip", self.clip, 0.0)


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 3
    max_steps: int = 0                # > 0: stop after this many steps; the LR schedule still spans all epochs
    output_dir: str = "runs/sky_t1"
    checkpoint_every: int = 0         # steps between distributed checkpoints; 0: only at the end
    keep_last: int = 2                # distributed checkpoints kept (older ones deleted)
    log_every: int = 1                # console lines every N steps (metrics.jsonl gets every step)
    resume: str = "auto"              # "auto": newest complete checkpoint in output_dir | "none" | a checkpoint path
    seed: int = 0                     # torch / numpy / python RNG seed
    activation_checkpointing: str = "full"  # "full": every block | "selective": every block's MLP | "none"
    compile: bool = False             # torch.compile each block
    attention: str = "auto"           # varlen attention backend (skyt1.attention)
    cpu_offload: bool = False         # FSDP2 CPUOffloadPolicy: parameters, gradients and optimizer on the host
    tensorboard: bool = False         # also write TensorBoard events (only if tensorboard is installed)
    export: bool = True               # write a HF checkpoint to output_dir/export at the end
    export_dtype: str = "bfloat16"
    z_loss: float = 0.0               # z-loss coefficient of the fused cross-entropy (0: plain CE)
    peak_tflops: float = 989.0        # per-device peak for MFU (H100 SXM dense bf16 datasheet)

    def __post_init__(self) -> None:
        _check_min("train.epochs", self.epochs, 1)
        _check_min("train.max_steps", self.max_steps, 0)
        if not self.output_dir:
            raise ConfigError("train.output_dir: must not be empty")
        _check_min("train.checkpoint_every", self.checkpoint_every, 0)
        _check_min("train.keep_last", self.keep_last, 1)
        _check_min("train.log_every", self.log_every, 1)
        if not self.resume:
            raise ConfigError("train.resume: expected 'auto', 'none' or a checkpoint folder")
        _check_min("train.seed", self.seed, 0)
        _check_choice("train.activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING)
        _check_choice("train.attention", self.attention, ATTENTION_BACKENDS)
        _check_choice("train.export_dtype", self.export_dtype, DTYPE_NAMES)
        _check_min("train.z_loss", self.z_loss, 0.0)
        _check_min("train.peak_tflops", self.peak_tflops, 0.0, strict=True)


@dataclass(frozen=True)
class ParallelSection:
    """The device mesh (skyt1.parallel.build_mesh): world size = dp_replicate x dp_shard x cp.

    dp_shard ranks hold one FSDP2 shard each (put them inside a node); dp_replicate groups of them hold
    full replicas, gradients all-reduced across groups (HSDP: a 2-D mesh, one group per node across
    nodes); cp ranks split every micro-batch's tokens (context parallelism, skyt1.context_parallel) and
    are sharded over too. The defaults are one flat FSDP group over all ranks."""

    dp_replicate: int = 1             # replica groups (nodes, for HSDP across machines)
    dp_shard: int = 0                 # ranks per FSDP shard group (without cp); 0: world / (dp_replicate x cp)
    cp: int = 1                       # context-parallel ranks per micro-batch

    def __post_init__(self) -> None:
        _check_min("parallel.dp_replicate", self.dp_replicate, 1)
        _check_min("parallel.dp_shard", self.dp_shard, 0)
        _check_min("parallel.cp", self.cp, 1)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    parallel: ParallelSection = ParallelSection()

    # ---- identity: what makes two configs "the same run" for resuming ---------------------------
    # Keys that may change between a run and its resumption without changing what is computed.
    RESUMABLE_CHANGES = frozenset({
        "train.max_steps", "train.resume", "train.output_dir", "train.checkpoint_every", "train.keep_last",
        "train.log_every", "train.tensorboard", "train.export", "train.export_dtype", "train.compile",
        "train.activation_checkpointing", "train.attention", "train.cpu_offload", "train.peak_tflops",
        # The mesh only lays the same computation out differently (a 2x2 HSDP run resumes as 4x1).
        "parallel.dp_replicate", "parallel.dp_shard", "parallel.cp",
    })

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_toml(self) -> str:
        return _dump_toml(self.to_dict())

    def flat(self) -> dict[str, Any]:
        """{"optim.lr": 1e-5, "model.shape.hidden_size": 64, ...}"""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    out[prefix + k] = v
        walk("", self.to_dict())
        return out

    def run_differences(self, other: "TrainConfig") -> list[str]:
        """Keys whose values differ between two configs, ignoring those a resumed run may change."""
        a, b = self.flat(), other.flat()
        keys = sorted(set(a) | set(b))
        return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys
                if a.get(k) != b.get(k) and k not in self.RESUMABLE_CHANGES]


# ---- loading -------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """value checked (and lightly converted: int -> float, list -> tuple, str -> 1-tuple) against tp."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message is the precise one
            return _coerce(key, value, real[0])
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args if a is not type(None))}, "
                          f"got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r} ({type(value).__name__})")
        return _build(tp, value, key)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if isinstance(value, str) and args and args[-1] is Ellipsis:
            value = [value]  # a single path where a list is allowed
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected an array, got {value!r} ({type(value).__name__})")
        if args and args[-1] is Ellipsis:
            items = [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        elif args:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected an array of {len(args)} values, got {len(value)}")
            items = [_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = list(value)
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected nothing, got {value!r}")
        return None
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    import typing

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = prefix or "the config"
    for key in table:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key {full!r}; {where} has keys {sorted(fields)}")
    kwargs = {}
    for name, value in table.items():
        full = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(full, value, hints[name])
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {[f'{prefix}.{m}' if prefix else m for m in missing]}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # ModelConfig's own messages say "model config field 'x'": say which table it came from.
        raise ConfigError(f"{prefix}: {e}" if prefix and cls is ModelConfig else str(e)) from None


def _parse_cli_value(raw: str, tp: Any) -> Any:
    """A command-line value: TOML syntax (2e-5, true, [0.9, 0.95], "x"), or a bare string."""
    import tomllib
    import typing

    wants_str = tp is str or (typing.get_origin(tp) is tuple and typing.get_args(tp)[:1] == (str,)
                              and not raw.lstrip().startswith("["))
    if wants_str:
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _field_type(key: str) -> Any:
    """The annotated type of a dotted key ('optim.lr'), or a ConfigError naming the unknown part."""
    import typing

    tp: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        tp = args[0]
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[:i])!r} is not a table")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"unknown key {key!r}; {where} has keys {sorted(hints)}")
        tp = hints[part]
    return tp


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """["--optim.lr", "2e-5", "--train.max_steps=20"] -> {"optim.lr": 2e-05, "train.max_steps": 20}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value "
                              "(e.g. --optim.lr 2e-5)")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        out[key] = _parse_cli_value(raw, _field_type(key))
    return out


def train_config_from_dict(d: dict[str, Any], overrides: dict[str, Any] | None = None,
                           source: str = "config") -> TrainConfig:
    import copy

    d = copy.deepcopy(d)
    for key, value in (overrides or {}).items():
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {part!r} is a value, not a table, so {key!r} cannot be set")
            node = child
        node[parts[-1]] = value
    for section in ("model", "data"):
        if section not in d:
            raise ConfigError(f"{source}: missing the [{section}] table")
    try:
        return _build(TrainConfig, d, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_train_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a TOML file plus `--section.key value` overrides; errors name file and key."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return train_config_from_dict(d, overrides, source=str(path))


# ---- writing ---------------------------------------------------------------------------------------
def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is None:
                continue  # TOML has no null; an absent key reads back as the default None
            out[f.name] = _to_plain(v)
        return out
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} as TOML")


def _dump_toml(d: dict[str, Any], prefix: str = "") -> str:
    scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in d.items() if isinstance(v, dict)]
    lines = []
    if prefix and (scalars or not tables):
        lines.append(f"[{prefix}]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars]
    text = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        sub = _dump_toml(v, f"{prefix}.{k}" if prefix else k)
        text += ("\n" if text else "") + sub
    return text
