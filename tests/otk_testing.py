"""Shared helpers for the otkernels test-suite (imported by the test modules in tests/).

Not collected by pytest (the name does not start with ``test_``).
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import warnings

import pytest
import torch

with warnings.catch_warnings():  # pykeops prints/warns about CUDA on import
    warnings.simplefilter("ignore")
    import geomloss  # noqa: F401  (the reference implementation)

import otkernels

from otkernels import backends  # noqa: E402
from otkernels._env import flag  # noqa: E402

TOL64 = 1e-9  # relative parity in float64
TOL32 = 1e-4  # relative parity in float32 (floor of the fp32 rule)


# ----------------------------------------------------------------------------- backends
def expected_backend(name):
    """``(expected, why)``: whether ``name`` must be available on this machine."""
    cxx = shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++")
    if name in ("tensorized", "blocked"):
        return True, "pure torch"
    if name in backends._disabled():
        return False, "disabled by OTKERNELS_DISABLE"
    if name == "native":
        return (cxx is not None), ("a C++ compiler is installed" if cxx else "no C++ compiler")
    if torch.cuda.is_available():
        spec = importlib.util.find_spec(name if name == "triton" else "pykeops")
        return spec is not None, "installed, with a CUDA device" if spec else "not installed"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if not (flag("OTKERNELS_TRITON_CPU") or flag("TRITON_INTERPRET")):  # conftest sets the former
            return False, "OTKERNELS_TRITON_CPU=0"
        return True, "triton is installed (interpreter on CPU)"
    if name == "keops":
        if importlib.util.find_spec("pykeops") is None:
            return False, "pykeops is not installed"
        if not flag("OTKERNELS_KEOPS_CPU"):
            return False, "OTKERNELS_KEOPS_CPU=0"
        return (cxx is not None), ("pykeops and a C++ compiler are installed" if cxx else "no C++ compiler")
    return False, "unknown"


def require_backend(name):
    """Return if backend ``name`` is available; fail the test if it is expected here
    (:func:`expected_backend`) but unavailable; otherwise skip with both reasons."""
    ok, why = backends.available()[name]
    if ok:
        return
    expected, because = expected_backend(name)
    if expected:
        pytest.fail(f"backend {name} should be available here ({because}) but is not: {why}")
    pytest.skip(f"backend {name} unavailable: {why} ({because})")


# ----------------------------------------------------------------------------- errors
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (absolute error when expected is all zero)."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_rel(actual, expected, tol, what=""):
    """Shapes equal and relative error (see :func:`rel_err`) ≤ tol, with a readable message."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values {actual}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


FP32_CAP = 1e-3  # the float32 bound never exceeds this, whatever geomloss's own error


def assert_fp32(ours32, geo32, ref64, what="", floor=TOL32, cap=FP32_CAP):
    """The float32 rule, against the float64 reference: our error ≤ bound with
    ``bound = min(cap, max(floor, 2 × geomloss's own float32 error))``, measured twice:
    relative to the largest entry, and entry by entry relative to ``|ref_i| + rms(ref)`` (so
    small entries are not judged against the largest one only)."""
    assert tuple(ours32.shape) == tuple(ref64.shape), (
        f"{what}: shape {tuple(ours32.shape)} != expected {tuple(ref64.shape)}")
    assert bool(torch.isfinite(ours32).all()), f"{what}: non-finite values"
    e_ours, e_geo = rel_err(ours32, ref64), rel_err(geo32, ref64)
    bound = min(cap, max(floor, 2 * e_geo))
    assert e_ours <= bound, (f"{what}: float32 relative error {e_ours:.3e} vs the float64 reference "
                             f"> min({cap:.0e}, max({floor:.0e}, 2 × geomloss's {e_geo:.3e}))")
    ours, ref = ours32.detach().double(), ref64.detach().double()
    scale = ref.abs() + ref.pow(2).mean().sqrt()
    worst = ((ours - ref).abs() / scale.clamp_min(1e-300)).max().item() if ref.numel() else 0.0
    geo = ((geo32.detach().double() - ref).abs() / scale.clamp_min(1e-300)).max().item() if ref.numel() else 0.0
    ebound = min(cap, max(floor, 2 * geo))
    assert worst <= ebound, (f"{what}: float32 entrywise error {worst:.3e} (relative to |ref_i| + rms) > "
                             f"min({cap:.0e}, max({floor:.0e}, 2 × geomloss's {geo:.3e}))")


# ----------------------------------------------------------------------------- data
def clouds(N=37, M=29, D=3, B=None, dtype=torch.float64, seed=0, shift=0.5, spread=0.8,
           zero_a=0, zero_b=0):
    """Random clouds x (N,D)/(B,N,D), y (M,D)/(B,M,D) and positive normalised weights a, b
    ((N,)/(B,N)).  Generated in float64 then cast, so all dtypes see the same data.
    ``zero_a``/``zero_b``: number of zero weights (the first points of each cloud)."""
    g = torch.Generator().manual_seed(seed)
    lead = () if B is None else (B,)
    x = torch.randn(*lead, N, D, generator=g, dtype=torch.float64)
    y = spread * torch.randn(*lead, M, D, generator=g, dtype=torch.float64) + shift
    a = torch.rand(*lead, N, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(*lead, M, generator=g, dtype=torch.float64) + 0.2
    a[..., :zero_a] = 0
    b[..., :zero_b] = 0
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    return tuple(t.to(dtype) for t in (x, y, a, b))


def value_and_grads(L, inputs, names=None):
    """Evaluate ``L(*inputs.values())`` on fresh leaves; return (value, {name: grad}).

    ``names``: which inputs get gradients (default: all).  Uses ``value.sum()`` for batches.
    """
    names = list(inputs) if names is None else list(names)
    leaves = {k: v.detach().clone().requires_grad_(k in names) for k, v in inputs.items()}
    value = L(*leaves.values())
    grads = torch.autograd.grad(value.sum(), [leaves[k] for k in names]) if names else ()
    return value.detach(), dict(zip(names, grads))


def geomloss_loss(**kw):
    """geomloss.SamplesLoss with the 'tensorized' backend (the reference)."""
    kw.setdefault("backend", "tensorized")
    return geomloss.SamplesLoss(**kw)


def otk_loss(**kw):
    return otkernels.SamplesLoss(**kw)


def unbalanced_grad_factor(p, blur, reach):
    """otkernels's point gradients for reach≠None = geomloss's × (ρ+ε)/(ρ+ε/2)."""
    rho, eps = reach ** p, blur ** p
    return (rho + eps) / (rho + eps / 2)


def fixed_eps(blur, iters):
    """``diameter``/``scaling`` arguments giving ``iters`` Sinkhorn iterations all at
    ε = blur^p·(1 + O(iters·1e-9)): a converged fixed-ε solve through geomloss's schedule."""
    return dict(diameter=blur * math.exp(iters * 1e-9), scaling=math.exp(-1e-9))


def assert_double_backward_like_dense(backend, dtype=torch.float64, tol=1e-9, N=20, M=15, D=2):
    """Handle-level check of a backend module's ``create_graph=True`` path: the gradient and
    the Hessian-vector product of ⟨w, softmin_grad(ε, h)⟩ w.r.t. x (p = 1 and 2), and of
    ⟨w, kernel_sum(x, y, b)⟩ w.r.t. x, y and b (every kernel), equal the dense backend's."""
    from otkernels.backends import tensorized
    from otkernels.costs import Cost, Kernel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, N, D, generator=g, dtype=torch.float64).to(dtype)
    y = (0.8 * torch.randn(1, M, D, generator=g, dtype=torch.float64) + 0.3).to(dtype)
    h = (0.1 * torch.randn(1, M, generator=g, dtype=torch.float64)).to(dtype)
    b = (torch.rand(1, M, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    w = (torch.rand(1, N, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    vx = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    vy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    vb = torch.randn(b.shape, generator=g, dtype=torch.float64).to(dtype)

    def softmin_hvp(mod, p):
        xl = x.clone().requires_grad_()
        C = mod.cost_handles(xl, y, Cost(p), debias=False)[0]
        (gx,) = torch.autograd.grad((C.softmin_grad(0.5, h) * w).sum(), xl, create_graph=True)
        (hv,) = torch.autograd.grad((gx * vx).sum(), xl)
        return gx.detach(), hv

    def kernel_hvp(mod, name):
        leaves = [t.clone().requires_grad_() for t in (x, y, b)]
        out = mod.kernel_sum(*leaves, Kernel(name, 0.7))
        grads = torch.autograd.grad((out * w).sum(), leaves, create_graph=True)
        s = sum((gr * v).sum() for gr, v in zip(grads, (vx, vy, vb)))
        return [gr.detach() for gr in grads], torch.autograd.grad(s, leaves)

    for p in (1, 2):
        (g0, hv0), (g1, hv1) = softmin_hvp(tensorized, p), softmin_hvp(backend, p)
        assert_rel(g1, g0, tol, f"{backend.NAME} softmin_grad p={p}: gradient under create_graph")
        assert_rel(hv1, hv0, tol, f"{backend.NAME} softmin_grad p={p}: Hessian-vector product")
    for name in Kernel.NAMES:
        (g0, hv0), (g1, hv1) = kernel_hvp(tensorized, name), kernel_hvp(backend, name)
        for i, what in enumerate("xyb"):
            assert_rel(g1[i], g0[i], tol, f"{backend.NAME} kernel_sum {name}: gradient w.r.t. {what}")
            assert_rel(hv1[i], hv0[i], tol, f"{backend.NAME} kernel_sum {name}: HVP w.r.t. {what}")
