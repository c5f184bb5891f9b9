"""Minibatch OT couplings (otkernels.coupling) against brute force, POT and their definitions."""
import itertools
import math
import sys

import pytest
import torch

import otkernels
from otkernels.coupling import _cost, exact_pairs, sample_pairs, sinkhorn_plan

ot = pytest.importorskip("ot")

DTYPES = [torch.float64, torch.float32]


def _clouds(n, m, d, dtype, seed=0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + shift
    return x.to(dtype), y.to(dtype)


def _sqcost(x, y, j):
    """Mean |x_i − y_{j_i}|² in float64."""
    return (x.double() - y.double()[j]).square().sum(1).mean().item()


def _uniform(n):
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def test_lazy_import():
    assert otkernels.coupling.sample_pairs is sample_pairs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_exact_pairs_is_the_best_permutation(n, dtype):
    for seed, d in ((0, 1), (1, 2), (2, 3)):
        x, y = _clouds(n, n, d, dtype, seed)
        j = exact_pairs(x, y)
        assert j.dtype == torch.long and sorted(j.tolist()) == list(range(n))
        best = min(_sqcost(x, y, torch.tensor(p)) for p in itertools.permutations(range(n)))
        assert abs(_sqcost(x, y, j) - best) <= 1e-9 * max(1.0, best)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_pairs_matches_pot_emd(dtype):
    n = 50
    x, y = _clouds(n, n, 5, dtype, seed=3)
    j = exact_pairs(x, y)
    C = (x.double()[:, None] - y.double()[None]).square().sum(-1)
    ref = ot.emd2(_uniform(n).numpy(), _uniform(n).numpy(), C.numpy())  # = mean cost of the best permutation
    assert abs(_sqcost(x, y, j) - ref) <= 1e-9 * ref
    i, j2 = sample_pairs(x, y, "exact")
    assert torch.equal(i, torch.arange(n)) and torch.equal(j2, j)


def test_exact_pairs_unequal_sizes_follow_the_emd_plan():
    x, y = _clouds(12, 5, 2, torch.float64, seed=4)
    C = _cost(x, y, 2).numpy() * 2
    plan = torch.as_tensor(ot.emd(_uniform(12).numpy(), _uniform(5).numpy(), C))
    j = exact_pairs(x, y, generator=torch.Generator().manual_seed(0))
    assert j.shape == (12,) and (plan[torch.arange(12), j] > 0).all()
    assert torch.equal(j, exact_pairs(x, y, generator=torch.Generator().manual_seed(0)))
    # rows with a single nonzero entry are deterministic
    single = (plan > 0).sum(1) == 1
    assert single.any() and torch.equal(j[single], plan[single].argmax(1))


def test_exact_pairs_unequal_sizes_without_pot(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # `import ot` raises ImportError
    x, y = _clouds(4, 3, 2, torch.float64)
    with pytest.raises(ImportError, match="needs POT"):
        exact_pairs(x, y)
    assert exact_pairs(x, x).tolist() == [0, 1, 2, 3]  # N = M needs only scipy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,blur", [(2, 0.5), (2, 0.3), (1, 0.5)])
def test_sinkhorn_plan_marginals_and_pot(p, blur, dtype):
    """Converged plan (scaling 0.9, then Sinkhorn updates to tol=1e-10): marginals = a, b and
    π = POT's log-domain Sinkhorn plan for reg = ε (same minimiser: ε·KL(π | a⊗b) and POT's
    −reg·H(π) differ by a constant on the transport polytope).  Tolerance: both solvers stop
    at marginal errors ~1e-10 to 1e-12, and a relative marginal error δ moves the potentials
    by ~δ·ε, i.e. the plan by ~δ relatively, so 1e-8 of max π leaves a wide margin in float64;
    float32 adds the final cast (2⁻²⁴ ≈ 6e-8 relative), hence 1e-6."""
    x, y = _clouds(20, 30, 3, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    a = (torch.rand(20, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = (torch.rand(30, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    P = sinkhorn_plan(x, y, blur=blur, p=p, scaling=0.9, a=a, b=b, tol=1e-10)
    assert P.dtype == dtype and P.shape == (20, 30)
    P = P.double()
    a, b = a.double() / a.double().sum(), b.double() / b.double().sum()
    tol = 1e-8 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(P.sum(1), a, rtol=tol, atol=0)
    torch.testing.assert_close(P.sum(0), b, rtol=tol, atol=0)
    Q = torch.as_tensor(ot.sinkhorn(a.numpy(), b.numpy(), _cost(x, y, p).numpy(), reg=blur ** p,
                                    method="sinkhorn_log", numItermax=100_000, stopThr=1e-12))
    assert (P - Q).abs().max() <= tol * Q.max()


def test_sinkhorn_plan_raw_potentials_at_large_blur():
    """tol=None: the plan straight from SamplesLoss's potentials.  When ε is large next to the
    cost differences its ε-annealing converges and the marginals are right (this checks the
    formula π = a b exp((f + g − C)/ε) and the potentials' convention); at small blur they are
    not, which is why sinkhorn_plan refines by default."""
    x, y = _clouds(30, 30, 3, torch.float64, seed=7)
    P = sinkhorn_plan(x, y, blur=3.0, tol=None)
    torch.testing.assert_close(P.sum(1) * 30, torch.ones(30, dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(P.sum(0) * 30, torch.ones(30, dtype=torch.float64), rtol=0, atol=1e-3)
    raw = sinkhorn_plan(x, y, blur=0.5, tol=None)
    assert (raw.sum(1) * 30 - 1).abs().max() > 1e-2  # not converged: documented behaviour
    fixed = sinkhorn_plan(x, y, blur=0.5)
    assert (fixed.sum(1) * 30 - 1).abs().max() < 2e-6


@pytest.mark.parametrize("blur", [0.3, 0.1, 0.05, 0.02])
def test_sinkhorn_plan_tends_to_the_exact_plan(blur):
    """⟨π_ε, C⟩ + ε·KL(π_ε | a⊗b) ≤ ⟨P*, C⟩ + ε·KL(P* | a⊗b) = W + ε log N for the optimal
    permutation plan P*, so 0 ≤ ⟨π_ε, C⟩ − W ≤ ε log N (up to the marginal error), and the
    row-wise argmax is the exact permutation once ε is below the assignment's cost gaps."""
    n = 8
    x, y = _clouds(n, n, 2, torch.float64, seed=8, shift=0.0)
    j = exact_pairs(x, y)
    C = _cost(x, y, 2)
    W = C[torch.arange(n), j].mean().item()
    P = sinkhorn_plan(x, y, blur=blur)
    gap = (P * C).sum().item() - W
    eps = blur ** 2
    assert -1e-6 <= gap <= eps * math.log(n) + 1e-6
    assert torch.equal(P.argmax(1), j)
    if blur <= 0.02:
        assert (P - torch.eye(n, dtype=P.dtype)[j] / n).abs().sum() < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_pairs_determinism_and_shapes(dtype):
    x, y = _clouds(16, 16, 4, dtype, seed=9)
    for method, kw in (("sinkhorn", dict(blur=0.5)), ("independent", {})):
        i1, j1 = sample_pairs(x, y, method, generator=torch.Generator().manual_seed(1), **kw)
        i2, j2 = sample_pairs(x, y, method, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(i1, torch.arange(16)) and torch.equal(j1, j2) and j1.dtype == torch.long
        assert 0 <= j1.min() and j1.max() < 16
    _, j = sample_pairs(x, y, "independent", generator=torch.Generator().manual_seed(2))
    assert sorted(j.tolist()) == list(range(16))
    _, j = sample_pairs(x[:5], y, "independent")
    assert len(set(j.tolist())) == 5
    _, j = sample_pairs(x, y[:3], "independent")
    assert j.shape == (16,) and j.max() < 3
    # the exact and sinkhorn couplings shorten the pairs compared with the independent one
    xs, ys = _clouds(64, 64, 4, dtype, seed=10, shift=0.0)
    indep = _sqcost(xs, ys, sample_pairs(xs, ys, "independent", generator=torch.Generator().manual_seed(3))[1])
    sk = _sqcost(xs, ys, sample_pairs(xs, ys, "sinkhorn", generator=torch.Generator().manual_seed(3), blur=0.3)[1])
    exact = _sqcost(xs, ys, sample_pairs(xs, ys, "exact")[1])
    assert exact <= sk < 0.7 * indep


def test_sinkhorn_pairs_follow_the_plan_rows():
    """2000 copies of two points against 3 targets: the sampled j of each copy follow its plan
    row (normalised), within 5 standard deviations."""
    g = torch.Generator().manual_seed(11)
    base = torch.tensor([[0.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
    x = base.repeat_interleave(1000, 0)
    y = torch.tensor([[0.2, 0.1], [0.9, 0.3], [0.5, 1.0]], dtype=torch.float64)
    rows = sinkhorn_plan(x, y, blur=0.7)[[0, 1000]]
    rows = rows / rows.sum(1, keepdim=True)
    _, j = sample_pairs(x, y, "sinkhorn", generator=g, blur=0.7)
    for k in range(2):
        freq = torch.bincount(j[1000 * k:1000 * (k + 1)], minlength=3).double() / 1000
        sd = (rows[k] * (1 - rows[k]) / 1000).sqrt()
        assert ((freq - rows[k]).abs() <= 5 * sd + 1e-3).all(), (freq, rows[k])


def test_coupling_ignores_gradients_and_keeps_device():
    x, y = _clouds(6, 6, 2, torch.float32)
    x.requires_grad_(True)
    P = sinkhorn_plan(x, y, blur=0.5)
    assert not P.requires_grad and P.device == x.device
    i, j = sample_pairs(x, y, "exact")
    assert i.device == x.device and j.device == x.device


X = torch.zeros(4, 2)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: exact_pairs([[0.0]], X), TypeError, "x must be a torch.Tensor"),
    (lambda: exact_pairs(X, X.long()), TypeError, "y must be a floating-point tensor"),
    (lambda: exact_pairs(torch.zeros(4, 1, 2, 2), X), ValueError, r"x must be a \(N, D\) matrix.*flatten"),
    (lambda: exact_pairs(torch.zeros(0, 2), X), ValueError, "x is empty"),
    (lambda: exact_pairs(X, torch.zeros(4, 0)), ValueError, "y has dimension D = 0"),
    (lambda: exact_pairs(X, torch.zeros(4, 3)), ValueError, "same dimension D"),
    (lambda: exact_pairs(X, X.double()), TypeError, "same dtype"),
    (lambda: exact_pairs(X, torch.full((4, 2), float("nan"))), ValueError, "y contains NaN"),
    (lambda: sinkhorn_plan(torch.full((4, 2), float("inf")), X), ValueError, "x contains Inf"),
    (lambda: sinkhorn_plan(X, X, blur=0), ValueError, "blur must be > 0"),
    (lambda: sinkhorn_plan(X, X, blur="big"), TypeError, "blur must be a number"),
    (lambda: sinkhorn_plan(X, X, p=3), ValueError, "p must be 1 or 2"),
    (lambda: sinkhorn_plan(X, X, scaling=1.5), ValueError, "scaling must be in"),
    (lambda: sinkhorn_plan(X, X, tol=-1), ValueError, "tol must be > 0"),
    (lambda: sinkhorn_plan(X, X, max_iter=-1), ValueError, "max_iter must be"),
    (lambda: sinkhorn_plan(X, X, a=torch.ones(3)), ValueError, r"a must have shape \(4,\)"),
    (lambda: sinkhorn_plan(X, X, b=-torch.ones(4)), ValueError, "b has negative weights"),
    (lambda: sinkhorn_plan(X, X, a=torch.zeros(4)), ValueError, "all-zero weights"),
    (lambda: sinkhorn_plan(X, X, a=torch.ones(4, dtype=torch.float64)), TypeError, "a must have the points' dtype"),
    (lambda: sample_pairs(X, X, "greedy"), ValueError, "method must be one of"),
    (lambda: sample_pairs(X, X, "exact", blur=0.1), TypeError, "unexpected keyword argument"),
    (lambda: sample_pairs(X, X, "sinkhorn", reach=1.0), TypeError, "unexpected keyword argument"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
