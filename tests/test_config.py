"""TrainConfig: TOML + dotted overrides, strict types, clear errors, round trip through the saved TOML."""
import tomllib
from pathlib import Path

import pytest

from skyt1.config import (ConfigError, ModelConfig, TrainConfig, load_train_config, parse_overrides,
                          train_config_from_dict)

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"preset": "qwen2.5-0.5b"}, "data": {"path": "data/x"}}


def test_shipped_configs_load_and_round_trip():
    for name in ("tiny.toml", "sky_t1_32b.toml"):
        cfg = load_train_config(ROOT / "configs" / name)
        again = train_config_from_dict(tomllib.loads(cfg.to_toml()))
        assert again == cfg, name


def test_recipe_values():
    cfg = load_train_config(ROOT / "configs" / "sky_t1_32b.toml")
    o, d, t = cfg.optim, cfg.data, cfg.train
    assert (o.lr, o.betas, o.weight_decay, o.clip, o.schedule, o.warmup_ratio, o.min_lr_ratio) == \
        (1e-5, (0.9, 0.999), 0.0, 1.0, "cosine", 0.1, 0.0)
    assert (d.samples_per_step, d.token_budget, t.epochs) == (96, 16384, 3)
    assert cfg.model.dtype == "bfloat16" and o.master in ("bf16_sr", "bf16_kahan")


def test_overrides_types_and_forms(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[model]\npreset = "qwen2.5-7b"\n[data]\npath = "d"\n')
    cfg = load_train_config(p, ["--optim.lr", "2e-5", "--train.max_steps=20", "--optim.betas", "[0.9, 0.95]",
                                "--train.compile", "true", "--train.output_dir", "123", "--model.layers", "2"])
    assert cfg.optim.lr == 2e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 20 and cfg.optim.betas == (0.9, 0.95) and cfg.train.compile is True
    assert cfg.train.output_dir == "123"  # a string field takes the text as is
    assert cfg.model.layers == 2
    # an integer where a float is expected is accepted and converted
    assert load_train_config(p, ["--optim.weight_decay", "1"]).optim.weight_decay == 1.0


def test_inline_model_shape():
    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    cfg = train_config_from_dict({"model": {"shape": shape}, "data": {"path": "d"}})
    assert cfg.model.shape == ModelConfig(**shape)
    with pytest.raises(ConfigError, match=r"model.preset or a \[model.shape\] table, not both"):
        train_config_from_dict({"model": {"shape": shape, "preset": "qwen2.5-7b"}, "data": {"path": "d"}})
    with pytest.raises(ConfigError, match="model.shape.*num_attention_heads"):
        train_config_from_dict({"model": {"shape": {**shape, "num_attention_heads": 3, "num_key_value_heads": 2}}, "data": {"path": "d"}})


@pytest.mark.parametrize("overrides, message", [
    (["--optim.lrr", "1"], "unknown key 'optim.lrr'"),
    (["--foo.bar", "1"], "unknown key 'foo.bar'"),
    (["--optim.lr", "fast"], "optim.lr: expected a number"),
    (["--train.compile", "1"], "train.compile: expected true or false"),
    (["--train.epochs", "1.5"], "train.epochs: expected an integer"),
    (["--optim.betas", "[0.9]"], "optim.betas: expected an array of 2"),
    (["--optim.master", "fp16"], "optim.master = 'fp16': expected one of"),
    (["--train.activation_checkpointing", "some"], "train.activation_checkpointing"),
    (["--data.token_budget", "0"], "data.token_budget = 0"),
    (["--model.shape.vocab_size", "8"], "model.shape: missing required key"),
    (["lr", "1"], "unexpected argument 'lr'"),
    (["--optim.lr"], "missing value"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        train_config_from_dict(BASE, parse_overrides(overrides))


def test_bad_toml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[model]\npreset = "qwen2.5-7b"\n[data]\npath = "d"\n[train]\nepoch = 3\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*unknown key 'train\.epoch'"):
        load_train_config(p)
    p.write_text('[model]\npreset = "qwen2.5-7b"\n[data]\npath = 5\n')
    with pytest.raises(ConfigError, match=r"data\.path: expected a string"):
        load_train_config(p)
    p.write_text('[model]\npreset = "qwen2.5-7b"\n')
    with pytest.raises(ConfigError, match=r"missing the \[data\] table"):
        load_train_config(p)
    p.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_train_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "absent.toml")


def test_run_differences_ignore_resumable_keys():
    a = train_config_from_dict(BASE)
    b = train_config_from_dict(BASE, {"train.max_steps": 7, "train.log_every": 3, "train.resume": "none"})
    assert a.run_differences(b) == []
    c = train_config_from_dict(BASE, {"optim.lr": 3e-5})
    assert [d.split(":")[0] for d in a.run_differences(c)] == ["optim.lr"]


def test_config_is_frozen():
    cfg = train_config_from_dict(BASE)
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert isinstance(cfg, TrainConfig)
