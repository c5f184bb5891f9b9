"""The blocked backend's reductions against dense torch references.

Tile sizes are shrunk (TILE=64 elements, MAX_COLS=7 columns) so that problems of ~100 points
walk many row and column blocks, with ragged last blocks, and exercise the online
log-sum-exp (running max and rescaled sums).
"""
from __future__ import annotations

import pytest
import torch

import otkernels
from otkernels import backends
from otkernels.backends import blocked, tensorized
from otkernels.costs import Cost, Kernel
from otk_testing import assert_double_backward_like_dense, require_backend

ZERO = -100000.0  # log-weight of a zero weight (geomloss's convention)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(blocked, "TILE", 64)
    monkeypatch.setattr(blocked, "MAX_COLS", 7)


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def rel_close(actual, expected, dtype, what):
    t = 1e-11 if dtype == torch.float64 else 2e-5
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err <= t, f"{what}: relative error {err:.2e} > {t:.0e}"


def make(B, N, M, D, dtype, seed=0):
    """Point clouds.  float32: coordinates on a dyadic grid (multiples of 1/16 in [−2, 2]) so
    that |x|², ⟨x, y⟩ and |x − y|² are exact and every tiling computes the same cost bits:
    otherwise the cost itself differs with the GEMM blocking (e.g. the diagonal of a float32
    p=1 self-cost is sqrt of a rounding residue), which is not what these tests are about."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(B, M, D, generator=g, dtype=torch.float64) + 0.4
    if dtype == torch.float32:
        x, y = ((t * 16).round().clamp(-32, 32) / 16 for t in (x, y))
    return x.to(dtype), y.to(dtype)


def log_weights(B, n, dtype, seed=1):
    """Random log-weights with zero-weight entries (−1e5) in several patterns: a leading run
    longer than a column block, every third entry, and all but one."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.rand(B, n, generator=g, dtype=torch.float64) + 0.1).log().to(dtype)
    h[0, :10] = ZERO
    if B > 1:
        h[1, ::3] = ZERO
    if B > 2:
        h[2, :] = ZERO
        h[2, n // 2] = 0.0
    return h


def dense_softmin(C, eps, h):
    return -eps * (h[:, None, :] - C / eps).logsumexp(2)


def l1_cost(x, y):
    return (x[:, :, None, :] - y[:, None, :, :]).abs().sum(-1)


COSTS = {"p1": Cost(1), "p2": Cost(2), "callable-l1": Cost(None, fn=l1_cost)}


# ----------------------------------------------------------------------------- softmin
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "recomputed"])
@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_softmin_rows_and_columns(small_tiles, dtype, B, cost, cache):
    """C_xy (rows), C_yx (columns: the cached C_xy read transposed for symmetric costs, its own
    matrix for a callable, or recomputed tiles), C_xx and C_yy, at several ε."""
    N, M, D = 53, 38, 3
    x, y = make(B, N, M, D, dtype)
    c = COSTS[cost]
    C_xy, C_yx, C_xx, C_yy = blocked.cost_handles(x, y, c, debias=True, cache=cache)
    if cache and c.symmetric:
        assert C_yx.cache is C_xy.cache and C_yx.transpose, "symmetric cost: C_yx must reuse C_xy's cache"
    if not cache:
        assert all(h.cache is None for h in (C_xy, C_yx, C_xx, C_yy))
    assert C_xy.bm == 7 and C_xy.bn < N, "the tile patch did not take"
    with torch.no_grad():
        dense = {"xy": c(x, y), "yx": c(y, x), "xx": c(x, x), "yy": c(y, y)}
    hy, hx = log_weights(B, M, dtype, seed=1), log_weights(B, N, dtype, seed=2)
    for eps in (0.01, 0.3, 5.0):
        for name, handle, h in (("xy", C_xy, hy), ("yx", C_yx, hx), ("xx", C_xx, hx), ("yy", C_yy, hy)):
            out = handle.softmin(eps, h)
            ref = dense_softmin(dense[name], eps, h)
            rel_close(out, ref, dtype, f"softmin C_{name} eps={eps}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_softmin_tile_layouts(monkeypatch, dtype):
    """The same result for many (TILE, MAX_COLS) layouts, including one row or one column per
    block and blocks larger than the problem."""
    x, y = make(2, 41, 29, 2, dtype)
    h = log_weights(2, 29, dtype)
    ref = dense_softmin(Cost(2)(x, y), 0.05, h)
    for tile, cols in ((1, 1), (2, 1), (29, 29), (64, 3), (100, 13), (1 << 20, 8192)):
        monkeypatch.setattr(blocked, "TILE", tile)
        monkeypatch.setattr(blocked, "MAX_COLS", cols)
        for cache in (True, False):
            C_xy = blocked.cost_handles(x, y, Cost(2), debias=False, cache=cache)[0]
            rel_close(C_xy.softmin(0.05, h), ref, dtype, f"TILE={tile} MAX_COLS={cols} cache={cache}")


# ----------------------------------------------------------------------------- gradients
def dense_grad_x(cost, x, y, eps, h, f, g, s=None):
    """Σ_j g_i P_ij s_j ∇_x C(x_i, y_j) with P_ij = exp(h_j − C_ij/ε + f_i/ε), by autograd:
    it is −ε ∂/∂x Σ_ij g_i s_j exp(h_j − C_ij(x)/ε + f_i/ε)."""
    xg = x.detach().clone().requires_grad_()
    with torch.enable_grad():
        E = (h[:, None, :] - cost(xg, y) / eps + f[:, :, None] / eps).exp() * g[:, :, None]
        if s is not None:
            E = E * s[:, None, :]
        (gx,) = torch.autograd.grad(E.sum(), [xg])
    return -eps * gx


@pytest.mark.parametrize("signed", [False, True], ids=["s=1", "s signed"])
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "recomputed"])
@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grad_x(small_tiles, dtype, B, cost, cache, signed):
    N, M, D = 47, 33, 3
    x, y = make(B, N, M, D, dtype, seed=3)
    c = COSTS[cost]
    handles = blocked.cost_handles(x, y, c, debias=True, cache=cache)
    gen = torch.Generator().manual_seed(5)
    for name, handle, (u, v) in (("xy", handles[0], (x, y)), ("yx", handles[1], (y, x)), ("xx", handles[2], (x, x))):
        n, m = u.shape[1], v.shape[1]
        eps = 0.2
        h = log_weights(B, m, dtype, seed=7)
        f = handle.softmin(eps, h) + 0.1 * torch.randn(B, n, generator=gen, dtype=torch.float64).to(dtype)
        g = torch.randn(B, n, generator=gen, dtype=torch.float64).to(dtype)
        s = torch.randn(B, m, generator=gen, dtype=torch.float64).to(dtype) if signed else None
        out = handle.grad_x(eps, h, f, g, s)
        ref = dense_grad_x(c, u, v, eps, h, f, g, s)
        rel_close(out, ref, dtype, f"grad_x C_{name}")


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "recomputed"])
@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_softmin_grad_autograd(small_tiles, dtype, cost, cache):
    """softmin_grad: the value of softmin, and the gradient of −ε logsumexp(h − C(x, y)/ε)
    w.r.t. x only (h and y constants)."""
    B, N, M = 2, 37, 26
    x, y = make(B, N, M, 2, dtype, seed=8)
    c = COSTS[cost]
    xl = x.clone().requires_grad_()
    C_xy = blocked.cost_handles(xl, y, c, debias=False, cache=cache)[0]
    h = log_weights(B, M, dtype, seed=9)
    w = torch.randn(B, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    for eps in (0.05, 1.0):
        out = C_xy.softmin_grad(eps, h)
        (gx,) = torch.autograd.grad((out * w).sum(), [xl])
        xr = x.clone().requires_grad_()
        ref = dense_softmin(c(xr, y), eps, h)
        (gr,) = torch.autograd.grad((ref * w).sum(), [xr])
        rel_close(out.detach(), ref.detach(), dtype, f"softmin_grad value eps={eps}")
        rel_close(gx, gr, dtype, f"softmin_grad gradient eps={eps}")


# ----------------------------------------------------------------------------- kernel sums
@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "energy"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_kernel_sum(small_tiles, dtype, B, kernel):
    N, M, D = 45, 31, 3
    x, y = make(B, N, M, D, dtype, seed=10)
    gen = torch.Generator().manual_seed(11)
    b = torch.rand(B, M, generator=gen, dtype=torch.float64).to(dtype)
    b[:, :4] = 0  # zero weights
    w = torch.randn(B, N, generator=gen, dtype=torch.float64).to(dtype)
    k = Kernel(kernel, 0.5)  # a power of 2: x / blur stays exact
    results = []
    for impl in (blocked.kernel_sum, tensorized.kernel_sum):
        xl, yl, bl = (t.clone().requires_grad_() for t in (x, y, b))
        out = impl(xl, yl, bl, k)
        grads = torch.autograd.grad((out * w).sum(), [xl, yl, bl])
        results.append((out.detach(), *grads))
    for name, ours, ref in zip(("value", "grad x", "grad y", "grad b"), *results):
        rel_close(ours, ref, dtype, f"kernel_sum {kernel} {name}")
    # self-sums (x with x): both arguments move together
    outs = []
    for impl in (blocked.kernel_sum, tensorized.kernel_sum):
        xl = x.clone().requires_grad_()
        a = torch.full((B, N), 1.0 / N, dtype=dtype)
        out = impl(xl, xl, a, k)
        (gx,) = torch.autograd.grad((out * w).sum(), [xl])
        outs.append((out.detach(), gx))
    rel_close(outs[0][0], outs[1][0], dtype, f"kernel_sum {kernel} self value")
    rel_close(outs[0][1], outs[1][1], dtype, f"kernel_sum {kernel} self grad")


# ----------------------------------------------------------------------------- cache decision
@pytest.mark.parametrize("name", ["blocked", "native"])
@pytest.mark.parametrize("loss,kw", [("sinkhorn", dict(p=2)), ("sinkhorn", dict(p=1, reach=0.5)),
                                     ("hausdorff", dict(p=2))])
def test_cache_decision_same_result(monkeypatch, small_tiles, name, loss, kw):
    """No cache, only C_xy (what a budget between N·M and N·M + N² buys), every cost: the same
    values and gradients; the plan caches C_xy first, then C_xx, then C_yy."""
    require_backend(name)
    module = backends.get(name)
    x, y = make(1, 60, 45, 3, torch.float64, seed=12)
    x, y = x[0], y[0]
    N, M = 60, 45
    monkeypatch.setattr(backends, "_budget", None)
    sq = lambda n: n * n  # noqa: E731 - the self-costs' footprint: native stores their packed triangle
    if name == "native" and module.packed_supported() and module.PACKED_SELF:
        sq = module.packed_numel
    xy, xx, yy = N * M * 8, sq(N) * 8, sq(M) * 8
    plans = {0: [False] * 3, xy: [True, False, False], xy + yy - 1: [True, False, False],
             xy + xx - 1: [True, False, True], xy + xx: [True, True, False], xy + xx + yy: [True] * 3, 1 << 40: [True] * 3}
    out = {}
    for budget, want in plans.items():
        backends.set_cache_budget(budget)
        assert backends.cache_budget() == budget
        assert backends.cache_plan([xy, xx, yy]) == want, f"budget {budget}"
        h_xy, h_yx, h_xx, h_yy = module.cost_handles(x[None], y[None], Cost(2), debias=True)
        got = [h_xy.cache is not None, h_xx.cache is not None, h_yy.cache is not None]
        assert got == want, f"budget {budget}: cached {got}, planned {want}"
        assert (h_yx.cache is not None) == want[0]
        leaves = [t.clone().requires_grad_() for t in (x, y)]
        v = otkernels.SamplesLoss(loss, blur=0.2, backend=name, **kw)(*leaves)
        out[budget] = (v.detach(), *torch.autograd.grad(v, leaves))
    backends.set_cache_budget(None)
    for budget in plans:
        for what, a, b in zip(("value", "grad x", "grad y"), out[0], out[budget]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"budget {budget}, {what}: {m}")


def test_cache_plan_forced():
    assert backends.cache_plan([10, 20], cache=True) == [True, True]
    assert backends.cache_plan([10, 20], cache=False) == [False, False]


def test_cache_budget_env(monkeypatch):
    monkeypatch.setattr(backends, "_budget", None)
    monkeypatch.setenv("OTKERNELS_CACHE_BYTES", "12345")
    assert backends.cache_budget() == 12345
    monkeypatch.delenv("OTKERNELS_CACHE_BYTES")
    assert backends.cache_budget() > 0


@pytest.mark.parametrize("cached", [True, False])
def test_double_backward_like_dense(monkeypatch, small_tiles, cached):
    """create_graph=True through blocked's closed-form backward passes (cached cost or tiles)."""
    monkeypatch.setattr(backends, "_budget", None if cached else 0)
    assert_double_backward_like_dense(blocked)


# ----------------------------------------------------------------------------- auto and large problems
def test_auto_selection(monkeypatch):
    """The documented auto rule (otkernels/backends/__init__.py), with and without 'native'."""
    cpu = torch.device("cpu")
    usable = {k for k, (ok, _) in backends.available().items() if ok}
    if "native" in usable:  # every size goes to native, but small batched Sinkhorn problems
        assert backends.select(1, 10, 10, 3, cpu) == "native"
        assert backends.select(1, 2000, 2000, 3, cpu) == "native"
        assert backends.select(8, 300, 300, 3, cpu) == "blocked"
        assert backends.select(8, 300, 301, 3, cpu) == "native"
        assert backends.select(8, 100, 100, 3, cpu, kind="kernel") == "native"
    assert backends.select(1, 5000, 5000, 3, cpu, need="dense") == "tensorized"
    with pytest.raises(ValueError, match="kind must be"):
        backends.select(1, 10, 10, 3, cpu, kind="mmd")
    # without native: dense up to 100² for Sinkhorn, 1500² for kernel sums; the rule counts B·N·M
    others = [k for k in backends.available() if k not in ("tensorized", "blocked")]
    monkeypatch.setenv("OTKERNELS_DISABLE", ",".join(others))
    assert backends.select(1, 100, 100, 3, cpu) == "tensorized"
    assert backends.select(1, 100, 101, 3, cpu) == "blocked"
    assert backends.select(2, 80, 80, 3, cpu) == "blocked"
    assert backends.select(1, 1500, 1500, 3, cpu, kind="kernel") == "tensorized"
    assert backends.select(3, 1000, 1000, 3, cpu, kind="kernel") == "blocked"
    assert backends.select(1, 2000, 2000, 3, cpu) == "blocked"
    # ... and with 'blocked' disabled too, to the dense backend
    monkeypatch.setenv("OTKERNELS_DISABLE", ",".join(others + ["blocked"]))
    assert backends.select(1, 2000, 2000, 3, cpu) == "tensorized"
    assert not backends.available()["blocked"][0]
    with pytest.raises(ValueError, match="not available"):
        backends.get("blocked")


def spy_backend(monkeypatch):
    """Record the backend modules SamplesLoss resolves."""
    seen = []
    real = backends.get

    def get(name):
        mod = real(name)
        seen.append(mod.NAME)
        return mod

    monkeypatch.setattr(backends, "get", get)
    return seen


def test_auto_small_problem_dispatch(monkeypatch):
    """What SamplesLoss(backend='auto') runs on a small CPU problem: the rule of
    backends.select (native where available, else the dense backend), and the dense backend
    for a custom kernel callable."""
    seen = spy_backend(monkeypatch)
    x, y = make(1, 30, 20, 3, torch.float64)
    small = backends.select(1, 30, 20, 3, torch.device("cpu"))
    otkernels.SamplesLoss("sinkhorn", blur=0.1)(x[0], y[0])
    otkernels.SamplesLoss("gaussian", blur=0.5)(x[0], y[0])
    otkernels.SamplesLoss("gaussian", kernel=lambda x, y, blur=1.0, **kw: (-torch.cdist(x, y)).exp())(x[0], y[0])
    assert seen == [small, backends.select(1, 30, 20, 3, torch.device("cpu"), kind="kernel"), "tensorized"], seen
    monkeypatch.setenv("OTKERNELS_DISABLE", "native,triton,keops")
    seen.clear()
    otkernels.SamplesLoss("sinkhorn", blur=0.1)(x[0], y[0])
    assert seen == ["tensorized"], seen


@pytest.mark.slow
def test_large_problem_blocked_matches_tensorized(monkeypatch):
    """N, M ≈ 2000 (a size 'auto' sends to a tiled backend): 'blocked' (default tiles, cached
    cost) gives the values and gradients of the dense backend."""
    assert backends.select(1, 2000, 2100, 3, torch.device("cpu")) != "tensorized"
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    y = 0.8 * torch.randn(2100, 3, generator=g, dtype=torch.float64) + 0.3
    seen = spy_backend(monkeypatch)
    results = {}
    for name in ("blocked", "tensorized"):
        leaves = [t.clone().requires_grad_() for t in (x, y)]
        v = otkernels.SamplesLoss("sinkhorn", p=2, blur=0.1, scaling=0.5, backend=name)(*leaves)
        results[name] = (v.detach(), *torch.autograd.grad(v, leaves))
    assert seen == ["blocked", "tensorized"], seen
    for what, a, b in zip(("value", "grad x", "grad y"), results["blocked"], results["tensorized"]):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= 1e-10, f"{what}: blocked vs tensorized relative error {err:.2e}"


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 50, 37, 12), (2, 23, 61, 130)])
def test_softmin_two(small_tiles, shape, dtype, p):
    """Both Sinkhorn updates from shared tiles (D > TWO_MIN_D, no cache) = two one-way passes."""
    B, N, M, D = shape
    x, y = make(B, N, M, D, dtype)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(B, M, generator=g, dtype=torch.float64).to(dtype)
    h_t = torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype)
    h_t[0, : N // 3] = ZERO
    eps = 0.5 * D ** 0.5
    C_xy, C_yx = blocked.BlockedCost(x, y, Cost(p)), blocked.BlockedCost(y, x, Cost(p))
    f, g_ = C_xy.softmin_two(eps, h, h_t)
    rel_close(f, C_xy.softmin(eps, h), dtype, "rows")
    rel_close(g_, C_yx.softmin(eps, h_t), dtype, "columns")
    C = Cost(p)(x.double(), y.double())
    ref = -eps * (h_t.double()[:, :, None] - C / eps).logsumexp(1)
    rel_close(g_.double(), ref, torch.float64 if dtype == torch.float64 else dtype, "columns vs dense")
    # declines where it would not be faster, or where one pass would read a cache
    assert blocked.BlockedCost(x[..., :3], y[..., :3], Cost(p)).softmin_two(eps, h, h_t) is None
    K = blocked.dense_cost(x, y, Cost(p))
    assert blocked.BlockedCost(x, y, Cost(p), cache=K).softmin_two(eps, h, h_t) is None
