"""Paged decode attention: the Triton kernel (interpreter on CPU) against its PyTorch reference and
against dense attention (SDPA) over the same keys laid out contiguously."""
import pytest
import torch
import torch.nn.functional as F

from skyt1.kernels.paged_attention import (_interpreting, choose_num_splits, page_tile, paged_decode_attention,
                                           paged_decode_attention_op, paged_decode_attention_ref,
                                           paged_decode_attention_sdpa)


def make_case(B, Hq, Hkv, D, page, lens, dtype, gen):
    """A pool with pages handed out in random order; returns pool, tables and each sequence's dense K/V."""
    per_seq = [max(1, -(-n // page)) for n in lens]
    num_pages = sum(per_seq) + 3                      # a few pages nobody owns
    k_cache = torch.randn(num_pages, page, Hkv, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, page, Hkv, D, generator=gen).to(dtype)
    perm = torch.randperm(num_pages, generator=gen)
    width = max(per_seq) + 1                          # a spare column: tables wider than needed
    tables = torch.zeros(B, width, dtype=torch.int32)
    start = 0
    for b, m in enumerate(per_seq):
        tables[b, :m] = perm[start:start + m].to(torch.int32)
        start += m
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def dense_reference(q, k_cache, v_cache, tables, lens):
    """Per sequence: gather its keys into a contiguous tensor, SDPA in fp64 (an oracle we did not write)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    page = k_cache.shape[1]
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            continue
        idx = torch.arange(n)
        pages = tables[b].long()[idx // page]
        k = k_cache[pages, idx % page].double()   # (n, Hkv, D)
        v = v_cache[pages, idx % page].double()
        o = F.scaled_dot_product_attention(q[b:b + 1, :, None].double(), k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], enable_gqa=True)  # (1, Hq, 1, D)
        out[b] = o[0, :, 0]
    return out


CASES = [
    # B, Hq, Hkv, D, page, lens, splits
    (3, 4, 4, 32, 16, [1, 16, 37], 1),      # MHA, one page exactly, a partial page
    (4, 14, 2, 64, 16, [5, 64, 100, 0], 3),  # Qwen2.5-0.5B grouping (7 query heads per KV head), a padding row
    (2, 8, 1, 24, 5, [23, 9], 2),            # MQA, head_dim not a power of two, odd page size
    (2, 6, 3, 16, 8, [130, 3], 4),           # more splits than needed for the short sequence
    (2, 10, 2, 32, 48, [150, 47], 2),        # pages of 48: tiles of 16, three per page
]
# CPU tensors run the kernels under the Triton interpreter (tests/conftest.py sets it); CUDA tensors where a
# GPU is present (the interpreter off, as bench/gpu_suite.sh runs them).
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


# Each case with the gather variant, and with one page per tile where the page size admits it.
VARIANTS = [pytest.param(*c, one, id=f"{i}-{'one-page' if one else 'gather'}") for i, c in enumerate(CASES)
            for one in (False, True) if not one or page_tile(c[4], 16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Hq,Hkv,D,page,lens,splits,one_page_tiles", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_and_dense(B, Hq, Hkv, D, page, lens, splits, one_page_tiles, dtype, device):
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    q, kc, vc, tables, ctx = make_case(B, Hq, Hkv, D, page, lens, dtype, gen)
    dense = dense_reference(q, kc, vc, tables, ctx)
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx)
    on = [t.to(device) for t in (q, kc, vc, tables, ctx)]
    out = paged_decode_attention(*on, num_splits=splits, block_n=16, one_page_tiles=one_page_tiles).cpu()
    assert out.dtype == dtype and out.shape == q.shape
    # Error rule: the kernel may be off the fp64 oracle by at most ~2x what the reference is (plus slack
    # for the final rounding to the storage dtype).
    ulp = 1e-6 if dtype == torch.float32 else 8e-3
    ref_err = (ref.double() - dense).abs().max().item()
    out_err = (out.double() - dense).abs().max().item()
    assert ref_err <= 4 * ulp, ref_err
    assert out_err <= 2 * ref_err + 2 * ulp, (out_err, ref_err)
    zero_rows = ctx == 0
    assert torch.all(out[zero_rows] == 0) and torch.all(ref[zero_rows] == 0)
    fast = paged_decode_attention_sdpa(q, kc, vc, tables, ctx)  # the CPU path
    assert fast.dtype == dtype and (fast.double() - dense).abs().max().item() <= 2 * ref_err + 2 * ulp
    assert torch.all(fast[zero_rows] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_splits_agree_and_write_in_place(device):
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    q, kc, vc, tables, ctx = (t.to(device) for t in make_case(2, 4, 2, 32, 8, [77, 40], torch.float32, gen))
    one = paged_decode_attention(q, kc, vc, tables, ctx, num_splits=1, block_n=16)
    out = torch.full_like(q, float("nan"))
    many = paged_decode_attention(q, kc, vc, tables, ctx, num_splits=5, block_n=16, out=out)
    assert many.data_ptr() == out.data_ptr()
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


def test_page_tile():
    assert [page_tile(p) for p in (4, 5, 16, 48, 64, 256)] == [None, None, 16, 16, 64, 64]
    assert page_tile(256, 32) == 32


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_is_one_op_for_fake_tensors_compile_and_profiler(device):
    """torch.ops.skyt1.paged_decode_attention: shapes under FakeTensorMode without running, no graph break
    under torch.compile(fullgraph=True), one op in the profiler; the same numbers as the launcher."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    case = [t.to(device) for t in make_case(3, 8, 2, 32, 16, [20, 33, 7], torch.float32, gen)]
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(t) for t in case]
        out = torch.ops.skyt1.paged_decode_attention(*fake, 2, True)
        assert out.shape == case[0].shape and out.dtype == case[0].dtype

    def attend(q, kc, vc, bt, lens):
        return torch.ops.skyt1.paged_decode_attention(q * 1.0, kc, vc, bt, lens, 2, False) + 0.0

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*case), paged_decode_attention(*case, num_splits=2), rtol=1e-5, atol=1e-6)
    with torch.profiler.profile() as prof:
        paged_decode_attention_op(*case)
    names = [e.name for e in prof.events()]
    assert names.count("skyt1::paged_decode_attention") == 1


def test_launcher_rejects_bad_layouts():
    q = torch.randn(2, 4, 16)
    kc = torch.randn(4, 8, 2, 16)
    tables = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(AssertionError):
        paged_decode_attention(q, kc, kc, tables.long(), lens)            # int64 table
    with pytest.raises(AssertionError):
        paged_decode_attention(q, kc, kc[..., :8], tables, lens)          # head_dim mismatch
    with pytest.raises(AssertionError):
        paged_decode_attention(q.double(), kc, kc, tables, lens)          # dtype mismatch


def test_num_splits_heuristic():
    # Enough sequences x heads to fill the GPU: no split. Few: split, bounded by the context length.
    assert choose_num_splits(256, 8, 32768, 132) == 1
    assert choose_num_splits(1, 8, 32768, 132) == 32   # capped at max_splits
    assert choose_num_splits(1, 2, 512, 132) == 2
    assert choose_num_splits(4, 2, 100, 132) == 1


def test_startup_checks_accept_good_and_reject_broken_backends():
    from skyt1.sample.attn_backend import check_decode_backend, check_prefill_backend

    cpu = torch.device("cpu")
    for name in ("torch", "sdpa", "triton"):
        assert check_decode_backend(name, cpu, torch.float32, 4, 6, 2, 16) is None, name
    assert check_decode_backend("triton-page", cpu, torch.float32, 16, 6, 2, 16) is None
    assert check_prefill_backend("gather", cpu, torch.float32, 4, 6, 2, 16) is None
    # flash-attn is not importable here: the check reports why instead of raising
    assert check_decode_backend("flash", cpu, torch.float32, 4, 6, 2, 16) is not None
    assert check_prefill_backend("flash-paged", cpu, torch.float32, 4, 6, 2, 16) is not None
