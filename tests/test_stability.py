"""Numerical stability: extreme blurs and coordinate scales, degenerate clouds."""
from __future__ import annotations

import pytest
import torch

from otk_testing import (TOL64, assert_rel, clouds, fixed_eps, geomloss_loss, otk_loss,
                         value_and_grads)

CONFIGS = {
    "sinkhorn-p1": dict(loss="sinkhorn", p=1),
    "sinkhorn-p2": dict(loss="sinkhorn", p=2),
    "sinkhorn-p2-reach": dict(loss="sinkhorn", p=2, reach=1.0),  # reach relative to the scale
    "gaussian": dict(loss="gaussian"),
}


def assert_finite(t, what):
    assert bool(torch.isfinite(t).all()), f"{what} is not finite: {t}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("blur", [1e-3, 1e-1, 1e1, 1e3])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_extreme_blur_and_scale(backend, cfg, blur, scale, dtype):
    """Finite values and gradients (x, y, a, b) for blurs and coordinate scales over 12 orders
    of magnitude, and the expected limits: a divergence is ≥ 0 up to rounding."""
    kw = dict(CONFIGS[cfg])
    if "reach" in kw:
        kw["reach"] = kw["reach"] * scale
    x, y, a, b = clouds(N=17, M=13, D=2, seed=1, dtype=torch.float64)
    x, y = (x * scale).to(dtype), (y * scale).to(dtype)
    a, b = a.to(dtype), b.to(dtype)
    inputs = dict(a=a, x=x, b=b, y=y)
    v, g = value_and_grads(otk_loss(**kw, blur=blur, backend=backend), inputs)
    assert v.dtype == dtype
    assert_finite(v, "value")
    for k, t in g.items():
        assert_finite(t, f"grad {k}")
    with torch.no_grad():
        F, G = otk_loss(**kw, blur=blur, backend=backend, potentials=True)(*inputs.values())
    assert_finite(F, "potential F")
    assert_finite(G, "potential G")
    # float64: also close to the geomloss value where geomloss itself is finite, to the
    # precision the problem allows: with blur ≫ scale the information sits in C/ε ~
    # (scale/blur)^p next to O(1) terms, so ~ε_mach·(blur/scale)^p of it survives (1e-4 at
    # blur=1e3, scale=1e-3, p=2); with blur ≪ scale the |x|²+|y|²−2⟨x,y⟩ cancellation costs
    # ~1e-5 (the exact gaussian value, from differences, is 1e-5 away from both).  For the
    # gaussian kernel that cancellation, ε_mach·|x|², is divided by 2σ² in the exponent of the
    # diagonal terms k(x_i, x_i): up to ε_mach·(scale/blur)² ≈ 2e-4 of the value at blur=1e-3,
    # scale=1e3, where both libraries round differently (measured 1.1–1.2e-5 on one CPU,
    # < 1e-5 on another).
    if dtype == torch.float64:
        ref = geomloss_loss(**kw, blur=blur)(*inputs.values())
        if bool(torch.isfinite(ref)):
            p = 2 if cfg == "gaussian" else kw["p"]
            tol = max(1e-5, 10 * 2.2e-16 * (blur / scale) ** p)
            if cfg == "gaussian":
                tol = max(tol, 2.2e-16 * (scale / blur) ** 2)
            assert_rel(v, ref, tol, f"value vs geomloss ({cfg}, blur={blur}, scale={scale})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", list(CONFIGS) + ["hausdorff-p1", "hausdorff-p2", "energy", "laplacian"])
def test_identical_clouds(backend, cfg, dtype):
    """D(α, α) ≈ 0 (relative to the size of a typical value) and ∇_x D(α, α) ≈ 0.

    The Hausdorff gradient (an adjoint of the fixed point) vanishes at α = β only at
    convergence: a converged fixed-ε schedule there (with the default schedule it is ~3e-5)."""
    if cfg.startswith("hausdorff"):
        kw = dict(loss="hausdorff", p=int(cfg[-1]), **fixed_eps(0.2, 60))
    else:
        kw = CONFIGS.get(cfg, dict(loss=cfg))
    x, y, a, b = clouds(N=25, M=20, D=3, dtype=dtype)
    L = otk_loss(**kw, blur=0.2, backend=backend)
    typical = L(a, x, b, y).abs().item()
    xl = x.clone().requires_grad_()
    v = L(a, xl, a, x)
    (gx,) = torch.autograd.grad(v, [xl])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert abs(v.item()) <= tol * max(1.0, typical), f"D(α, α) = {v.item():.3e}"
    gtyp = torch.autograd.grad(L(a, xl, b, y), [xl])[0].abs().max().item()
    assert gx.abs().max().item() <= 10 * tol * max(1.0, gtyp), f"∇D(α, α) = {gx.abs().max().item():.3e}"
    v2 = L(x, x)  # uniform weights
    assert abs(v2.item()) <= tol * max(1.0, typical), f"D(x, x) = {v2.item():.3e}"


@pytest.mark.parametrize("cfg", list(CONFIGS) + ["energy"])
@pytest.mark.parametrize("NM", [(1, 9), (9, 1), (1, 1)], ids=["N1", "M1", "N1M1"])
def test_single_point(backend, cfg, NM):
    """A cloud of one point: finite values, and geomloss's value where it is defined."""
    kw = CONFIGS.get(cfg, dict(loss=cfg))
    N, M = NM
    x, y, a, b = clouds(N=N, M=M, D=2, seed=2)
    inputs = dict(a=a, x=x, b=b, y=y)
    v, g = value_and_grads(otk_loss(**kw, blur=0.2, backend=backend), inputs)
    assert v.shape == ()
    assert_finite(v, "value")
    for k, t in g.items():
        assert_finite(t, f"grad {k}")
    ref, gref = value_and_grads(geomloss_loss(**kw, blur=0.2), inputs)
    assert_rel(v, ref, TOL64, "value vs geomloss")
    for k in "xy":
        if kw.get("reach") is None:
            assert_rel(g[k], gref[k], TOL64, f"grad {k} vs geomloss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", list(CONFIGS) + ["hausdorff-p2", "energy"])
def test_all_points_identical(backend, cfg, dtype):
    """Every point at the same location: diameter 0 (geomloss fails on log 0 here).  The
    divergence is 0, with finite (zero) gradients."""
    kw = dict(loss="hausdorff", p=2) if cfg.startswith("hausdorff") else CONFIGS.get(cfg, dict(loss=cfg))
    c = torch.tensor([0.3, -1.2], dtype=dtype)
    x, y = c.repeat(7, 1), c.repeat(5, 1)
    _, _, a, b = clouds(N=7, M=5, D=2, dtype=dtype)
    inputs = dict(a=a, x=x, b=b, y=y)
    v, g = value_and_grads(otk_loss(**kw, blur=0.1, backend=backend), inputs)
    assert_finite(v, "value")
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert abs(v.item()) <= tol, f"all points identical: value {v.item():.3e} != 0"
    for k in "xy":
        assert_finite(g[k], f"grad {k}")
        assert g[k].abs().max().item() <= 10 * tol, f"grad {k}: {g[k]}"
    for k in "ab":
        assert_finite(g[k], f"grad {k}")


@pytest.mark.parametrize("p", [1, 2])
def test_two_separate_points(backend, p):
    """All x at one location, all y at another: the only coupling is the product, so
    S_ε = C(x, y) − ½C(x, x) − ½C(y, y) exactly, for any ε (for p=1 geomloss's clamp makes
    the self-cost sqrt(1e-8) = 1e-4)."""
    x = torch.zeros(6, 2, dtype=torch.float64)
    y = torch.tensor([[3.0, 4.0]], dtype=torch.float64).repeat(4, 1)
    for blur in (1e-3, 1.0, 100.0):
        v = otk_loss(loss="sinkhorn", p=p, blur=blur, backend=backend)(x, y)
        expected = 5.0 - 1e-4 if p == 1 else 12.5
        assert abs(v.item() - expected) <= 1e-9 * expected, f"p={p}, blur={blur}: {v.item()} != {expected}"
        ref = geomloss_loss(loss="sinkhorn", p=p, blur=blur)(x, y)
        assert_rel(v, ref, TOL64, f"p={p}, blur={blur} vs geomloss")


@pytest.mark.parametrize("D", [1, 3])
@pytest.mark.parametrize("debias", [True, False], ids=["debias", "biased"])
@pytest.mark.parametrize("p", [1, 2])
def test_float32_accuracy(backend, p, debias, D):
    """float32 against float64 on the same data (and the same backend), several seeds: the
    relative error of values and gradients stays ≤ 1e-4.  (For p=1 this needs |x − y|
    computed without the cancellation of |x|² + |y|² − 2⟨x, y⟩ near coincident points, e.g.
    the diagonal of the self-costs C(x, x).)"""
    kw = dict(loss="sinkhorn", p=p, blur=0.3, debias=debias)
    for seed in range(3):
        x, y, a, b = clouds(N=23, M=31, D=D, seed=seed)
        inputs = dict(a=a, x=x, b=b, y=y)
        v64, g64 = value_and_grads(otk_loss(**kw, backend=backend), inputs)
        v32, g32 = value_and_grads(otk_loss(**kw, backend=backend), {k: t.float() for k, t in inputs.items()})
        assert_rel(v32, v64, 1e-4, f"seed {seed}: float32 value")
        for k in inputs:
            assert_rel(g32[k], g64[k], 1e-4, f"seed {seed}: float32 grad {k}")


@pytest.mark.parametrize("loss,p", [("sinkhorn", 2), ("sinkhorn", 1), ("gaussian", 2), ("energy", 2)])
def test_far_from_origin(backend, loss, p):
    """SamplesLoss translates both clouds by their common mean before any cost is formed
    (``samples_loss._center``).  Clouds moved ~2e3 from the origin: in float64 values and
    gradients are shift invariant to 1e-12; in float32 the moved clouds give the float64 result
    on the same (float32-rounded) points to 1e-4 — without the centring, |x|² + |y|² − 2⟨x, y⟩
    at |x| ≈ 2e3 loses everything to cancellation in float32."""
    x, y, a, b = clouds(N=23, M=31, D=3, seed=4)
    shift = torch.tensor([1e3, -2e3, 5e2], dtype=torch.float64)
    kw = dict(loss=loss, p=p, blur=0.3)
    L = otk_loss(**kw, backend=backend)
    v0, g0 = value_and_grads(L, dict(a=a, x=x, b=b, y=y))
    v1, g1 = value_and_grads(L, dict(a=a, x=x + shift, b=b, y=y + shift))
    assert_rel(v1, v0, 1e-12, f"{loss} p={p}: float64 value, shifted by {shift.tolist()}")
    for k in g0:
        assert_rel(g1[k], g0[k], 1e-12, f"{loss} p={p}: float64 grad {k}, shifted")
    moved32 = {k: t.float() for k, t in dict(a=a, x=x + shift, b=b, y=y + shift).items()}
    v32, g32 = value_and_grads(L, moved32)
    v64, g64 = value_and_grads(L, {k: t.double() for k, t in moved32.items()})
    assert_rel(v32, v64, 1e-4, f"{loss} p={p}: float32 value far from the origin")
    for k in g64:
        assert_rel(g32[k], g64[k], 1e-4, f"{loss} p={p}: float32 grad {k} far from the origin")
