"""The transport-plan product of the Triton backend (issue 19), in Triton's interpreter on CPU.

``plan_apply(x, y, u, v, V, eps, p)`` = ``Σ_j exp(u_i + v_j − C(x_i, y_j)/ε) V_jk`` without the
N×M plan, against the dense float64 formula ``(u + v − C/ε).exp() @ V``: p = 1, 2; batches;
K = 1, K ≠ D, K over several output chunks; D not a power of two, D ≤ 8 (direct distances) and D
walked by chunks; M not a multiple of the tile; signed V; several column tiles whose row maxima
grow and shrink (the online rescaling); u/v offsets of ±750 that overflow ``exp`` on their own,
and a result near float64's largest value whose scale ``exp(u_i + max_j …)`` alone overflows;
rows and columns of −inf; float32 in the ``ieee`` and default (``tf32x3``) precisions, the
``tf32``/``bf16`` precisions and float16/bfloat16 points (looser, stated bounds); non-contiguous
inputs; unbatched shapes; the errors for bad arguments; the launch plumbing (the tensors' CUDA
device, the K axis of the grid) with recording stand-ins; the pruner's configs for the
(BLOCK_N, BLOCK_DV) accumulator and the (BLOCK_M, BLOCK_DV) V tile on sm_80/86/90.

The compiled kernel's registers, spills and shared memory are in test_triton_compile.py.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from otkernels.backends import triton as tb  # noqa: E402
from otkernels.backends.triton import kernels as K  # noqa: E402
from otkernels.backends.triton import ops  # noqa: E402
from otkernels.costs import Cost  # noqa: E402

TOL64 = 1e-12
TOL32 = 1e-5


def logits(x, y, u, v, eps, p):
    x, y, u, v = (t.double() for t in (x, y, u, v))
    return u[:, :, None] + v[:, None, :] - Cost(p)(x, y) / eps


def ref_plan(x, y, u, v, V, eps, p, shift=0.0):
    """Dense float64 ``(u + v − C/ε).exp() @ V`` (``shift``: computed as ``exp(L − s) @ V · e^s``)."""
    return (logits(x, y, u, v, eps, p) - shift).exp() @ V.double() * math.exp(shift)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def problem(B, N, M, D, Kc, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    y = 0.8 * torch.randn(B, M, D, generator=g, dtype=torch.float64) + 0.3
    u = torch.randn(B, N, generator=g, dtype=torch.float64)
    v = torch.randn(B, M, generator=g, dtype=torch.float64)
    V = torch.randn(B, M, Kc, generator=g, dtype=torch.float64)  # signed
    return tuple(t.to(dtype) for t in (x, y, u, v, V))


def eps_for(D):
    return 0.25 * D  # C/ε of order 1–10 at every D (½‖x − y‖² grows like D)


@pytest.fixture
def small_tiles(monkeypatch):
    """16×16 tiles and 16 output columns per program: several column tiles and K chunks."""
    monkeypatch.setattr(ops, "INTERPRET_CONFIG", {"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_DV": 16})


# ----------------------------------------------------------------------------- float64 values
CASES = [  # (B, N, M, D, K)
    (2, 37, 29, 3, 1),     # direct distances (D ≤ 8), K = 1, batched
    (1, 33, 40, 17, 5),    # D not a power of two, K ≠ D
    (2, 23, 31, 64, 64),   # K = D
    (1, 19, 27, 130, 3),   # D walked by chunks (D_PAD 160, BLOCK_D 32)
    (1, 21, 19, 10, 300),  # K over two output chunks of 256
]


@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("B, N, M, D, Kc", CASES)
def test_plan_float64(B, N, M, D, Kc, p):
    x, y, u, v, V = problem(B, N, M, D, Kc)
    out = tb.plan_apply(x, y, u, v, V, eps_for(D), p)
    assert out.shape == (B, N, Kc) and out.dtype == torch.float64
    assert rel(out, ref_plan(x, y, u, v, V, eps_for(D), p)) < TOL64


@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("D, Kc", [(3, 40), (24, 1), (24, 37)])
def test_plan_small_tiles_online_rescaling(small_tiles, D, Kc, p):
    """Three column tiles of 16 and up to three K chunks of 16; v rises along j in batch 0 (the
    row max grows tile after tile: the accumulator is rescaled) and falls in batch 1."""
    x, y, u, v, V = problem(2, 35, 41, D, Kc, seed=1)
    ramp = torch.linspace(0, 12, 41, dtype=torch.float64)
    v = v + torch.stack([ramp, ramp.flip(0)])
    out = tb.plan_apply(x, y, u, v, V, eps_for(D), p)
    assert rel(out, ref_plan(x, y, u, v, V, eps_for(D), p)) < TOL64
    for b in range(2):  # each batch element on its own scale
        assert rel(out[b], ref_plan(x, y, u, v, V, eps_for(D), p)[b]) < TOL64


@pytest.mark.parametrize("su, sv", [(750.0, -400.0), (-400.0, 750.0)])
def test_plan_large_offsets(small_tiles, su, sv):
    """u or v offset by +750: exp(750) overflows float64, exp(u + v − C/ε) ≈ e^350 does not."""
    x, y, u, v, V = problem(2, 30, 37, 5, 6, seed=2)
    u, v = u + su, v + sv
    assert torch.isinf(u.exp()).any() or torch.isinf(v.exp()).any()
    out = tb.plan_apply(x, y, u, v, V, eps_for(5), 2)
    ref = ref_plan(x, y, u, v, V, eps_for(5), 2)
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e150
    assert torch.isfinite(out).all()
    assert rel(out, ref) < TOL64


def test_plan_result_near_the_largest_float64():
    """exp(u_i + max_j(v_j − C_ij/ε)) ≈ e^715 overflows float64; V ~ 1e-10 brings the result
    to ~1e300: the scale is applied as two powers of two, so the result stays finite."""
    x, y, u, v, V = problem(1, 20, 25, 4, 3, seed=3)
    u = u + 715.0 - (u + v.max()).max()
    V = 1e-10 * V
    out = tb.plan_apply(x, y, u, v, V, 1.0, 2)
    ref = ref_plan(x, y, u, v, V, 1.0, 2, shift=30.0)
    assert torch.isinf(logits(x, y, u, v, 1.0, 2).exp()).any()
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e290
    assert torch.isfinite(out).all()
    assert rel(out, ref) < TOL64


@pytest.mark.parametrize("p", [2, 1])
def test_plan_minus_inf(small_tiles, p):
    """u_i = −inf → row 0; v_j = −inf on a whole column tile (16 columns) → those columns drop
    out; v = −inf everywhere → all 0; never NaN."""
    x, y, u, v, V = problem(1, 20, 40, 6, 4, seed=4)
    u[0, 3] = float("-inf")
    v[0, :16] = float("-inf")
    out = tb.plan_apply(x, y, u, v, V, 1.0, p)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0, 3], torch.zeros(4, dtype=torch.float64))
    ref = ref_plan(x[:, :, :], y[:, 16:], u, v[:, 16:], V[:, 16:], 1.0, p)
    assert rel(out, ref) < TOL64
    v[:] = float("-inf")
    out = tb.plan_apply(x, y, u, v, V, 1.0, p)
    assert torch.equal(out, torch.zeros_like(out))


def test_plan_unbatched_noncontiguous_and_empty():
    x, y, u, v, V = problem(1, 25, 30, 12, 7, seed=5)
    ref = ref_plan(x, y, u, v, V, 2.0, 2)
    out = tb.plan_apply(x[0], y[0], u[0], v[0], V[0], 2.0)
    assert out.shape == (25, 7) and rel(out, ref[0]) < TOL64
    # strided views: x every other coordinate, V transposed storage
    xs = torch.zeros(1, 25, 24, dtype=torch.float64)
    xs[:, :, ::2] = x
    Vt = V.transpose(1, 2).contiguous().transpose(1, 2)
    assert not Vt.is_contiguous()
    out = tb.plan_apply(xs[:, :, ::2], y, u, v, Vt, 2.0)
    assert rel(out, ref) < TOL64
    empty = tb.plan_apply(x, y[:, :0], u, v[:, :0], V[:, :0], 2.0)
    assert empty.shape == (1, 25, 7) and not empty.any()
    assert tb.plan_apply(x[:, :0], y, u[:, :0], v, V, 2.0).shape == (1, 0, 7)


# ----------------------------------------------------------------------------- float32 and half
@pytest.mark.parametrize("precision", ["ieee", None])
@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("D, Kc", [(3, 1), (24, 37), (64, 16)])
def test_plan_float32(D, Kc, p, precision):
    """float32 (``ieee`` FMA dots, the default ``tf32x3``) within 1e-5 of float64."""
    x, y, u, v, V = problem(2, 31, 38, D, Kc, dtype=torch.float32, seed=6)
    out = tb.plan_apply(x, y, u, v, V, eps_for(D), p, precision=precision)
    assert out.dtype == torch.float32
    assert rel(out, ref_plan(x, y, u, v, V, eps_for(D), p)) < TOL32


@pytest.mark.parametrize("precision, tol", [("tf32", 3e-3), ("bf16", 3e-2)])
def test_plan_float32_low_precisions(precision, tol):
    """TF32 / bfloat16 operands (cost and π·V): about 2^-11 / 2^-8 per operand."""
    x, y, u, v, V = problem(1, 30, 35, 24, 9, dtype=torch.float32, seed=7)
    out = tb.plan_apply(x, y, u, v, V, eps_for(24), 2, precision=precision)
    err = rel(out, ref_plan(x, y, u, v, V, eps_for(24), 2))
    assert err < tol
    assert err > 1e-6, "the low precision should show (is the precision flag reaching the dots?)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_plan_half_points(dtype):
    """float16/bfloat16 x, y, V (float32 u, v); float32 accumulation and result; the reference
    takes the same rounded inputs, so the error is the plan's rounding to the dtype."""
    x, y, u, v, V = problem(1, 30, 35, 24, 9, dtype=dtype, seed=8)
    u, v = u.float(), v.float()
    out = tb.plan_apply(x, y, u, v, V, eps_for(24), 2)
    assert out.dtype == torch.float32
    assert rel(out, ref_plan(x, y, u, v, V, eps_for(24), 2)) < (3e-3 if dtype == torch.float16 else 2e-2)


# ----------------------------------------------------------------------------- bad arguments
def test_plan_bad_arguments():
    x, y, u, v, V = problem(2, 10, 12, 4, 3)
    good = dict(x=x, y=y, u=u, v=v, V=V, eps=0.5)

    def call(**kw):
        return tb.plan_apply(**{**good, **kw})

    bad = [
        (dict(u=u[:, :9]), ValueError, "u"),
        (dict(u=u[:1]), ValueError, "u"),
        (dict(v=v[:, :11]), ValueError, "v"),
        (dict(V=V[:, :11]), ValueError, "V"),
        (dict(V=V[:1]), ValueError, "V"),
        (dict(V=V[:, :, :0]), ValueError, "V"),
        (dict(V=V[..., 0]), ValueError, "V"),
        (dict(y=y[..., :3]), ValueError, "y"),
        (dict(y=y.float()), TypeError, "y"),
        (dict(V=V.float()), TypeError, "V"),
        (dict(u=u.long()), TypeError, "u"),
        (dict(v=v.half()), TypeError, "v"),
        (dict(x=x.long(), y=y.long()), TypeError, "points"),
        (dict(V=V.to("meta")), ValueError, "V"),
        (dict(u=u.to("meta")), ValueError, "u"),
        (dict(V=V.numpy()), TypeError, "V"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(p=3), ValueError, "p"),
        (dict(precision="fp8"), ValueError, "precision"),
        (dict(x=x[None]), ValueError, "x"),
        (dict(x=x[0]), ValueError, "y"),  # unbatched x with batched y
    ]
    for kw, exc, word in bad:
        with pytest.raises(exc, match=word):
            call(**kw)
    assert call(u=u.float().double(), eps=torch.tensor(0.5)).shape == (2, 10, 3)


# ----------------------------------------------------------------------------- launch and pruner
def test_plan_launch_on_the_tensors_device_and_k_grid(monkeypatch):
    """Compiled launches enter ``torch.cuda.device(x.device)``; the grid's third axis covers K
    by ``BLOCK_DV`` (not D); N > TUNE_ROWS first autotunes on a proxy; the autotune key holds
    K's bucket and every code constexpr."""
    entered, launches = [], []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    class Launcher:
        def __init__(self, name):
            self.fn = K.KERNELS[name].fn

        def __getitem__(self, grid):
            def run(*args, **consts):
                names = self.fn.arg_names
                launches.append((args[names.index("N")], grid({"BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_DV": 64})))
            return run

    monkeypatch.setattr(ops, "interpreting", lambda device: False)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(ops._compiled, "KERNELS", {n: Launcher(n) for n in K.KERNELS})
    monkeypatch.setattr(ops, "TUNE_ROWS", 64)
    monkeypatch.setattr(ops, "_tuned", set())
    x, y, u, v, V = problem(2, 100, 50, 8, 200, dtype=torch.float32)
    tb.plan_apply(x, y, u, v, V, 0.5)
    assert entered and all(str(d) == str(x.device) for d in entered)
    assert launches == [(64, (2, 2, 4)), (100, (4, 2, 4))], launches
    assert {"K_KEY", "P", "PRECISION", "D_PAD", "BLOCK_D", "DIRECT"} <= set(K._plan_apply.keys)  # ACC: fixed by the dtypes triton adds


@pytest.mark.parametrize("cc", [80, 86, 90])
@pytest.mark.parametrize("dtype, precision", [(torch.float32, "tf32x3"), (torch.float32, "ieee"),
                                              (torch.bfloat16, "ieee"), (torch.float64, "ieee")])
def test_plan_pruner_fits_shared_memory(cc, dtype, precision):
    """For D up to 2048 and K up to 4096 the pruner keeps configs whose estimated shared memory
    (cost operands, the staged (BLOCK_M, BLOCK_DV) V tile, the plan tile) fits ``sm_<cc>``, or,
    where nothing fits the (conservative) estimate — sm_86's 99 KB with tf32x3 or float64 at
    D ≥ 128, as for the gradient kernel — the two smallest configs (the compiled figures are
    far below: test_triton_compile.py); ``BLOCK_DV`` spans K (no wider than K's power of two,
    at least 32, at most 256; 8 warps only with ``BLOCK_DV`` ≥ 64: the measured spills)."""
    from otkernels.backends.triton import resources as R
    for D in (3, 64, 128, 512, 2048):
        for Kc in (1, 64, 128, 1000, 4096):
            x = torch.zeros(1, 64, D, dtype=dtype)
            V = torch.zeros(1, 64, Kc, dtype=dtype)
            z = torch.zeros(1, 64, dtype=ops.acc_dtype(dtype))
            with ops.capture() as log:
                tb.plan_apply(x, x, z, z, V, 1.0, precision=precision)
            name, args, consts = log[0]
            kept = R.kept_configs(name, args, consts, cc)
            assert kept, (D, Kc)
            limit = K.shared_limit(cc)
            est = {}
            for c in kept:
                kw = c.kwargs
                dv = kw["BLOCK_DV"]
                assert 32 <= dv <= min(256, max(32, 1 << (Kc - 1).bit_length())), (D, Kc, dv)
                assert c.num_warps < 8 or dv >= 64, (D, Kc, R.config_label(c))
                est[R.config_label(c)] = K.shared_bytes(name, kw["BLOCK_N"], kw["BLOCK_M"], c.num_stages,
                                                        consts["D_PAD"], consts["BLOCK_D"], consts["DIRECT"], dv,
                                                        x.element_size(), consts["PRECISION"])
            fallback = len(kept) <= 2 and all(c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] <= 32 * 32 for c in kept)
            assert fallback or max(est.values()) <= limit, (D, Kc, est, limit)
            if cc != 86:  # sm_80 and sm_90 always have configs that fit the estimate
                assert max(est.values()) <= limit, (D, Kc, est, limit)
