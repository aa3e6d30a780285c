"""HF checkpoints both ways against transformers, single-file and sharded, and bad input."""
import json

import pytest
import torch
from safetensors.torch import save_file

from skyt1.checkpoint import CheckpointError, load_pretrained, save_pretrained
from skyt1.config import ConfigError

transformers = pytest.importorskip("transformers")


def tiny_hf(tied: bool, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=131, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                   tie_word_embeddings=tied, max_position_embeddings=256)
    model = transformers.Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def inputs(vocab, gen):
    ids = torch.randint(0, vocab, (13,), generator=gen)
    return ids, torch.arange(13), torch.tensor([0, 13], dtype=torch.int32)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


def our_logits(model, ids, pos, cu):
    with torch.no_grad():
        return model.logits(model(ids, pos, cu))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard_bytes", [None, 20_000])  # None: one model.safetensors; 20 KB: many shards
def test_transformers_to_skyt1_to_transformers(tmp_path, tied, shard_bytes):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    hf = tiny_hf(tied, seed)
    kw = {} if shard_bytes is None else {"max_shard_size": shard_bytes}
    hf.save_pretrained(tmp_path / "hf", **kw)
    assert ((tmp_path / "hf" / "model.safetensors.index.json").exists()) == (shard_bytes is not None)

    ours = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    ids, pos, cu = inputs(131, gen)
    ref = hf_logits(hf, ids)
    assert (our_logits(ours, ids, pos, cu) - ref).abs().max() < 1e-5

    save_pretrained(ours, tmp_path / "ours", max_shard_bytes=shard_bytes or 5 * 2**30)
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    if shard_bytes is None:
        assert "model.safetensors" in files
    else:
        assert "model.safetensors.index.json" in files and sum(f.startswith("model-") for f in files) > 1
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert (hf_logits(back, ids) - ref).abs().max() < 1e-5
    again = load_pretrained(tmp_path / "ours")
    assert torch.equal(our_logits(again, ids, pos, cu), our_logits(ours, ids, pos, cu))


def test_save_bf16_and_copy_tokenizer_files(tmp_path):
    hf = tiny_hf(False, 0)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    ours = load_pretrained(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "out", tokenizer_dir=tmp_path / "hf", dtype=torch.bfloat16)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    back = load_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert back.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(back.lm_head.weight, ours.lm_head.weight.bfloat16())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_save_replaces_existing_folder_atomically(tmp_path):
    hf = tiny_hf(True, 1)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    save_pretrained(ours, tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- bad input: every failure names the file and the key --------------------------------------

@pytest.fixture
def saved(tmp_path):
    hf = tiny_hf(False, 2)
    hf.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_pretrained(saved)


def test_corrupt_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_pretrained(saved)


def test_corrupt_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(saved)


def _rewrite(saved, edit):
    from safetensors.torch import load_file
    sd = load_file(str(saved / "model.safetensors"))
    edit(sd)
    save_file(sd, str(saved / "model.safetensors"))


def test_missing_tensor_named(saved):
    _rewrite(saved, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(saved)


def test_misshaped_tensor_named(saved):
    def edit(sd):
        sd["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(7)
    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj"
                                              r"\.bias' has shape \(7,\), the model expects \(16,\)"):
        load_pretrained(saved)


def test_unexpected_tensor_named(saved):
    def edit(sd):
        sd["model.layers.5.mlp.up_proj.weight"] = torch.zeros(2, 2)
    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.5\.mlp\.up_proj\.weight'"):
        load_pretrained(saved)


def test_index_pointing_to_missing_shard(tmp_path):
    hf = tiny_hf(False, 3)
    hf.save_pretrained(tmp_path / "c", max_shard_size=20_000)
    shard = sorted((tmp_path / "c").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"is mapped to '{shard.name}', which does not exist"):
        load_pretrained(tmp_path / "c")
