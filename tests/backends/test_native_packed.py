"""Packed-triangle storage of the symmetric caches C(x, x), C(y, y) (issue 23, native backend).

The packed layout (csrc/tiles.h, ``Packed``): row blocks of PB rows (16, 32 or 64, from N),
block b storing the columns [b·PB, N) of its rows.  Checked here: the layout itself (unpacked
in Python, against the full cache and the exact float64 cost), the packed reductions and
gradients against the full cache's (same stored values: equal to rounding), SamplesLoss
values and gradients with packed / full / no self-cost caches, and the budget (the smaller
footprint buys the self-costs a place at a budget where the full matrices did not fit).
"""
from __future__ import annotations

import pytest
import torch

import otkernels
from otkernels import backends
from otkernels.backends import native
from otkernels.costs import Cost
from otk_testing import assert_rel, clouds, value_and_grads

OK, WHY = native.available()
pytestmark = pytest.mark.skipif(not (OK and native.packed_supported()),
                                reason=f"native packed kernels unavailable: {WHY}")

DTYPES = [torch.float32, torch.float64]
DT_IDS = ["f32", "f64"]
# (B, N, D): N = 1; one block; N not a multiple of the block or the 1,024-column chunk; D ≤ 8
# (direct distances) and D > 8 (GEMM tiles); N > 1,024 (PB = 64, several chunks)
SHAPES = [(1, 1, 3), (2, 13, 2), (3, 100, 5), (2, 257, 12), (1, 1100, 9), (2, 600, 20)]
IDS = [f"B{b}N{n}D{d}" for b, n, d in SHAPES]


def block_rows(N):
    """PB of the layout (csrc/tiles.h, Packed)."""
    pb = 16
    while pb < 64 and pb * 32 < N:
        pb *= 2
    return pb


def unpack(C, N):
    """The full symmetric (B,N,N) matrix of a packed (B, numel) cache, from the documented layout."""
    pb, B = block_rows(N), C.shape[0]
    full = torch.empty(B, N, N, dtype=torch.float64)
    k = 0
    for i0 in range(0, N, pb):
        rows = min(pb, N - i0)
        blk = C[:, k:k + rows * (N - i0)].double().reshape(B, rows, N - i0)
        full[:, i0:i0 + rows, i0:] = blk
        full[:, i0:, i0:i0 + rows] = blk.transpose(1, 2)
        k += rows * (N - i0)
    assert k == C.shape[1] == native.packed_numel(N)
    return full


def exact_cost(x, p):
    x = x.double()
    d2 = ((x[:, :, None, :] - x[:, None, :, :]) ** 2).sum(-1)
    return d2 / 2 if p == 2 else d2.clamp_min(1e-8).sqrt()


def data(B, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    h = torch.randn(B, N, generator=g, dtype=torch.float64)
    h[0, : N // 3] = -100000.0  # zero weights
    return x.to(dtype), h.to(dtype)


def tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-6


@pytest.mark.parametrize("N", [1, 15, 16, 17, 511, 512, 513, 1023, 1025, 4000, 10000])
def test_packed_numel(N):
    pb = block_rows(N)
    want = sum(min(pb, N - i0) * (N - i0) for i0 in range(0, N, pb))
    assert native.packed_numel(N) == want
    assert want <= N * (N + pb) / 2  # ≈ N²/2 + N·PB/2


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_cost_packed_is_the_triangle(shape, dtype, p):
    """Unpacked, the packed cache is the full cache (exact diagonal too) and the exact cost."""
    B, N, D = shape
    x, _ = data(B, N, D, dtype)
    Kp, sp = native.cost_packed(x, p)
    Kf, sf = native.cost_matrix(x, x, p)
    assert Kp.shape == (B, native.packed_numel(N)) and Kp.dtype == dtype and sp == sf == 1.0
    U = unpack(Kp, N)
    assert_rel(U, Kf.double(), 1e-13 if dtype == torch.float64 else 1e-5, "packed vs full")
    assert_rel(U, exact_cost(x, p), 1e-12 if dtype == torch.float64 else 1e-5, "packed vs exact")
    diag = U.diagonal(dim1=1, dim2=2)
    assert bool((diag == (1e-4 if p == 1 else 0.0) if dtype == torch.float64 else
                 (diag - (1e-4 if p == 1 else 0.0)).abs() < 1e-9).all())


@pytest.mark.parametrize("store", [torch.bfloat16, torch.float16])
def test_cost_packed_16bit(store):
    x, h = data(2, 300, 3, torch.float32)
    x = 30 * x  # large costs: float16 needs its scale
    Kp, sp = native.cost_packed(x, 2, dtype=store)
    Kf, sf = native.cost_matrix(x, x, 2, dtype=store)
    assert Kp.dtype == store and sp == sf
    assert_rel(unpack(Kp, 300), Kf.double(), 0.0, "16-bit packed vs full (same stored values)")
    lse = native.lse_packed(Kp, sp, h, 50.0)
    assert_rel(lse, native.lse_cached_two(Kf, sf, h, None, 50.0, sym=True)[0], 2e-6, "16-bit lse")
    g = torch.ones(2, 300)
    assert_rel(native.grad_packed(Kp, sp, x, h, lse, g, None, 50.0, 2, -1.0),
               native.grad_cached(Kf, sf, False, x, x, h, lse, g, None, 50.0, 2, -1.0), 1e-6, "16-bit grad")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_lse_and_grad_packed_match_full(shape, dtype, p, threads):
    """The packed sym pass and gradient vs the full cache's (its triangle pass, its gradient)
    and the dense float64 log-sum-exp; gradients with and without the weights s, with the
    forward's fscale = −1 and with a potential (fscale = 1/ε)."""
    B, N, D = shape
    x, h = data(B, N, D, dtype)
    eps = 0.05 * D + 0.3
    Kp, sp = native.cost_packed(x, p)
    Kf, sf = native.cost_matrix(x, x, p)
    g = torch.Generator().manual_seed(1)
    gi = torch.randn(B, N, generator=g, dtype=torch.float64).to(dtype)
    s = torch.rand(B, N, generator=g, dtype=torch.float64).to(dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lp = native.lse_packed(Kp, sp, h, eps)
        lf = native.lse_cached_two(Kf, sf, h, None, eps, sym=True)[0]
        grads = [(native.grad_packed(Kp, sp, x, h, f, gi, w, eps, p, fs),
                  native.grad_cached(Kf, sf, False, x, x, h, f, gi, w, eps, p, fs))
                 for f, fs in ((lp, -1.0), (-eps * lp, None)) for w in (None, s)]
    finally:
        torch.set_num_threads(old)
    ref = (h.double()[:, None, :] - exact_cost(x, p) / eps).logsumexp(-1)
    assert lp.dtype == dtype and lp.shape == (B, N)
    assert_rel(lp, lf, tol(dtype), "lse packed vs full")
    assert_rel(-eps * lp, -eps * ref, 1e-12 if dtype == torch.float64 else 1e-5, "lse packed vs float64")
    for k, (gp, gf) in enumerate(grads):
        assert gp.shape == (B, N, D)
        assert_rel(gp, gf, 1e-12 if dtype == torch.float64 else 1e-5, f"grad {k} packed vs full")


def _losses(monkeypatch, mode, x, y, a, b, **kw):
    """Value and gradients (a, x, b, y) of SamplesLoss with C_xx, C_yy cached packed / full /
    not at all (C_xy cached in every mode)."""
    monkeypatch.setattr(native, "PACKED_SELF", mode != "full")
    monkeypatch.setattr(backends, "_budget", 0 if mode == "online" else 1 << 30)
    hs = native.cost_handles(x, y, Cost(kw["p"]), debias=True)
    want = {"packed": (True, True), "full": (True, False), "online": (False, False)}[mode]
    for H in hs[2:]:
        assert (H.cache is not None, H.packed) == want, mode
    if mode == "packed":
        assert hs[2].cache.numel() == x.shape[0] * native.packed_numel(x.shape[1])
    L = otkernels.SamplesLoss("sinkhorn", backend="native", **kw)
    return value_and_grads(L, dict(a=a, x=x, b=b, y=y))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("NMD", [(1, 1, 3), (37, 29, 3), (70, 45, 12), (530, 130, 10)],
                         ids=["N1", "small", "gemm", "blocks"])
def test_samples_loss_packed_full_online(monkeypatch, NMD, dtype, p):
    """Sinkhorn divergence (debias) batched (B = 2): the value and the gradients w.r.t. both
    clouds and both weights with packed self-costs equal the full caches' and the recomputed
    tiles'."""
    N, M, D = NMD
    x, y, a, b = clouds(N, M, D, B=2, dtype=dtype, seed=4)
    kw = dict(p=p, blur=0.3 if p == 2 else 0.5, debias=True)
    out = {mode: _losses(monkeypatch, mode, x, y, a, b, **kw) for mode in ("packed", "full", "online")}
    t = {"full": 1e-12, "online": 1e-11} if dtype == torch.float64 else {"full": 1e-5, "online": 1e-4}
    v0, g0 = out["packed"]
    assert v0.shape == (2,)
    for mode in ("full", "online"):
        v, g = out[mode]
        assert_rel(v0, v, t[mode], f"{mode}: value")
        for k in g:
            assert_rel(g0[k], g[k], t[mode] * (10 if dtype == torch.float32 else 1), f"{mode}: grad {k}")


def test_hausdorff_and_unbalanced_packed(monkeypatch):
    """The other users of C(x, x), C(y, y): the Hausdorff divergence and unbalanced Sinkhorn."""
    x, y, a, b = clouds(45, 33, 4, B=2, seed=2)
    for loss, kw in (("hausdorff", dict(p=2, blur=0.3)), ("sinkhorn", dict(p=1, blur=0.5, reach=0.7))):
        res = {}
        monkeypatch.setattr(backends, "_budget", 1 << 30)
        for mode in ("packed", "full"):
            monkeypatch.setattr(native, "PACKED_SELF", mode == "packed")
            res[mode] = value_and_grads(otkernels.SamplesLoss(loss, backend="native", **kw), dict(a=a, x=x, b=b, y=y))
        assert_rel(res["packed"][0], res["full"][0], 1e-12, f"{loss} value")
        for k in res["full"][1]:
            assert_rel(res["packed"][1][k], res["full"][1][k], 1e-12, f"{loss} grad {k}")


def test_budget_counts_the_triangle(monkeypatch):
    """A budget that holds C_xy and the packed C_xx, C_yy but not their full matrices caches
    the self-costs now (packed); it did not before (PACKED_SELF off: the full footprint)."""
    B, N, M, D = 2, 300, 200, 3
    x, y = torch.randn(B, N, D), torch.randn(B, M, D)
    item = 4
    xy, packed = B * N * M * item, B * (native.packed_numel(N) + native.packed_numel(M)) * item
    full = B * (N * N + M * M) * item
    assert packed < full
    budget = xy + (packed + full) // 2  # between the two footprints
    monkeypatch.setattr(backends, "_budget", budget)
    hs = native.cost_handles(x, y, Cost(2))
    assert hs[0].cache is not None
    for H, n in zip(hs[2:], (N, M)):
        assert H.packed and H.cache.shape == (B, native.packed_numel(n))
    stored = sum(h.cache.numel() * h.cache.element_size() for h in (hs[0], hs[2], hs[3]))
    assert stored == xy + packed <= budget
    assert "(upper triangle)" in backends.describe_cache(hs)
    monkeypatch.setattr(native, "PACKED_SELF", False)
    hs = native.cost_handles(x, y, Cost(2))
    # the full C_xx fits what C_xy left, the full C_yy no longer does
    assert hs[0].cache is not None and hs[2].cache.shape == (B, N, N) and not hs[2].packed and hs[3].cache is None
    # a budget with room for the packed C_xx only: C_yy recomputed
    monkeypatch.setattr(native, "PACKED_SELF", True)
    monkeypatch.setattr(backends, "_budget", xy + B * native.packed_numel(N) * item)
    hs = native.cost_handles(x, y, Cost(2))
    assert hs[2].packed and hs[3].cache is None


def test_cache_forcing(monkeypatch):
    """``cache=True`` caches every cost (self-costs packed) whatever the budget; ``False`` none."""
    x, y = torch.randn(1, 50, 3), torch.randn(1, 40, 3)
    monkeypatch.setattr(backends, "_budget", 0)
    hs = native.cost_handles(x, y, Cost(2), cache=True)
    assert all(h.cache is not None for h in hs) and hs[2].packed and hs[3].packed and not hs[0].packed
    monkeypatch.setattr(backends, "_budget", 1 << 30)
    hs = native.cost_handles(x, y, Cost(2), cache=False)
    assert all(h.cache is None for h in hs)


def test_packed_bad_input():
    x = torch.randn(1, 20, 3, dtype=torch.float64)
    K, s = native.cost_packed(x, 2)
    with pytest.raises(ValueError, match="symmetric"):
        native.NativeCost(x, torch.randn(1, 20, 3, dtype=torch.float64), Cost(2), cache=K, packed=True)
    with pytest.raises(ValueError):
        native.lse_packed(K, s, torch.zeros(1, 21, dtype=torch.float64), 1.0)  # not this N's layout
    h = torch.zeros(1, 20, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="packed cache"):
        native._ext().softmin_cached_two(K[:, :-1].contiguous(), 1.0, h, h, 1.0, True)
    with pytest.raises(RuntimeError, match="needs sym"):
        native._ext().softmin_cached_two(K, 1.0, h, h, 1.0, False)
    with pytest.raises(RuntimeError, match="y must be x"):
        native._ext().cost_matrix(x, x.clone(), 2, K, 1.0)
    with pytest.raises(RuntimeError, match="b must be a"):
        native._ext().grad_cached(K, 1.0, False, x, x.clone(), h, h, h, None, 1.0, 2, -1.0)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        native.cost_packed(x, 3)
