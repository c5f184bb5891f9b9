"""The native backend's kernels (csrc/, ``otkernels._C``) against their torch references.

Every op is checked in float32 and float64 on odd sizes (N or M = 1, D = 1, ragged column
tiles, GEMM tiles for D > 8 and direct distances for D ≤ 8), batched and non-contiguous
inputs.  References are computed in float64 from exact pairwise differences, so float32
results are held to float32 accuracy (torch's own float32 |x|² − 2⟨x,y⟩ + |y|² formula can be
less accurate than the native direct path).  The whole SamplesLoss suite also runs on
``backend="native"`` through the ``backend`` fixture (tests/conftest.py).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import otkernels
from otkernels import assign, backends
from otkernels.backends import blocked, native, tensorized
from otkernels.costs import Cost, Kernel
from otk_testing import assert_double_backward_like_dense  # noqa: E402

OK, WHY = native.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"native backend unavailable: {WHY}")

ZERO = -100000.0
SHAPES = [  # (B, N, M, D)
    (1, 1, 7, 3),
    (1, 9, 1, 2),
    (2, 37, 53, 1),
    (3, 100, 70, 3),
    (1, 64, 513, 20),   # GEMM tiles, a ragged second column tile
    (2, 33, 1030, 9),   # GEMM tiles, three column tiles
]
IDS = ["N1", "M1", "D1", "B3", "gemm", "gemm-3tiles"]
DTYPES = [torch.float32, torch.float64]
DT_IDS = ["f32", "f64"]


def tol(dtype):
    return 1e-11 if dtype == torch.float64 else 3e-5


def rel(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def assert_rel(actual, expected, t, what=""):
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values"
    err = rel(actual, expected)
    assert err <= t, f"{what}: relative error {err:.2e} > {t:.0e}"


def make(B, N, M, D, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(B, N, D, generator=g, dtype=torch.float64)
    y = scale * (0.7 * torch.randn(B, M, D, generator=g, dtype=torch.float64) + 0.4)
    return x.to(dtype), y.to(dtype)


def exact_cost(x, y, p):
    """float64 cost from pairwise differences (no cancellation)."""
    x, y = x.double(), y.double()
    d2 = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    return d2 / 2 if p == 2 else d2.clamp_min(1e-8).sqrt()


def log_weights(B, n, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = (torch.rand(B, n, generator=g, dtype=torch.float64) + 0.1).log()
    h[0, : n // 3] = ZERO  # zero weights
    if n > 1:
        h[0, -1] = 0.0
    return h.to(dtype)


def eps_for(D):
    return 0.05 * D + 0.05  # keeps the plans away from total underflow at every D


# ----------------------------------------------------------------------------- cost matrix
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_cost_matrix(shape, dtype, p):
    B, N, M, D = shape
    x, y = make(B, N, M, D, dtype)
    C, scale = native.cost_matrix(x, y, p)
    assert scale == 1.0 and C.dtype == dtype and C.shape == (B, N, M)
    ref = exact_cost(x, y, p)
    t = 1e-12 if dtype == torch.float64 else (2e-6 if D <= 8 else 2e-5)
    assert_rel(C, ref, t, "cost")


@pytest.mark.parametrize("store", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [1, 2])
def test_cost_matrix_16bit(store, p):
    x, y = make(2, 45, 71, 3, torch.float32, scale=30.0)  # float16 needs its scale here
    C, scale = native.cost_matrix(x, y, p, dtype=store)
    assert C.dtype == store
    ref = exact_cost(x, y, p)
    if store == torch.float16 and p == 2:
        assert scale > 1.0
    unit = 2.0 ** -8 if store == torch.bfloat16 else 2.0 ** -11
    err = (C.double() * scale - ref).abs() / ref.abs().clamp_min(1e-3)
    assert err.max().item() <= unit * 1.01
    # the softmin on a 16-bit cache moves by at most the cost error
    h = log_weights(2, 71, torch.float32)
    eps = 2.0
    f16 = native.softmin_cached(C, scale, False, h, eps)
    f = -eps * (h.double()[:, None, :] - ref / eps).logsumexp(2)
    assert (f16.double() - f).abs().max().item() <= unit * ref.abs().max().item() * 1.01


# ----------------------------------------------------------------------------- softmin
@pytest.mark.parametrize("mode", ["cached", "online"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_softmin_rows(shape, dtype, p, mode):
    B, N, M, D = shape
    x, y = make(B, N, M, D, dtype)
    h = log_weights(B, M, dtype)
    eps = eps_for(D)
    ref = -eps * (h.double()[:, None, :] - exact_cost(x, y, p) / eps).logsumexp(2)
    if mode == "cached":
        C, s = native.cost_matrix(x, y, p)
        out = native.softmin_cached(C, s, False, h, eps)
    else:
        out = native.softmin_online(x, y, h, eps, p)
    assert out.dtype == dtype
    assert_rel(out, ref, tol(dtype), f"softmin rows {mode}")


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_softmin_columns(shape, dtype, p):
    """Column reduction of a cached C(x, y): the C_yx handle, no transpose copy."""
    B, N, M, D = shape
    x, y = make(B, N, M, D, dtype)
    h = log_weights(B, N, dtype)
    eps = eps_for(D)
    ref = -eps * (h.double()[:, :, None] - exact_cost(x, y, p) / eps).logsumexp(1)
    C, s = native.cost_matrix(x, y, p)
    out = native.softmin_cached(C, s, True, h, eps)
    assert_rel(out, ref, tol(dtype), "softmin columns")


def _two_case(shape, dtype, p):
    """Points, row/column log-weights, ε and the dense float64 references (rows of C(x, y),
    its columns, rows of C(x, x)) of the two-way reductions."""
    B, N, M, D = shape
    x, y = make(B, N, M, D, dtype)
    hr, hc = log_weights(B, M, dtype), log_weights(B, N, dtype, seed=2)
    eps = eps_for(D)
    C = exact_cost(x, y, p)
    refs = ((hr.double()[:, None, :] - C / eps).logsumexp(2), (hc.double()[:, :, None] - C / eps).logsumexp(1),
            (hc.double()[:, None, :] - exact_cost(x, x, p) / eps).logsumexp(2))
    return x, y, hr, hc, eps, refs


TWO_SHAPES = [(1, 64, 513, 20), (2, 33, 1030, 9), (1, 300, 257, 17), (3, 70, 70, 128), (1, 517, 517, 10)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", TWO_SHAPES, ids=[f"B{b}N{n}M{m}D{d}" for b, n, m, d in TWO_SHAPES])
def test_softmin_two(shape, dtype, p, threads):
    """Rows and columns from shared GEMM tiles (and the symmetric triangle) vs the dense
    float64 log-sum-exp; several tasks per thread, ragged tiles, zero weights.  The symmetric
    kernel sets C(x_i, x_i) exactly (a float32 GEMM leaves √ulp·|x| ≈ 1e-3 on the diagonal
    for p=1: 2–6e-4 relative error in the log-sum-exp before)."""
    x, y, hr, hc, eps, refs = _two_case(shape, dtype, p)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        r, c = native.lse_online_two(x, y, hr, hc, eps, p)
        s, none = native.lse_online_two(x, x, hc, None, eps, p, sym=True)
    finally:
        torch.set_num_threads(old)
    assert none is None and r.dtype == c.dtype == s.dtype == dtype
    for what, got, ref in zip(("rows", "columns", "sym"), (r, c, s), refs):
        assert_rel(-eps * got, -eps * ref, tol(dtype), f"softmin two {what}")


CACHED_TWO_SHAPES = TWO_SHAPES + [(2, 37, 53, 1), (1, 1, 7, 3), (1, 9, 1, 2), (1, 130, 2100, 3)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", CACHED_TWO_SHAPES, ids=[f"B{b}N{n}M{m}D{d}" for b, n, m, d in CACHED_TWO_SHAPES])
def test_softmin_cached_two(shape, dtype, p, threads):
    """Rows and columns from one read of a cached C(x, y), and the upper triangle of a cached
    C(x, x), vs the dense float64 log-sum-exp (issue 23): any D (the cache has no GEMM tile
    limit), row blocks not multiples of 16, more than one 1,024-column chunk, zero weights."""
    x, y, hr, hc, eps, refs = _two_case(shape, dtype, p)
    K, sc = native.cost_matrix(x, y, p)
    Kx, sx = native.cost_matrix(x, x, p)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        r, c = native.lse_cached_two(K, sc, hr, hc, eps)
        s, none = native.lse_cached_two(Kx, sx, hc, None, eps, sym=True)
    finally:
        torch.set_num_threads(old)
    assert none is None and r.dtype == c.dtype == s.dtype == dtype
    t = tol(dtype) if (dtype == torch.float64 or shape[3] <= 8) else 1e-4  # float32 GEMM-built cache
    for what, got, ref in zip(("rows", "columns", "sym"), (r, c, s), refs):
        assert_rel(-eps * got, -eps * ref, t, f"cached two {what}")
    # the same numbers as the one-way cached passes (the read order differs, not the terms)
    assert_rel(r, native.lse_cached(K, sc, False, hr, eps), 1e-12 if dtype == torch.float64 else 2e-6, "vs rows")
    assert_rel(c, native.lse_cached(K, sc, True, hc, eps), 1e-12 if dtype == torch.float64 else 2e-6, "vs cols")


@pytest.mark.parametrize("store", [torch.bfloat16, torch.float16])
def test_softmin_cached_two_16bit(store):
    x, y = make(2, 45, 1100, 3, torch.float32, scale=30.0)
    K, sc = native.cost_matrix(x, y, 2, dtype=store)
    hr, hc = log_weights(2, 1100, torch.float32), log_weights(2, 45, torch.float32, seed=2)
    r, c = native.lse_cached_two(K, sc, hr, hc, 2.0)
    assert_rel(r, native.lse_cached(K, sc, False, hr, 2.0), 2e-6, "16-bit rows")
    assert_rel(c, native.lse_cached(K, sc, True, hc, 2.0), 2e-6, "16-bit cols")


# ----------------------------------------------------------------------------- plan form (issue 23)
# The cached two-way and triangle passes sum P_ij = exp(hc_i + hr_j − C_ij/ε) (one exp per entry
# for both directions, no maxima) and recompute by log-sum-exp the rows and columns whose sums
# leave the safe range.  Each test compares with the log-sum-exp form (plan=False) and says,
# through plan_counts, which of the kernel's branches ran.
PLAN_SHAPES = [(1, 300, 257, 17), (2, 37, 1100, 5), (3, 70, 70, 128), (1, 1, 7, 3), (1, 517, 33, 2),
               (1, 40, 8300, 3)]  # the last: more than one 8,192-column chunk


def _near_plan(K, sc, la, lb, eps, iters=8):
    """Potentials after a few averaged Sinkhorn iterations (log-sum-exp form): hr, hc of the
    next iteration, the regime of the loop."""
    f, g = torch.zeros_like(la), torch.zeros_like(lb)
    for _ in range(iters):
        r, c = native.lse_cached_two(K, sc, lb + g / eps, la + f / eps, eps, plan=False)
        f, g = 0.5 * (f - eps * r), 0.5 * (g - eps * c)
    return lb + g / eps, la + f / eps


def _self_near_plan(Kp, sp, la, eps, iters=8):
    f = torch.zeros_like(la)
    for _ in range(iters):
        f = 0.5 * (f - eps * native.lse_packed(Kp, sp, la + f / eps, eps, plan=False))
    return la + f / eps


def _uniform(B, n, dtype):
    return torch.full((B, n), -math.log(n), dtype=dtype)


def _plan_vs_lse(K, sc, hr, hc, eps, dtype, what):
    t = 1e-12 if dtype == torch.float64 else 2e-6
    native.plan_counts(reset=True)
    r, c = native.lse_cached_two(K, sc, hr, hc, eps, plan=True)
    counts = native.plan_counts(reset=True)
    r0, c0 = native.lse_cached_two(K, sc, hr, hc, eps, plan=False)
    assert_rel(-eps * r, -eps * r0, t, f"{what} rows")
    assert_rel(-eps * c, -eps * c0, t, f"{what} columns")
    return counts


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", PLAN_SHAPES, ids=[f"B{b}N{n}M{m}D{d}" for b, n, m, d in PLAN_SHAPES])
def test_plan_form_near_a_plan(shape, dtype, p):
    """At Sinkhorn's iterates every row and column sum is kept (no recomputation) and equals
    the log-sum-exp form's: C(x, y) both ways, the packed and the whole C(x, x) (batches,
    row blocks not multiples of 16, a second 1,024-column chunk, vector tails)."""
    B, N, M, D = shape
    x, y = make(B, N, M, D, dtype)
    eps = eps_for(D) / 4
    K, sc = native.cost_matrix(x, y, p)
    hr, hc = _near_plan(K, sc, _uniform(B, N, dtype), _uniform(B, M, dtype), eps)
    counts = _plan_vs_lse(K, sc, hr, hc, eps, dtype, "C_xy")
    assert counts == {"passes": B, "rows": 0, "columns": 0, "column_passes": 0}, counts
    Kp, sp = native.cost_packed(x, p)
    Kx, sx = native.cost_matrix(x, x, p)
    h = _self_near_plan(Kp, sp, _uniform(B, N, dtype), eps)
    t = 1e-12 if dtype == torch.float64 else 2e-6
    ref = native.lse_packed(Kp, sp, h, eps, plan=False)
    native.plan_counts(reset=True)
    assert_rel(-eps * native.lse_packed(Kp, sp, h, eps, plan=True), -eps * ref, t, "packed C_xx")
    assert_rel(-eps * native.lse_cached_two(Kx, sx, h, None, eps, sym=True, plan=True)[0], -eps * ref, t, "whole C_xx")
    assert native.plan_counts(reset=True) == {"passes": 2 * B, "rows": 0, "columns": 0, "column_passes": 0}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_plan_form_recomputes_what_it_cannot_keep(dtype):
    """Each way out of the plan form, against the log-sum-exp form and the dense float64
    log-sum-exp: zero-weight rows (their sums underflow), a few zero-weight columns (gathered),
    many (one whole column pass), potentials far from a plan (sums beyond the range: every row
    and column), and zero-weight points of a symmetric C (packed and whole)."""
    B, N, M, D = 1, 200, 1100, 6
    x, y = make(B, N, M, D, dtype)
    eps = 0.3
    K, sc = native.cost_matrix(x, y, 2)
    hr, hc = _near_plan(K, sc, _uniform(B, N, dtype), _uniform(B, M, dtype), eps)
    C = exact_cost(x, y, 2)

    def dense_ok(hr, hc, what):
        r, c = native.lse_cached_two(K, sc, hr, hc, eps)
        tr = (hr.double()[:, None, :] - C / eps).logsumexp(2)
        tc = (hc.double()[:, :, None] - C / eps).logsumexp(1)
        t = tol(dtype) if dtype == torch.float64 else 1e-5
        assert_rel(-eps * r, -eps * tr, t, f"{what}: rows vs float64")
        assert_rel(-eps * c, -eps * tc, t, f"{what}: columns vs float64")

    cases = []
    h1 = hc.clone()
    h1[:, :7] = ZERO
    cases.append(("zero-weight rows", hr, h1, {"rows": 7, "columns": 0, "column_passes": 0}))
    h2 = hr.clone()
    h2[:, 100:103] = ZERO
    cases.append(("3 zero-weight columns", h2, hc, {"rows": 0, "columns": 3, "column_passes": 0}))
    h3 = hr.clone()
    h3[:, 500:] = ZERO
    cases.append(("600 zero-weight columns", h3, hc, {"rows": 0, "columns": 600, "column_passes": 1}))
    far = 100.0 if dtype == torch.float32 else 1000.0  # e^far per term: past the float range
    cases.append(("far from a plan", hr + far, hc + far, {"rows": N, "columns": M, "column_passes": 1}))
    for what, a, b, want in cases:
        counts = _plan_vs_lse(K, sc, a, b, eps, dtype, what)
        assert counts == {"passes": 1, **want}, f"{what}: {counts}"
        dense_ok(a, b, what)
    Kp, sp = native.cost_packed(x, 2)
    Kx, sx = native.cost_matrix(x, x, 2)
    h = _self_near_plan(Kp, sp, _uniform(B, N, dtype), eps)
    h[:, 150:160] = ZERO
    ref = (h.double()[:, None, :] - exact_cost(x, x, 2) / eps).logsumexp(2)
    native.plan_counts(reset=True)
    for what, got in (("packed", native.lse_packed(Kp, sp, h, eps)),
                      ("whole", native.lse_cached_two(Kx, sx, h, None, eps, sym=True)[0])):
        assert_rel(-eps * got, -eps * ref, tol(dtype) if dtype == torch.float64 else 1e-5, f"{what} C_xx")
        assert_rel(got, native.lse_packed(Kp, sp, h, eps, plan=False), 1e-12 if dtype == torch.float64 else 2e-6,
                   f"{what} C_xx vs log-sum-exp")
    assert native.plan_counts(reset=True) == {"passes": 2, "rows": 20, "columns": 0, "column_passes": 0}


def test_handle_leaves_the_plan_form_when_it_recomputes_much(monkeypatch):
    """A cost handle whose pass recomputed more than 1/PLAN_GIVE_UP of its rows and columns
    (half the weights zero, as padding gives) runs its next passes in the log-sum-exp form, with
    the same results; near a plan it keeps the plan form."""
    monkeypatch.setattr(native, "PLAN_FORM", True)
    B, N, M, D = 1, 300, 400, 8
    x, y = make(B, N, M, D, torch.float64)
    eps = 0.5
    K, sc = native.cost_matrix(x, y, 2)
    hr, hc = _near_plan(K, sc, _uniform(B, N, torch.float64), _uniform(B, M, torch.float64), eps)
    near = native.NativeCost(x, y, Cost(2), cache=K, scale=sc)
    for _ in range(2):
        near.softmin_two(eps, hr, hc)
    assert near.plan
    padded = native.NativeCost(x, y, Cost(2), cache=K, scale=sc)
    hz = hr.clone()
    hz[:, 200:] = ZERO
    native.plan_counts(reset=True)
    first = padded.softmin_two(eps, hz, hc)
    assert not padded.plan and native.plan_counts()["columns"] == 200
    second = padded.softmin_two(eps, hz, hc)
    assert native.plan_counts(reset=True)["passes"] == 1  # the second pass: log-sum-exp form
    ref = native.lse_cached_two(K, sc, hz, hc, eps, plan=False)
    for a, b, r in zip(first, second, ref):
        assert_rel(a, -eps * r, 1e-12, "first pass")
        assert_rel(b, -eps * r, 1e-12, "second pass")
    Kp, sp = native.cost_packed(x, 2)
    sym = native.NativeCost(x, x, Cost(2), cache=Kp, scale=sp, packed=True)
    hs = hc.clone()
    hs[:, ::2] = ZERO
    out = sym.lse(eps, hs)
    assert not sym.plan
    assert_rel(out, native.lse_packed(Kp, sp, hs, eps, plan=False), 1e-12, "packed")


def test_two_way_passes_are_deterministic():
    """The two-way passes accumulate the column log-sum-exps per thread and merge them: with
    tasks handed out dynamically the float32 result depended on which thread took which row
    block (the 10k divergence varied in its 8th digit between runs).  Tasks now go to threads
    in a fixed order: ten runs on 2 threads are bit-identical (cached, packed triangle, online)."""
    x, y = make(1, 2100, 700, 16, torch.float32)
    hr, hc = log_weights(1, 700, torch.float32), log_weights(1, 2100, torch.float32, seed=2)
    K, sc = native.cost_matrix(x, y, 2)
    passes = {"cached": lambda: native.lse_cached_two(K, sc, hr, hc, 0.1),
              "online": lambda: native.lse_online_two(x, y, hr, hc, 0.1, 2),
              "online sym": lambda: native.lse_online_two(x, x, hc, None, 0.1, 2, sym=True)}
    if native.packed_supported():
        Kp, sp = native.cost_packed(x, 2)
        passes["packed"] = lambda: (native.lse_packed(Kp, sp, hc, 0.1),)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, run in passes.items():
            first = run()
            for _ in range(9):
                again = run()
                assert all(torch.equal(a, b) for a, b in zip(first, again) if a is not None), name
    finally:
        torch.set_num_threads(old)


def test_column_sums_do_not_drift():
    """The column log-sum-exps rescale their running sums once per block of rows; exp(0) must
    be exactly 1 there (the float polynomial's 1 + 2^-23 drifted by one ulp per block: 2e-6 on
    37 rows, ~1e-4 on 10k).  4,000 rows, every term alike (large ε), float32 vs float64."""
    x, y = make(1, 4000, 7, 20, torch.float32)
    h = torch.full((1, 4000), -8.29, dtype=torch.float32)  # log(1/4000)
    hr = torch.full((1, 7), -1.95, dtype=torch.float32)
    eps = 500.0
    K, s = native.cost_matrix(x, y, 2)
    ref = (h.double()[:, :, None] - K.double() / eps).logsumexp(1)
    outs = {"cached columns": native.lse_cached(K, s, True, h, eps),
            "cached two columns": native.lse_cached_two(K, s, hr, h, eps)[1],
            "online two columns": native.lse_online_two(x, y, hr, h, eps, 2)[1]}
    for what, out in outs.items():
        err = (out.double() - ref).abs().max().item()
        assert err <= 1e-6, f"{what}: {err:.1e}"  # torch float32 logsumexp: 4.4e-7; the drift: ~3e-5


def test_cached_handles_use_one_read(monkeypatch):
    """The cached C_xy handle answers softmin_two (one read for both updates), C_xx reads its
    triangle; with CACHED_TWO off the loop takes the two-pass reads: same divergence."""
    x, y = make(1, 300, 250, 5, torch.float64)
    x, y = x[0], y[0]
    L = otkernels.SamplesLoss("sinkhorn", blur=0.3, backend="native")
    monkeypatch.setattr(backends, "_budget", 1 << 30)
    C_xy, _, C_xx, _ = native.cost_handles(x[None], y[None], Cost(2))
    assert C_xy.cache is not None and C_xx.cache is not None
    h, ht = torch.zeros(1, 250, dtype=torch.float64), torch.zeros(1, 300, dtype=torch.float64)
    assert C_xy.softmin_two(0.1, h, ht) is not None
    one = L(x, y)
    monkeypatch.setattr(native, "CACHED_TWO", False)
    assert C_xy.softmin_two(0.1, h, ht) is None
    assert_rel(L(x, y), one, 1e-13, "one read vs two")


def test_softmin_two_small_d_declines():
    """D ≤ 8 computes distances directly: no shared-tile kernel, the caller makes two passes."""
    x, y = make(1, 20, 30, 8, torch.float64)
    assert native.lse_online_two(x, y, torch.zeros(1, 30, dtype=torch.float64),
                                 torch.zeros(1, 20, dtype=torch.float64), 1.0, 2) is None


def test_softmin_all_zero_weights_but_one():
    x, y = make(1, 20, 300, 3, torch.float64)
    h = torch.full((1, 300), ZERO, dtype=torch.float64)
    h[0, 123] = 0.0
    C, s = native.cost_matrix(x, y, 2)
    ref = exact_cost(x, y, 2)[:, :, 123]
    assert_rel(native.softmin_cached(C, s, False, h, 0.1), ref, 1e-12, "rows")
    assert_rel(native.softmin_online(x, y, h, 0.1, 2), ref, 1e-12, "online")


def test_softmin_tiny_eps_no_denormal_slowdown():
    """Exponents far below −87 (float32 denormals in torch) stay exact and fast."""
    x, y = make(1, 200, 3000, 3, torch.float32, scale=10.0)
    h = torch.zeros(1, 3000)
    eps = 1e-3
    ref = -eps * (-exact_cost(x, y, 2) / eps).logsumexp(2)
    C, s = native.cost_matrix(x, y, 2)
    assert_rel(native.softmin_cached(C, s, False, h, eps), ref, 1e-5, "tiny eps")


# ----------------------------------------------------------------------------- gradients
def dense_grad(x, y, p, eps, h, f, g, s):
    """Σ_j g_i s_j P_ij ∇_x C(x_i, y_j) in float64 from exact differences."""
    x, y = x.double(), y.double()
    C = exact_cost(x, y, p)
    W = (h.double()[:, None, :] - C / eps + f.double()[:, :, None] / eps).exp() * g.double()[:, :, None]
    if s is not None:
        W = W * s.double()[:, None, :]
    if p == 1:
        W = torch.where(C > 1e-4, W / C, torch.zeros_like(W))
    return x * W.sum(2, keepdim=True) - torch.bmm(W, y)


def potentials(x, y, p, eps, h):
    return -eps * (h.double()[:, None, :] - exact_cost(x, y, p) / eps).logsumexp(2)


@pytest.mark.parametrize("signed", [False, True], ids=["s=1", "signed-s"])
@pytest.mark.parametrize("mode", ["cached", "online", "columns"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_grad_x(shape, dtype, p, mode, signed):
    B, N, M, D = shape
    x, y = make(B, N, M, D, dtype)
    eps = eps_for(D)
    gen = torch.Generator().manual_seed(3)
    if mode == "columns":  # the C_yx handle on a cache of C(x, y): first cloud y
        a, b = y, x
    else:
        a, b = x, y
    Na, Nb = a.shape[1], b.shape[1]
    h = log_weights(B, Nb, dtype)
    f = potentials(a, b, p, eps, h).to(dtype)  # P rows sum to 1: a well-scaled plan
    g = torch.randn(B, Na, generator=gen, dtype=torch.float64).to(dtype)
    s = torch.randn(B, Nb, generator=gen, dtype=torch.float64).to(dtype) if signed else None
    ref = dense_grad(a, b, p, eps, h, f, g, s)
    if mode == "cached":
        C, sc = native.cost_matrix(a, b, p)
        out = native.grad_cached(C, sc, False, a, b, h, f, g, s, eps, p)
    elif mode == "columns":
        C, sc = native.cost_matrix(x, y, p)  # (B, Nb, Na), read transposed
        out = native.grad_cached(C, sc, True, a, b, h, f, g, s, eps, p)
    else:
        out = native.grad_online(a, b, h, f, g, s, eps, p)
    t = 1e-10 if dtype == torch.float64 else 2e-4
    assert_rel(out, ref, t, f"grad {mode}")


@pytest.mark.parametrize("mode", ["cached", "online", "columns", "packed"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_grad_x_sparse_plan(dtype, p, mode):
    """At a small ε a plan row holds a few entries and the other weights underflow to exact
    zeros (issue 23): the gradient sums those tiles pair by pair (grad_counts: sparse tiles),
    the same as the dense float64 reference; D = 20 (a vector and a tail), zero weights,
    signed s, more than one column tile.  ε: a row's weights within e^−86 (float32) or e^−700
    (float64) of its largest span ~1 of cost here, a few of the 600 points."""
    B, N, M, D = 2, 150, 600, 20
    x, y = make(B, N, M, D, dtype)
    eps = 0.01 if dtype == torch.float32 else 0.001
    a, b = (y, x) if mode == "columns" else (x, x) if mode == "packed" else (x, y)
    Nb = b.shape[1]
    h = log_weights(B, Nb, dtype)
    f = potentials(a, b, p, eps, h).to(dtype)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(B, a.shape[1], generator=gen, dtype=torch.float64).to(dtype)
    s = torch.randn(B, Nb, generator=gen, dtype=torch.float64).to(dtype)
    ref = dense_grad(a, b, p, eps, h, f, g, s)
    native.grad_counts(reset=True)
    if mode == "cached":
        C, sc = native.cost_matrix(a, b, p)
        out = native.grad_cached(C, sc, False, a, b, h, f, g, s, eps, p)
    elif mode == "columns":
        C, sc = native.cost_matrix(x, y, p)
        out = native.grad_cached(C, sc, True, a, b, h, f, g, s, eps, p)
    elif mode == "packed":
        C, sc = native.cost_packed(x, p)
        out = native.grad_packed(C, sc, a, h, f, g, s, eps, p)
    else:
        out = native.grad_online(a, b, h, f, g, s, eps, p)
    counts = native.grad_counts(reset=True)
    assert counts["sparse"] > 0 and counts["sparse"] >= 3 * counts["dense"], counts
    # float32: C/ε ~ 3e3 rounds by ~2e-4 in the exponent (the dense path's error too)
    assert_rel(out, ref, 1e-10 if dtype == torch.float64 else 1e-3, f"sparse grad {mode}")


def test_grad_x_nonfinite_weights_reach_the_result():
    """A NaN weight (from s) takes the dense path, where the sparse one would skip it: it
    reaches the result, in a tile that is otherwise sparse."""
    x, y = make(1, 40, 300, 20, torch.float32)
    h = log_weights(1, 300, torch.float32)
    f = potentials(x, y, 2, 0.01, h).float()
    s = torch.ones(1, 300)
    C, sc = native.cost_matrix(x, y, 2)
    native.grad_counts(reset=True)
    out = native.grad_cached(C, sc, False, x, y, h, f, torch.ones(1, 40), s, 0.01, 2)
    assert bool(torch.isfinite(out).all()) and native.grad_counts(reset=True)["dense"] == 0
    s[0, 200] = float("nan")
    out = native.grad_cached(C, sc, False, x, y, h, f, torch.ones(1, 40), s, 0.01, 2)
    assert bool(torch.isnan(out).all()) and native.grad_counts(reset=True)["sparse"] == 0


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "online"])
@pytest.mark.parametrize("p", [1, 2])
def test_softmin_grad_autograd(p, cache):
    """softmin_grad's backward against torch autograd through the dense reference."""
    x, y = make(2, 31, 45, 3, torch.float64)
    x.requires_grad_(True)
    h = log_weights(2, 45, torch.float64)
    eps = 0.3
    cost = Cost(p)
    w = torch.randn(2, 31, dtype=torch.float64)
    handles = native.cost_handles(x, y, cost, debias=False, cache=cache)
    f = handles[0].softmin_grad(eps, h)
    (gx,) = torch.autograd.grad((f * w).sum(), x)
    fr = tensorized.DenseCost(x, y, cost).softmin_grad(eps, h)
    (gr,) = torch.autograd.grad((fr * w).sum(), x)
    assert_rel(f.detach(), fr.detach(), 1e-12, "value")
    assert_rel(gx, gr, 1e-10, "gradient")


def test_double_backward_like_dense():
    assert_double_backward_like_dense(native)


# ----------------------------------------------------------------------------- kernel sums
def dense_kernel(x, y, name, blur):
    d2 = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    if name == "gaussian":
        return (-d2 / (2 * blur ** 2)).exp()
    d = (d2 / (blur ** 2 if name == "laplacian" else 1.0)).clamp_min(1e-8).sqrt()
    return (-d).exp() if name == "laplacian" else -d


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "energy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_kernel_sum(shape, dtype, kernel):
    B, N, M, D = shape
    x, y = make(B, N, M, D, dtype)
    blur = 0.3 * D ** 0.5 + 0.2
    gen = torch.Generator().manual_seed(5)
    b = torch.rand(B, M, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(B, N, generator=gen, dtype=torch.float64)
    x64, y64, b64 = (t.double().requires_grad_(True) for t in (x, y, b))
    ref = (dense_kernel(x64, y64, kernel, blur) @ b64[:, :, None]).squeeze(-1)
    rx, ry, rb = torch.autograd.grad((ref * w).sum(), (x64, y64, b64))
    xs, ys, bs = (t.clone().requires_grad_(True) for t in (x, y, b))
    out = native.kernel_sum(xs, ys, bs, Kernel(kernel, blur))
    gx, gy, gb = torch.autograd.grad((out * w.to(dtype)).sum(), (xs, ys, bs))
    t = 1e-11 if dtype == torch.float64 else (1e-5 if D <= 8 else 1e-4)
    assert_rel(out, ref, t, "value")
    assert_rel(gx, rx, t * 10, "grad x")
    assert_rel(gy, ry, t * 10, "grad y")
    assert_rel(gb, rb, t, "grad b")


def test_kernel_sum_self_and_fallbacks():
    x, _ = make(2, 40, 1, 3, torch.float64)
    a = torch.rand(2, 40, dtype=torch.float64)
    xs = x.clone().requires_grad_(True)
    k = Kernel("energy", 1.0)
    v = native.kernel_sum(xs, xs, a, k)
    (g,) = torch.autograd.grad(v.sum(), xs)
    xr = x.clone().requires_grad_(True)
    vr = tensorized.kernel_sum(xr, xr, a, k)
    (gr,) = torch.autograd.grad(vr.sum(), xr)
    assert_rel(v.detach(), vr.detach(), 1e-12, "self value")
    assert_rel(g, gr, 1e-10, "self grad (both arguments)")
    # float16 inputs and callable kernels go to the blocked backend
    out = native.kernel_sum(x.float().half().float(), x.float(), a.float(), k)
    assert out.shape == (2, 40)


# ----------------------------------------------------------------------------- non-contiguous, threads
def test_noncontiguous_inputs():
    x, y = make(2, 50, 60, 4, torch.float32)
    h = log_weights(2, 60, torch.float32)
    xn = x.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, column-major
    yn = torch.stack([y, y], 3)[..., 0]
    hn = torch.stack([h, h], 2)[:, :, 0]
    assert not (xn.is_contiguous() or yn.is_contiguous() or hn.is_contiguous())
    assert torch.equal(native.softmin_online(xn, yn, hn, 0.3, 2), native.softmin_online(x, y, h, 0.3, 2))
    assert torch.equal(native.argmin_sqdist(xn, yn, hn)[1], native.argmin_sqdist(x, y, h)[1])
    handles = native.cost_handles(xn, yn, Cost(2))
    assert handles[0].cache is not None  # the cached path, against the same path on contiguous inputs
    assert torch.equal(handles[0].softmin(0.3, hn), native.cost_handles(x, y, Cost(2))[0].softmin(0.3, h))
    torch.testing.assert_close(handles[0].softmin(0.3, hn), native.softmin_online(x, y, h, 0.3, 2),
                               rtol=1e-6, atol=1e-6)


def test_results_do_not_depend_on_threads():
    x, y = make(2, 300, 257, 3, torch.float32)
    h = log_weights(2, 257, torch.float32)
    hn = log_weights(2, 300, torch.float32)
    C, s = native.cost_matrix(x, y, 2)
    old = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append((native.softmin_cached(C, s, False, h, 0.2), native.softmin_cached(C, s, True, hn, 0.2),
                         native.softmin_online(x, y, h, 0.2, 2)))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for u, v in zip(o, outs[0]):
            assert torch.equal(u, v)


# ----------------------------------------------------------------------------- assignment
def brute(x, y, h, mode):
    x, y = x.double(), y.double()
    if mode == 0:
        s = x @ y.transpose(-1, -2)
    else:
        s = ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)
    if h is not None:
        s = s + h.double()[..., None, :]
    return s.max(-1) if mode == 0 else s.min(-1)


@pytest.mark.parametrize("with_h", [False, True], ids=["h=None", "h"])
@pytest.mark.parametrize("mode", [0, 1], ids=["argmax_inner", "argmin_sqdist"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_assign(shape, dtype, mode, with_h):
    B, N, M, D = shape
    x, y = make(B, N, M, D, dtype)
    h = log_weights(B, M, dtype).clamp_min(-3) if with_h else None
    fn = assign.argmax_inner if mode == 0 else assign.argmin_sqdist
    rv, ri = brute(x, y, h, mode)
    t = 1e-12 if dtype == torch.float64 else 1e-5
    for backend in ("native", "torch"):
        v, i = fn(x, y, h, backend=backend)
        assert v.dtype == dtype and i.dtype == torch.int64 and v.shape == (B, N) and i.shape == (B, N)
        assert (v.double() - rv).abs().max().item() <= t * max(1.0, rv.abs().max().item()), backend
        # the index attains the optimum (up to rounding: near-ties may pick another index)
        at = brute(x, y, h, mode)[0]
        s = (x.double() @ y.double().transpose(1, 2) if mode == 0
             else ((x.double()[:, :, None] - y.double()[:, None]) ** 2).sum(-1))
        if h is not None:
            s = s + h.double()[:, None, :]
        picked = s.gather(2, i[:, :, None]).squeeze(2)
        assert (picked - at).abs().max().item() <= 2 * t * max(1.0, at.abs().max().item()), backend
        if dtype == torch.float64:
            assert torch.equal(i, ri), backend


def test_assign_ties_unbatched_and_blocks(monkeypatch):
    """First index on exact ties, (N,D) inputs, and the torch path over several y blocks."""
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]] * 10)
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    monkeypatch.setattr(assign, "BLOCK", 7)
    for backend in ("native", "torch"):
        v, i = assign.argmax_inner(x, y, backend=backend)
        assert i.tolist() == [0, 1, 0] and v.tolist() == [2.0, 3.0, 1.0]
        v, i = assign.argmin_sqdist(x, y, backend=backend)
        assert i.tolist() == [0, 1, 0]
        h = torch.zeros(40)
        h[37] = -10.0
        v, i = assign.argmin_sqdist(x, y, h, backend=backend)
        assert i.tolist() == [37, 37, 37]


def test_assign_auto_dispatch_and_errors():
    x, y = make(1, 5, 6, 3, torch.float32)
    v, i = assign.argmin_sqdist(x[0], y[0])
    assert v.shape == (5,) and i.shape == (5,)
    v16, i16 = assign.argmin_sqdist(x[0].half().float(), y[0])  # auto: any float dtype
    with pytest.raises(ValueError, match="same batch size and dimension"):
        assign.argmax_inner(x, y[:, :, :2])
    with pytest.raises(ValueError, match="shape"):
        assign.argmax_inner(x, y, torch.zeros(1, 5))
    with pytest.raises(TypeError):
        assign.argmax_inner(x, y.double())
    with pytest.raises(ValueError, match="backend='native'"):
        assign.argmax_inner(x.half(), y.half(), backend="native")
    v, i = assign.argmax_inner(x.half(), y.half())  # auto -> torch
    assert i.shape == (1, 5)


# ----------------------------------------------------------------------------- SamplesLoss
@pytest.mark.parametrize("loss", ["sinkhorn", "hausdorff"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("cache", ["cached", "online"])
def test_samples_loss_matches_tensorized(monkeypatch, loss, p, cache):
    if cache == "online":
        monkeypatch.setattr(backends, "_budget", 0)
    x, y = make(2, 40, 33, 3, torch.float64)
    a = torch.rand(2, 40, dtype=torch.float64) + 0.1
    b = torch.rand(2, 33, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    res = {}
    for be in ("tensorized", "native"):
        leaves = [t.clone().requires_grad_(True) for t in (a, x, b, y)]
        v = otkernels.SamplesLoss(loss, p=p, blur=0.1, backend=be)(*leaves)
        res[be] = (v,) + torch.autograd.grad(v.sum(), leaves)
    for u, w in zip(res["native"], res["tensorized"]):
        assert_rel(u.detach(), w.detach(), 1e-10, f"{loss} p={p} {cache}")


@pytest.mark.parametrize("loss,kw", [("sinkhorn", dict(p=2)), ("sinkhorn", dict(p=1, reach=0.5)),
                                     ("sinkhorn", dict(p=2, debias=False)), ("hausdorff", dict(p=2))])
@pytest.mark.parametrize("D", [3, 12])  # direct distances / GEMM tiles (the two-way pass)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_partial_cache_same_result(monkeypatch, loss, kw, D, dtype):
    """A budget below N·M caches the first rows of C_xy (all the budget holds; C_xx, C_yy
    none): values and gradients w.r.t. both clouds and both weights equal the uncached ones,
    batched."""
    B, N, M = 2, 41, 29
    x, y = make(B, N, M, D, dtype, seed=3)
    a = torch.rand(B, N, dtype=dtype) + 0.1
    b = torch.rand(B, M, dtype=dtype) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    item = torch.empty((), dtype=dtype).element_size()
    row = B * M * item
    # budget -> cached rows of C_xy (C_xx, C_yy never cached here); all of C_xy: the full cache
    budgets = {0: 0, row: 1, 17 * row + 5: 17, (N - 1) * row: N - 1, 3 * row + B * M * M * item: 3 + M,
               B * N * M * item: 0}
    out = {}
    for budget, rows in budgets.items():
        monkeypatch.setattr(backends, "_budget", budget)
        h_xy, h_yx, h_xx, h_yy = native.cost_handles(x, y, Cost(kw["p"]), debias=True)
        assert getattr(h_xy, "rows", 0) == rows and getattr(h_yx, "rows", 0) == rows, f"budget {budget}"
        full = budget >= B * N * M * item
        assert (h_xy.cache is not None) == (rows > 0 or full) and (h_yx.cache is not None) == (rows > 0 or full)
        assert h_xx.cache is None and h_yy.cache is None, f"budget {budget}"
        leaves = [t.clone().requires_grad_(True) for t in (a, x, b, y)]
        v = otkernels.SamplesLoss(loss, blur=0.3, backend="native", **kw)(*leaves)
        out[budget] = (v.detach(),) + torch.autograd.grad(v.sum(), leaves)
    t = 1e-12 if dtype == torch.float64 else 2 * tol(dtype)  # float32: two float32 results, each within tol
    for budget in budgets:
        for what, u, w in zip(("value", "grad a", "grad x", "grad b", "grad y"), out[budget], out[0]):
            assert_rel(u, w, t, f"{loss} {kw} D={D} budget {budget}: {what}")


def test_partial_cache_handles_match_full_cache(monkeypatch):
    """The partial handles' reductions (rows, columns, the two-way pass, gradients with weights
    s) against the fully cached handles, directly."""
    x, y = make(2, 37, 26, 12, torch.float64, seed=5)
    monkeypatch.setattr(backends, "_budget", None)
    full = native.cost_handles(x, y, Cost(2), debias=False, cache=True)[:2]
    monkeypatch.setattr(backends, "_budget", 10 * 2 * 26 * 8)
    part = native.cost_handles(x, y, Cost(2), debias=False)[:2]
    assert part[0].rows == 10
    g = torch.Generator().manual_seed(0)
    hx, hy = torch.randn(2, 37, generator=g, dtype=torch.float64), torch.randn(2, 26, generator=g, dtype=torch.float64)
    eps = 0.7
    (F, G), (P, Q) = full, part
    assert_rel(Q.softmin(eps, hx), G.softmin(eps, hx), 1e-13, "columns")
    assert_rel(P.softmin(eps, hy), F.softmin(eps, hy), 1e-13, "rows")
    r, c = P.softmin_two(eps, hy, hx)
    assert_rel(r, F.softmin(eps, hy), 1e-13, "two: rows")
    assert_rel(c, G.softmin(eps, hx), 1e-13, "two: columns")
    assert Q.softmin_two(eps, hx, hy) is None
    fx, gx = F.softmin(eps, hy), torch.randn(2, 37, generator=g, dtype=torch.float64)
    fy, gy = G.softmin(eps, hx), torch.randn(2, 26, generator=g, dtype=torch.float64)
    sx, sy = torch.rand(2, 37, generator=g, dtype=torch.float64), torch.rand(2, 26, generator=g, dtype=torch.float64)
    for s_x, s_y in ((None, None), (sx, sy)):
        assert_rel(P.grad_x(eps, hy, fx, gx, s_y), F.grad_x(eps, hy, fx, gx, s_y), 1e-12, "grad x")
        assert_rel(Q.grad_x(eps, hx, fy, gy, s_x), G.grad_x(eps, hx, fy, gy, s_x), 1e-12, "grad y")


def test_samples_loss_gemm_path_float32():
    """D = 20 (GEMM tiles): float32 native vs the float64 reference."""
    x, y = make(1, 300, 200, 20, torch.float64)
    ref = otkernels.SamplesLoss("sinkhorn", p=2, blur=0.5, backend="tensorized")(x, y)
    out = otkernels.SamplesLoss("sinkhorn", p=2, blur=0.5, backend="native")(x.float(), y.float())
    assert_rel(out, ref, 1e-4, "D=20 float32")


# ----------------------------------------------------------------------------- dispatch, fallbacks
def test_auto_selects_native_on_cpu(monkeypatch):
    assert backends.select(1, 2000, 2000, 3, torch.device("cpu")) == "native"
    assert backends.select(1, 2000, 2000, 3, "cpu") == "native"
    assert backends.select(1, 20, 20, 3, "cpu") == "native"   # faster than the dense backend at every size measured
    assert backends.select(1, 2000, 2000, 3, "cuda:0") != "native"
    monkeypatch.setenv("OTKERNELS_DISABLE", "native")
    assert backends.available()["native"] == (False, "disabled by OTKERNELS_DISABLE")
    assert backends.select(1, 2000, 2000, 3, "cpu") == "blocked"


def test_callable_cost_and_other_dtypes_fall_back_to_blocked():
    x, y = make(1, 10, 12, 2, torch.float64)
    l1 = Cost(None, fn=lambda a, b: (a[:, :, None] - b[:, None]).abs().sum(-1))
    assert all(isinstance(hd, blocked.BlockedCost) for hd in native.cost_handles(x, y, l1))
    assert all(isinstance(hd, native.NativeCost) for hd in native.cost_handles(x, y, Cost(2)))
    hs = native.cost_handles(x.half(), y.half(), Cost(2), debias=False)
    assert isinstance(hs[0], blocked.BlockedCost)


def test_unavailable_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(native, "_state", {"ext": None, "why": None, "how": None, "tried": False})
    monkeypatch.setenv("OTKERNELS_NO_EXT", "1")
    ok, why = native.available()
    assert not ok and "OTKERNELS_NO_EXT" in why
    assert backends.available()["native"][0] is False
    # the Sinkhorn front still works through auto (torch backends)
    x, y = make(1, 60, 50, 2, torch.float32)
    assert torch.isfinite(otkernels.SamplesLoss(backend="auto")(x[0], y[0]))
    assert native.info() == {"unavailable": why}


def test_sources_are_found():
    files = [os.path.basename(f) for f in native._sources()]
    assert "bindings.cpp" in files and "softmin.cpp" in files


def test_cache_pool_reuses_memory():
    ext = native._ext()
    old = ext.set_pool_limit(1 << 30)
    try:
        a = ext.alloc_cache(1, 1024, 1024, torch.float32)  # 4 MiB: pooled sizes
        ptr = a.data_ptr()
        del a
        b = ext.alloc_cache(1, 1000, 1024, torch.float32)
        assert b.data_ptr() == ptr  # the released block comes back
        del b
        assert ext.set_pool_limit(0) == 0  # frees the pool
    finally:
        native.empty_cache()
    assert old >= 0


# ----------------------------------------------------------------------------- bad input
def test_bad_input_caught_in_python():
    x, y = make(1, 10, 12, 3, torch.float32)
    h = torch.zeros(1, 12)
    with pytest.raises(TypeError, match="dtype"):
        native.softmin_online(x.int(), y.int(), h, 0.1, 2)
    with pytest.raises(TypeError, match="dtype"):
        native.softmin_online(x, y.double(), h, 0.1, 2)
    with pytest.raises(TypeError, match="dtype"):
        native.softmin_online(x, y, h.double(), 0.1, 2)
    with pytest.raises(ValueError, match="same batch size and dimension"):
        native.softmin_online(x, y[:, :, :2], h, 0.1, 2)
    with pytest.raises(ValueError, match=r"shape \(1, 12\)"):
        native.softmin_online(x, y, torch.zeros(1, 11), 0.1, 2)
    with pytest.raises(ValueError, match=r"\(B,N,D\)"):
        native.softmin_online(x[0], y[0], h, 0.1, 2)
    C, s = native.cost_matrix(x, y, 2)
    with pytest.raises(ValueError, match=r"shape \(1, 10\)"):
        native.softmin_cached(C, s, True, h, 0.1)  # columns need h over the rows
    with pytest.raises(ValueError, match="shape"):
        native.grad_online(x, y, h, torch.zeros(1, 9), torch.zeros(1, 10), None, 0.1, 2)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        native.cost_matrix(x, y, 3)
    with pytest.raises(ValueError, match="unknown kernel"):
        native.kernel_sum_raw(x, y, h, "cauchy", 1.0)


def test_bad_input_reaching_the_extension_raises_not_crashes():
    """The C++ entry points re-check everything (RuntimeError), even bypassing Python."""
    ext = native._ext()
    x, y = make(1, 10, 12, 3, torch.float32)
    h = torch.zeros(1, 12)
    bad = [
        lambda: ext.softmin_online(x.transpose(1, 2), y, h, 0.1, 2),          # non-contiguous / shape
        lambda: ext.softmin_online(x[:, :, ::2], y[:, :, ::2], h, 0.1, 2),      # non-contiguous
        lambda: ext.softmin_online(x.double(), y, h, 0.1, 2),                   # dtype mismatch
        lambda: ext.softmin_online(x.half(), y.half(), h.half(), 0.1, 2),       # unsupported dtype
        lambda: ext.softmin_online(x, y, torch.zeros(1, 5), 0.1, 2),            # size mismatch
        lambda: ext.softmin_online(x, y, h, 0.0, 2),                            # eps
        lambda: ext.softmin_online(x, y, h, 0.1, 3),                            # p
        lambda: ext.softmin_cached(torch.zeros(1, 10, 12, dtype=torch.float64), 1.0, False, h, 0.1),
        lambda: ext.softmin_cached(torch.zeros(1, 10, 12), 1.0, False, torch.zeros(1, 10), 0.1),
        lambda: ext.grad_cached(torch.zeros(1, 10, 12), 1.0, True, x, y, h, torch.zeros(1, 10),
                                torch.zeros(1, 10), None, 0.1, 2, 10.0),
        lambda: ext.grad_online(x, y, h, torch.zeros(1, 10), torch.zeros(1, 9), None, 0.1, 2, 10.0),
        lambda: ext.kernel_sum(x, y, h, None, 7, 1.0, True, False),
        lambda: ext.kernel_sum(x, y, torch.zeros(1, 3), None, 0, 1.0, True, False),
        lambda: ext.argminmax(x, y, torch.zeros(1, 3), 0),
        lambda: ext.argminmax(x, y[:, :0], None, 1),
        lambda: ext.cost_matrix(x, y, 2, torch.zeros(1, 10, 11), 1.0),
        lambda: ext.cost_matrix(x, y, 2, torch.zeros(1, 10, 12, dtype=torch.int32), 1.0),
    ]
    for k, call in enumerate(bad):
        with pytest.raises(RuntimeError, match="otkernels native"):
            call()


def test_softmin_grad_finite_beyond_float_precision():
    """C/ε ~ 1e12 in float32: f/ε does not round-trip, but the backward reuses the forward's
    log-sum-exp, so the plan stays ≤ 1 and the gradient finite."""
    x, y = make(1, 17, 13, 2, torch.float32, scale=1e3)
    x.requires_grad_(True)
    for cache in (True, False):
        hs = native.cost_handles(x, y, Cost(2), debias=False, cache=cache)
        f = hs[0].softmin_grad(1e-6, torch.full((1, 13), -13.0 ** 0.5))
        (g,) = torch.autograd.grad(f.sum(), x)
        assert bool(torch.isfinite(g).all())
