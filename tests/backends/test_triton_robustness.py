"""What a real GPU run of the Triton kernels would hit, reproduced on CPU (issue 14).

Triton's interpreter runs the same kernels on CPU tensors (numpy, with the TF32 dots
emulated: ``ops._dot_fix``); launch plumbing that only exists on CUDA (devices, the
autotuner) is checked with recording stand-ins.  Each test names the failure it guards:

* autotune keys: every constexpr that changes the generated code is in the key, so a config
  tuned under one precision/mode is never launched under another;
* a column tile whose scores are all −inf (NaN from ``−inf − (−inf)``);
* float16 backward with a small upstream gradient (the plan times 1e-5 underflowed in fp16);
* row offsets past 2³¹ elements (int32 ``offs * stride`` wrapped), on a strided view of a
  lazily allocated 4 GiB storage;
* launches on the tensors' CUDA device, autotuning on a bounded proxy launch;
* D not a power of two (no padding to 2^k) and the D-tiled gradient (several BLOCK_DV chunks);
* float64 gradients that cancel (difference form, exact elementwise);
* the float32 precisions' accuracy against float64 (the stated bounds).
"""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import otkernels  # noqa: E402
from otkernels.backends.triton import kernels as K  # noqa: E402
from otkernels.backends.triton import ops  # noqa: E402
from otkernels.costs import Cost, Kernel  # noqa: E402


def ref_softmin(x, y, h, eps, p):
    return -eps * (h[:, None, :] - Cost(p)(x, y) / eps).logsumexp(2)


def relmax(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def cloud(B, N, D, seed=0, dtype=torch.float64, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g, dtype=torch.float64) + shift).to(dtype)


# ----------------------------------------------------------------------------- point 2: keys
@pytest.mark.parametrize("name", list(K.KERNELS))
def test_every_code_constexpr_is_in_the_autotune_key(name):
    tuner = K.KERNELS[name]
    fn = getattr(tuner.fn, "fn", tuner.fn)  # the Python function (JIT or interpreted)
    constexprs = {n for n, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}
    assert {"BLOCK_N", "PRECISION", "D_PAD"} <= constexprs
    tuned = {"BLOCK_N", "BLOCK_M", "BLOCK_DV"}
    by_dtype = {"ACC"}  # float64 iff the points are: triton's key holds the tensors' dtypes
    missing = constexprs - tuned - by_dtype - set(tuner.keys)
    assert not missing, f"{name}: constexprs {missing} are not in the autotune key {tuner.keys}"


@pytest.mark.parametrize("dtype", ["fp32", "fp64", "bf16"])
def test_autotune_keys_are_json(dtype):
    """The key the autotuner builds for every launch the backend makes is what triton writes
    to its disk cache as JSON (``cache_results=True``): a ``tl.dtype`` in it (ACC) made every
    first launch raise on a GPU (triton 3.6, H200) while the interpreter never tunes."""
    import json

    from otkernels.backends.triton import resources
    for variant in resources.VARIANTS:
        for D in (3, 130):
            name, args, consts = resources.launch_of(variant, D, dtype, N=64, M=48)
            tuner = K.KERNELS[name]
            named = {**dict(zip(tuner.fn.arg_names, args)), **consts}
            assert set(tuner.keys) <= set(named), f"{name}: key names {tuner.keys} not all passed"
            key = [named[k] for k in tuner.keys] + [str(a.dtype) for a in args if hasattr(a, "dtype")]
            json.dumps({"key": key})  # raises TypeError on a dtype object


def test_precision_switch_changes_the_autotune_key():
    """The key the autotuner builds (its ``keys`` over the launch's arguments) differs between
    two launches that differ only in precision, and each launch computes in its precision."""
    x, y = cloud(1, 40, 24, 0, torch.float32), cloud(1, 30, 24, 1, torch.float32)
    h = torch.zeros(1, 30)
    keys = {}
    for prec in ("tf32", "tf32x3"):
        with ops.capture() as log:
            ops.softmin_rows(x, y, h, 0.5, 2, precision=prec)
        name, args, consts = log[0]
        tuner = K.KERNELS[name]
        named = {**dict(zip(tuner.fn.arg_names, args)), **consts}
        keys[prec] = tuple(named[k] for k in tuner.keys)
    assert keys["tf32"] != keys["tf32x3"]
    ref = ref_softmin(x.double(), y.double(), h.double(), 0.5, 2)
    e1 = relmax(ops.softmin(x, y, h, 0.5, 2, precision="tf32"), ref)
    e3 = relmax(ops.softmin(x, y, h, 0.5, 2, precision="tf32x3"), ref)
    assert e3 < e1 / 10, f"tf32x3 ({e3:.1e}) should be far more accurate than tf32 ({e1:.1e})"


# ----------------------------------------------------------------------------- point 4
@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(ops, "INTERPRET_CONFIG", {"BLOCK_N": 16, "BLOCK_M": 16})


@pytest.mark.parametrize("D", [3, 24])
def test_column_tile_of_minus_inf(small_tiles, D):
    """The first column tile (16 columns) has h = −inf: no NaN, same as dropping those columns."""
    x, y = cloud(1, 20, D, 0), cloud(1, 40, D, 1)
    h = torch.randn(1, 40, dtype=torch.float64)
    h[:, :16] = float("-inf")
    ref = ref_softmin(x, y[:, 16:], h[:, 16:], 0.3, 2)
    out = ops.softmin_rows(x, y, h, 0.3, 2)
    assert torch.isfinite(out).all()
    assert relmax(out, ref) < 1e-12
    f, G = ops.softmin_and_grad(x, y, h, 0.3, 2)
    assert torch.isfinite(f).all() and torch.isfinite(G).all()
    assert relmax(f, ref) < 1e-12
    h[:, :] = float("-inf")  # every column: an empty measure, f = +inf, not NaN
    assert torch.isposinf(ops.softmin_rows(x, y, h, 0.3, 2)).all()


def test_float16_backward_small_upstream_gradient():
    """fp16 points, upstream gradient ≤ 1e-6, a spread plan (ε = 4): the P·X product of the
    y-gradient multiplies plan entries (~1e-3) by g; cast to fp16 they fell into fp16's
    subnormals and underflowed (measured without the fix: error 0.34).  Rows are now scaled by
    a power of two before the cast (measured: 2.1e-2, the fp16 rounding of W and the
    cancellation in Σ W (y − x) at this ε)."""
    x = cloud(1, 200, 16, 0, torch.float16)
    y = cloud(1, 180, 16, 1, torch.float16)
    h = torch.zeros(1, 180, dtype=torch.float32)
    w = 1e-6 * torch.rand(1, 200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    yl = y.clone().requires_grad_(True)
    (ops.softmin(x, yl, h, 4.0, 2) * w.float()).sum().backward()
    y64 = y.double().requires_grad_(True)
    (ref_softmin(x.double(), y64, h.double(), 4.0, 2) * w).sum().backward()
    err = relmax(yl.grad, y64.grad)
    assert err < 4e-2, f"fp16 y-gradient error {err:.1e} (underflow?)"


def test_row_offsets_past_2_31():
    """Rows 2³⁰ elements apart in a 2³¹+ element (lazily allocated) float16 storage: the
    second and third rows start past element 2³¹, where int32 offsets wrapped."""
    base = torch.empty(2 ** 31 + 2 ** 30 + 64, dtype=torch.float16)
    D = 16
    x = base.as_strided((1, 3, D), (0, 2 ** 30, 1))
    vals = cloud(1, 3, D, 5, torch.float16)
    for i in range(3):
        x[0, i] = vals[0, i]
    y = cloud(1, 10, D, 6, torch.float16)
    h = torch.zeros(1, 10)
    out = ops.softmin_rows(x, y, h, 0.5, 2)
    ref = ref_softmin(vals.double(), y.double(), h.double(), 0.5, 2)
    assert relmax(out, ref) < 1e-5
    val, idx = ops.argminmax_rows(x, y, None, "sqdist", False)
    d = ((vals.double()[0, :, None] - y.double()[0, None]) ** 2).sum(-1)
    assert torch.equal(idx[0], d.argmin(1))


def test_launch_on_the_tensors_device_and_bounded_autotuning(monkeypatch):
    """Compiled launches enter ``torch.cuda.device(x.device)``; the first launch of a key with
    N > TUNE_ROWS first runs a proxy with TUNE_ROWS rows and TUNE_COLS columns."""
    entered, launches = [], []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    class Launcher:
        def __init__(self, name):
            self.name = name
            self.fn = K.KERNELS[name].fn

        def __getitem__(self, grid):
            def run(*args, **consts):
                names = self.fn.arg_names
                launches.append((args[names.index("N")], args[names.index("M")], len(entered)))
            return run

    monkeypatch.setattr(ops, "interpreting", lambda device: False)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(ops._compiled, "KERNELS", {n: Launcher(n) for n in K.KERNELS})
    monkeypatch.setattr(ops, "TUNE_ROWS", 64)
    monkeypatch.setattr(ops, "TUNE_COLS", 32)
    monkeypatch.setattr(ops, "_tuned", set())
    x, y, h = cloud(1, 100, 8, 0, torch.float32), cloud(1, 50, 8, 1, torch.float32), torch.zeros(1, 50)
    ops.softmin_rows(x, y, h, 0.5, 2)
    ops.softmin_rows(x, y, h, 0.5, 2)
    assert entered and all(str(d) == str(x.device) for d in entered)
    assert launches == [(64, 32, 1), (100, 50, 1), (100, 50, 2)], launches


@pytest.mark.parametrize("D, layout", [(3, (16, 16)), (17, (32, 32)), (64, (64, 64)), (128, (128, 128)),
                                       (129, (160, 32)), (256, (256, 256)), (512, (512, 128)),
                                       (1000, (1024, 128)), (2048, (2048, 128))])
def test_d_layout_pads_little(D, layout):
    """Layouts with the default whole-tile limit (256: float16/bfloat16 and TF32 dots)."""
    direct = D if D <= ops.DIRECT_MAX_D else 0
    assert K.d_layout(D, direct) == layout
    d_pad, bd = layout
    assert d_pad % bd == 0 and d_pad >= D


@pytest.mark.parametrize("D, dv", [(129, 64), (40, 16), (200, 256)])
@pytest.mark.parametrize("p", [2, 1])
def test_chunked_d_and_tiled_gradient(monkeypatch, D, dv, p):
    """D walked by chunks (not padded to 2^k) and the gradient's output coordinates split over
    several programs (BLOCK_DV < D): values and every gradient equal float64 torch."""
    monkeypatch.setattr(ops, "INTERPRET_CONFIG", {"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_DV": dv})
    x, y = cloud(2, 37, D, 0), cloud(2, 29, D, 1, shift=0.3)
    h = torch.randn(2, 29, dtype=torch.float64)
    xs, ys, hs = (t.clone().requires_grad_(True) for t in (x, y, h))
    out = ops.softmin(xs, ys, hs, 2.0, p)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), (xs, ys, hs))
    xr, yr, hr = (t.clone().requires_grad_(True) for t in (x, y, h))
    ref = ref_softmin(xr, yr, hr, 2.0, p)
    want = torch.autograd.grad((ref * w).sum(), (xr, yr, hr))
    assert relmax(out, ref) < 1e-10
    for g, r, what in zip(got, want, "xyh"):
        assert relmax(g, r) < 1e-9, what


def test_float64_gradient_that_cancels_is_exact_elementwise():
    """Gaussian kernel, blur 0.4, N=M=64, D=128, float64: the kernel is nearly diagonal and the
    exact gradient is ~1e-98; ``x_i Σ k − Σ k y_j`` gave ~1e-19.  Elementwise relative error."""
    x = cloud(1, 64, 128, 0)
    y = cloud(1, 64, 128, 1)
    b = torch.full((1, 64), 1 / 64, dtype=torch.float64)
    xs = x.clone().requires_grad_(True)
    (ops.kernel_sum(xs, x, b, "gaussian", 0.4) * b).sum().backward()
    xr = x.clone().requires_grad_(True)
    ((Kernel("gaussian", 0.4)(xr, x) @ b[..., None])[..., 0] * b).sum().backward()
    nz = xr.grad.abs() > 0
    assert nz.any()
    assert xr.grad.abs().max() < 1e-60  # the case really is degenerate
    err = ((xs.grad - xr.grad).abs()[nz] / xr.grad.abs()[nz]).max().item()
    assert err < 1e-8, f"elementwise relative error {err:.1e}"
    ys = y.clone().requires_grad_(True)  # and the softmin gradient with a tiny blur
    f = ops.softmin(xs.detach().clone().requires_grad_(True), ys, torch.zeros(1, 64, dtype=torch.float64), 1e-3, 2)
    assert torch.isfinite(f).all()


@pytest.mark.parametrize("D", [48, 128])
def test_precision_bounds_on_the_divergence(D, monkeypatch):
    """The stated bounds (otkernels/_precision.py), TF32 dots emulated in the interpreter:
    the default tf32x3 is within 2 × dense float32's error of float64 (values and gradients)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # backend="triton" on CPU tensors
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, D, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(140, D, generator=g, dtype=torch.float64) + 0.4

    def run(backend, dtype, **kw):
        xs = x.to(dtype).requires_grad_(True)
        v = otkernels.SamplesLoss("sinkhorn", p=2, blur=0.05, backend=backend, **kw)(xs, y.to(dtype))
        return v, torch.autograd.grad(v, xs)[0]

    v64, g64 = run("tensorized", torch.float64)
    v32, g32 = run("tensorized", torch.float32)
    dense_v, dense_g = relmax(v32, v64), relmax(g32, g64)
    for prec, kv, kg in (("tf32x3", 1e-6, 2 * dense_g), (None, 1e-6, 2 * dense_g), ("tf32", 2e-5, 0.1),
                         ("bf16", 2e-2, 1.0)):
        v, gr = run("triton", torch.float32, precision=prec)
        ev, eg = relmax(v, v64), relmax(gr, g64)
        assert ev <= max(kv, 2 * dense_v), f"{prec}: value error {ev:.1e}"
        assert eg <= max(kg, 1e-5), f"{prec}: gradient error {eg:.1e} (dense float32 {dense_g:.1e})"


def test_precision_argument_is_checked():
    with pytest.raises(ValueError, match="precision"):
        otkernels.SamplesLoss(precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        ops.softmin(cloud(1, 4, 3), cloud(1, 4, 3), torch.zeros(1, 4, dtype=torch.float64), 0.1, precision="tf16")


# ----------------------------------------------------------------------------- softmin_two
@pytest.mark.parametrize("D", [3, 24, 129])
@pytest.mark.parametrize("p", [2, 1])
def test_softmin_two_both_directions_and_symmetric(small_tiles, D, p):
    """Rows and columns from one tile per block pair (several row blocks per program, the
    column partials merged across programs), and the symmetric pass from the upper triangle;
    a column tile of −inf weights included."""
    x, y = cloud(2, 70, D, 0), cloud(2, 53, D, 1, shift=0.3)
    hr, hc = torch.randn(2, 53, dtype=torch.float64), torch.randn(2, 70, dtype=torch.float64)
    hr[:, :16] = float("-inf")
    f, g = ops.softmin_two(x, y, hr, hc, 0.7, p)
    assert relmax(f, ref_softmin(x, y, hr, 0.7, p)) < 1e-12
    assert relmax(g, ref_softmin(y, x, hc, 0.7, p)) < 1e-12
    fs, none = ops.softmin_two(x, x, hc, None, 0.7, p, sym=True)
    assert none is None and relmax(fs, ref_softmin(x, x, hc, 0.7, p)) < 1e-12


def test_softmin_two_falls_back_when_partials_do_not_fit(monkeypatch):
    monkeypatch.setattr(ops, "TWO_PARTIAL_BYTES", 64)
    x, y = cloud(1, 20, 5, 0), cloud(1, 30, 5, 1)
    assert ops.softmin_two(x, y, torch.zeros(1, 30, dtype=torch.float64), torch.zeros(1, 20, dtype=torch.float64),
                           0.5) is None
    v = otkernels.SamplesLoss(backend="tensorized")(x[0], y[0])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert relmax(otkernels.SamplesLoss(backend="triton")(x[0], y[0]), v) < 1e-10  # two passes instead


# bounds: measured here with the fix (the old row sum, in parentheses): bfloat16 points 3.6e-3
# (2.4e-2, 3.0e-2 for x, y), float16 3.0e-4 (2.0e-3), float32 at bf16 dots 2.9e-2 (5.1e-2: what
# remains is the points rounded to bfloat16 in the cost), tf32 1.6e-3 (2.5e-3)
@pytest.mark.parametrize("dtype, precision, bound", [(torch.bfloat16, None, 1e-2), (torch.float16, None, 1e-3),
                                                     (torch.float32, "bf16", 4e-2), (torch.float32, "tf32", 5e-3)])
def test_half_precision_gradient_near_coincident_points(dtype, precision, bound):
    """p = 1 at small ε (D = 3): the gradient ``x_i Σ_j W_ij − W·Y`` with W_ij = P_ij/‖x_i − y_j‖
    large where y_j ≈ x_i.  The row sum must be taken of the weights as the dot reads them
    (rounded to bfloat16): with the unrounded sum the terms did not cancel and the gradient was
    off by 10 % in bfloat16 (seen on an H200, gpu_check softmin D = 3, p = 1, ε = 0.01)."""
    g = torch.Generator().manual_seed(1003)
    N, D, eps = 500, 3, 0.01
    x = (torch.randn(1, N, D, generator=g, dtype=torch.float64) / D ** 0.5).to(dtype)
    y = ((torch.randn(1, N + 1, D, generator=g, dtype=torch.float64) + 0.5) / D ** 0.5).to(dtype)
    h = -torch.log(torch.tensor(N + 1.0)) + 0.3 * torch.randn(1, N + 1, generator=g, dtype=torch.float64)
    gout = torch.randn(1, N, generator=g, dtype=torch.float64)
    kw = {} if precision is None else {"precision": precision}
    xs, ys = x.detach().requires_grad_(), y.detach().requires_grad_()
    (ops.softmin(xs, ys, h.float(), eps, 1, **kw) * gout.float()).sum().backward()
    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
    (ref_softmin(x64, y64, h[None] if h.dim() == 1 else h, eps, 1) * gout).sum().backward()
    for got, ref in ((xs.grad, x64.grad), (ys.grad, y64.grad)):
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < bound, err


def test_hopper_keeps_the_h200_measured_configs_first():
    """sm_90, D ≤ 128: the pruner keeps the configs measured fastest on an H200 first (one-stage
    pipelines the autotuning space does not hold), then its estimated choice, 4 at most; other
    architectures and wider D keep exactly the estimated choice."""
    two, grad = K._configs(), K._configs(grad=True)

    def keep(name, configs, cc, D, prec="tf32x3", elt=4):
        return [K.config_key(c) for c in K.keep_configs(name, configs, cc, D, D, 0, elt, D, False, prec)]

    def estimated(name, configs, cc, D, prec="tf32x3", elt=4):
        return [K.config_key(c) for c in K.estimated_configs(name, configs, cc, D, D, 0, elt, D, False, prec)]

    kept = keep("_softmin_two", two, 90, 128)
    assert kept[0] == (128, 64, None, 8, 1) and len(kept) <= K.MAX_KEPT
    assert keep("_weighted_grad", grad, 90, 128, "bf16")[0] == (64, 64, 128, 4, 1)
    assert keep("_weighted_grad", grad, 90, 64, "tf32")[0] == (128, 64, 64, 8, 1)  # BLOCK_DV capped at D
    assert keep("_softmin_fwd", two, 90, 128, "ieee", elt=2)[0] == (64, 128, None, 4, 1)  # bfloat16 points
    for name, configs, cc, D in (("_softmin_two", two, 80, 128), ("_softmin_two", two, 86, 64),
                                 ("_weighted_grad", grad, 80, 128), ("_softmin_two", two, 90, 256)):
        assert keep(name, configs, cc, D) == estimated(name, configs, cc, D)
    assert keep("_softmin_two", two, 90, 128, "ieee") == estimated("_softmin_two", two, 90, 128, "ieee")
