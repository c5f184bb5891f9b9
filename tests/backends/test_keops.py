"""The KeOps backend (``otkernels/backends/keops.py``) on CPU, where pykeops compiles C++.

KeOps builds one binary per (formula, D, dtype): ~10–25 s each on this CPU the first time,
then cached in ``KEOPS_CACHE_FOLDER`` (set below to ``~/.cache/keops-otkernels`` unless
already set, before pykeops is imported).  So the tests share a few formulas: float64, D = 3
(plus D = 17, marked ``slow``, and two float32 formulas), about fifteen compilations in all:
~5 min on a cold cache on this shared 2-core machine, ~10 s warm.

Checked against the dense ``tensorized`` handles and torch formulas in float64: softmin rows
(p=1, 2, with zero weights and coincident points), ``softmin_grad``'s backward and ``grad_x``
with signed weights, kernel sums and their x, y, b gradients, and ``SamplesLoss(backend=
"keops")`` against geomloss.  The module is skipped, with the reason, only if pykeops is not
installed or there is no C++ compiler (``keops.available()``); a formula that fails to compile fails.
"""
from __future__ import annotations

import os

os.environ.setdefault("KEOPS_CACHE_FOLDER", os.path.join(os.path.expanduser("~"), ".cache", "keops-otkernels"))

import pytest  # noqa: E402
import torch  # noqa: E402

import otkernels  # noqa: E402
from otkernels.backends import keops, tensorized  # noqa: E402
from otkernels.costs import Cost, Kernel  # noqa: E402
from otk_testing import assert_double_backward_like_dense  # noqa: E402

ZERO = -100000.0
TOL64 = 1e-10


@pytest.fixture(scope="module", autouse=True)
def keops_cpu():
    """Opt the keops backend in on CPU for this module; skip it only if keops.available() says no."""
    old = os.environ.get("OTKERNELS_KEOPS_CPU")
    os.environ["OTKERNELS_KEOPS_CPU"] = "1"
    try:
        ok, why = keops.available()
        if not ok:
            pytest.skip(f"keops backend unavailable: {why}")
        # The first formula the tests need anyway (softmin p=2, D=3, float64).  A compiler
        # failure here is a failure, not a skip: available() said KeOps can build on this machine.
        x = torch.randn(1, 5, 3, dtype=torch.float64)
        f = keops.cost_handles(x, x, Cost(2), debias=False)[0].softmin(0.5, torch.zeros(1, 5, dtype=torch.float64))
        assert torch.isfinite(f).all(), f"keops softmin on CPU is not finite: {f}"
        yield
    finally:
        if old is None:
            os.environ.pop("OTKERNELS_KEOPS_CPU", None)
        else:
            os.environ["OTKERNELS_KEOPS_CPU"] = old


def rel(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def assert_rel(actual, expected, tol, what=""):
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values"
    err = rel(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def make(B, N, M, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(B, M, D, generator=g, dtype=torch.float64) + 0.4
    return x, y


@pytest.mark.parametrize("p, D", [(2, 3), (1, 3), pytest.param(2, 17, marks=pytest.mark.slow)])
def test_handles_match_tensorized(p, D):
    """softmin, softmin_grad backward and grad_x (signed g, s) of the four handles, batched."""
    x, y = make(2, 45, 38, D)
    x[:, :2] = y[:, :2]  # coincident points: p=1's clamp
    xl = x.clone().requires_grad_()
    ours = keops.cost_handles(xl, y, Cost(p))
    refs = tensorized.cost_handles(xl, y, Cost(p))
    gen = torch.Generator().manual_seed(1)
    for k, (C, R) in enumerate(zip(ours, refs)):
        n_cols = R.C.shape[2]
        h = torch.randn(2, n_cols, generator=gen, dtype=torch.float64)
        h[:, 0] = ZERO
        f = C.softmin(0.4, h)
        assert_rel(f, R.softmin(0.4, h), TOL64, f"handle {k} softmin")
        g = torch.randn(f.shape, generator=gen, dtype=torch.float64)
        s = torch.randn(h.shape, generator=gen, dtype=torch.float64)
        assert_rel(C.grad_x(0.4, h, f, g), R.grad_x(0.4, h, f, g), TOL64, f"handle {k} grad_x")
        assert_rel(C.grad_x(0.4, h, f, g, s), R.grad_x(0.4, h, f, g, s), TOL64, f"handle {k} grad_x(s)")
        if C.x is xl:
            (go,) = torch.autograd.grad((C.softmin_grad(0.4, h) * g).sum(), xl)
            (gr,) = torch.autograd.grad((R.softmin_grad(0.4, h) * g).sum(), xl)
            assert_rel(go, gr, TOL64, f"handle {k} softmin_grad backward")


def test_softmin_grad_float32_when_cost_over_eps_is_huge():
    """C/ε ~ 1e6 in float32: the backward normalises the plan inside KeOps's SumSoftMaxWeight
    reduction, so the gradient is as accurate as dense torch float32 (factor 4)."""
    g = torch.Generator().manual_seed(0)
    x = 10 * torch.randn(1, 120, 3, generator=g, dtype=torch.float64)
    y = 10 * torch.randn(1, 110, 3, generator=g, dtype=torch.float64)
    h = torch.full((1, 110), -4.7, dtype=torch.float64)
    eps, grads = 1e-4, {}
    for name, dt, backend in (("ref", torch.float64, tensorized), ("torch32", torch.float32, tensorized),
                              ("ours", torch.float32, keops)):
        xl = x.to(dt).requires_grad_()
        C = backend.cost_handles(xl, y.to(dt), Cost(2), debias=False)[0]
        grads[name] = torch.autograd.grad(C.softmin_grad(eps, h.to(dt)).sum(), xl)[0]
    assert rel(grads["ours"], grads["ref"]) <= max(4 * rel(grads["torch32"], grads["ref"]), 1e-6)


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "energy"])
def test_kernel_sum_values_and_gradients(kernel):
    x, y = make(2, 37, 29, 3)
    x[:, :2] = y[:, :2]  # the sqrt clamps
    b = torch.rand(2, 29, dtype=torch.float64) - 0.3
    K = Kernel(kernel, 0.8)
    w = torch.randn(2, 37, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, y, b)]
    out = keops.kernel_sum(*leaves, K)
    g = torch.autograd.grad((out * w).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, y, b)]
    ref = tensorized.kernel_sum(*ref_leaves, K)
    gr = torch.autograd.grad((ref * w).sum(), ref_leaves)
    assert_rel(out, ref, TOL64, f"{kernel} value")
    for name, a, r in zip("xyb", g, gr):
        assert_rel(a, r, TOL64, f"{kernel} d/d{name}")


def test_double_backward_like_dense():
    assert_double_backward_like_dense(keops)


def test_callable_cost_goes_to_blocked():
    from otkernels.backends import blocked
    x, y = make(1, 10, 9, 3)
    cost = Cost(None, fn=lambda a, b: ((a[:, :, None] - b[:, None]) ** 2).sum(-1))
    assert all(isinstance(H, blocked.BlockedCost) for H in keops.cost_handles(x, y, cost))


def test_available_reasons(monkeypatch):
    monkeypatch.delenv("OTKERNELS_KEOPS_CPU")
    ok, why = keops.available()
    if not torch.cuda.is_available():
        assert not ok and "OTKERNELS_KEOPS_CPU" in why


PARITY = [
    dict(loss="sinkhorn", p=2, blur=0.1),
    dict(loss="sinkhorn", p=1, blur=0.1),
    dict(loss="sinkhorn", p=2, blur=0.1, debias=False),
    dict(loss="sinkhorn", p=2, blur=0.1, reach=0.5),
    dict(loss="energy"),
    dict(loss="gaussian", blur=0.5),
    dict(loss="laplacian", blur=0.5),
]


@pytest.mark.parametrize("kw", PARITY, ids=["-".join(f"{k}={v}" for k, v in kw.items()) for kw in PARITY])
def test_samples_loss_matches_geomloss(kw):
    from otk_testing import assert_rel as assert_rel_t, clouds, geomloss_loss, unbalanced_grad_factor, value_and_grads
    x, y, a, b = clouds(N=53, M=41, D=3, zero_a=2)
    inputs = {"a": a, "x": x, "b": b, "y": y}
    ours, go = value_and_grads(otkernels.SamplesLoss(**kw, backend="keops"), inputs, ["x", "a"])
    ref, gr = value_and_grads(geomloss_loss(**kw), inputs, ["x", "a"])
    assert_rel_t(ours, ref, 1e-9, f"{kw} value")
    factor = unbalanced_grad_factor(kw["p"], kw["blur"], kw["reach"]) if kw.get("reach") else 1.0
    assert_rel_t(go["x"], gr["x"] * factor, 1e-8, f"{kw} grad x")
    if not kw.get("reach"):
        assert_rel_t(go["a"], gr["a"], 1e-8, f"{kw} grad a")
