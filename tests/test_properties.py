"""Property-based tests (Hypothesis): cases generated at random, each checked against an answer
known exactly, on the tensorized, blocked and native backends, in float64.

Known answers (α = Σ a_i δ_{x_i}, β = Σ b_j δ_{y_j}; S the debiased Sinkhorn divergence, K a
kernel loss ½‖α − β‖²_k; C = |x − y| for p = 1, ½|x − y|² for p = 2; ε = blur^p):

* symmetry S(α, β) = S(β, α) and K(α, β) = K(β, α) (balanced and unbalanced);
* S(α, α) = 0, K(α, α) = 0;
* translation invariance: S(α + t, β + t) = S(α, β), K likewise (float64, 1e-10 of the cost scale);
* positivity: S(α, β) ≥ 0 (k = exp(−C/ε) is positive definite), K(α, β) ≥ 0;
* large blur: OT_ε(α, β) lies in [E_{α⊗β}C − E_{α⊗β}C²/(2ε), E_{α⊗β}C] (primal plan α⊗β; dual
  potentials f = g = 0 with 1 − e^{−u} ≥ u − u²/2), so S_ε − ½‖α − β‖²_{−C} is in
  [−E_{α⊗β}C²/(2ε), (E_{α⊗α}C² + E_{β⊗β}C²)/(4ε)]: the energy distance (p = 1, which is the
  "energy" loss) or ½|mean α − mean β|² (p = 2);
* small blur: W(α, β) = min ⟨π, C⟩ (POT's exact ``ot.emd2``) ≤ OT_ε(α, β) ≤ W(α, β) +
  ε·min(H(a), H(b)) (the optimal plan's mutual information) and W(α, α) ≤ OT_ε(α, α) ≤
  W(α, α) + ε·H(a) (the diagonal plan), so |S_ε − (W(α, β) − ½W(α, α) − ½W(β, β))| ≤
  ε·max(H(a), H(b)) at convergence (H the entropy of the weights; W(α, α) = 0 for p = 2, 1e-4
  for p = 1 by the cost's floor); the solves use scaling 0.95, converged to that bound for
  ε ≥ 0.01·diameter^p;
* a batch of B problems equals B single calls (same diameter: the schedule is per call).

``derandomize=True``: the same examples on every run; deadline off (first calls compile/warm up).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import otkernels
from otk_testing import require_backend

ot = pytest.importorskip("ot")

BACKENDS = ["tensorized", "blocked", "native"]
KERNELS = ["energy", "gaussian", "laplacian"]
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

coord = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False, width=64)
weight = st.floats(0.05, 1.0, allow_nan=False, width=64)


@st.composite
def measure(draw, n, D, lead=()):
    """Points (*lead, n, D) and positive weights (*lead, n) summing to 1, in float64."""
    size = int(np.prod(lead, dtype=int)) * n
    x = torch.tensor(draw(st.lists(coord, min_size=size * D, max_size=size * D)), dtype=torch.float64)
    w = torch.tensor(draw(st.lists(weight, min_size=size, max_size=size)), dtype=torch.float64)
    w = w.reshape(*lead, n)
    return x.reshape(*lead, n, D), w / w.sum(-1, keepdim=True)


@st.composite
def pair(draw, max_n=8, max_d=4, batch=False):
    """(a, x, b, y): two measures with N, M ≤ max_n points in D ≤ max_d dimensions (B ≤ 3 of each)."""
    N, M, D = draw(st.integers(1, max_n)), draw(st.integers(1, max_n)), draw(st.integers(1, max_d))
    lead = (draw(st.integers(1, 3)),) if batch else ()
    x, a = draw(measure(N, D, lead))
    y, b = draw(measure(M, D, lead))
    return a, x, b, y


def cost(x, y, p):
    """The library's costs: ½|x − y|² (p = 2); |x − y| floored at 1e-4 (p = 1: geomloss's clamp of
    the squared distance at 1e-8, so coincident points are 1e-4 apart for this cost and the
    energy kernel)."""
    d = x[..., :, None, :] - y[..., None, :, :]
    return (d * d).sum(-1).clamp_min(1e-8).sqrt() if p == 1 else 0.5 * (d * d).sum(-1)


def cost_scale(x, y, p):
    """diameter^p of all the points (at least 1e-3^p): the scale of every value and error."""
    pts = torch.cat([x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])])
    return max((pts.max(0).values - pts.min(0).values).norm().item(), 1e-3) ** p


def entropy(w):
    return -(w * w.log()).sum().item()


def sinkhorn(backend, p, blur, reach=None, **kw):
    return otkernels.SamplesLoss("sinkhorn", p=p, blur=blur, reach=reach, backend=backend, **kw)


blurs = st.floats(0.05, 2.0)
reaches = st.one_of(st.none(), st.floats(0.2, 10.0))


# ----------------------------------------------------------------------------- symmetry, zero, translation
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, **SETTINGS)
@given(case=pair(), p=st.sampled_from([1, 2]), blur=blurs, reach=reaches)
def test_sinkhorn_symmetric_zero_on_diagonal(backend, case, p, blur, reach):
    require_backend(backend)
    a, x, b, y = case
    L, scale = sinkhorn(backend, p, blur, reach), cost_scale(x, y, p)
    s_ab, s_ba = L(a, x, b, y).item(), L(b, y, a, x).item()
    assert abs(s_ab - s_ba) <= 1e-12 * scale, (s_ab, s_ba)
    for w, z in ((a, x), (b, y)):
        assert abs(L(w, z, w, z).item()) <= 1e-12 * scale


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, **SETTINGS)
@given(case=pair(), p=st.sampled_from([1, 2]), blur=blurs, reach=reaches,
       shift=st.lists(st.floats(-10.0, 10.0), min_size=4, max_size=4))
def test_sinkhorn_translation_invariant_and_positive(backend, case, p, blur, reach, shift):
    require_backend(backend)
    a, x, b, y = case
    t = torch.tensor(shift[:x.shape[-1]], dtype=torch.float64)
    L, scale = sinkhorn(backend, p, blur, reach), cost_scale(x, y, p)
    s, s_t = L(a, x, b, y).item(), L(a, x + t, b, y + t).item()
    assert abs(s - s_t) <= 1e-10 * scale, (s, s_t)
    assert s >= -1e-12 * scale, s


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, **SETTINGS)
@given(case=pair(), kernel=st.sampled_from(KERNELS), blur=blurs,
       shift=st.lists(st.floats(-10.0, 10.0), min_size=4, max_size=4))
def test_kernel_losses_symmetric_zero_translation_positive(backend, case, kernel, blur, shift):
    require_backend(backend)
    a, x, b, y = case
    t = torch.tensor(shift[:x.shape[-1]], dtype=torch.float64)
    L = otkernels.SamplesLoss(kernel, blur=blur, backend=backend)
    scale = cost_scale(x, y, 1) if kernel == "energy" else 1.0  # |k| ≤ diameter, or ≤ 1
    k_ab, k_ba = L(a, x, b, y).item(), L(b, y, a, x).item()
    assert abs(k_ab - k_ba) <= 1e-12 * scale
    assert abs(L(a, x, a, x).item()) <= 1e-12 * scale
    assert abs(L(a, x + t, b, y + t).item() - k_ab) <= 1e-10 * scale
    assert k_ab >= -1e-12 * scale


# ----------------------------------------------------------------------------- limits in blur
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, **SETTINGS)
@given(case=pair(), p=st.sampled_from([1, 2]), ratio=st.floats(2.0, 100.0))
def test_large_blur_limit(backend, case, p, ratio):
    """blur = ratio·diameter: S_ε is within the second-order bound of ½‖α − β‖²_{−C}."""
    require_backend(backend)
    a, x, b, y = case
    scale = cost_scale(x, y, p)
    eps = (ratio * scale ** (1 / p)) ** p
    s = sinkhorn(backend, p, eps ** (1 / p))(a, x, b, y).item()

    def mean_c(u, wu, v, wv, power=1):
        return (wu[:, None] * wv[None] * cost(u, v, p) ** power).sum().item()

    if p == 1:
        limit = otkernels.SamplesLoss("energy", backend=backend)(a, x, b, y).item()
        dense = mean_c(x, a, y, b) - 0.5 * mean_c(x, a, x, a) - 0.5 * mean_c(y, b, y, b)
        assert abs(limit - dense) <= 1e-12 * scale  # the energy loss is ½‖α − β‖²_{−|x−y|}
    else:
        limit = 0.5 * ((a @ x - b @ y) ** 2).sum().item()
    lo = -mean_c(x, a, y, b, 2) / (2 * eps)
    hi = (mean_c(x, a, x, a, 2) + mean_c(y, b, y, b, 2)) / (4 * eps)
    floor = 1e-12 * scale
    assert lo - floor <= s - limit <= hi + floor, (s, limit, lo, hi)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, **SETTINGS)
@given(case=pair(max_n=6, max_d=3), p=st.sampled_from([1, 2]), ratio=st.floats(0.01, 0.1))
def test_small_blur_limit_is_wasserstein(backend, case, p, ratio):
    """ε = ratio·diameter^p: |S_ε − S_0| ≤ ε·max(H(a), H(b)), S_0 = W(α, β) − ½W(α, α) − ½W(β, β)
    (= W(α, β) for p = 2) with W from POT's exact solver."""
    require_backend(backend)
    a, x, b, y = case
    scale = cost_scale(x, y, p)
    eps = ratio * scale
    # The bound holds for the converged S_ε.  geomloss's annealing does one iteration per ε:
    # at scaling 0.95, Hypothesis found x = y = {(0,0), (0,1)}, a = (½, ½), b = (4/7, 3/7), p = 1,
    # ε = 0.03 where S = 0.040 against W = 0.071 (1.4× outside the bound; geomloss gives the same
    # 0.040); at 0.995 it is 0.0648, 0.30 of the bound.
    s = sinkhorn(backend, p, eps ** (1 / p), scaling=0.995)(a, x, b, y).item()
    def W(u, wu, v, wv):
        return ot.emd2(wu.numpy(), wv.numpy(), cost(u, v, p).numpy())

    # the self terms are 0 for p = 2, and 1e-4 for p = 1 (the cost's floor at coincident points)
    w = W(x, a, y, b) - 0.5 * W(x, a, x, a) - 0.5 * W(y, b, y, b)
    bound = eps * max(entropy(a), entropy(b))
    assert abs(s - w) <= bound + 1e-12 * scale, (s, w, bound)


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, **SETTINGS)
@given(case=pair(batch=True), loss=st.sampled_from(["sinkhorn", "energy", "gaussian"]),
       p=st.sampled_from([1, 2]), blur=blurs, reach=reaches)
def test_batch_equals_loop(backend, case, loss, p, blur, reach):
    require_backend(backend)
    a, x, b, y = case
    scale = cost_scale(x, y, p)
    diameter = scale ** (1 / p)  # one schedule for the batch and the single calls
    kw = dict(p=p, reach=reach, diameter=diameter) if loss == "sinkhorn" else {}
    L = otkernels.SamplesLoss(loss, blur=blur, backend=backend, **kw)
    batched = L(a, x, b, y)
    assert batched.shape == (x.shape[0],)
    loop = torch.stack([L(a[i], x[i], b[i], y[i]) for i in range(x.shape[0])])
    assert (batched - loop).abs().max().item() <= 1e-12 * scale, (batched, loop)
