"""Gradients against central finite differences, float64, small converged problems.

geomloss's ε-scaling gives gradients that are the derivative of the value only at
convergence (envelope theorem on the last extrapolation step).  We reach convergence at a
fixed ε by a schedule of K iterations whose ε all equal blur^p up to 1e-9·K relative
(``fixed_eps``: diameter = blur·e^{K·1e-9}, scaling = e^{-1e-9}); the finite differences then
agree to ~1e-7 (blur=1, 80 iterations; blur=0.5, 120 iterations), and a 1e-4 tolerance
catches any error above 0.01%.  One test also uses a
real annealing schedule (diameter 1.5, scaling 0.999: agreement ~1e-3) with tolerance 1e-2.

Balanced Sinkhorn (and the ε-Hausdorff divergence) are divergences between measures of equal
mass: their weight gradients are defined up to a constant, so we test directions that keep
the total mass.  Unbalanced OT (reach=0.7) is defined for any masses: any direction, which
proves otkernels's corrected unbalanced gradient (geomloss's is off by (ρ+ε/2)/(ρ+ε), see
test_geomloss_unbalanced_gradient_is_off).
"""
from __future__ import annotations

import pytest
import torch

from otk_testing import assert_rel, clouds, fixed_eps, geomloss_loss, otk_loss, value_and_grads

N, M, D = 30, 25, 2
H = 1e-5  # finite-difference step (float64)


def data(seed=0, B=None):
    x, y, a, b = clouds(N=N, M=M, D=D, B=B, seed=seed, shift=0.3, spread=0.8)
    return dict(a=a, x=x, b=b, y=y)


def directional_check(L, inputs, names, tol, keep_mass=(), n_random=1, seed=1, what=""):
    """For each input in ``names``: the directional derivatives of ``L(*inputs)`` along the
    (normalised) gradient and ``n_random`` random directions, analytic vs central differences.

    ``keep_mass``: inputs whose directions are projected on total-mass-preserving ones.
    Asserts max |analytic − FD| ≤ tol · max |FD| per input.  Returns the relative errors.
    """
    if _interpreted(L):
        return _same_gradients_as_tensorized(L, inputs, names, what)
    g = torch.Generator().manual_seed(seed)
    leaves = {k: v.detach().clone().requires_grad_(k in names) for k, v in inputs.items()}
    value = L(*leaves.values()).sum()
    grads = dict(zip(names, torch.autograd.grad(value, [leaves[k] for k in names])))
    errors = {}
    for k in names:
        base = inputs[k].detach()
        dirs = [grads[k]] + [torch.randn(base.shape, generator=g, dtype=base.dtype) for _ in range(n_random)]
        an, num = [], []
        for d in dirs:
            if k in keep_mass:
                d = d - d.mean(-1, keepdim=True)
            d = d / d.norm()
            an.append((grads[k] * d).sum().item())
            plus = {**inputs, k: base + H * d}
            minus = {**inputs, k: base - H * d}
            with torch.no_grad():
                num.append((L(*plus.values()).sum() - L(*minus.values()).sum()).item() / (2 * H))
        an, num = torch.tensor(an, dtype=torch.float64), torch.tensor(num, dtype=torch.float64)
        err = ((an - num).abs().max() / num.abs().max()).item()
        errors[k] = err
        assert err <= tol, (f"{what} d/d{k}: analytic {an.tolist()} vs finite differences "
                            f"{num.tolist()}: relative error {err:.2e} > {tol:.0e}")
    return errors


def _interpreted(L):
    """triton (interpreter) and keops (CPU) without a GPU: ~17 loss evaluations of 80 iterations
    would take many minutes per test there."""
    return getattr(L, "backend", None) in ("triton", "keops") and not torch.cuda.is_available()


def _same_gradients_as_tensorized(L, inputs, names, what):
    """The slow backends' check: their analytic gradients equal tensorized's to 1e-9 under the
    same settings (8 iterations: equal iterations give equal results whatever the convergence),
    and tensorized's are checked against finite differences by the same test."""
    kw = dict(loss=L.loss, p=L.p, blur=L.blur, reach=L.reach, debias=L.debias)
    if L.loss in ("sinkhorn", "hausdorff"):
        kw.update(fixed_eps(L.blur, 8))
    _, g = value_and_grads(otk_loss(backend=L.backend, **kw), inputs, names)
    _, g0 = value_and_grads(otk_loss(backend="tensorized", **kw), inputs, names)
    for k in names:
        assert_rel(g[k], g0[k], 1e-9, f"{what} d/d{k} on {L.backend} vs tensorized")
    return {}


BLUR = 1.0
FIXED = fixed_eps(BLUR, 80)  # 80 iterations at fixed ε = 1: converged to ~1e-8


@pytest.mark.parametrize("debias", [True, False], ids=["debias", "biased"])
@pytest.mark.parametrize("p", [1, 2])
def test_sinkhorn_balanced(backend, p, debias):
    L = otk_loss(loss="sinkhorn", p=p, blur=BLUR, debias=debias, backend=backend, **FIXED)
    directional_check(L, data(), "axby", tol=1e-4, keep_mass="ab",
                      what=f"sinkhorn p={p} debias={debias}")


@pytest.mark.parametrize("debias", [True, False], ids=["debias", "biased"])
@pytest.mark.parametrize("p", [1, 2])
def test_sinkhorn_unbalanced(backend, p, debias):
    """reach=0.7: any direction for the weights (unbalanced OT is defined for any mass)."""
    L = otk_loss(loss="sinkhorn", p=p, blur=BLUR, reach=0.7, debias=debias, backend=backend, **FIXED)
    directional_check(L, data(), "axby", tol=1e-4,
                      what=f"unbalanced sinkhorn p={p} debias={debias}")


@pytest.mark.parametrize("debias", [True, False], ids=["debias", "biased"])
@pytest.mark.parametrize("reach", [(0.7, None), (None, 0.7), (0.7, 1.3)], ids=["soft-x", "soft-y", "both"])
def test_sinkhorn_semi_unbalanced(backend, reach, debias):
    """reach=(ρ_x, ρ_y), one side a hard marginal: the problem is defined for any masses, so
    every weight direction, including ones that change the hard side's mass (its gradient is
    f − ε/2 in the biased OT_ε, the envelope term that ⟨a, f⟩ alone would miss)."""
    inputs = data(seed=4)
    inputs["a"], inputs["b"] = 1.4 * inputs["a"], 0.8 * inputs["b"]
    L = otk_loss(loss="sinkhorn", p=2, blur=BLUR, reach=reach, debias=debias, backend=backend, **FIXED)
    directional_check(L, inputs, "axby", tol=1e-4, n_random=2, what=f"semi-unbalanced {reach} debias={debias}")


def test_sinkhorn_unbalanced_batched_unnormalised(backend):
    """Batched, masses far from 1 (unbalanced OT compares measures of any mass)."""
    inputs = data(seed=3, B=2)
    inputs["a"] = inputs["a"] * torch.tensor([[1.7], [0.6]], dtype=torch.float64)
    inputs["b"] = inputs["b"] * torch.tensor([[0.5], [1.3]], dtype=torch.float64)
    L = otk_loss(loss="sinkhorn", p=2, blur=0.5, reach=0.7, backend=backend, **fixed_eps(0.5, 120))
    directional_check(L, inputs, "axby", tol=1e-4, what="unbalanced batched")


@pytest.mark.slow
def test_sinkhorn_annealed_schedule(backend):
    """A real ε-annealing schedule (diameter 1.5 → blur 1, scaling 0.999: ~400 iterations):
    gradients agree with finite differences to ~1e-3 (convergence error of the schedule)."""
    L = otk_loss(loss="sinkhorn", p=2, blur=1.0, reach=0.7, diameter=1.5, scaling=0.999, backend=backend)
    directional_check(L, data(seed=2), "xb", tol=1e-2, what="annealed unbalanced sinkhorn")


@pytest.mark.parametrize("loss", ["energy", "gaussian", "laplacian"])
def test_kernel_losses(backend, loss):
    """Kernel norms are closed forms: exact gradients, tight tolerance, any weight direction."""
    L = otk_loss(loss=loss, blur=0.7, backend=backend)
    directional_check(L, data(), "axby", tol=1e-6, n_random=2, what=loss)
    directional_check(L, data(seed=5, B=2), "axby", tol=1e-6, what=f"{loss} batched")


@pytest.mark.parametrize("p", [1, 2])
def test_hausdorff(backend, p):
    """ε-Hausdorff divergence: points, and weights along mass-preserving directions."""
    L = otk_loss(loss="hausdorff", p=p, blur=BLUR, backend=backend, **FIXED)
    directional_check(L, data(), "axby", tol=1e-4, keep_mass="ab", n_random=2, what=f"hausdorff p={p}")


@pytest.mark.parametrize("p", [1, 2])
def test_hausdorff_weights_any_direction(backend, p):
    """H_ε(α, β) is a smooth function of the weights for any masses (its formula, the
    symmetric potentials, are defined for any positive measure) and otkernels documents
    "exact gradients": the weight gradient must also hold along directions that change the
    total mass.  The true derivative is ∂H/∂α_i = ½(b_x − a_x)_i + adjoint terms + ε/4: the
    ε/4 comes from ∂⟨α, a_x⟩/∂α_i = a_x,i − ε/2 (a_x shifts by −(ε/2)·log c when α → cα),
    which the envelope formula for ½OT_ε(α, α) leaves out; same for β."""
    L = otk_loss(loss="hausdorff", p=p, blur=BLUR, backend=backend, **FIXED)
    directional_check(L, data(), "ab", tol=1e-4, n_random=2, what=f"hausdorff p={p}, any direction")


def test_geomloss_unbalanced_gradient_is_off():
    """Why otkernels deviates from geomloss for reach≠None: geomloss's gradient fails the same
    finite-difference check by far more than the tolerance (so the unbalanced tests above
    would catch an implementation that copied it)."""
    L = geomloss_loss(loss="sinkhorn", p=2, blur=BLUR, reach=0.7, **FIXED)
    with pytest.raises(AssertionError, match="relative error"):
        directional_check(L, data(), "x", tol=0.1, what="geomloss unbalanced")


# ----------------------------------------------------------------------------- double backward
def _hvp(L, inputs, v, wrt="x", B=None):
    """(gradient, Hessian-vector product along v) of L w.r.t. the input ``wrt`` (create_graph)."""
    leaves = {k: t.detach().clone().requires_grad_(k == wrt) for k, t in inputs.items()}
    value = L(leaves["a"], leaves["x"], leaves["b"], leaves["y"]).sum()
    (g,) = torch.autograd.grad(value, [leaves[wrt]], create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), [leaves[wrt]])
    return g.detach(), hv


@pytest.mark.parametrize("loss,p,wrt", [("sinkhorn", 2, "x"), ("sinkhorn", 1, "x"), ("sinkhorn", 2, "y"),
                                        ("gaussian", 2, "x"), ("energy", 2, "x"), ("laplacian", 2, "b"),
                                        ("hausdorff", 2, "x")])
def test_double_backward_matches_tensorized(backend, loss, p, wrt):
    """create_graph=True works on every backend and gives the dense backend's second derivatives
    (the tiled backends recompute the gradient with differentiable torch ops, see
    otkernels/backends/_double.py): gradient and Hessian-vector product to 1e-9, float64."""
    inputs = data()
    v = torch.randn(inputs[wrt].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(loss=loss, p=p, blur=0.5)
    # Sinkhorn: the reference is geomloss (tensorized: torch autograd through its dense
    # formulas).  Kernel losses: geomloss's are not (it forms K(x, x) as k(x, x.detach()) with
    # a doubled first-order gradient, so its second derivatives are off by ~90% here) and it
    # has no Hausdorff loss: there the reference is our tensorized backend (for kernel losses
    # checked against central differences of its gradient in the next test).
    ref = geomloss_loss(**kw) if loss == "sinkhorn" else otk_loss(backend="tensorized", **kw)
    g_ref, hv_ref = _hvp(ref, inputs, v, wrt)
    g, hv = _hvp(otk_loss(backend=backend, **kw), inputs, v, wrt)
    assert_rel(g, g_ref, 1e-9, f"{loss} p={p}: gradient w.r.t. {wrt} under create_graph")
    assert_rel(hv, hv_ref, 1e-9, f"{loss} p={p}: Hessian-vector product w.r.t. {wrt}")


@pytest.mark.parametrize("loss,wrt", [("gaussian", "x"), ("energy", "x"), ("laplacian", "b"), ("laplacian", "x")])
def test_dense_double_backward_finite_differences(loss, wrt):
    """The reference of the test above for kernel losses (exact, no iterations): the tensorized
    Hessian-vector product equals central differences of its gradient.  (Hausdorff's
    create_graph path, like geomloss's Sinkhorn, differentiates the last step with the
    potentials held fixed, so it has no finite-difference reference: there the backends are
    compared with tensorized only.)"""
    inputs = data()
    v = torch.randn(inputs[wrt].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    L = otk_loss(loss=loss, p=2, blur=0.5, backend="tensorized")
    _, hv = _hvp(L, inputs, v, wrt)
    H = 1e-5
    g_plus, _ = _hvp(L, {**inputs, wrt: inputs[wrt] + H * v}, v, wrt)
    g_minus, _ = _hvp(L, {**inputs, wrt: inputs[wrt] - H * v}, v, wrt)
    assert_rel(hv, (g_plus - g_minus) / (2 * H), 1e-6, f"{loss}: HVP w.r.t. {wrt} vs finite differences")


def test_double_backward_batched_and_auto(backend):
    """Batched clouds, and backend='auto' (the drop-in default) at sizes where it picks a
    tiled backend: Hessian-vector products of the Sinkhorn divergence equal the dense ones."""
    inputs = data(B=3)
    v = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, hv_ref = _hvp(otk_loss(loss="sinkhorn", blur=0.5, backend="tensorized"), inputs, v)
    for name in (backend, "auto"):
        _, hv = _hvp(otk_loss(loss="sinkhorn", blur=0.5, backend=name), inputs, v)
        assert_rel(hv, hv_ref, 1e-9, f"batched Sinkhorn HVP on {name}")


def test_double_backward_sinkhorn_matches_geomloss(backend):
    """geomloss (tensorized) supports create_graph through torch autograd: the same
    Hessian-vector product of the Sinkhorn divergence (both differentiate the last
    extrapolation step with the potentials held fixed)."""
    inputs = data()
    v = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    _, hv_geo = _hvp(geomloss_loss(loss="sinkhorn", p=2, blur=0.5), inputs, v)
    _, hv = _hvp(otk_loss(loss="sinkhorn", p=2, blur=0.5, backend=backend), inputs, v)
    assert_rel(hv, hv_geo, 1e-9, "Sinkhorn HVP vs geomloss")


def test_hessian_vector_product_kernel(backend):
    """The Hessian-vector product of an exact (kernel) loss matches finite differences of the
    gradient, on every backend."""
    inputs = data()
    L = otk_loss(loss="gaussian", blur=0.7, backend=backend)
    v = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def grad_at(xx, create_graph=False):
        xx = xx if xx.requires_grad else xx.clone().requires_grad_()
        (g,) = torch.autograd.grad(L(inputs["a"], xx, inputs["b"], inputs["y"]), [xx], create_graph=create_graph)
        return xx, g

    x, g = grad_at(inputs["x"].clone().requires_grad_(), create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), [x])
    num = (grad_at(inputs["x"] + H * v)[1] - grad_at(inputs["x"] - H * v)[1]) / (2 * H)
    err = ((hv - num).abs().max() / num.abs().max()).item()
    assert err < 1e-6, f"Hessian-vector product: relative error {err:.2e}"
