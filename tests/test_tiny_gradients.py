"""Gradients that are tiny relative to the coordinates, compared ELEMENTWISE with a dense
float64 reference built from coordinate differences.

The expanded form of ``Σ_j w_ij (x_i − y_j)`` — ``x_i Σ_j w_ij − Σ_j w_ij y_j``, one GEMM —
cancels when a row's weight sits on a pair with ``y_j ≈ x_i``: the diagonal of the self terms
``k(x, x)`` / ``C(x, x)``, or a plan at small ε between matched clouds.  Its error is then
``ε_mach·|x|·w`` however small the exact gradient is (issue 15: 3.2e-19 where the exact
gradient of a gaussian kernel loss is 3.7e-98).  These problems make every such gradient tiny:

* kernel losses between two clouds of well-separated points in high dimension, the second a
  translate of the first, at a small bandwidth: the self terms contribute exact zeros (the
  diagonal) and underflowing off-diagonals, the cross term one matched pair per row
  (``|x_i − y_i|² = D·c²``, a kernel value of ~1e-65 in float64, ~1e-20 in float32);
* Sinkhorn divergences (p = 1, 2) at a tiny blur between matched clouds ``y_i = x_i + s·e_0
  + δ_i`` (far apart along e_0 or not), with ``|δ_i| ~ 1e-9``: the plan is the identity and
  the gradient's coordinates off e_0 are ``−a_i δ_i`` (p = 2).

The reference is the dense float64 computation with costs and kernels written as sums of
squared coordinate differences, differentiated by torch autograd (each pair's gradient is
formed from ``x_i − y_j``).  ``|ours − ref| ≤ rtol·|ref| + atol`` on every coordinate, with
``atol`` far below the gradients (the native kernels clamp exp arguments at −700 / −86, so
pairs beyond that contribute ~1e-304 / ~1e-38 instead of 0).
"""
import pytest
import torch

from otkernels import SamplesLoss



RTOL = {torch.float64: 1e-9, torch.float32: 2e-3}
ATOL = {torch.float64: 1e-250, torch.float32: 1e-32}


def _sqdist(x, y):
    """‖x_i − y_j‖² from coordinate differences (no cancellation): (B?,n,D), (B?,m,D) -> (B?,n,m)."""
    return ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)


def _kernel_ref(kind, blur):
    def k(x, y):
        d2 = _sqdist(x, y)
        if kind == "gaussian":
            return (-d2 / (2 * blur * blur)).exp()
        d = d2.clamp_min(1e-8).sqrt()
        return (-d / blur).exp() if kind == "laplacian" else -d
    return k


def _kernel_loss_ref(kind, blur, a, x, b, y):
    """½⟨a, K_xx a⟩ + ½⟨b, K_yy b⟩ − ⟨a, K_xy b⟩ (geomloss's kernel norms), dense, float64."""
    k = _kernel_ref(kind, blur)
    return 0.5 * a @ k(x, x) @ a + 0.5 * b @ k(y, y) @ b - a @ k(x, y) @ b


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def _assert_elementwise(ours, ref, dtype, what):
    ours, ref = ours.detach().double(), ref.detach().double()
    assert bool(torch.isfinite(ours).all()), f"{what}: non-finite gradient"
    err = (ours - ref).abs()
    bound = RTOL[dtype] * ref.abs() + ATOL[dtype]
    bad = err > bound
    if bool(bad.any()):
        i = int((err / bound).flatten().argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {ref.numel()} coordinates off; worst {ours.flatten()[i]:.6e} "
            f"vs {ref.flatten()[i]:.6e} (|ref| max {ref.abs().max():.3e}, rtol {RTOL[dtype]:.0e})")


def _separated(N, D, scale, seed):
    """N points in D dimensions, pairwise distances ≈ scale·√(2D) (none closer than ~scale·√D)."""
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(N, D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["gaussian", "laplacian"])
def test_kernel_loss_tiny_gradients(backend, kind, dtype):
    N, D = 40, 64
    x = _separated(N, D, 3.0, seed=1)
    # matched pair exponent: gaussian D·c²/2σ², laplacian √D·c/σ
    if kind == "gaussian":
        blur = 0.5
        target = 150.0 if dtype == torch.float64 else 46.0   # kernel ≈ 1e-65 / 1e-20
        c = (target * 2 * blur * blur / D) ** 0.5
    else:
        blur = 0.1 if dtype == torch.float64 else 0.15
        target = 150.0 if dtype == torch.float64 else 46.0
        c = target * blur / D ** 0.5
    y = x + c  # a translate: x_i − y_i = −c on every coordinate
    g = torch.Generator().manual_seed(2)
    a = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    a, b = a / a.sum(), b / b.sum()
    _, (gx_ref, gy_ref) = _grads(lambda x_, y_: _kernel_loss_ref(kind, blur, a, x_, b, y_), x, y)
    assert 0 < gx_ref.abs().max() < 1e-15 and gx_ref.abs().min() > 1e3 * ATOL[dtype]  # tiny, not underflowing
    L = SamplesLoss(kind, blur=blur, backend=backend)
    cast = [t.to(dtype) for t in (a, x, b, y)]
    _, (gx, gy) = _grads(lambda x_, y_: L(cast[0], x_, cast[2], y_), cast[1], cast[3])
    _assert_elementwise(gx, gx_ref, dtype, f"{backend} {kind} {dtype} ∂/∂x")
    _assert_elementwise(gy, gy_ref, dtype, f"{backend} {kind} {dtype} ∂/∂y")


def test_kernel_loss_issue_case(backend):
    """The case of issue 15: gaussian, blur 0.4, N = M = 64, D = 128, float64, independent clouds
    (y shifted by 0.5): the exact gradient is ~1e-220, the expanded form gave ~1e-17."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g, dtype=torch.float64)
    y = torch.randn(64, 128, generator=g, dtype=torch.float64) + 0.5
    a = torch.full((64,), 1 / 64, dtype=torch.float64)
    _, (gx_ref,) = _grads(lambda x_: _kernel_loss_ref("gaussian", 0.4, a, x_, a, y), x)
    _, (gx,) = _grads(lambda x_: SamplesLoss("gaussian", blur=0.4, backend=backend)(x_, y), x)
    assert gx_ref.abs().max() < 1e-200
    # rows whose gradient is above the clamped-exp floor: every coordinate to 1e-9
    rows = gx_ref.abs().amax(1) > 1e-280
    assert int(rows.sum()) >= 10
    _assert_elementwise(gx[rows], gx_ref[rows], torch.float64, f"{backend} gaussian issue case")
    assert float(gx.abs().max()) < 1e-200, f"{backend}: |grad| {float(gx.abs().max()):.3e}, exact ~1e-220"


def _direct_cost(p):
    def cost(x, y):
        d2 = _sqdist(x, y)
        return d2 / 2 if p == 2 else d2.clamp_min(1e-8).sqrt()
    return cost


def _dyadic(t, bits):
    """t rounded to the grid 2^-bits (exact sums below)."""
    return torch.round(t * 2.0 ** bits) / 2.0 ** bits


@pytest.mark.parametrize("shift", [0.0, 4.0], ids=["matched", "far-apart"])
@pytest.mark.parametrize("p", [2, 1])
def test_sinkhorn_tiny_gradients(backend, p, shift):
    """Matched clouds y_i = x_i + δ_i (+ shift along e_0), |δ| ~ 1e-9, ε = 0.01: the plan is the
    identity and every gradient coordinate off e_0 is ~a_i δ_i (p = 2) or ~a_i δ_i / 4 (p = 1,
    far apart), 1e-9 of the coordinates.  The
    points lie on dyadic grids (x: 2^-20, δ: 2^-42, |x| < 4) so that SamplesLoss's translation
    by the common mean is exact: a rounded translation alone would move x_i − y_i by ε_mach·|x|."""
    N, D = 32, 16
    g = torch.Generator().manual_seed(3)
    x = _dyadic(torch.randn(N, D, generator=g, dtype=torch.float64).clamp(-1.9, 1.9), 20)
    delta = _dyadic(1e-9 * torch.randn(N, D, generator=g, dtype=torch.float64), 42)
    y = x + delta
    x[:, 0] -= shift / 2
    y[:, 0] += shift / 2
    c = torch.cat([x, y]).mean(0)
    assert torch.equal((y - c) - (x - c), y - x), "the test data must make the centring exact"
    a = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    a, b = a / a.sum(), b / b.sum()
    blur = 0.1 if p == 2 else 0.01  # ε = 0.01 either way
    ref = SamplesLoss("sinkhorn", p=p, blur=blur, cost=_direct_cost(p), backend="tensorized")
    v_ref, (gx_ref, gy_ref) = _grads(lambda x_, y_: ref(a, x_, b, y_), x, y)
    off = gx_ref[:, 1:] if shift else gx_ref
    assert 0 < off.abs().max() < 1e-7 * x.abs().max(), "the test problem should have tiny gradients"
    L = SamplesLoss("sinkhorn", p=p, blur=blur, backend=backend)
    v, (gx, gy) = _grads(lambda x_, y_: L(a, x_, b, y_), x, y)
    assert abs(float(v) - float(v_ref)) <= 1e-9 * abs(float(v_ref)) + 1e-15
    what = f"{backend} sinkhorn p={p} shift={shift}"
    _assert_elementwise(gx, gx_ref, torch.float64, what + " ∂/∂x")
    _assert_elementwise(gy, gy_ref, torch.float64, what + " ∂/∂y")
