"""Fused linear cross-entropy against a float64 reference, PyTorch's own unfused op and
F.linear_cross_entropy. The Triton path runs under TRITON_INTERPRET=1 (set by conftest.py); the
plain PyTorch path is the one CPU training uses. Tolerance rule (flash-attention's): our error
against float64 is at most 2x what PyTorch's unfused computation in the same dtype achieves, plus a
small floor for fp32 where both errors are at rounding level. Each option (reduction "mean"/"none",
label smoothing, softcap, class weights, the z-loss returned apart) is checked the same way, against
F.cross_entropy's semantics in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from skyt1.kernels import fused_linear_ce as flce
from skyt1.kernels.fused_linear_ce import fused_linear_cross_entropy, linear_cross_entropy_reference

IMPLS = ["triton", "torch"]
# cpu: the Triton kernel under the interpreter and the torch path; cuda: the compiled kernel.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _inputs(T, H, V, dtype, *, ignored_frac=0.2, bias=False, seed=None):
    seed = seed if seed is not None else torch.seed() % 2**31
    print(f"_inputs(T={T}, H={H}, V={V}, {dtype}) seed {seed}")  # shown by pytest when a test fails
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)  # (T, H)
    # std so that logits have std ~2.5, like a trained LM head: softmax far from uniform.
    weight = (torch.randn(V, H, generator=g) * 2.5 / H**0.5).to(dtype)  # (V, H)
    labels = torch.randint(0, V, (T,), generator=g)  # (T,)
    labels[torch.rand(T, generator=g) < ignored_frac] = -100
    b = torch.randn(V, generator=g).to(dtype) if bias else None  # (V,)
    return hidden, weight, labels, b


def _run(fn, hidden, weight, labels, bias, grad_scale, **kw):
    """loss and grads of fn, with upstream gradient grad_scale (a number, or a (T,) tensor for
    reduction="none"); inputs are copied to fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    if isinstance(grad_scale, torch.Tensor):
        grad_scale = grad_scale.to(loss.device, loss.dtype)
    (loss * grad_scale).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return loss.detach(), grads


def _rel(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _compare_all(draws, *, z_loss, grad_scale, options=None, floor=None, **kw):
    """Loss and every gradient of the fused op vs float64, against PyTorch's unfused op in the same dtype.

    Errors are relative Frobenius norms, pooled (root mean square) over independent draws: a single
    draw's PyTorch error can be small by luck (its bf16 loss is one rounded scalar), which would make a
    per-draw 2x rule flaky without making it stricter.
    """
    ref_fn = linear_cross_entropy_reference
    up = lambda t: t.double() if t is not None else None  # noqa: E731
    options = dict(options or {})
    opt64 = {k: up(v) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    sq = {}  # name -> [sum of squared ours errors, sum of squared PyTorch errors]
    for hidden, weight, labels, bias in draws:
        loss64, g64 = _run(ref_fn, up(hidden), up(weight), labels, up(bias), grad_scale, z_loss=z_loss, **opt64)
        loss_t, g_t = _run(ref_fn, hidden, weight, labels, bias, grad_scale, z_loss=z_loss, **options)
        loss_f, g_f = _run(fused_linear_cross_entropy, hidden, weight, labels, bias, grad_scale,
                           z_loss=z_loss, **options, **kw)
        assert loss_f.dtype == torch.float32 and loss_f.shape == loss64.shape and torch.isfinite(loss_f).all()
        items = [("loss", loss_f.reshape(-1), loss_t.reshape(-1), loss64.reshape(-1))]
        items += [(n, a, b, c) for n, a, b, c in zip(("d_hidden", "d_weight", "d_bias"), g_f, g_t, g64)
                  if c is not None]
        for name, ours, same_dtype, ref64 in items:
            if name != "loss":
                assert ours.dtype == hidden.dtype and ours.shape == ref64.shape, name
                assert torch.isfinite(ours).all(), f"{name} has non-finite entries"
            acc = sq.setdefault(name, [0.0, 0.0])
            acc[0] += _rel(ours.cpu(), ref64.cpu()) ** 2
            acc[1] += _rel(same_dtype.cpu(), ref64.cpu()) ** 2
    if floor is None:
        floor = 1e-6 if draws[0][0].dtype == torch.float32 else 1e-5
    for name, (e_ours, e_torch) in sq.items():
        e_ours, e_torch = (e_ours / len(draws)) ** 0.5, (e_torch / len(draws)) ** 0.5
        assert e_ours <= 2 * e_torch + floor, f"{name}: error {e_ours:.3e} vs PyTorch's {e_torch:.3e}"


def _on(device, draws):
    return [tuple(t.to(device) if t is not None else None for t in d) for d in draws]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T,H,V,chunk,z_loss,bias",
    [
        (77, 48, 1031, 32, 0.0, False),  # T not a multiple of the chunk; several chunks
        (77, 48, 1031, None, 1e-2, True),  # default chunking (one chunk here), z-loss, bias
        (1, 48, 1031, None, 1e-2, False),  # a single token
    ],
)
def test_against_float64(device, impl, dtype, T, H, V, chunk, z_loss, bias):
    n_draws = 3 if T > 1 else 16  # a one-token error is one noisy sample: pool more draws
    draws = [_inputs(T, H, V, dtype, ignored_frac=0.2 if T > 1 else 0.0, bias=bias) for _ in range(n_draws)]
    _compare_all(_on(device, draws), z_loss=z_loss, grad_scale=0.37, impl=impl, chunk_size=chunk)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_param_dtype_dw_accumulation(impl):
    # dW summed across chunks in bf16 (the 32B-shape policy): one rounding per chunk, still within 2x.
    draws = [_inputs(77, 48, 1031, torch.bfloat16) for _ in range(3)]
    _compare_all(draws, z_loss=0.0, grad_scale=1.0, impl=impl, chunk_size=20, fp32_accum=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored(impl):
    hidden, weight, labels, b = _inputs(9, 16, 300, torch.float32, bias=True)
    labels.fill_(-100)
    loss, (dh, dw, db) = _run(fused_linear_cross_entropy, hidden, weight, labels, b, 1.0, impl=impl,
                              z_loss=1e-3, chunk_size=4)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_mean_with_every_label_ignored_gives_zero_gradients(impl):
    # F.cross_entropy: a NaN loss (0 / 0) but zero gradients; the gradients must not be scaled by 1 / 0.
    hidden, weight, labels, b = _inputs(9, 16, 300, torch.float32, bias=True)
    labels.fill_(-100)
    for z in (0.0, 1e-3):
        loss, grads = _run(fused_linear_cross_entropy, hidden, weight, labels, b, 1.0, impl=impl, z_loss=z,
                           reduction="mean", chunk_size=4)
        loss_o, grads_o = _run(lambda h, w, y, bias: F.cross_entropy(F.linear(h, w, bias), y), hidden, weight,
                               labels, b, 1.0)
        assert torch.isnan(loss) and torch.isnan(loss_o)
        for g, g_o in zip(grads, grads_o):
            assert torch.equal(g, g_o) and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_poisoned_buffers(monkeypatch, impl):
    # Every buffer the op writes comes from flce._empty: fill them with NaN so any element the kernels
    # or GEMMs leave unwritten shows up in the results.
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(flce, "_empty", poisoned)
    draws = [_inputs(37, 24, 517, torch.bfloat16) for _ in range(3)]
    _compare_all(draws, z_loss=1e-3, grad_scale=2.0, impl=impl, chunk_size=16, fp32_accum=False)


@pytest.mark.parametrize("device", DEVICES)
def test_row_kernel_matches_its_reference(monkeypatch, device):
    # A small vocabulary tile makes the kernel loop over several tiles with a ragged tail (1031 = 4*256+7).
    monkeypatch.setattr(flce, "MAX_BLOCK_V", 256)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(11, 1031, generator=g) * 3).to(dtype).to(device)  # (rows, V)
        bias = torch.randn(1031, generator=g).to(dtype).to(device)  # (V,)
        labels = torch.randint(0, 1031, (11,), generator=g).to(device)  # (rows,)
        labels[[2, 7]] = -100
        labels[3] = 1030  # last column, in the ragged tile
        out = {}
        for name, fn in (("triton", flce.cross_entropy_rows_triton), ("torch", flce.cross_entropy_rows_torch)):
            lg = logits.clone()
            loss = torch.full((11,), float("nan"), device=device)
            fn(lg, labels, loss, bias=bias, opts=flce.LossOptions(-100, 1e-2), need_grad=True)
            out[name] = (loss, lg.float())
        torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
        # Same fp32 math, one rounding to the param dtype: at most one ulp apart.
        tol = 1e-6 if dtype == torch.float32 else 2**-8
        torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=tol, atol=1e-7)
        assert out["torch"][0][2] == 0 and torch.count_nonzero(out["triton"][1][[2, 7]]) == 0


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch has no F.linear_cross_entropy")
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_torch_linear_cross_entropy(impl):
    hidden, weight, labels, b = _inputs(45, 32, 700, torch.float32, bias=True)
    oracle = lambda h, w, y, bias: F.linear_cross_entropy(  # noqa: E731
        h, w, y, linear_bias=bias, reduction="sum", ignore_index=-100
    )
    loss_o, g_o = _run(oracle, hidden, weight, labels, b, 0.5)
    loss_f, g_f = _run(fused_linear_cross_entropy, hidden, weight, labels, b, 0.5, impl=impl, chunk_size=16)
    torch.testing.assert_close(loss_f, loss_o, rtol=1e-5, atol=1e-4)
    for a, o in zip(g_f, g_o):
        torch.testing.assert_close(a, o, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_reduction_mean_int32_labels_and_no_grad(impl):
    hidden, weight, labels, _ = _inputs(30, 16, 200, torch.float32)
    labels[0] = -100
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="mean")
    got = fused_linear_cross_entropy(hidden, weight, labels.int(), reduction="mean", impl=impl, chunk_size=7)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        w = weight.clone().requires_grad_()
        loss = fused_linear_cross_entropy(hidden, w, labels, impl=impl)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref * (labels != -100).sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_unchecked_bad_label_gives_nan_not_a_fault(impl):
    hidden, weight, labels, _ = _inputs(6, 8, 50, torch.float32, ignored_frac=0.0)
    labels[4] = 50
    loss = fused_linear_cross_entropy(hidden, weight, labels, check_labels=False, impl=impl)
    assert torch.isnan(loss)


def test_second_backward_raises():
    hidden, weight, labels, _ = _inputs(5, 8, 40, torch.float32)
    h = hidden.requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs_raise_value_errors():
    T, H, V = 6, 8, 50
    hidden, weight, labels, _ = _inputs(T, H, V, torch.float32, ignored_frac=0.0)
    bad = [
        (dict(hidden=hidden[:, :5]), "weight"),
        (dict(hidden=hidden[None]), "hidden"),
        (dict(weight=weight.double()), "weight"),
        (dict(weight=torch.randn(H, V).t()), "weight must be contiguous"),
        (dict(labels=labels[:-1]), "labels"),
        (dict(labels=labels.float()), "labels"),
        (dict(labels=labels.clone().index_fill_(0, torch.tensor([3]), V)), r"labels\[3\] = 50"),
        (dict(labels=labels.clone().index_fill_(0, torch.tensor([1]), -5)), r"labels\[1\] = -5"),
        (dict(bias=torch.zeros(V + 1)), "bias"),
        (dict(bias=torch.zeros(V, dtype=torch.bfloat16)), "bias"),
        (dict(reduction="avg"), "reduction"),
        (dict(bias=torch.zeros(2 * V)[::2]), "bias must be contiguous"),
        (dict(class_weight=torch.ones(V, 2)[:, 0]), "class_weight must be contiguous"),
        (dict(class_weight=torch.ones(V - 1)), "class_weight"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(softcap=0.0), "softcap"),
        (dict(z_loss=-1.0), "z_loss"),
        (dict(chunk_size=0), "chunk_size"),
    ]
    for override, match in bad:
        args = dict(hidden=hidden, weight=weight, labels=labels)
        kwargs = {k: override.pop(k) for k in list(override) if k not in args}
        args.update(override)
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **kwargs)


def test_default_chunk_rows_bounds_memory():
    # The 32B shape: 2048-token chunks, logits chunk within budget, extra memory well under 1 GiB.
    rows = flce.default_chunk_rows(16384, 152064, 2)
    assert rows == 2048 and rows * 152064 * 2 <= flce.LOGITS_CHUNK_BYTES
    for T, V, item in ((77, 1031, 4), (5000, 151936, 2), (16384, 152064, 4), (3, 10**9, 2)):
        rows = flce.default_chunk_rows(T, V, item)
        assert 1 <= rows <= max(T, 1) and (rows * V * item <= flce.LOGITS_CHUNK_BYTES or rows == 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("std", [25.0, 250.0])
def test_fp32_gradients_at_large_logits(impl, std):
    # Exact logits (small integers times a power of two, so the fp32 matmul does not round): what is
    # left is the softmax's own error. exp(x - lse) with lse rounded to fp32 was 22x PyTorch's error
    # at std 25 and 120x at std 250; exp(x - m) / s is within PyTorch's.
    draws = []
    for _ in range(3):
        g = torch.Generator().manual_seed(torch.seed() % 2**31)
        hidden = torch.randint(-3, 4, (77, 48), generator=g).float()  # (T, H)
        w_int = torch.randint(-8, 9, (1031, 48), generator=g).float()  # (V, H)
        scale = 2.0 ** round(math.log2(std / (hidden @ w_int.t()).std().item()))
        labels = torch.randint(0, 1031, (77,), generator=g)  # (T,)
        labels[torch.rand(77, generator=g) < 0.2] = -100
        draws.append((hidden, w_int * scale, labels, None))
    _compare_all(draws, z_loss=0.0, grad_scale=0.37, floor=1e-7, impl=impl, chunk_size=32)


def test_row_kernel_rows_below_minus_1e30():
    # The running max used to start at -1e30: a row entirely below it got s = 0 and NaN everywhere.
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    logits = -1e31 * (1 + torch.rand(5, 300, generator=g))  # (rows, V)
    logits[:, 0] = -1e31  # the max of every row, so every loss is finite
    labels = torch.randint(0, 300, (5,), generator=g)  # (rows,)
    labels[0] = 0
    ref = F.cross_entropy(logits, labels, reduction="none")
    for fn in (flce.cross_entropy_rows_triton, flce.cross_entropy_rows_torch):
        lg = logits.clone()
        loss = torch.empty(5)
        fn(lg, labels, loss, bias=None, opts=flce.LossOptions(), need_grad=True)
        torch.testing.assert_close(loss, ref)
        assert torch.isfinite(lg).all()
        assert loss[0] == 0 and lg[0, 0] == 0  # the label is the max by 1e30: p = 1, gradient 0


def test_row_launcher_rejects_a_non_contiguous_bias():
    # A layout error is a ValueError raised by the launcher (it was an assert: gone under python -O,
    # where the kernel then read the bias with the wrong stride).
    for bad in (dict(bias=torch.zeros(16)[::2]), dict(class_weight=torch.zeros(8, 2)[:, 0])):
        with pytest.raises(ValueError, match="must be a contiguous"):
            flce.cross_entropy_rows_triton(torch.zeros(3, 8), torch.zeros(3, dtype=torch.long), torch.empty(3),
                                           opts=flce.LossOptions(), need_grad=False, **{"bias": None, **bad})


REDUCTIONS = ["sum", "mean", "none"]
OPTIONS = {
    "label_smoothing": dict(label_smoothing=0.1),
    "softcap": dict(softcap=3.0),
    "class_weight": "class_weight",
    "all": "all",
}


def _options(name, V, g):
    opt = OPTIONS[name]
    if not isinstance(opt, str):
        return dict(opt)
    cw = torch.rand(V, generator=g) + 0.25  # (V,)
    if name == "class_weight":
        return dict(class_weight=cw)
    return dict(class_weight=cw, label_smoothing=0.2, softcap=4.0)


# The torch path runs every (option, reduction); the interpreted kernel (slow) each option with
# reduction="none" (its per-row upstream gradients) and all options together with sum and mean.
OPTION_CASES = [("torch", o, r) for o in OPTIONS for r in ("sum", "mean", "none")]
OPTION_CASES += [("triton", o, "none") for o in OPTIONS] + [("triton", "all", r) for r in ("sum", "mean")]
OPTION_CASES = [("cpu", *c) for c in OPTION_CASES]
OPTION_CASES += [pytest.param("cuda", "triton", o, r, marks=DEVICES[1].marks) for o in OPTIONS for r in REDUCTIONS]


@pytest.mark.parametrize("device,impl,option,reduction", OPTION_CASES)
def test_options_against_float64(device, impl, option, reduction):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    draws = _on(device, [_inputs(29, 32, 389, torch.float32, bias=True) for _ in range(2)])
    z_loss = 1e-2 if option == "all" else 0.0
    grad = torch.randn(29, generator=g) if reduction == "none" else 0.37  # a per-token upstream gradient
    opts = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _options(option, 389, g).items()}
    _compare_all(draws, z_loss=z_loss, grad_scale=grad, options=dict(opts, reduction=reduction),
                 impl=impl, chunk_size=16)


@pytest.mark.parametrize("impl", IMPLS)
def test_options_in_bf16(impl):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    draws = [_inputs(29, 32, 389, torch.bfloat16, bias=True) for _ in range(3)]
    _compare_all(draws, z_loss=1e-3, grad_scale=0.5, options=_options("all", 389, g), impl=impl, chunk_size=16)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch has no F.linear_cross_entropy")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_smoothing_and_class_weights_match_torch_linear_cross_entropy(reduction):
    hidden, weight, labels, b = _inputs(45, 32, 700, torch.float32, bias=True)
    cw = torch.rand(700) + 0.5  # (V,)
    grad = torch.randn(45) if reduction == "none" else 1.0
    oracle = lambda h, w, y, bias: F.linear_cross_entropy(  # noqa: E731
        h, w, y, linear_bias=bias, weight=cw, reduction=reduction, label_smoothing=0.1)
    loss_o, g_o = _run(oracle, hidden, weight, labels, b, grad)
    loss_f, g_f = _run(fused_linear_cross_entropy, hidden, weight, labels, b, grad, impl="torch", chunk_size=16,
                       class_weight=cw, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss_f, loss_o, rtol=1e-5, atol=1e-5)
    for a, o in zip(g_f, g_o):
        torch.testing.assert_close(a, o, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_return_z_loss(impl, reduction):
    hidden, weight, labels, _ = _inputs(30, 16, 200, torch.float32)
    cw = torch.rand(200) + 0.5
    for class_weight in (None, cw):
        loss, z = fused_linear_cross_entropy(hidden, weight, labels, z_loss=1e-2, return_z_loss=True, impl=impl,
                                             reduction=reduction, class_weight=class_weight, chunk_size=8)
        ref, z_ref = linear_cross_entropy_reference(hidden.double(), weight.double(), labels, z_loss=1e-2,
                                                    return_z_loss=True, reduction=reduction,
                                                    class_weight=None if class_weight is None else cw.double())
        assert z.grad_fn is None and z.shape == loss.shape
        torch.testing.assert_close(z.double(), z_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_casts_inputs_and_grads_flow_to_fp32_weight(impl):
    hidden, weight, labels, _ = _inputs(30, 16, 200, torch.float32)
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, w, labels, impl=impl, chunk_size=8)
    loss.backward()
    ref, (_, g_ref, _) = _run(fused_linear_cross_entropy, hidden.bfloat16(), weight.bfloat16(), labels, None, 1.0,
                              impl=impl, chunk_size=8)
    assert w.grad.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(w.grad, g_ref.float())


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_second_backward_raises_every_reduction(reduction):
    hidden, weight, labels, _ = _inputs(5, 8, 40, torch.float32)
    h = hidden.requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels, impl="torch", reduction=reduction).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp32_accum", [True, False])
def test_cuda_against_float64(fp32_accum):
    hidden, weight, labels, b = _inputs(3000, 256, 32003, torch.bfloat16, bias=True)
    draws = [tuple(t.cuda() for t in (hidden, weight, labels, b))]
    _compare_all(draws, z_loss=1e-3, grad_scale=0.37, chunk_size=1024, fp32_accum=fp32_accum)


@pytest.mark.skipif(not flce._INTERPRETED and not torch.cuda.is_available(), reason="liger needs Triton")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_z_loss_and_smoothing_match_liger(reduction):
    # Liger's own op as the oracle of the z-loss (its lse_square_scale), label smoothing and the
    # separately returned z-loss. fp32 only: the interpreter mishandles liger's bf16 arithmetic, and
    # liger's class-weight and softcap paths do not run in the interpreter.
    liger = pytest.importorskip("liger_kernel.ops.fused_linear_cross_entropy")
    hidden, weight, labels, _ = _inputs(29, 16, 389, torch.float32)
    z_out = {}

    def oracle(h, w, y, bias):
        loss, z_out["liger"], *_ = liger.LigerFusedLinearCrossEntropyFunction.apply(
            h, w, y, bias, None, -100, 1e-2, 0.1, reduction, None, True)
        return loss

    def ours(h, w, y, bias):
        loss, z_out["ours"] = fused_linear_cross_entropy(h, w, y, bias=bias, z_loss=1e-2, label_smoothing=0.1,
                                                         reduction=reduction, return_z_loss=True, chunk_size=8)
        return loss

    loss_o, g_o = _run(oracle, hidden, weight, labels, None, 0.7)
    loss_f, g_f = _run(ours, hidden, weight, labels, None, 0.7)
    torch.testing.assert_close(loss_f, loss_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_out["ours"], z_out["liger"], rtol=1e-5, atol=1e-6)
    for a, o in zip(g_f[:2], g_o[:2]):
        torch.testing.assert_close(a, o, rtol=1e-4, atol=1e-6)
