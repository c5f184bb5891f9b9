"""Semi-unbalanced OT: ``reach=(reach_x, reach_y)``, either None (a hard marginal).

References: POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, ε, reg_m=(ρ_x, ρ_y),
reg_type="kl")`` (``inf`` = hard marginal) for the plan, and the primal objective of its plan
for the value: ⟨π, C⟩ + ε KL(π | α⊗β) + ρ_x KL(π1 | α) + ρ_y KL(πᵀ1 | β) (generalised KL)
plus geomloss's mass convention c = ε/2 (m_α + m_β) − ε m_α m_β (zero for unit masses; the
term geomloss's value adds for unbalanced OT, kept for every side).  The debiased value is
OT(α, β) − ½ OT(α, α) − ½ OT(β, β), where OT(α, α) penalises both marginals with ρ_x.
Gradients (finite differences, any weight direction): tests/test_gradients.py.
"""
from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from otkernels import SamplesLoss
from otkernels.plan import transport_plan

BLUR = 0.7
EPS = BLUR ** 2
PAIRS = [(1.0, None), (None, 0.8), (1.0, 0.8), (0.9, 0.9)]
IDS = ["soft-x", "soft-y", "both", "equal"]


def _clouds(N=15, M=18, seed=0, dtype=torch.float64, B=None):
    g = torch.Generator().manual_seed(seed)
    shape = (B,) if B else ()
    x = torch.randn(*shape, N, 2, generator=g, dtype=torch.float64)
    y = torch.randn(*shape, M, 2, generator=g, dtype=torch.float64) + 0.5
    a = torch.rand(*shape, N, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(*shape, M, generator=g, dtype=torch.float64) + 0.2
    a, b = a / a.sum(-1, keepdim=True), 1.3 * b / b.sum(-1, keepdim=True)  # masses 1 and 1.3
    return [t.to(dtype) for t in (x, y, a, b)]


def _rho(reach):
    return tuple(math.inf if r is None else r ** 2 for r in reach)


def _kl(p, q):
    return float((p * np.log(p / q) - p + q).sum())


def pot_value(a, b, C, reach):
    """OT_ε by POT's plan: its primal objective + geomloss's mass convention."""
    a, b, C = (t.double().numpy() for t in (a, b, C))
    rx, ry = _rho(reach)
    P = ot.unbalanced.sinkhorn_unbalanced(a, b, C, EPS, (rx, ry), reg_type="kl", numItermax=100000,
                                          stopThr=1e-15)
    v = (P * C).sum() + EPS * _kl(P, a[:, None] * b[None])
    for r, marg, w in ((rx, P.sum(1), a), (ry, P.sum(0), b)):
        if r != math.inf:
            v += r * _kl(marg, w)
    return P, v + EPS / 2 * (a.sum() + b.sum()) - EPS * a.sum() * b.sum()


def _cost(x, y):
    return 0.5 * torch.cdist(x.double(), y.double()) ** 2


def _loss(backend, reach, **kw):
    return SamplesLoss("sinkhorn", blur=BLUR, reach=reach, tol=1e-13, max_iter=20000, backend=backend, **kw)


@pytest.mark.parametrize("reach", PAIRS, ids=IDS)
def test_plan_and_value_match_pot(backend, reach):
    x, y, a, b = _clouds()
    F, G = _loss(backend, reach, debias=False, potentials=True)(a, x, b, y)
    C = _cost(x, y)
    P = a[:, None] * b[None] * torch.exp((F[:, None] + G[None] - C) / EPS)
    P_pot, v_pot = pot_value(a, b, C, reach)
    np.testing.assert_allclose(P.numpy(), P_pot, rtol=0, atol=1e-12)
    if reach[0] is None:  # a hard marginal holds exactly
        torch.testing.assert_close(P.sum(1), a, rtol=0, atol=1e-12)
    if reach[1] is None:
        torch.testing.assert_close(P.sum(0), b, rtol=0, atol=1e-12)
    v = _loss(backend, reach, debias=False)(a, x, b, y)
    assert abs(v.item() - v_pot) <= 1e-10 * abs(v_pot)


@pytest.mark.parametrize("reach", PAIRS, ids=IDS)
def test_debiased_value_matches_pot(backend, reach):
    x, y, a, b = _clouds(seed=1)
    S = _loss(backend, reach)(a, x, b, y).item()
    rx, ry = reach
    _, ab = pot_value(a, b, _cost(x, y), reach)
    _, aa = pot_value(a, a, _cost(x, x), (rx, rx))
    _, bb = pot_value(b, b, _cost(y, y), (ry, ry))
    assert abs(S - (ab - aa / 2 - bb / 2)) <= 1e-10 * abs(S)


def test_pairs_equal_the_scalar_and_balanced_forms(backend):
    """(r, r) is reach=r; (None, None) is balanced; semi-unbalanced sits between them."""
    x, y, a, b = _clouds(seed=2)
    b = b / 1.3
    kw = dict(blur=BLUR, backend=backend)
    for debias in (True, False):
        one = SamplesLoss(reach=0.9, debias=debias, **kw)(a, x, b, y)
        two = SamplesLoss(reach=(0.9, 0.9), debias=debias, **kw)(a, x, b, y)
        torch.testing.assert_close(two, one, rtol=1e-14, atol=0)
        none = SamplesLoss(reach=(None, None), debias=debias, **kw)(a, x, b, y)
        bal = SamplesLoss(debias=debias, **kw)(a, x, b, y)
        torch.testing.assert_close(none, bal, rtol=1e-14, atol=0)
        # a huge reach on the soft side tends to the balanced value (ρ = 1e8: ~1e-8 relative)
        near = SamplesLoss(reach=(None, 1e4), debias=debias, **kw)(a, x, b, y)
        assert abs(near.item() - bal.item()) <= 1e-6 * abs(bal.item())
        soft = SamplesLoss(reach=(None, 1.0), debias=debias, **kw)(a, x, b, y)
        assert abs(soft.item() - bal.item()) >= 1e-2 * abs(bal.item())  # and a small one does not


def test_batched_equals_loop(backend):
    x, y, a, b = _clouds(N=12, M=10, seed=3, B=3)
    L = SamplesLoss(blur=BLUR, reach=(None, 0.8), diameter=4.0, backend=backend)  # one ε-schedule for all
    v = L(a, x, b, y)
    loop = torch.stack([L(a[k], x[k], b[k], y[k]) for k in range(3)])
    torch.testing.assert_close(v, loop, rtol=1e-12, atol=0)


def test_float32_close_to_float64(backend):
    x, y, a, b = _clouds(seed=5)
    L = SamplesLoss(blur=BLUR, reach=(1.0, None), backend=backend)
    v64 = L(a, x, b, y)
    v32 = L(a.float(), x.float(), b.float(), y.float())
    assert v32.dtype == torch.float32
    assert abs(v32.double().item() - v64.item()) <= 1e-5 * abs(v64.item()) + 1e-6


def test_transport_plan_semi_unbalanced():
    """transport_plan(reach=pair): the plan's hard marginal is exact, the soft one is POT's."""
    x, y, a, b = _clouds(seed=6)
    a, b = a / a.sum(), b / b.sum()
    plan = transport_plan(x, y, a, b, blur=BLUR, reach=(None, 0.8), tol=1e-13, max_iter=5000, backend="blocked")
    P_pot, _ = pot_value(a, b, _cost(x, y), (None, 0.8))
    np.testing.assert_allclose(plan.dense().numpy(), P_pot, rtol=0, atol=1e-12)
    rows, cols = plan.marginals()
    torch.testing.assert_close(rows, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reach,exc,match", [
    ((1.0, 2.0, 3.0), ValueError, r"reach must be None, a number or a pair"),
    ((0.0, None), ValueError, r"reach\[0\] must be > 0"),
    ((None, -1.0), ValueError, r"reach\[1\] must be > 0"),
    (("a", None), TypeError, r"reach\[0\] must be a number"),
    ((None, math.inf), ValueError, r"reach\[1\] must be finite"),
])
def test_bad_reach_pairs(reach, exc, match):
    with pytest.raises(exc, match=match):
        SamplesLoss(reach=reach)
