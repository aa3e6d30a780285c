"""Kernel benchmarks: the fused linear cross-entropy against its alternatives, and the fused-op decision
for RMSNorm, RoPE and SwiGLU.

1. Loss, forward + backward, at the Qwen2.5-32B head (T=16384, H=5120, V=152064, bf16) and the
   Qwen2.5-0.5B head (T=16384, H=896, V=151936): ours (skyt1.kernels.fused_linear_ce, both dW
   accumulation modes), PyTorch unfused (F.linear + F.cross_entropy), F.linear_cross_entropy with its
   chunked path (torch builds that have it), liger-kernel's LigerFusedLinearCrossEntropyFunction, and
   the floor: the three bf16 GEMMs alone (logits, dhidden, dweight) at full size.
   Time: median of device-event timings (triton.testing.do_bench). Memory: peak allocated during one
   forward+backward minus what was live before it (inputs) minus the gradients of hidden and weight,
   i.e. the extra memory the op needs beyond its inputs and their gradients.
2. RMSNorm, RoPE and SwiGLU, forward + backward at the 32B shapes (T=16384, H=5120, I=27648, 40/8
   heads, D=128, bf16): the model's plain PyTorch code (skyt1.model), the same under torch.compile, and
   liger-kernel's Triton ops (called through liger_kernel.ops' autograd Functions, no transformers).

Every contender's output is checked against ours / the plain path before it is timed.
On a machine without CUDA it runs a tiny smoke shape with wall-clock timing, prints "CPU SMOKE", and
writes no record (liger and Triton need TRITON_INTERPRET=1 there, and the ops run in fp32 because the
interpreter mishandles liger's bf16 arithmetic; torch.compile is skipped unless --compile-on-cpu). On CUDA it writes bench/results/kernels_<gpu>_<date>.json.

    python bench/kernels.py                 # everything (~3-5 minutes on an H100)
    python bench/kernels.py --only loss     # or --only ops
    python bench/kernels.py --only overhead --label after --baseline-rev a397d1f   # CPU: the default call

3. Overhead of the default loss call (`--only overhead`): the call the trainer makes
   (fused_linear_cross_entropy(h, W, y, check_labels=False), sum, no options), forward + backward, wall
   clock on the CPU path the CPU trainer takes (impl="torch"), at a host-bound shape (T=64, H=64, V=512)
   where any per-call cost of the options shows, and a GEMM-bound one (T=512, H=256, V=8192). It
   appends {label: timings} to bench/results/loss_overhead_cpu.json; --baseline-rev REV also runs the
   kernel file of an older revision, its calls interleaved with ours, which is the fair comparison on
   a shared machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skyt1.kernels.fused_linear_ce import (  # noqa: E402
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from skyt1.model import RMSNorm, apply_rope, rope_cos_sin  # noqa: E402

GiB = 2**30
LOSS_SHAPES_GPU = {"qwen2.5-32b": (16384, 5120, 152064), "qwen2.5-0.5b": (16384, 896, 151936)}
LOSS_SHAPES_CPU = {"cpu-smoke": (300, 64, 2053)}
OPS_SHAPE_GPU = dict(T=16384, H=5120, I=27648, Hq=40, Hkv=8, D=128)
OPS_SHAPE_CPU = dict(T=64, H=256, I=512, Hq=4, Hkv=2, D=32)


# ----------------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------------
def time_ms(fn, grad_to_none, cuda: bool, rep_ms: int) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(25, rep_ms // 5), rep=rep_ms, grad_to_none=grad_to_none,
                                       return_mode="median")
    fn()  # CPU smoke: wall clock, median of 3
    times = []
    for _ in range(3):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn, leaves) -> int:
    """Peak bytes allocated by one call beyond what was live before it and the leaves' gradients."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = sum(t.numel() * t.element_size() for t in leaves)
    for t in leaves:
        t.grad = None
    return peak - grads


# ----------------------------------------------------------------------------------------------------
# 1. the loss
# ----------------------------------------------------------------------------------------------------
def loss_contenders(cuda: bool):
    """name -> callable(h, W, y) returning the summed loss (scalar); unavailable ones -> reason string."""
    out = {
        "ours": lambda h, w, y: fused_linear_cross_entropy(h, w, y, check_labels=False),
        "ours (fp32 dW acc)": lambda h, w, y: fused_linear_cross_entropy(h, w, y, check_labels=False,
                                                                          fp32_accum=True),
        "ours (bf16 dW acc)": lambda h, w, y: fused_linear_cross_entropy(h, w, y, check_labels=False,
                                                                          fp32_accum=False),
        "torch unfused": lambda h, w, y: linear_cross_entropy_reference(h, w, y),
    }
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()  # the chunked path, "auto" policy
        out["F.linear_cross_entropy chunked"] = lambda h, w, y: F.linear_cross_entropy(
            h, w, y, reduction="sum", options=opts)
    else:
        out["F.linear_cross_entropy chunked"] = f"not in torch {torch.__version__}"
    if cuda or _interpreted():
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            # positional: input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
            # label_smoothing, reduction; liger's default accum_dtype=None sums dW in the param dtype.
            out["liger"] = lambda h, w, y: LigerFusedLinearCrossEntropyFunction.apply(
                h, w, y, None, None, -100, 0.0, 0.0, "sum")[0]
        except ImportError as e:
            out["liger"] = f"liger-kernel not importable: {e}"
    else:
        out["liger"] = "Triton on CPU needs TRITON_INTERPRET=1"
    return out


def _interpreted() -> bool:
    from skyt1.kernels import fused_linear_ce

    return fused_linear_ce._interpreted()


def bench_loss(shapes: dict, cuda: bool, rep_ms: int) -> list[dict]:
    dev = "cuda" if cuda else "cpu"
    rows = []
    for shape_name, (T, H, V) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(0)
        h = torch.randn(T, H, device=dev, generator=g).bfloat16().requires_grad_()  # (T, H)
        w = (torch.randn(V, H, device=dev, generator=g) * 2.5 / H**0.5).bfloat16().requires_grad_()  # (V, H)
        y = torch.randint(0, V, (T,), device=dev, generator=g)  # (T,)
        y[torch.rand(T, device=dev, generator=g) < 0.1] = -100  # some prompt tokens
        leaves = [h, w]
        ref_loss = None
        for name, fn in loss_contenders(cuda).items():
            row = {"shape": shape_name, "T": T, "H": H, "V": V, "impl": name}
            if isinstance(fn, str):
                rows.append({**row, "skipped": fn})
                continue
            step = lambda fn=fn: fn(h, w, y).backward()  # noqa: E731
            try:
                loss = fn(h, w, y)
                loss.backward()
                if ref_loss is None:
                    ref_loss = loss.detach().float()  # "ours" runs first
                row["loss_rel_diff_vs_ours"] = abs((loss.detach().float() - ref_loss) / ref_loss).item()
                del loss
                if cuda:
                    row["extra_mem_gib"] = peak_extra_bytes(step, leaves) / GiB
                row["ms"] = time_ms(step, leaves, cuda, rep_ms)
            except torch.cuda.OutOfMemoryError as e:  # the unfused path at large shapes on small GPUs
                row["skipped"] = f"OOM: {str(e).splitlines()[0]}"
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a broken third-party contender must not stop the run
                row["skipped"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            for t in leaves:
                t.grad = None
            rows.append(row)
        rows.append(_gemm_floor(shape_name, h.detach(), w.detach(), cuda, rep_ms))
        del h, w, y, leaves
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _gemm_floor(shape_name, h, w, cuda, rep_ms) -> dict:
    """The three GEMMs any exact method must run: logits = h W^T, dh = g W, dW = g^T h."""
    T, H = h.shape
    V = w.shape[0]
    row = {"shape": shape_name, "T": T, "H": H, "V": V, "impl": "floor: 3 bf16 GEMMs"}
    try:
        logits = torch.empty(T, V, dtype=h.dtype, device=h.device)  # (T, V)
        dh, dw = torch.empty_like(h), torch.empty_like(w)  # (T, H), (V, H)

        def gemms():
            torch.mm(h, w.t(), out=logits)
            torch.mm(logits, w, out=dh)
            torch.mm(logits.t(), h, out=dw)

        row["ms"] = time_ms(gemms, [], cuda, rep_ms)
        row["tflops"] = 3 * 2 * T * H * V / (row["ms"] * 1e-3) / 1e12
        del logits, dh, dw
    except torch.cuda.OutOfMemoryError as e:
        row["skipped"] = f"OOM: {str(e).splitlines()[0]}"
    return row


def print_loss_table(rows: list[dict]) -> None:
    print(f"\n{'shape':14s} {'impl':32s} {'ms':>9s} {'x floor':>8s} {'extra GiB':>10s} {'loss vs ours':>13s}")
    floors = {r["shape"]: r.get("ms") for r in rows if r["impl"].startswith("floor")}
    for r in rows:
        if "skipped" in r:
            print(f"{r['shape']:14s} {r['impl']:32s} skipped: {r['skipped']}")
            continue
        fl = floors.get(r["shape"])
        ratio = f"{r['ms'] / fl:8.2f}" if fl else f"{'':8s}"
        mem = f"{r['extra_mem_gib']:10.2f}" if "extra_mem_gib" in r else f"{'':10s}"
        diff = f"{r['loss_rel_diff_vs_ours']:13.1e}" if "loss_rel_diff_vs_ours" in r else ""
        print(f"{r['shape']:14s} {r['impl']:32s} {r['ms']:9.2f} {ratio} {mem} {diff}")


# ----------------------------------------------------------------------------------------------------
# 2. RMSNorm, RoPE, SwiGLU
# ----------------------------------------------------------------------------------------------------
def _liger_ops():
    """liger-kernel's autograd Functions, or the reason they are unavailable."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError as e:
        return f"liger-kernel not importable: {e}"
    return LigerRMSNormFunction, LigerRopeFunction, LigerSiLUMulFunction


def ops_cases(s: dict, dev: str, dtype=torch.bfloat16, eps: float = 1e-6):
    """[(op, {variant: fn(*inputs) -> tuple of outputs}, make_inputs)] for RMSNorm, RoPE and SwiGLU."""
    T, H, I, Hq, Hkv, D = s["T"], s["H"], s["I"], s["Hq"], s["Hkv"], s["D"]
    liger = _liger_ops()
    cuda = dev == "cuda"
    liger_ok = not isinstance(liger, str) and (cuda or _interpreted())
    liger_why = liger if isinstance(liger, str) else "Triton on CPU needs TRITON_INTERPRET=1"

    norm = RMSNorm(H, eps).to(device=dev, dtype=dtype)  # the model's own module

    def rms_plain(x, w):
        return (torch.func.functional_call(norm, {"weight": w}, (x,)),)

    def rms_liger(x, w):
        # casting_mode "llama" = HF/our order (fp32 statistics, scale after the cast back); in_place=False
        # keeps dY intact (in_place=True writes dX over dY: only safe when nothing else reads dY).
        return (liger[0].apply(x, w, eps, 0.0, "llama", False),)

    def rms_inputs():
        x = torch.randn(T, H, device=dev, dtype=dtype, requires_grad=True)  # (T, H)
        w = (1 + 0.1 * torch.randn(H, device=dev)).to(dtype).requires_grad_()  # (H,)
        return [x, w]

    def rope_plain(q, k, cos, sin):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (T, Hq, D), (T, Hkv, D)

    def rope_liger(q, k, cos, sin):
        # liger wants (B, heads, S, D) views of (B, S, heads, D) storage, cos/sin (1, S, D/2) with
        # rotary_dim=D for the non-duplicated half-width tables; it rotates q and k in place.
        qo, ko = liger[1].apply(q[None].transpose(1, 2), k[None].transpose(1, 2), cos[None], sin[None], None, 1, D)
        return qo.transpose(1, 2)[0], ko.transpose(1, 2)[0]

    def rope_inputs():
        pos = torch.arange(T, device=dev) % 4096  # packed documents restart positions
        cos, sin = rope_cos_sin(pos, D, 1e6, dtype)  # (T, D/2)
        q = torch.randn(T, Hq, D, device=dev, dtype=dtype, requires_grad=True)  # (T, Hq, D)
        k = torch.randn(T, Hkv, D, device=dev, dtype=dtype, requires_grad=True)  # (T, Hkv, D)
        return [q, k, cos, sin]

    def swiglu_plain(gate, up):
        return (F.silu(gate) * up,)  # (T, I), as in skyt1.model's MLP

    def swiglu_liger(gate, up):
        return (liger[2].apply(gate, up),)

    def swiglu_inputs():
        return [torch.randn(T, I, device=dev, dtype=dtype, requires_grad=True) for _ in range(2)]  # (T, I) x2

    cases = []
    for op, plain, lig, make in (("rmsnorm", rms_plain, rms_liger, rms_inputs),
                                 ("rope", rope_plain, rope_liger, rope_inputs),
                                 ("swiglu", swiglu_plain, swiglu_liger, swiglu_inputs)):
        cases.append((op, {"plain": plain, "compiled": plain, "liger": lig if liger_ok else liger_why}, make))
    return cases


def bench_ops(s: dict, cuda: bool, rep_ms: int, compile_ok: bool | str) -> list[dict]:
    dev = "cuda" if cuda else "cpu"
    rows = []
    # fp32 in the CPU smoke: the Triton interpreter mishandles liger's bf16 arithmetic (NaN from its RoPE),
    # while in fp32 it checks that the liger calls are right (RoPE matches the model exactly).
    for op, variants, make in ops_cases(s, dev, dtype=torch.bfloat16 if cuda else torch.float32):
        inputs = make()
        leaves = [t for t in inputs if t.requires_grad]
        with torch.no_grad():
            ref = [o.detach().clone() for o in variants["plain"](*[t.detach().clone() for t in inputs])]
        for name, fn in variants.items():
            row = {"op": op, "impl": name, "dtype": str(inputs[0].dtype), **s}
            if isinstance(fn, str):
                rows.append({**row, "skipped": fn})
                continue
            if name == "compiled":
                if compile_ok is not True:
                    rows.append({**row, "skipped": compile_ok})
                    continue
                fn = torch.compile(fn, dynamic=False)
            try:
                # Check outputs on fresh copies (liger's RoPE rotates its inputs in place).
                fresh = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
                outs = fn(*fresh)
                row["max_abs_diff_vs_plain"] = max((o.float() - r.float()).abs().max().item()
                                                   for o, r in zip(outs, ref))
                grads = [torch.randn_like(o) for o in outs]

                def step(fn=fn, grads=grads):
                    torch.autograd.backward(list(fn(*inputs)), grads)

                step()  # compile / autotune outside the timing
                row["ms"] = time_ms(step, leaves, cuda, rep_ms)
            except Exception as e:  # noqa: BLE001 - a broken contender must not stop the run
                row["skipped"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            for t in leaves:
                t.grad = None
            rows.append(row)
        del inputs, leaves
    return rows


def print_ops_table(rows: list[dict]) -> None:
    print(f"\n{'op':8s} {'impl':10s} {'fwd+bwd ms':>11s} {'vs plain':>9s} {'max |diff|':>11s}")
    plain = {r["op"]: r.get("ms") for r in rows if r["impl"] == "plain"}
    for r in rows:
        if "skipped" in r:
            print(f"{r['op']:8s} {r['impl']:10s} skipped: {r['skipped']}")
            continue
        print(f"{r['op']:8s} {r['impl']:10s} {r['ms']:11.3f} {plain[r['op']] / r['ms']:8.2f}x "
              f"{r['max_abs_diff_vs_plain']:11.2e}")


# ----------------------------------------------------------------------------------------------------
def _versions() -> dict:
    import triton

    v = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    try:
        import importlib.metadata as md

        v["liger_kernel"] = md.version("liger-kernel")
    except Exception as e:  # noqa: BLE001 - a version string is informative only
        v["liger_kernel"] = f"unknown ({e})"
    return v


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "bench/kernels.py"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"


OVERHEAD_SHAPES = {"host-bound": (64, 64, 512), "gemm-bound": (512, 256, 8192)}


def _kernel_at(rev: str):
    """kernels/fused_linear_ce.py as it was at git revision `rev`, imported as a module of its own."""
    import importlib.util
    import tempfile

    src = subprocess.run(["git", "show", f"{rev}:kernels/fused_linear_ce.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    if "skyt1::fused_linear_ce" in src:
        raise SystemExit(f"--baseline-rev {rev}: that kernel registers the torch op skyt1::fused_linear_ce too, and "
                         "one process can hold only one registration; pick a revision before it (e.g. a397d1f)")
    path = Path(tempfile.mkdtemp()) / f"fused_linear_ce_{rev}.py"
    path.write_text(src)  # triton.jit needs the source in a real file
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_overhead(reps: int, baseline_rev: str = "") -> dict:
    """Median wall-clock ms of the default call, forward + backward, per shape (fp32 and bf16). With
    baseline_rev, the kernel file of that revision runs too, its calls interleaved with ours, so a
    shared machine's load falls on both alike."""
    contenders = {"current": fused_linear_cross_entropy}
    if baseline_rev:
        contenders[f"at {baseline_rev}"] = _kernel_at(baseline_rev).fused_linear_cross_entropy
    out = {}
    for shape_name, (T, H, V) in OVERHEAD_SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            h = torch.randn(T, H, generator=g).to(dtype).requires_grad_()  # (T, H)
            w = (torch.randn(V, H, generator=g) * 2.5 / H**0.5).to(dtype).requires_grad_()  # (V, H)
            y = torch.randint(0, V, (T,), generator=g)  # (T,)

            times = {name: [] for name in contenders}
            for i in range(reps + 5):  # 5 warm-up rounds
                for name, fn in contenders.items():
                    h.grad = w.grad = None
                    t0 = time.perf_counter()
                    fn(h, w, y, check_labels=False, impl="torch").backward()
                    if i >= 5:
                        times[name].append((time.perf_counter() - t0) * 1e3)
            key = f"{shape_name} T={T} H={H} V={V} {str(dtype).removeprefix('torch.')}"
            out[key] = {name: {"median_ms": statistics.median(t), "min_ms": min(t), "reps": reps}
                        for name, t in times.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["loss", "ops", "all", "overhead"], default="all")
    ap.add_argument("--label", default="", help="--only overhead: the name of this run in the record")
    ap.add_argument("--reps", type=int, default=200, help="--only overhead: timed calls per shape")
    ap.add_argument("--baseline-rev", default="", help="--only overhead: also time kernels/fused_linear_ce.py "
                    "of this git revision, interleaved with the current one")
    ap.add_argument("--rep-ms", type=int, default=2000, help="do_bench measuring time per contender (ms)")
    ap.add_argument("--out", default=None, help="record path (default bench/results/kernels_<gpu>_<date>.json)")
    ap.add_argument("--compile-on-cpu", action="store_true", help="also run torch.compile in the CPU smoke")
    a = ap.parse_args()

    if a.only == "overhead":
        torch.set_num_threads(1)  # the shared CI host: one thread gives stable timings
        cpu = f"CPU ({platform.processor() or platform.machine()}), 1 thread"
        rec = {"benchmark": "bench/kernels.py --only overhead", "commit": _git_commit(), "device": cpu,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **_versions(),
               "call": "fused_linear_cross_entropy(h, W, y, check_labels=False, impl='torch').backward()",
               "baseline_rev": a.baseline_rev or None, "timings": bench_overhead(a.reps, a.baseline_rev)}
        for k, per in rec["timings"].items():
            for name, v in per.items():
                print(f"{k:40s} {name:16s} median {v['median_ms']:8.3f} ms  min {v['min_ms']:8.3f} ms")
        out = Path(a.out) if a.out else ROOT / "bench" / "results" / "loss_overhead_cpu.json"
        runs = json.loads(out.read_text()) if out.exists() else {}
        runs[a.label or rec["date"]] = rec
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(runs, indent=1) + "\n")
        print(f"record: {out}")
        return

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU only ({platform.machine()}), no GPU"
    print(f"device: {device} | " + " ".join(f"{k} {v}" for k, v in _versions().items()))
    if not cuda:
        print("CPU SMOKE: tiny shapes, wall-clock timing; the numbers say nothing about GPU speed; no record written")
    rec = {"benchmark": "bench/kernels.py", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "commit": _git_commit(), "device": device, **_versions(),
           "timing": "triton.testing.do_bench median, forward+backward" if cuda else "CPU smoke, wall clock"}
    if a.only in ("loss", "all"):
        rec["loss"] = bench_loss(LOSS_SHAPES_GPU if cuda else LOSS_SHAPES_CPU, cuda, a.rep_ms)
        print_loss_table(rec["loss"])
    if a.only in ("ops", "all"):
        compile_ok = True if (cuda or a.compile_on_cpu) else "CPU smoke: pass --compile-on-cpu"
        shape = OPS_SHAPE_GPU if cuda else OPS_SHAPE_CPU
        rec["ops_shape"] = shape
        rec["ops"] = bench_ops(shape, cuda, a.rep_ms, compile_ok)
        print_ops_table(rec["ops"])
    if cuda:
        gpu = torch.cuda.get_device_name().replace(" ", "-").lower()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"kernels_{gpu}_{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"\nrecord: {out}")


if __name__ == "__main__":
    main()
