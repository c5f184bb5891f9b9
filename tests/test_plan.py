"""otkernels.plan: transport plans as operators, on every backend (the backend fixture),
against POT's dense log-domain Sinkhorn plan and a dense torch reference; gradients by
finite differences; the sampler by χ² tests."""
import math

import numpy as np
import pytest
import torch

from otkernels.plan import TransportPlan, transport_plan

ot = pytest.importorskip("ot")
scipy_stats = pytest.importorskip("scipy.stats")


def _cost(x, y, p):
    d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    return 0.5 * d ** 2 if p == 2 else d.clamp_min(1e-4)


def _dense(x, y, u, v, eps, p):
    """The reference plan exp(u_i + v_j − C_ij/ε) in float64, batched or not."""
    return (u[..., :, None] + v[..., None, :] - _cost(x, y, p) / eps).exp()


def _clouds(N=23, M=31, D=3, B=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (() if B is None else (B,))
    x = torch.randn(*shape, N, D, generator=g, dtype=dtype)
    y = torch.randn(*shape, M, D, generator=g, dtype=dtype) * 0.8 + 0.4
    a = torch.rand(*shape, N, generator=g, dtype=dtype) + 0.2
    b = torch.rand(*shape, M, generator=g, dtype=dtype) + 0.2
    return x, y, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


@pytest.mark.parametrize("p,blur", [(2, 0.5), (1, 0.3)])
def test_plan_operators_match_pot(backend, p, blur):
    """P@V, Pᵀ@U, the barycentric map and the marginals of the refined plan equal those of
    POT's log-domain Sinkhorn plan (cost ½|x−y|² or |x−y|, reg ε = blur^p) to 1e-9."""
    x, y, a, b = _clouds()
    plan = transport_plan(x, y, a, b, blur=blur, p=p, tol=1e-13, max_iter=20000, backend=backend)
    assert plan.marginal_error <= 1e-13
    Q = torch.as_tensor(ot.sinkhorn(a.numpy(), b.numpy(), _cost(x, y, p).numpy(), reg=blur ** p,
                                    method="sinkhorn_log", numItermax=200_000, stopThr=1e-15))
    g = torch.Generator().manual_seed(1)
    V, U = torch.randn(31, 4, generator=g, dtype=torch.float64), torch.randn(23, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(plan @ V, Q @ V, rtol=0, atol=1e-9 * (Q @ V).abs().max().item())
    torch.testing.assert_close(plan.T @ U, Q.T @ U, rtol=0, atol=1e-9 * (Q.T @ U).abs().max().item())
    torch.testing.assert_close(plan.barycentric_map(), (Q @ y) / Q.sum(1, keepdim=True), rtol=0, atol=1e-9)
    rows, cols = plan.marginals()
    torch.testing.assert_close(rows, a, rtol=1e-9, atol=0)
    torch.testing.assert_close(cols, b, rtol=1e-9, atol=0)
    torch.testing.assert_close(plan.dense(), Q, rtol=0, atol=1e-9 * Q.max().item())


@pytest.mark.parametrize("B,p", [(None, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plan_from_potentials_matches_dense(backend, B, p, dtype):
    """A plan from arbitrary (unconverged) potentials: every operator equals the dense
    formula exp(u_i + v_j − C_ij/ε), batched or not, float64 to 1e-12, float32 to 1e-5."""
    x, y, a, b = _clouds(N=19, M=26, D=5, B=B, seed=2)
    g = torch.Generator().manual_seed(3)
    f, gg = torch.randn(a.shape, generator=g, dtype=torch.float64), torch.randn(b.shape, generator=g, dtype=torch.float64)
    eps = 0.7
    P = _dense(x, y, a.log() + f / eps, b.log() + gg / eps, eps, p)
    plan = TransportPlan(x.to(dtype), y.to(dtype), f.to(dtype), gg.to(dtype), a.to(dtype), b.to(dtype), eps=eps, p=p,
                         backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    V = torch.randn(*b.shape, 3, generator=g, dtype=torch.float64)
    U = torch.randn(*a.shape, generator=g, dtype=torch.float64)
    close = lambda got, want: torch.testing.assert_close(got.double(), want, rtol=0,  # noqa: E731
                                                         atol=tol * want.abs().max().item())
    close(plan @ V.to(dtype), P @ V)
    close(plan.T @ U.to(dtype), (P.transpose(-1, -2) @ U[..., None])[..., 0])
    close(plan.marginals()[0], P.sum(-1))
    close(plan.marginals()[1], P.sum(-2))
    close(plan.apply(V.to(dtype), normalize=True), (P @ V) / P.sum(-1, keepdim=True))
    close(plan.dense(), P)
    vals, idx = plan.topk(4)
    want = P.topk(4, dim=-1)
    close(vals, want.values)
    assert torch.equal(idx, want.indices) or dtype == torch.float32  # ties are measure-zero in float64


def test_plan_apply_large_potentials_and_empty_rows(backend):
    """Potentials of +300 each (entries ≈ 1e260: representable, but not their squares) and a row
    with zero weight (u = −inf in the log-plan: −1e5 by geomloss's convention) give the dense
    result and no NaN."""
    x, y, a, b = _clouds(N=9, M=14, D=2, seed=4)
    a[3] = 0.0
    a = a / a.sum()
    f = torch.full((9,), 300.0, dtype=torch.float64)     # entries ~e^600 ≈ 1e260
    g = torch.full((14,), 300.0, dtype=torch.float64)
    plan = TransportPlan(x, y, f, g, a, b, eps=1.0, backend=backend)
    V = torch.randn(14, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = plan @ V
    P = _dense(x, y, plan.u[0], plan.v[0], 1.0, 2)
    assert torch.isfinite(got).all()
    want = P @ V
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * want.abs().max().item())
    assert (got[3] == 0).all()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_plan_apply_gradients_finite_differences(backend, p, normalize):
    """∂(P@V) w.r.t. x, y, V, f, g (potentials held fixed) against finite differences."""
    x, y, a, b = _clouds(N=4, M=5, D=2, seed=5)
    g = torch.Generator().manual_seed(6)
    f, gg = 0.3 * torch.randn(4, generator=g, dtype=torch.float64), 0.3 * torch.randn(5, generator=g, dtype=torch.float64)
    V = torch.randn(5, 2, generator=g, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (x, y, V, f, gg)]

    def fn(x, y, V, f, gg):
        return TransportPlan(x, y, f, gg, a, b, eps=0.6, p=p, backend=backend).apply(V, normalize=normalize)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_barycentric_map_gradient(backend):
    """The barycentric map's gradient w.r.t. x and y (y enters as the values and the cost)."""
    x, y, a, b = _clouds(N=4, M=5, D=2, seed=7)
    g = torch.Generator().manual_seed(8)
    f, gg = 0.2 * torch.randn(4, generator=g, dtype=torch.float64), 0.2 * torch.randn(5, generator=g, dtype=torch.float64)

    def fn(x, y):
        return TransportPlan(x, y, f, gg, eps=0.5, backend=backend).barycentric_map()

    assert torch.autograd.gradcheck(fn, [x.clone().requires_grad_(True), y.clone().requires_grad_(True)],
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def _chi2_pvalue(counts, expected):
    """Pearson χ² p-value, cells with expected < 5 pooled into one."""
    counts, expected = np.asarray(counts, float).ravel(), np.asarray(expected, float).ravel()
    small = expected < 5
    c = np.append(counts[~small], counts[small].sum())
    e = np.append(expected[~small], expected[small].sum())
    keep = e > 0
    return scipy_stats.chisquare(c[keep], e[keep] * c[keep].sum() / e[keep].sum()).pvalue


def test_sampled_pairs_follow_the_plan_chi2():
    """N = M = 64: columns drawn per row (``sample``) follow each row of π, and pairs
    (``sample_pairs``) follow π and its marginals (χ², p > 1e-3, fixed seeds)."""
    x, y, a, b = _clouds(N=64, M=64, D=2, seed=9)
    plan = transport_plan(x, y, a, b, blur=0.7, tol=1e-10, backend="tensorized")
    P = plan.dense().numpy()
    gen = torch.Generator().manual_seed(10)
    j = plan.sample(400, generator=gen).numpy()                       # (64, 400)
    counts = np.zeros((64, 64))
    np.add.at(counts, (np.repeat(np.arange(64), 400), j.ravel()), 1)
    assert _chi2_pvalue(counts, 400 * P / P.sum(1, keepdims=True)) > 1e-3
    i, j = plan.sample_pairs(100_000, generator=gen)
    pairs = np.zeros((64, 64))
    np.add.at(pairs, (i.numpy(), j.numpy()), 1)
    assert _chi2_pvalue(pairs, 100_000 * P) > 1e-3
    assert _chi2_pvalue(pairs.sum(1), 100_000 * a.numpy()) > 1e-3
    assert _chi2_pvalue(pairs.sum(0), 100_000 * b.numpy()) > 1e-3


def test_sampling_is_reproducible_and_batched():
    x, y, a, b = _clouds(N=10, M=12, D=2, B=3, seed=11)
    plan = transport_plan(x, y, a, b, blur=0.5, backend="blocked")
    s1 = plan.sample(5, generator=torch.Generator().manual_seed(0))
    s2 = plan.sample(5, generator=torch.Generator().manual_seed(0))
    assert s1.shape == (3, 10, 5) and torch.equal(s1, s2) and int(s1.max()) < 12
    i, j = plan.sample_pairs(7, generator=torch.Generator().manual_seed(1))
    assert i.shape == j.shape == (3, 7)


def test_refinement_fixes_the_annealed_plans_marginals():
    """Without refinement the annealed solve's plan is off its marginals by percents; with
    ``tol`` the rows are within tol and the columns exact."""
    x, y, a, b = _clouds(N=40, M=50, D=2, seed=12)
    raw = transport_plan(x, y, a, b, blur=0.5, tol=None, backend="native")
    fixed = transport_plan(x, y, a, b, blur=0.5, tol=1e-9, backend="native")
    assert raw.iterations == 0 and raw.marginal_error is None
    r_raw, _ = raw.marginals()
    r, c = fixed.marginals()
    assert ((r_raw - a).abs() / a).max() > 1e-3
    assert ((r - a).abs() / a).max() <= 2e-9
    torch.testing.assert_close(c, b, rtol=1e-12, atol=0)
    assert 0 < fixed.iterations < 1000 and fixed.marginal_error <= 1e-9


def test_unbalanced_plan_marginals_are_reported():
    """reach=ρ^(1/p): the refined potentials are the unbalanced fixed point (a dense float64
    iteration of f = λ softmin, λ = 1/(1+ε/ρ)), and the marginals are the plan's, not a, b."""
    x, y, a, b = _clouds(N=20, M=25, D=2, seed=13)
    blur, reach = 0.5, 1.0
    plan = transport_plan(x, y, a, b, blur=blur, reach=reach, tol=1e-13, max_iter=5000, backend="blocked")
    eps, rho = blur ** 2, reach ** 2
    lam = 1 / (1 + eps / rho)
    C = _cost(x, y, 2)
    f, g = torch.zeros(20, dtype=torch.float64), torch.zeros(25, dtype=torch.float64)
    for _ in range(5000):
        f = -lam * eps * torch.logsumexp(b.log() + (g - C) / eps, 1)
        g = -lam * eps * torch.logsumexp(a.log()[:, None] + (f[:, None] - C) / eps, 0)
    P = a[:, None] * b[None, :] * ((f[:, None] + g[None, :] - C) / eps).exp()
    rows, cols = plan.marginals()
    torch.testing.assert_close(rows, P.sum(1), rtol=1e-9, atol=0)
    torch.testing.assert_close(cols, P.sum(0), rtol=1e-9, atol=0)
    assert (rows - a).abs().max() > 1e-3  # unbalanced: the marginals differ from a


def test_flow_sinkhorn_coupling_uses_the_plan_sampler(monkeypatch):
    """``coupling.sample_pairs(method="sinkhorn")`` (diffusion.flow's entropic coupling) draws
    from the plan operators, never the dense plan (the distribution of its draws is checked
    in tests/test_coupling.py)."""
    from otkernels import coupling

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense plan was built")

    monkeypatch.setattr(coupling, "_log_plan", no_dense)
    x, y, _, _ = _clouds(N=50, M=50, D=4, seed=14)
    i, j = coupling.sample_pairs(x.float(), y.float(), "sinkhorn", blur=0.5, generator=torch.Generator().manual_seed(0))
    assert i.shape == j.shape == (50,) and j.dtype == torch.long and int(j.max()) < 50
    ref = torch.Generator().manual_seed(0)
    assert torch.equal(j, coupling.sample_pairs(x.float(), y.float(), "sinkhorn", blur=0.5, generator=ref)[1])


_X = torch.randn(5, 2, dtype=torch.float64)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: TransportPlan(_X, _X, torch.zeros(5, dtype=torch.long), _X[:, 0], blur=0.5), TypeError,
     "f must be a floating-point tensor"),
    (lambda: TransportPlan(_X, _X, torch.zeros(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), blur=0.5),
     ValueError, r"g must have shape \(5,\)"),
    (lambda: TransportPlan(_X, _X, torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)),
     ValueError, "exactly one of blur"),
    (lambda: TransportPlan(_X, _X, torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), eps=1,
                           p=3), ValueError, "p must be 1 or 2"),
    (lambda: transport_plan(_X, _X, tol=-1), ValueError, "tol must be > 0"),
    (lambda: transport_plan(_X, _X, max_iter=1.5), ValueError, "max_iter must be"),
    (lambda: transport_plan(_X, _X[:, :1]), ValueError, "same dimension D"),
    (lambda: transport_plan(_X, _X, a=-torch.ones(5, dtype=torch.float64)), ValueError, "a has negative weights"),
    (lambda: transport_plan(_X, _X) @ torch.ones(4, dtype=torch.float64), ValueError, r"V must have shape"),
    (lambda: transport_plan(_X, _X).sample(0), ValueError, "k must be an int >= 1"),
    (lambda: transport_plan(_X, _X).topk(6), ValueError, r"k must be an int in \[1, M = 5\]"),
    (lambda: transport_plan(_X, _X).sample_pairs(-1), ValueError, "n must be an int >= 1"),
    (lambda: transport_plan(_X, _X, backend="nope"), ValueError, "backend='nope' is unknown"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_dense_refuses_above_max_bytes():
    plan = transport_plan(_X, _X, blur=1.0)
    with pytest.raises(ValueError, match="more than max_bytes"):
        plan.dense(max_bytes=100)
    assert math.isfinite(float((plan @ torch.ones(5, dtype=torch.float64)).sum()))
