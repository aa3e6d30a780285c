"""The model against Hugging Face transformers' Qwen2 (the oracle), and packing against documents alone."""
import pytest
import torch

from skyt1.attention import document_mask, sdpa_varlen_attention, varlen_attention
from skyt1.config import ConfigError, ModelConfig
from skyt1.model import build_model

transformers = pytest.importorskip("transformers")

# (heads, kv_heads, tied, hidden, head_dim, intermediate, vocab, layers): GQA ratios 1, 2, 4; odd sizes.
CONFIGS = [
    (4, 4, False, 48, 12, 100, 211, 2),
    (6, 3, True, 42, 14, 70, 157, 2),
    (8, 2, False, 64, 8, 96, 301, 3),
    (4, 1, True, 40, 10, 52, 97, 1),
]


def hf_config(heads, kv, tied, hidden, head_dim, inter, vocab, layers):
    return transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=512)


def hf_model(cfg_args, seed):
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(hf_config(*cfg_args)).float().eval()
    with torch.no_grad():  # random biases too (HF inits them to zero), so a bias bug cannot hide
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def ours_from_hf(hf):
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    model = build_model(cfg, device="cpu")
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def packed_inputs(lengths, vocab, gen):
    ids = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    pos = torch.cat([torch.arange(n) for n in lengths])
    return ids, torch.cat(ids), pos, cu


@pytest.mark.parametrize("cfg_args", CONFIGS)
def test_logits_match_transformers(cfg_args):
    seed = torch.randint(0, 2**31 - 1, ()).item()
    hf = hf_model(cfg_args, seed)
    model = ours_from_hf(hf)
    gen = torch.Generator().manual_seed(seed)
    lengths = [17, 5, 31, 1]
    docs, ids, pos, cu = packed_inputs(lengths, cfg_args[6], gen)
    with torch.no_grad():
        ours = model.logits(model(ids, pos, cu))  # (T, V)
        ref = torch.cat([hf(input_ids=d[None]).logits[0] for d in docs])  # each document alone in HF
    err = (ours - ref).abs().max().item()
    assert err < 1e-4, f"max abs diff {err} (seed {seed})"


def test_packed_equals_each_document_alone():
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = build_model(cfg, seed=int(torch.randint(0, 1000, ()))).eval()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    lengths = [9, 1, 23, 4]
    docs, ids, pos, cu = packed_inputs(lengths, cfg.vocab_size, gen)
    with torch.no_grad():
        packed = model(ids, pos, cu)
        alone = torch.cat([model(d, torch.arange(len(d)), torch.tensor([0, len(d)], dtype=torch.int32))
                           for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_every_parameter():
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4, tie_word_embeddings=True)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 50, (12,))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    pos = torch.cat([torch.arange(5), torch.arange(7)])
    model.logits(model(ids, pos, cu)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.lm_head.weight is model.embed_tokens.weight


def test_meta_build_then_materialise():
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=4, tie_word_embeddings=True)
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights(seed=3)
    ref = build_model(cfg, seed=3)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    assert model.lm_head.weight is model.embed_tokens.weight


def _mask_reference(lq, lk):
    """Per-document bottom-right causal masks placed on the block diagonal, built one element at a time."""
    tq, tk = sum(lq), sum(lk)
    m = torch.zeros(tq, tk, dtype=torch.bool)
    oq = ok = 0
    for a, b in zip(lq, lk):
        for i in range(a):
            for j in range(b):
                m[oq + i, ok + j] = j <= b - a + i
        oq, ok = oq + a, ok + b
    return m


def test_document_mask_bottom_right():
    lq, lk = [3, 1, 4], [5, 6, 4]
    cu_q = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11, 15], dtype=torch.int32)
    assert torch.equal(document_mask(cu_q, cu_k, 8, 15), _mask_reference(lq, lk))


def test_varlen_attention_gqa_matches_per_document_softmax():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    lq, lk = [3, 2], [6, 2]
    q = torch.randn(5, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(8, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(8, 2, 8, generator=gen, dtype=torch.float64)
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 8], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu_q, 3, cu_k, 6, backend="sdpa")
    # Hand-written softmax attention, one document and head at a time.
    ref = torch.empty_like(out)
    for d in range(2):
        qs, ks = slice(int(cu_q[d]), int(cu_q[d + 1])), slice(int(cu_k[d]), int(cu_k[d + 1]))
        for h in range(4):
            s = q[qs, h] @ k[ks, h // 2].T / 8 ** 0.5
            allowed = _mask_reference([lq[d]], [lk[d]])
            s = s.masked_fill(~allowed, float("-inf"))
            ref[qs, h] = s.softmax(-1) @ v[ks, h // 2]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(sdpa_varlen_attention(q, k, v, cu_q, cu_k), ref)


def test_unknown_attention_backend_refused():
    q = torch.randn(2, 2, 4)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="not available"):
        varlen_attention(q, q, q, cu, 2, backend="flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "torch"])
def test_cuda_backends_match_sdpa(backend):
    from skyt1.attention import available_backends
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} unavailable")
    lengths = [100, 3, 257]
    cu = torch.tensor([0, 100, 103, 360], dtype=torch.int32, device="cuda")
    q = torch.randn(360, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(360, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(360, 2, 64, device="cuda", dtype=torch.bfloat16)
    out = varlen_attention(q, k, v, cu, max(lengths), backend=backend)
    ref = varlen_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), cu.cpu(), max(lengths),
                           backend="sdpa")
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "llama", "model_type"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("hidden_act", "gelu", "hidden_act"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
])
def test_unsupported_config_refused_naming_field(field, value, match):
    d = hf_config(*CONFIGS[0]).to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(d, source="x/config.json")


def test_missing_field_named():
    d = hf_config(*CONFIGS[0]).to_dict()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict(d, source="x/config.json")
