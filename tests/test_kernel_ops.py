"""The fused loss and the AdamW update as torch ops: torch's own op checker (schema, fake vs real,
autograd registration, AOT dispatch), torch.compile(fullgraph=True) of the loss head and of the
update against eager, fake-tensor runs that allocate what the real op allocates (and nothing at full
32B width), and the profiler seeing each as one op."""
import resource

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from skyt1.config import ModelConfig
from skyt1.kernels import fused_linear_ce as flce
from skyt1.kernels.adamw import adamw_update
from skyt1.model import build_model
from skyt1.optim import AdamW
from skyt1.parallel import LossHead, install_loss_head


def _loss_inputs(T=20, H=8, V=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()  # (T, H)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()  # (V, H)
    labels = torch.randint(0, V, (T,), generator=g)  # (T,)
    labels[::4] = -100
    return hidden, weight, labels, g


def _op_args(hidden, weight, labels, *, bias=None, cw=None, z_loss=0.0, smoothing=0.0, softcap=0.0,
             reduction="sum", rows=8, use_triton=False, want_z=False):
    return (hidden, weight, labels, bias, cw, reduction, [z_loss, smoothing, softcap], [-100, rows],
            [True, use_triton, hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
             want_z])


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_opcheck_fused_linear_ce(reduction):
    hidden, weight, labels, g = _loss_inputs()
    bias = torch.randn(50, generator=g).requires_grad_()
    cw = torch.rand(50, generator=g) + 0.5
    args = _op_args(hidden, weight, labels, bias=bias, cw=cw, z_loss=1e-2, smoothing=0.1, softcap=5.0,
                    reduction=reduction, want_z=True)
    torch.library.opcheck(torch.ops.skyt1.fused_linear_ce.default, args)


def test_opcheck_adamw_update():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    p = torch.randn(300, generator=g).bfloat16()
    args = (p, torch.randn(300, generator=g), torch.zeros(300), torch.zeros(300), torch.zeros(300, dtype=torch.bfloat16),
            1e-3, 0.9, 0.999, 1e-8, 0.0, 1, "bf16_kahan", 3, 0, "torch")
    torch.library.opcheck(torch.ops.skyt1.adamw_update_.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_loss_head_compiles_fullgraph_and_equals_eager():
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = build_model(cfg, seed=int(torch.randint(0, 2**31, ())))
    head = install_loss_head(model, z_loss=1e-3)
    hidden, _, labels, _ = _loss_inputs(T=24, H=32, V=97)

    def loss_fn(h, y):
        return head(h, y) * 0.25  # the train step's scaling

    results = []
    # aot_eager: Dynamo (fullgraph: any graph break raises) and AOTAutograd (the op's fake impl and its
    # autograd formula), without Inductor's C++ build, which takes a minute on 2 cores.
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        h = hidden.detach().clone().requires_grad_()
        head.weight.grad = None
        loss = fn(h, labels)
        loss.backward()
        results.append((loss.detach(), h.grad, head.weight.grad.clone()))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_adamw_update_compiles_fullgraph_and_equals_eager():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    state = [torch.randn(500, generator=g).bfloat16(), torch.randn(500, generator=g) * 1e-3, torch.rand(500, generator=g)]
    grad = torch.randn(500, generator=g)

    def step(p, m, v, grad):
        adamw_update(p, grad, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3,
                     master="bf16_sr", seed=11, backend="torch")

    eager = [t.clone() for t in state]
    step(*eager, grad)
    compiled = [t.clone() for t in state]
    torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled, grad)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def _record_work_buffers(monkeypatch):
    seen = []
    real = flce._work_buffers

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append([None if t is None else (tuple(t.shape), t.dtype) for t in out[:4]])
        return out

    monkeypatch.setattr(flce, "_work_buffers", recording)
    return seen


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_op_allocates_what_the_real_op_allocates(monkeypatch, reduction, dtype):
    # Both implementations take their work buffers (dh, dW accumulator, db accumulator, logits chunk)
    # from _work_buffers; record them, and compare every output's shape, dtype and strides.
    seen = _record_work_buffers(monkeypatch)
    hidden, weight, labels, g = _loss_inputs(T=37, H=16, V=300, dtype=dtype)
    bias = torch.randn(300, generator=g).to(dtype).requires_grad_()
    args = _op_args(hidden, weight, labels, bias=bias, rows=16, use_triton=True, reduction=reduction, want_z=True)
    real = torch.ops.skyt1.fused_linear_ce(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = torch.ops.skyt1.fused_linear_ce(*fake_args)
    assert len(seen) == 2 and seen[0] == seen[1]
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


def test_fake_loss_and_adamw_at_32b_width_allocate_nothing():
    # The dry run's building blocks at the 32B head: bf16 parameters, hidden 5120, vocab 152064. Real
    # tensors would be 1.5 GiB (weight) + 1.5 GiB (its gradient) + 6 GiB (fp32 moments).
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with FakeTensorMode():
        head = LossHead(5120, 152064, bias=False, dtype=torch.bfloat16)
        hidden = torch.empty(4096, 5120, dtype=torch.bfloat16, requires_grad=True)  # (T, H)
        labels = torch.zeros(4096, dtype=torch.long)  # (T,)
        loss = head(hidden, labels)
        loss.backward()
        opt = AdamW(head.parameters(), lr=1e-5, master="bf16_sr", backend="auto")
        opt.step()
        opt.step()
        state = opt.state[head.weight]
        assert loss.shape == () and loss.dtype == torch.float32
        assert head.weight.grad.shape == (152064, 5120) and head.weight.grad.dtype == torch.bfloat16
        assert hidden.grad.shape == (4096, 5120) and hidden.grad.dtype == torch.bfloat16
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].shape == (152064, 5120)
    assert opt._steps[id(head.weight)] == 2
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mib < 512, f"resident memory grew by {grown_mib:.0f} MiB: something was materialised"


def test_profiler_sees_each_as_one_op():
    hidden, weight, labels, _ = _loss_inputs()
    p = torch.randn(64).bfloat16()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        flce.fused_linear_cross_entropy(hidden, weight, labels, impl="torch").backward()
        adamw_update(p, torch.randn(64), torch.zeros(64), torch.zeros(64), lr=1e-3, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.0, step=1, master="bf16_sr", backend="torch")
    names = [e.name for e in prof.events()]
    assert names.count("skyt1::fused_linear_ce") == 1 and names.count("skyt1::adamw_update_") == 1
