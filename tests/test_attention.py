"""The attention backends: the CPU op (skyt1::varlen_attn) against the SDPA + mask reference and a
hand-written softmax, its fake implementation, torch.compile of a block with no graph break, and the
CUDA varlen backward against SDPA (skips without CUDA)."""
import pytest
import torch

from skyt1.attention import (available_backends, default_backend, resolve_attention, sdpa_varlen_attention,
                             varlen_attention)
from skyt1.config import ModelConfig
from skyt1.model import Block, rope_cos_sin


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)


def _softmax_attention(q, k, v, lq, lk):
    """One document and head at a time, bottom-right causal, GQA by head // group: the oracle."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    oq = ok = 0
    for a, b in zip(lq, lk):
        for h in range(q.shape[1]):
            s = q[oq:oq + a, h] @ k[ok:ok + b, h // group].T / q.shape[-1] ** 0.5   # (a, b)
            allowed = torch.ones(a, b, dtype=torch.bool).tril(b - a)
            out[oq:oq + a, h] = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[ok:ok + b, h // group]
        oq, ok = oq + a, ok + b
    return out


@pytest.mark.parametrize("lq,lk,heads,kv", [([7, 1, 13], [7, 1, 13], 4, 2), ([3, 5, 2], [8, 5, 6], 6, 3),
                                             ([11], [11], 2, 2)])
def test_cpu_op_matches_softmax_and_sdpa_reference(lq, lk, heads, kv):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    q = torch.randn(sum(lq), heads, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lk), kv, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lk), kv, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = _cu(lq), _cu(lk)
    out = varlen_attention(q, k, v, cu_q, max(lq), cu_k, max(lk), backend="cpu")
    torch.testing.assert_close(out, _softmax_attention(q.detach(), k.detach(), v.detach(), lq, lk))
    ref = sdpa_varlen_attention(q, k, v, cu_q, cu_k)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, msg=f"d{name}")


def test_cpu_op_passes_opcheck():
    q = torch.randn(9, 4, 8, requires_grad=True)
    k = torch.randn(9, 2, 8, requires_grad=True)
    v = torch.randn(9, 2, 8, requires_grad=True)
    # Schema, autograd registration and fake implementation against the real one (the AOT-dispatch check is
    # the compile test's job below, at a fraction of its time).
    torch.library.opcheck(torch.ops.skyt1.varlen_attn.default, (q, k, v, _cu([4, 5]), _cu([4, 5]), True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_fake_mode_allocates_output_and_lse_only():
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, H, D = 4096, 8, 64
    with FakeTensorMode():
        q = torch.empty(T, H, D, dtype=torch.bfloat16, requires_grad=True)
        k = torch.empty(T, 2, D, dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 1000, T], dtype=torch.int32)
        out, lse = torch.ops.skyt1.varlen_attn(q, k, k, cu, cu, True)
        assert out.shape == (T, H, D) and out.dtype == torch.bfloat16
        assert lse.shape == (H, T) and lse.dtype == torch.float32
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_backend_follows_dtype():
    assert default_backend("cpu") == "cpu"
    # The GPU varlen kernels take fp16/bf16 only: fp32 on CUDA goes to the SDPA reference.
    assert available_backends("cuda", torch.float32) == ["sdpa"]
    with pytest.raises(ValueError, match="not available"):
        resolve_attention("torch", "cuda", torch.float32)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_attention("nope", "cpu", torch.float32)


def test_compiled_block_has_no_graph_break_and_equals_eager():
    torch._dynamo.reset()
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    block = Block(cfg, 0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    lengths = [5, 11, 3]
    cu = _cu(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)
    fn = resolve_attention(None, "cpu", torch.float32)
    attn = lambda _i, q, k, v: fn(q, k, v, cu, cu, max(lengths), max(lengths))  # noqa: E731
    x = torch.randn(sum(lengths), cfg.hidden_size, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    y_eager = block(x, cos, sin, attn)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x, *block.parameters()])
    y = compiled(x, cos, sin, attn)
    g = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "torch"])
def test_cuda_varlen_backward_matches_sdpa(backend):
    if backend not in available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} unavailable")
    lengths = [100, 3, 257]
    cu = _cu(lengths, "cuda")
    q = torch.randn(360, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(360, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(360, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(360, 8, 64, device="cuda", dtype=torch.bfloat16)
    out = varlen_attention(q, k, v, cu, max(lengths), backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref = sdpa_varlen_attention(*ref_in, cu.cpu(), cu.cpu())
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double().cpu())
    # bf16 kernel vs an fp64 reference: relative error of a bf16 computation (flash-attn's test rule).
    for name, a, b in zip("qkv", grads, ref_grads):
        err = (a.double().cpu() - b).norm() / b.norm()
        assert err < 2e-2, f"d{name}: relative error {err:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_attention_runs():
    lengths = [17, 40]
    cu = _cu(lengths, "cuda")
    q = torch.randn(57, 4, 16, device="cuda")
    k = torch.randn(57, 2, 16, device="cuda")
    out = varlen_attention(q, k, k, cu, 40)
    ref = _softmax_attention(q.double().cpu(), k.double().cpu(), k.double().cpu(), lengths, lengths)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=1e-4)
