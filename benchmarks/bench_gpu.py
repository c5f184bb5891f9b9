"""GPU benchmarks: one softmin pass and the full Sinkhorn divergence, triton vs keops vs geomloss
vs dense torch.  Skipped (with the reason) without a CUDA device.

Run: ``pytest benchmarks/bench_gpu.py --benchmark-only`` (``--large`` adds N=M=100k and the
slow competitors).  Each benchmark records in ``extra_info`` the achieved TFLOP/s of the cost
``tl.dot`` (2·N·M·D flops per pass) and exponentials per second (N·M per pass), and their
fraction of the GPU's peak (:data:`PEAKS`, dense tensor-core and MUFU ex2 rates by GPU name):
the roofline time of a pass is ``max(flops / peak_flops, N·M / peak_exp)``.

Targets of the triton backend (asserted by the ``test_target_*`` benchmarks):

* N=M=50k, D=128, float32 with TF32 (operands rounded to nearest TF32 by the kernels):
  Sinkhorn divergence forward+backward ≥ 10× faster than geomloss's KeOps backend
  (``backend="online"``), value within 1e-4 relative of float64 (``tf32x3`` is the fallback
  if TF32 alone misses the accuracy);
* one softmin pass at N=M=100k, D=128, bfloat16 within 2× of the tensor-core roofline
  (≈ 2.6 ms on an H100 SXM).

Timing rule (``common.Rounds``), the same for every competitor of a group, and for both sides
of a target: one untimed call at full size (compilation, autotuning) plus ``rule.warmup``
more, then the median of ``rule.rounds`` calls timed with CUDA events (``seconds``); the
pytest-benchmark figure is the same number of synchronised wall-clock rounds.  Softmin passes
and divergences: warm-up 1, median of 5 / 3; the 50k target: warm-up 1, median of 3 for
triton **and** geomloss.

Every timed result is checked: softmin rows against a dense float64 torch computation of the
first rows, divergences against geomloss's float64 value and gradient of the same problem
(``tensorized`` up to N = 10k, its KeOps ``online`` backend above; nothing from otkernels).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

from common import Rounds, make_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the GPU benchmarks need one")

# dense bf16/fp16 TFLOP/s, TF32 TFLOP/s, fp32 (no tensor core) TFLOP/s, ex2 per second
# (SMs × 16 MUFU ex2 per clock × boost clock); from the vendors' datasheets.
PEAKS = {
    "H100": dict(bf16=989e12, tf32=495e12, fp32=67e12, exp=132 * 16 * 1.98e9),
    "H200": dict(bf16=989e12, tf32=495e12, fp32=67e12, exp=132 * 16 * 1.98e9),
    "A100": dict(bf16=312e12, tf32=156e12, fp32=19.5e12, exp=108 * 16 * 1.41e9),
    "L40S": dict(bf16=362e12, tf32=183e12, fp32=91.6e12, exp=142 * 16 * 2.52e9),
}
SIZES = (10_000, 50_000)
LARGE_SIZES = (100_000,)
DIMS = (3, 64, 128, 256)
EPS = 0.05 ** 2
DENSE_MAX = 20_000  # dense torch (N×M matrices) only up to here
SINKHORN = dict(loss="sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True)
SOFTMIN_RULE = Rounds(warmup=1, rounds=5)
DIVERGENCE_RULE = Rounds(warmup=1, rounds=3)
TARGET_RULE = Rounds(warmup=1, rounds=3)


def peaks():
    name = torch.cuda.get_device_name()
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    warnings.warn(f"no peak table for {name}: fractions of peak are not reported")
    return None


def roofline_s(N, M, D, kind):
    p = peaks()
    if p is None:
        return None
    return max(2.0 * N * M * D / p[kind], N * M / p["exp"])


def cuda_time(fn, rule: Rounds):
    """``rule.warmup`` untimed calls, then the median seconds of ``fn()`` over ``rule.rounds``
    calls, timed with CUDA events."""
    for _ in range(rule.warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rule.rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def pedantic(benchmark, fn, rule: Rounds):
    """pytest-benchmark's figure: ``rule.rounds`` synchronised calls (already warm)."""
    benchmark.extra_info.update(warmup_rounds=rule.warmup, rounds=rule.rounds, statistic="median")
    return benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize())[0], rounds=rule.rounds, iterations=1)


def gpu_data(N, D, dtype=torch.float32):
    x, y = make_data(N, N, D, dtype=torch.float32)
    return x.to("cuda", dtype), y.to("cuda", dtype)


@contextlib.contextmanager
def triton_precision(precision):
    from otkernels.backends.triton import ops
    old = ops.get_precision()
    ops.set_precision(precision)
    try:
        yield
    finally:
        ops.set_precision(old)


def has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def record(benchmark, seconds, N, M, D, kind, passes=1, **info):
    """TFLOP/s and exp/s of ``passes`` softmin-like passes, and their fraction of the peak."""
    flops, exps = 2.0 * N * M * D * passes, float(N * M) * passes
    info.update(N=N, M=M, D=D, seconds=seconds, tflops=flops / seconds / 1e12, exp_per_s=exps / seconds,
                gpu=torch.cuda.get_device_name())
    p = peaks()
    if p is not None:
        info.update(flops_of_peak=flops / seconds / p[kind], exp_of_peak=exps / seconds / p["exp"],
                    roofline_s=passes * roofline_s(N, M, D, kind))
    benchmark.extra_info.update(info)


# ----------------------------------------------------------------------------- one softmin pass
def softmin_fn(impl, x, y, h):
    """A function computing one row softmin pass with implementation ``impl``."""
    if impl.startswith("triton"):
        from otkernels.backends.triton import ops
        xx, yy = ops.sqnorms(x), ops.sqnorms(y)
        return lambda: ops.softmin_rows(x[None], y[None], h[None], EPS, 2, xx[None], yy[None])
    if impl == "keops":
        from otkernels.backends import keops
        from otkernels.costs import Cost
        C = keops.KeOpsCost(x[None], y[None], Cost(2))
        return lambda: C.softmin(EPS, h[None])
    if impl == "geomloss":  # geomloss's online softmin (a KeOps Genred log-sum-exp)
        try:
            from geomloss._legacy.sinkhorn_samples import lse_genred, softmin_online  # geomloss 0.3
        except ImportError:
            from geomloss.sinkhorn_samples import lse_genred, softmin_online  # geomloss 0.2
        lse = lse_genred("(SqDist(X,Y) / IntCst(2))", x.shape[1])
        return lambda: softmin_online(EPS, (x, y), h, log_conv=lse)
    if impl == "dense":
        return lambda: -EPS * (h[None, :] - torch.cdist(x, y).square_() / (2 * EPS)).logsumexp(1)
    raise ValueError(impl)


SOFTMIN_IMPLS = ("triton-bf16", "triton-tf32", "triton-tf32x3", "triton-fp32", "keops", "geomloss", "dense")


def _softmin_cases():
    for N in SIZES + LARGE_SIZES:
        for D in DIMS:
            for impl in SOFTMIN_IMPLS:
                yield pytest.param(N, D, impl, id=f"n{N}-d{D}-{impl}")


@pytest.mark.parametrize("N, D, impl", list(_softmin_cases()))
def test_softmin_pass(benchmark, large, N, D, impl):
    if N in LARGE_SIZES and not large:
        pytest.skip("N=100k: run with --large")
    if impl.startswith("triton") and not has("triton"):
        pytest.skip("triton is not installed")
    if impl in ("keops", "geomloss") and not has("pykeops"):
        pytest.skip("pykeops is not installed")
    if impl == "dense" and N > DENSE_MAX:
        pytest.skip(f"dense torch: N×M matrices above N={DENSE_MAX} do not fit")
    benchmark.group = f"softmin N={N} D={D}"
    dtype = torch.bfloat16 if impl == "triton-bf16" else torch.float32
    x, y = gpu_data(N, D, dtype)
    h = torch.zeros(N, device="cuda") - math.log(N)
    kind = {"triton-bf16": "bf16", "triton-tf32": "tf32", "triton-tf32x3": "tf32"}.get(impl, "fp32")
    precision = {"triton-tf32": "tf32", "triton-tf32x3": "tf32x3"}.get(impl, "ieee")
    with (triton_precision(precision) if impl.startswith("triton") else contextlib.nullcontext()):
        fn = softmin_fn(impl, x, y, h)
        out = fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        seconds = cuda_time(fn, SOFTMIN_RULE)
        pedantic(benchmark, fn, SOFTMIN_RULE)
    out = out.reshape(-1).float()
    rows = 256  # dense float64 reference on the first rows
    xr, yr = x[:rows].double(), y.double()
    ref = -EPS * (h.double()[None, :] - torch.cdist(xr, yr).square_() / (2 * EPS)).logsumexp(1)
    err = ((out[:rows] - ref).abs().max() / ref.abs().max()).item()
    record(benchmark, seconds, N, N, D, kind, impl=impl, rel_err_first_rows=err)
    assert err < (2e-2 if impl == "triton-bf16" else 1e-3 if impl == "triton-tf32" else 1e-4), \
        f"{impl}: relative error {err:.2e} on the first rows"


# ----------------------------------------------------------------------------- full divergence
def divergence_fn(impl, x, y):
    """Forward + backward of the Sinkhorn divergence; returns (value, grad)."""
    if impl == "geomloss":
        import geomloss
        loss = geomloss.SamplesLoss(**SINKHORN, backend="online")
    elif impl == "geomloss-dense":
        import geomloss
        loss = geomloss.SamplesLoss(**SINKHORN, backend="tensorized")
    else:
        import otkernels
        backend = {"triton-tf32": "triton", "triton-tf32x3": "triton", "triton-fp32": "triton",
                   "dense": "tensorized"}.get(impl, impl)
        loss = otkernels.SamplesLoss(**SINKHORN, backend=backend)

    def run():
        xg = x.detach().clone().requires_grad_()
        v = loss(xg, y)
        v.backward()
        return v.detach(), xg.grad
    return run


DIVERGENCE_IMPLS = ("triton-tf32", "triton-tf32x3", "triton-fp32", "keops", "geomloss", "dense", "geomloss-dense")
_REF64: dict = {}


def reference64(N, D):
    """geomloss's float64 divergence and gradient of the (N, D) problem (cached): ``tensorized``
    up to N = DENSE_MAX // 2, its KeOps ``online`` backend above."""
    if (N, D) not in _REF64:
        x, y = gpu_data(N, D, torch.float64)
        if N <= DENSE_MAX // 2:
            v, g = divergence_fn("geomloss-dense", x, y)()
        elif has("pykeops"):
            v, g = divergence_fn("geomloss", x, y)()
        else:
            pytest.skip(f"no float64 geomloss reference at N={N} without pykeops")
        _REF64[N, D] = (v.item(), g.float())
    return _REF64[N, D]


def _divergence_cases():
    for N in SIZES + LARGE_SIZES:
        for D in DIMS:
            for impl in DIVERGENCE_IMPLS:
                yield pytest.param(N, D, impl, id=f"n{N}-d{D}-{impl}")


def _divergence_skip(N, D, impl, large):
    if N in LARGE_SIZES and not large:
        return "N=100k: run with --large"
    if impl.startswith("triton") and not has("triton"):
        return "triton is not installed"
    if impl in ("keops", "geomloss") and not has("pykeops"):
        return "pykeops is not installed"
    if impl in ("dense", "geomloss-dense") and N > DENSE_MAX // 2:
        return f"dense torch: the four N×N costs and their temporaries above N={DENSE_MAX // 2} do not fit"
    if impl == "geomloss" and N >= 50_000 and D >= 128 and not large:
        return "geomloss KeOps at N≥50k, D≥128 takes minutes: run with --large"
    return None


@pytest.mark.parametrize("N, D, impl", list(_divergence_cases()))
def test_divergence(benchmark, large, N, D, impl):
    why = _divergence_skip(N, D, impl, large)
    if why:
        pytest.skip(why)
    benchmark.group = f"sinkhorn divergence N={N} D={D}"
    x, y = gpu_data(N, D)
    precision = {"triton-tf32": "tf32", "triton-tf32x3": "tf32x3"}.get(impl, "ieee")
    with (triton_precision(precision) if impl.startswith("triton") else contextlib.nullcontext()):
        run = divergence_fn(impl, x, y)
        run()  # compile / autotune
        torch.cuda.synchronize()
        seconds = cuda_time(run, DIVERGENCE_RULE)
        v, g = pedantic(benchmark, run, DIVERGENCE_RULE)
    ref, gref = reference64(N, D)
    rel = abs(v.item() - ref) / abs(ref)
    grel = ((g.float() - gref).norm() / gref.norm()).item()
    from otkernels.sinkhorn import epsilon_schedule, max_diameter
    n_iter = len(epsilon_schedule(2, max_diameter(x, y), SINKHORN["blur"], SINKHORN["scaling"]))
    passes = 4 * (n_iter + 2) + 4  # 4 softmins per iteration, init and extrapolation, 4 gradient passes
    kind = "tf32" if impl.startswith("triton-tf32") else "fp32"
    record(benchmark, seconds, N, N, D, kind, passes=passes, impl=impl, value=v.item(), ref64=ref,
           rel_diff=rel, grad_rel_diff=grel)
    assert rel <= 1e-4, f"{impl}: value {v.item()} vs float64 {ref} (rel {rel:.2e})"
    assert grel <= 1e-2, f"{impl}: gradient rel diff {grel:.2e} vs float64"


# ----------------------------------------------------------------------------- targets
def test_target_divergence_50k_tf32(benchmark, large):
    """triton (TF32) ≥ 10× faster than geomloss KeOps at N=M=50k, D=128, fwd+bwd; value
    within 1e-4 of float64."""
    if not has("triton") or not has("pykeops"):
        pytest.skip("needs triton and pykeops")
    N, D = 50_000, 128
    x, y = gpu_data(N, D)
    with triton_precision("tf32"):
        ours = divergence_fn("triton", x, y)
        ours()
        t_ours = cuda_time(ours, TARGET_RULE)
        v, _ = ours()
    geo = divergence_fn("geomloss", x, y)
    geo()
    t_geo = cuda_time(geo, TARGET_RULE)  # the same rule as triton's
    ref, _ = reference64(N, D)
    rel = abs(v.item() - ref) / abs(ref)
    benchmark.extra_info.update(triton_s=t_ours, geomloss_keops_s=t_geo, speedup=t_geo / t_ours, rel_vs_fp64=rel,
                                rule=str(TARGET_RULE), reference="geomloss online float64")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert rel <= 1e-4, f"value {v.item()} vs float64 {ref}: rel {rel:.2e}"
    assert t_geo / t_ours >= 10, f"speed-up {t_geo / t_ours:.1f}× < 10× ({t_ours:.3f} s vs {t_geo:.3f} s)"


def test_target_softmin_100k_bf16(benchmark):
    """One bf16 softmin pass at N=M=100k, D=128 within 2× of the tensor-core roofline."""
    if not has("triton"):
        pytest.skip("triton is not installed")
    if peaks() is None:
        pytest.skip(f"no peak table for {torch.cuda.get_device_name()}")
    N, D = 100_000, 128
    x, y = gpu_data(N, D, torch.bfloat16)
    h = torch.zeros(N, device="cuda") - math.log(N)
    fn = softmin_fn("triton-bf16", x, y, h)
    fn()
    seconds = cuda_time(fn, Rounds(warmup=1, rounds=10))
    bound = roofline_s(N, N, D, "bf16")
    record(benchmark, seconds, N, N, D, "bf16", impl="triton-bf16", roofline_ratio=seconds / bound)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, iterations=1)
    assert seconds <= 2 * bound, f"{seconds * 1e3:.2f} ms > 2 × roofline {bound * 1e3:.2f} ms"
