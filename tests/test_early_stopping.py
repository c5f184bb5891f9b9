"""SamplesLoss(tol=, max_iter=): early stopping at the final ε (issue 21), on every backend
through the backend fixture; the default stays geomloss's loop."""
import functools

import pytest
import torch

from otkernels import SamplesLoss

ot = pytest.importorskip("ot")


def _clouds(N=30, M=37, D=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(M, D, generator=g, dtype=torch.float64) * 0.7 + 0.8
    a = torch.rand(N, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(M, generator=g, dtype=torch.float64) + 0.2
    return x, y, a / a.sum(), b / b.sum()


@functools.lru_cache(maxsize=None)
def _ot_eps_pot_cached(seed, eps, which):
    x, y, a, b = _clouds(seed=seed)
    pairs = {"xy": (a, x, b, y), "xx": (a, x, a, x), "yy": (b, y, b, y)}
    return _ot_eps_pot(*pairs[which], eps)


def _ot_eps_pot(a, x, b, y, eps):
    """Converged entropic OT (geomloss's OT_ε: ⟨π, C⟩ + ε KL(π | a⊗b), C = ½|x−y|²) from POT's
    log-domain plan."""
    C = 0.5 * torch.cdist(x, y) ** 2
    P = torch.as_tensor(ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), reg=eps, method="sinkhorn_log",
                                    numItermax=20_000, stopThr=1e-13))
    kl = (P * (P / (a[:, None] * b[None, :])).log()).sum() - P.sum() + 1
    return (P * C).sum() + eps * kl, P


def test_converged_value_and_marginals_match_pot(backend):
    """With tol, OT_ε (debias=False) is the converged entropic OT of POT to 1e-9, and the plan of
    the returned potentials has both marginals within 1e-9 (geomloss's loop alone: ~1e-1)."""
    x, y, a, b = _clouds()
    blur = 0.3
    eps = blur ** 2
    L = SamplesLoss("sinkhorn", blur=blur, debias=False, tol=1e-12, max_iter=5000, backend=backend)
    value = L(a, x, b, y)
    want, _ = _ot_eps_pot_cached(0, eps, "xy")
    torch.testing.assert_close(value, want, rtol=1e-9, atol=0)
    assert L.last_info["pair"]["marginal_error"] <= 1e-12 and L.last_info["annealing"] > 0
    F, G = SamplesLoss("sinkhorn", blur=blur, debias=False, potentials=True, tol=1e-12, max_iter=5000,
                       backend=backend)(a, x, b, y)
    P = a[:, None] * b[None, :] * ((F[:, None] + G[None, :] - 0.5 * torch.cdist(x, y) ** 2) / eps).exp()
    torch.testing.assert_close(P.sum(1), a, rtol=1e-9, atol=0)
    torch.testing.assert_close(P.sum(0), b, rtol=1e-9, atol=0)


def test_converged_divergence_matches_pot(backend):
    x, y, a, b = _clouds(seed=1)
    blur = 0.4
    eps = blur ** 2
    L = SamplesLoss("sinkhorn", blur=blur, tol=1e-12, max_iter=5000, backend=backend)
    S = L(a, x, b, y)
    want = (_ot_eps_pot_cached(1, eps, "xy")[0] - 0.5 * _ot_eps_pot_cached(1, eps, "xx")[0]
            - 0.5 * _ot_eps_pot_cached(1, eps, "yy")[0])
    torch.testing.assert_close(S, want, rtol=1e-8, atol=1e-12)
    assert set(L.last_info) == {"annealing", "pair", "xx", "yy"}


def test_converged_gradient_is_the_derivative_of_the_value(backend):
    """At convergence the envelope gradient is exact: it matches the central difference of the
    converged value along a random direction (float64, step 1e-5: error ~1e-10)."""
    x, y, a, b = _clouds(N=6, M=7, seed=2)
    L = SamplesLoss("sinkhorn", blur=0.5, tol=1e-13, max_iter=10000, backend=backend)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(L(a, xg, b, y), xg)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h = 1e-5
    fd = (L(a, x + h * d, b, y) - L(a, x - h * d, b, y)) / (2 * h)
    torch.testing.assert_close((grad * d).sum(), fd, rtol=1e-7, atol=1e-10)


def test_default_is_geomloss_loop_and_max_iter_alone(backend):
    x, y, a, b = _clouds(seed=3)
    base = SamplesLoss("sinkhorn", blur=0.3, backend=backend)
    v0 = base(a, x, b, y)
    assert set(base.last_info) == {"annealing"}
    assert torch.equal(v0, SamplesLoss("sinkhorn", blur=0.3, tol=None, backend=backend)(a, x, b, y))
    L = SamplesLoss("sinkhorn", blur=0.3, max_iter=7, backend=backend)
    v = L(a, x, b, y)
    assert L.last_info["pair"]["iterations"] == 7 and L.last_info["xx"]["iterations"] == 7
    assert torch.isfinite(v) and not torch.equal(v, v0)
    L = SamplesLoss("sinkhorn", blur=0.3, tol=1e-3, check_every=4, backend=backend)
    L(a, x, b, y)
    assert all(L.last_info[k]["iterations"] % 4 == 0 for k in ("pair", "xx", "yy"))
    tight = SamplesLoss("sinkhorn", blur=0.3, tol=1e-9, backend=backend)
    tight(a, x, b, y)
    assert tight.last_info["pair"]["iterations"] > L.last_info["pair"]["iterations"]


def test_unbalanced_converges_to_the_fixed_point(backend):
    """reach with tol: the potentials are the unbalanced fixed point (dense float64 iteration)."""
    x, y, a, b = _clouds(N=15, M=18, seed=4)
    blur, reach = 0.5, 1.0
    eps, rho = blur ** 2, reach ** 2
    F, G = SamplesLoss("sinkhorn", blur=blur, reach=reach, debias=False, potentials=True, tol=1e-13,
                       max_iter=5000, backend=backend)(a, x, b, y)
    lam, C = 1 / (1 + eps / rho), 0.5 * torch.cdist(x, y) ** 2
    f, g = torch.zeros(15, dtype=torch.float64), torch.zeros(18, dtype=torch.float64)
    for _ in range(5000):
        g = -lam * eps * torch.logsumexp(a.log()[:, None] + (f[:, None] - C) / eps, 0)
        f = -lam * eps * torch.logsumexp(b.log() + (g - C) / eps, 1)
    g = -lam * eps * torch.logsumexp(a.log()[:, None] + (f[:, None] - C) / eps, 0)
    torch.testing.assert_close(F, f, rtol=0, atol=1e-9)
    torch.testing.assert_close(G, g, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(tol=0), ValueError, "tol must be > 0"),
    (dict(tol="x"), TypeError, "tol must be a number"),
    (dict(max_iter=-1), ValueError, "max_iter must be None or an int >= 0"),
    (dict(max_iter=2.5), ValueError, "max_iter must be None or an int >= 0"),
    (dict(check_every=0), ValueError, "check_every must be an int >= 1"),
    (dict(loss="gaussian", tol=1e-3), ValueError, "tol and max_iter apply to loss='sinkhorn'"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        SamplesLoss(**kw)
