"""Fused linear cross-entropy against a float64 reference, PyTorch's own unfused op and
F.linear_cross_entropy. The Triton path runs under TRITON_INTERPRET=1 (set by conftest.py); the
plain PyTorch path is the one CPU training uses. Tolerance rule (flash-attention's): our error
against float64 is at most 2x what PyTorch's unfused computation in the same dtype achieves, plus a
small floor for fp32 where both errors are at rounding level."""
import pytest
import torch
import torch.nn.functional as F

from skyt1.kernels import fused_linear_ce as flce
from skyt1.kernels.fused_linear_ce import fused_linear_cross_entropy, linear_cross_entropy_reference

IMPLS = ["triton", "torch"]


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
    """loss and grads of fn, with upstream gradient grad_scale; inputs are copied to fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    (loss * grad_scale).backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return loss.detach(), grads


def _rel(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _compare_all(draws, *, z_loss, grad_scale, **kw):
    """Loss and every gradient of the fused op vs float64, against PyTorch's unfused op in the same dtype.

    Errors are relative Frobenius norms, pooled (root mean square) over independent draws: a single
    draw's PyTorch error can be small by luck (its bf16 loss is one rounded scalar), which would make a
    per-draw 2x rule flaky without making it stricter.
    """
    ref_fn = linear_cross_entropy_reference
    up = lambda t: t.double() if t is not None else None  # noqa: E731
    sq = {}  # name -> [sum of squared ours errors, sum of squared PyTorch errors]
    for hidden, weight, labels, bias in draws:
        loss64, g64 = _run(ref_fn, up(hidden), up(weight), labels, up(bias), grad_scale, z_loss=z_loss)
        loss_t, g_t = _run(ref_fn, hidden, weight, labels, bias, grad_scale, z_loss=z_loss)
        loss_f, g_f = _run(fused_linear_cross_entropy, hidden, weight, labels, bias, grad_scale,
                           z_loss=z_loss, **kw)
        assert loss_f.dtype == torch.float32 and loss_f.dim() == 0 and torch.isfinite(loss_f)
        items = [("loss", loss_f.reshape(1), loss_t.reshape(1), loss64.reshape(1))]
        items += [(n, a, b, c) for n, a, b, c in zip(("d_hidden", "d_weight", "d_bias"), g_f, g_t, g64)
                  if c is not None]
        for name, ours, same_dtype, ref64 in items:
            if name != "loss":
                assert ours.dtype == hidden.dtype and ours.shape == ref64.shape, name
                assert torch.isfinite(ours).all(), f"{name} has non-finite entries"
            acc = sq.setdefault(name, [0.0, 0.0])
            acc[0] += _rel(ours, ref64) ** 2
            acc[1] += _rel(same_dtype, ref64) ** 2
    floor = 1e-6 if draws[0][0].dtype == torch.float32 else 1e-5
    for name, (e_ours, e_torch) in sq.items():
        e_ours, e_torch = (e_ours / len(draws)) ** 0.5, (e_torch / len(draws)) ** 0.5
        assert e_ours <= 2 * e_torch + floor, f"{name}: error {e_ours:.3e} vs PyTorch's {e_torch:.3e}"


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
def test_against_float64(impl, dtype, T, H, V, chunk, z_loss, bias):
    n_draws = 3 if T > 1 else 16  # a one-token error is one noisy sample: pool more draws
    draws = [_inputs(T, H, V, dtype, ignored_frac=0.2 if T > 1 else 0.0, bias=bias) for _ in range(n_draws)]
    _compare_all(draws, z_loss=z_loss, grad_scale=0.37, impl=impl, chunk_size=chunk)


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
    mean = fused_linear_cross_entropy(hidden, weight, labels, impl=impl, reduction="mean")
    assert torch.isnan(mean) and torch.isnan(F.cross_entropy(hidden @ weight.t(), labels))


@pytest.mark.parametrize("impl", IMPLS)
def test_poisoned_buffers(monkeypatch, impl):
    # Every buffer the op writes comes from flce._empty: fill them with NaN so any element the kernels
    # or GEMMs leave unwritten shows up in the results.
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(flce, "_empty", poisoned)
    draws = [_inputs(37, 24, 517, torch.bfloat16) for _ in range(3)]
    _compare_all(draws, z_loss=1e-3, grad_scale=2.0, impl=impl, chunk_size=16, fp32_accum=False)


def test_row_kernel_matches_its_reference(monkeypatch):
    # A small vocabulary tile makes the kernel loop over several tiles with a ragged tail (1031 = 4*256+7).
    monkeypatch.setattr(flce, "MAX_BLOCK_V", 256)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(11, 1031, generator=g) * 3).to(dtype)  # (rows, V)
        bias = torch.randn(1031, generator=g).to(dtype)  # (V,)
        labels = torch.randint(0, 1031, (11,), generator=g)  # (rows,)
        labels[[2, 7]] = -100
        labels[3] = 1030  # last column, in the ragged tile
        out = {}
        for name, fn in (("triton", flce.cross_entropy_rows_triton), ("torch", flce.cross_entropy_rows_torch)):
            lg = logits.clone()
            loss = torch.full((11,), float("nan"))
            fn(lg, labels, loss, bias=bias, ignore_index=-100, z_loss=1e-2, need_grad=True)
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
        (dict(reduction="none"), "reduction"),
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp32_accum", [True, False])
def test_cuda_against_float64(fp32_accum):
    hidden, weight, labels, b = _inputs(3000, 256, 32003, torch.bfloat16, bias=True)
    draws = [tuple(t.cuda() for t in (hidden, weight, labels, b))]
    _compare_all(draws, z_loss=1e-3, grad_scale=0.37, chunk_size=1024, fp32_accum=fp32_accum)
