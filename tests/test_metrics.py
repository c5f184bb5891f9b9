"""otkernels.metrics against its references: prdc, scipy (pytorch-fid's FID formula),
torchmetrics (FID, KID), geomloss (kernel losses = ½·biased MMD²), POT (exact OT), and naive
dense torch formulas (values and gradients); plus bad input."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from otkernels import metrics
from otkernels.metrics import neighbours

from otk_testing import assert_rel

try:
    import prdc as prdc_ref
except ImportError:  # pragma: no cover
    prdc_ref = None
try:
    import ot
except ImportError:  # pragma: no cover
    ot = None
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
    HAS_TM = True
except ImportError:  # pragma: no cover
    HAS_TM = False

needs_prdc = pytest.mark.skipif(prdc_ref is None, reason="prdc is not installed")
needs_pot = pytest.mark.skipif(ot is None, reason="POT is not installed")
needs_tm = pytest.mark.skipif(not HAS_TM, reason="torchmetrics is not installed")


def feats(N, D, seed=0, shift=0.0, dtype=torch.float64, scale=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    if scale is not None:  # anisotropic: a random rotation of axis scales
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        x = (x * scale) @ q
    return (x + shift).to(dtype)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64×… elements: several row and column blocks even on small sets."""
    monkeypatch.setattr(neighbours, "TILE", 64 * 50)
    monkeypatch.setattr(neighbours, "CENTERED_COLS", 50)  # float32: tiles centred on the fly


def quiet_prdc(real, fake, k):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sample counts
        return prdc_ref.compute_prdc(real, fake, nearest_k=k)


# ============================================================================= FID
def fid_scipy(mu1, s1, mu2, s2, eps=1e-6):
    """The pytorch-fid formula: scipy sqrtm of Σ₁Σ₂, ε-offset fallback, real part."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("structured", [False, True], ids=["isotropic", "anisotropic"])
def test_fid_vs_scipy(structured):
    D = 24
    scale = torch.logspace(-2, 1, D, dtype=torch.float64) if structured else None
    x = feats(700, D, 0, scale=scale)
    y = feats(600, D, 1, shift=0.3, scale=scale)
    xn, yn = x.numpy(), y.numpy()
    ref = fid_scipy(xn.mean(0), np.cov(xn, rowvar=False), yn.mean(0), np.cov(yn, rowvar=False))
    val = metrics.fid(x, y)
    assert abs(val - ref) <= 1e-6 * abs(ref), (val, ref)
    assert abs(metrics.fid(x, y, method="sqrtm") - ref) <= 1e-9 * abs(ref)
    assert abs(metrics.fid(x, x)) <= 1e-9 * abs(ref)  # same set: 0 up to round-off


@needs_tm
def test_fid_vs_torchmetrics():
    D = 16

    class Identity(torch.nn.Module):
        num_features = D

        def forward(self, z):
            return z

    x, y = feats(500, D, 2, shift=0.5), feats(400, D, 3)
    tm = FrechetInceptionDistance(feature=Identity())
    tm.update(x, real=True)
    tm.update(y, real=False)
    ref = float(tm.compute())
    assert abs(metrics.fid(x, y) - ref) <= 1e-6 * abs(ref)


def test_feature_stats_streaming():
    x = feats(1000, 12, 4, shift=1e4)  # far from the origin: Σxxᵀ − Nμμᵀ would cancel
    stats = metrics.FeatureStats()
    for lo, hi in [(0, 1), (1, 250), (250, 251), (251, 1000)]:
        stats.update(x[lo:hi])
    xn = x.numpy()
    np.testing.assert_allclose(stats.mean.numpy(), xn.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(xn - xn.mean(0), rowvar=False), rtol=1e-10, atol=1e-10)
    a = metrics.FeatureStats().update(x[:300])
    b = metrics.FeatureStats().update(x[300:].float())  # float32 batches are promoted
    a.merge(b)
    assert a.count == 1000
    np.testing.assert_allclose(a.cov.numpy(), np.cov(np.concatenate([xn[:300], x[300:].float().double().numpy()]),
                                                     rowvar=False), rtol=1e-9, atol=1e-9)
    # fid from batches / stats equals fid from the matrices
    y = feats(800, 12, 5, shift=1e4 + 0.2)
    ref = metrics.fid(x, y)
    assert math.isclose(metrics.fid(list(x.split(128)), metrics.FeatureStats.of(y)), ref, rel_tol=1e-9)


def test_fid_singular_covariance_warns():
    D = 40
    x, y = feats(25, D, 6), feats(30, D, 7, shift=0.2)  # N < D: rank-deficient covariances
    with pytest.warns(RuntimeWarning, match="singular"):
        val = metrics.fid(x, y)
    assert math.isfinite(val)
    # the eigenvalues of Σ₁^½Σ₂Σ₁^½ and Σ₂^½Σ₁Σ₂^½ agree: the value is symmetric
    with pytest.warns(RuntimeWarning, match="singular"):
        assert math.isclose(metrics.fid(y, x), val, rel_tol=1e-8)
    # and matches the scipy formula (which needs no offset here) to its accuracy
    xn, yn = x.numpy(), y.numpy()
    ref = fid_scipy(xn.mean(0), np.cov(xn, rowvar=False), yn.mean(0), np.cov(yn, rowvar=False))
    assert abs(val - ref) <= 1e-6 * abs(ref)


def test_fid_bad_input():
    x = feats(50, 8)
    with pytest.raises(ValueError, match="same feature dimension"):
        metrics.fid(x, feats(50, 9))
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="fake contains NaN"):
        metrics.fid(x, bad)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.fid(x, x[:1])
    with pytest.raises(ValueError, match=r"sigma1 must have shape \(D, D\)"):
        metrics.frechet_distance(torch.zeros(3), torch.eye(4), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="method"):
        metrics.fid(x, x, method="svd")


# ============================================================================= MMD
def naive_kernel(name, sigma, x, y):
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    if name == "gaussian":
        return torch.exp(-d2 / (2 * sigma ** 2))
    if name == "laplacian":  # geomloss's clamps (gradient 0 at coincident points)
        return torch.exp(-(d2 / sigma ** 2).clamp_min(1e-8).sqrt())
    return -d2.clamp_min(1e-8).sqrt()


def naive_mmd2(name, sigma, x, y, unbiased):
    kxx, kyy, kxy = (naive_kernel(name, sigma, a, b) for a, b in ((x, x), (y, y), (x, y)))
    N, M = x.shape[0], y.shape[0]
    if not unbiased:
        return kxx.mean() + kyy.mean() - 2 * kxy.mean()
    return ((kxx.sum() - kxx.diagonal().sum()) / (N * (N - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (M * (M - 1)) - 2 * kxy.mean())


@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "energy"])
def test_mmd_vs_geomloss(kernel, backend):
    import geomloss

    x, y = feats(300, 5, 8), feats(250, 5, 9, shift=0.4)
    ref = geomloss.SamplesLoss(kernel, blur=1.5, backend="tensorized")(x, y)
    val = metrics.mmd2(x, y, kernel, 1.5, backend=backend)
    assert_rel(val, 2 * ref, 1e-9, f"{kernel} biased MMD² vs 2 × geomloss")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "energy"])
def test_mmd_value_and_gradient_vs_naive(kernel, unbiased, dtype, backend):
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    x = feats(200, 6, 10, dtype=dtype)
    y0 = feats(170, 6, 11, shift=0.3, dtype=dtype)
    y = y0.clone().requires_grad_()
    val = metrics.mmd2(x, y, kernel, 2.0, unbiased=unbiased, backend=backend)
    (g,) = torch.autograd.grad(val, y)
    yr = y0.double().requires_grad_()
    ref = naive_mmd2(kernel, 2.0, x.double(), yr, unbiased)
    (gref,) = torch.autograd.grad(ref, yr)
    assert_rel(val, ref, tol, "value")
    assert_rel(g, gref, tol if dtype == torch.float64 else 1e-3, "gradient w.r.t. fake")


def test_mmd_bandwidths_and_median():
    from scipy.spatial.distance import pdist

    x, y = feats(150, 4, 12), feats(120, 4, 13, shift=0.5)
    single = [metrics.mmd2(x, y, "gaussian", s) for s in (0.5, 2.0)]
    assert_rel(metrics.mmd2(x, y, "gaussian", [0.5, 2.0]), single[0] + single[1], 1e-12, "sum of kernels")
    med = np.median(pdist(torch.cat([x, y]).numpy()))
    assert math.isclose(metrics.median_bandwidth(x, y), med, rel_tol=1e-12)
    assert_rel(metrics.mmd2(x, y, "gaussian", "median"), metrics.mmd2(x, y, "gaussian", med), 1e-12, "median")
    sub = metrics.median_bandwidth(x, y, max_points=100)  # subsampled: close, not equal
    assert abs(sub - med) < 0.15 * med


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_polynomial_mmd_value_and_gradient(unbiased, monkeypatch):
    from otkernels.metrics import mmd as mmd_mod

    monkeypatch.setattr(mmd_mod, "TILE", 97 * 31)  # several tiles, ragged edges
    x = feats(210, 7, 14)
    y0 = feats(190, 7, 15, shift=0.2)
    y = y0.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    val = metrics.polynomial_mmd2(xg, y, unbiased=unbiased)
    gx, gy = torch.autograd.grad(val, (xg, y))
    xr, yr = x.clone().requires_grad_(), y0.clone().requires_grad_()
    k = lambda a, b: (a @ b.T / 7 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(xr, xr), k(yr, yr), k(xr, yr)
    N, M = 210, 190
    if unbiased:
        ref = ((kxx.sum() - kxx.diagonal().sum()) / (N * (N - 1))
               + (kyy.sum() - kyy.diagonal().sum()) / (M * (M - 1)) - 2 * kxy.mean())
    else:
        ref = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    gxr, gyr = torch.autograd.grad(ref, (xr, yr))
    assert_rel(val, ref, 1e-10, "polynomial MMD²")
    assert_rel(gx, gxr, 1e-10, "gradient x")
    assert_rel(gy, gyr, 1e-10, "gradient y")
    assert_rel(metrics.mmd2(x, y0, "polynomial", unbiased=unbiased), ref, 1e-10, "mmd2(kernel='polynomial')")
    if HAS_TM and unbiased:
        m = 190  # torchmetrics' estimator needs equal sizes
        assert_rel(metrics.polynomial_mmd2(x[:m], y0), poly_mmd(x[:m], y0), 1e-10, "vs torchmetrics poly_mmd")


@needs_tm
@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_vs_torchmetrics():
    D = 8

    x, y = feats(400, D, 16, shift=0.1), feats(350, D, 17)
    tm = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=7, subset_size=120)
    tm.update(x, real=True)
    tm.update(y, real=False)
    torch.manual_seed(1234)
    ref_mean, ref_std = (float(v) for v in tm.compute())
    mean, std = metrics.kid(x, y, subsets=7, subset_size=120, generator=torch.Generator().manual_seed(1234))
    assert math.isclose(mean, ref_mean, rel_tol=1e-9), (mean, ref_mean)
    assert math.isclose(std, ref_std, rel_tol=1e-7), (std, ref_std)
    # subsets = all samples: every subset gives the full unbiased estimate
    mean, std = metrics.kid(x[:350], y, subsets=3, subset_size=350)
    full = float(metrics.polynomial_mmd2(x[:350], y))
    assert math.isclose(mean, full, rel_tol=1e-9) and std < 1e-9 * abs(full)


def test_mmd_bad_input():
    x = feats(20, 3)
    with pytest.raises(ValueError, match="kernel="):
        metrics.mmd2(x, x, "cauchy")
    with pytest.raises(ValueError, match="bandwidth"):
        metrics.mmd2(x, x, "gaussian", -1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        metrics.mmd2(x, x, "gaussian", "mean")
    with pytest.raises(ValueError, match="y has 1 samples"):
        metrics.mmd2(x, x[:1], unbiased=True)
    with pytest.raises(ValueError, match="same feature dimension"):
        metrics.mmd2(x, feats(20, 4))
    with pytest.raises(ValueError, match="subset_size=50 exceeds"):
        metrics.kid(x, x, subset_size=50)
    with pytest.raises(TypeError, match="x must hold floating-point"):
        metrics.mmd2(torch.ones(4, 3, dtype=torch.long), x)


# ============================================================================= k-NN, PRDC
@pytest.mark.parametrize("tiles", ["one", "small"])
def test_knn_vs_brute_force(tiles, request):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    x, y = feats(230, 5, 18), feats(170, 5, 19)
    d, i = metrics.knn(x, None, 4)
    full = torch.cdist(x, x)
    full.fill_diagonal_(float("inf"))
    dr, ir = full.topk(4, dim=1, largest=False)
    assert_rel(d, dr, 1e-12, "self k-NN distances")
    assert torch.equal(i, ir)
    d, i = metrics.knn(x, y, 3)
    dr, ir = torch.cdist(x, y).topk(3, dim=1, largest=False)
    assert_rel(d, dr, 1e-12, "cross k-NN distances")
    assert torch.equal(i, ir)
    d32, _ = metrics.knn(x.float(), None, 4)
    assert d32.dtype == torch.float32
    assert_rel(d32, metrics.knn(x, None, 4)[0], 1e-5, "float32 k-NN")


@needs_prdc
@pytest.mark.parametrize("tiles", ["one", "small"])
def test_knn_radii_vs_prdc(tiles, request):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    from prdc.prdc import compute_nearest_neighbour_distances

    x = feats(300, 6, 20)
    for k in (1, 3, 5):
        ref = compute_nearest_neighbour_distances(x.numpy(), k)
        assert_rel(metrics.knn_radii(x, k), torch.from_numpy(ref), 1e-12, f"radii k={k}")


@needs_prdc
@pytest.mark.parametrize("tiles", ["one", "small"])
@pytest.mark.parametrize("k", [3, 5])
def test_prdc_vs_prdc_package(k, tiles, request):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    real, fake = feats(600, 8, 21), feats(500, 8, 22, shift=0.25)
    ref = quiet_prdc(real.numpy(), fake.numpy(), k)
    got = metrics.prdc(real, fake, k)
    assert got == pytest.approx({n: float(v) for n, v in ref.items()}, abs=1e-15), (got, ref)
    # the package's split defaults: precision/recall k=3, density/coverage k=5
    pr = metrics.precision_recall(real, fake, k=k)
    dc = metrics.density_coverage(real, fake, k=k)
    assert pr == {n: got[n] for n in ("precision", "recall")}
    assert dc == {n: got[n] for n in ("density", "coverage")}


@needs_prdc
def test_prdc_split_k_and_float32():
    real, fake = feats(500, 6, 23), feats(450, 6, 24, shift=0.3)
    got = metrics.prdc(real, fake)  # k_pr = 3, k_dc = 5
    r3 = quiet_prdc(real.numpy(), fake.numpy(), 3)
    r5 = quiet_prdc(real.numpy(), fake.numpy(), 5)
    assert got["precision"] == r3["precision"] and got["recall"] == r3["recall"]
    assert got["density"] == pytest.approx(r5["density"], abs=1e-15) and got["coverage"] == r5["coverage"]
    # float32 features: prdc computes in float64 and rounds; decisions agree on this data
    r32 = quiet_prdc(real.float().numpy(), fake.float().numpy(), 3)
    g32 = metrics.prdc(real.float(), fake.float(), 3)
    for n in r32:
        assert abs(g32[n] - float(r32[n])) <= 1.0 / 450, (n, g32[n], r32[n])


@needs_prdc
@pytest.mark.parametrize("tiles", ["one", "small"])
def test_prdc_float32_far_from_the_origin(tiles, request):
    """float32 features whose mean is far from the origin (post-ReLU Inception features are):
    the tiles are centred on the fly (no centred copy of the sets), so the decisions match
    prdc's float64 computation on the same float32 data."""
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    real, fake = feats(400, 16, 25) + 300.0, feats(350, 16, 26, shift=0.3) + 300.0
    r32, f32 = real.float(), fake.float()
    ref = quiet_prdc(r32.double().numpy(), f32.double().numpy(), 3)
    got = metrics.prdc(r32, f32, 3)
    for n in ref:
        assert abs(got[n] - float(ref[n])) <= 2.0 / 350, (n, got[n], ref[n])


@needs_prdc
@pytest.mark.parametrize("k", [2, 4])
def test_prdc_lattice_ties(k, request):
    """Integer points with many exact ties and duplicates: strict comparisons as prdc."""
    request.getfixturevalue("small_tiles")
    g = torch.Generator().manual_seed(25)
    real = torch.randint(0, 5, (400, 3), generator=g).double()
    fake = torch.randint(0, 6, (300, 3), generator=g).double()
    ref = quiet_prdc(real.numpy(), fake.numpy(), k)
    got = metrics.prdc(real, fake, k)
    assert got == {n: float(v) for n, v in ref.items()}


def test_prdc_bad_input():
    real, fake = feats(6, 3), feats(10, 3)
    with pytest.raises(ValueError, match=r"real has 5 samples.*k = 5 need at least k \+ 1 = 6"):
        metrics.prdc(real[:5], fake)  # k_dc = 5 needs 6
    with pytest.raises(ValueError, match=r"fake has 3 samples"):
        metrics.precision_recall(real, fake[:3], k=3)
    with pytest.raises(ValueError, match="same feature dimension"):
        metrics.prdc(real, feats(10, 4))
    bad = fake.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="fake contains Inf"):
        metrics.prdc(real, bad)
    with pytest.raises(ValueError, match=r"must be a \(N, D\) matrix"):
        metrics.prdc(real[None], fake)
    with pytest.raises(ValueError, match="k must be >= 1"):
        metrics.knn(real, None, 0)


# ============================================================================= mode mixture
def test_mode_mixture_values():
    probs = torch.tensor([[0.90, 0.05, 0.05, 0.0], [0.5, 0.5, 0.0, 0.0], [0.1, 0.85, 0.05, 0.0],
                          [0.79, 0.2, 0.01, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    r = metrics.mode_mixture(probs)
    assert r["mmr"] == pytest.approx(2 / 5)
    assert r["histogram"].tolist() == [3, 1, 1, 0]  # ties go to the first class
    assert r["missing_classes"] == 1 and r["num_classes"] == 4
    assert metrics.mode_mixture(probs, threshold=0.5)["mmr"] == 0.0
    logits = torch.log(probs.clamp_min(1e-30))
    assert metrics.mode_mixture(logits=logits)["mmr"] == pytest.approx(2 / 5)
    lin = torch.nn.Linear(3, 4).double()
    z = feats(37, 3, 26)
    p = metrics.classify(lin, z, batch_size=8)
    assert torch.allclose(p, torch.softmax(lin(z), 1).detach(), atol=1e-15)


def test_mode_mixture_bad_input():
    probs = torch.full((5, 3), 1 / 3)
    with pytest.raises(ValueError, match="exactly one of probs"):
        metrics.mode_mixture()
    with pytest.raises(ValueError, match="exactly one of probs"):
        metrics.mode_mixture(probs, logits=probs)
    with pytest.raises(ValueError, match="not probabilities.*logits="):
        metrics.mode_mixture(probs * 2)
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        metrics.mode_mixture(probs[:, 0])
    with pytest.raises(ValueError, match="expected num_classes = 4"):
        metrics.mode_mixture(probs, num_classes=4)
    with pytest.raises(ValueError, match="threshold"):
        metrics.mode_mixture(probs, threshold=1.5)
    with pytest.raises(ValueError, match=r"classifier must return a \(8, C\)"):
        metrics.classify(lambda b: b.sum(1), feats(20, 3), batch_size=8)


# ============================================================================= OT
@needs_pot
@pytest.mark.parametrize("p", [1, 2])
def test_exact_ot_vs_pot(p):
    x, y = feats(60, 3, 27), feats(45, 3, 28, shift=0.5)
    M = ot.dist(x.numpy(), y.numpy(), metric="sqeuclidean")
    M = M if p == 2 else np.sqrt(M)
    ref = ot.emd2(np.full(60, 1 / 60), np.full(45, 1 / 45), M)
    assert math.isclose(metrics.exact_ot(x, y, p, root=False), ref, rel_tol=1e-10)
    assert math.isclose(metrics.exact_ot(x, y, p), ref ** (1 / p), rel_tol=1e-10)
    a = torch.rand(60, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    ref_w = ot.emd2((a / a.sum()).numpy(), np.full(45, 1 / 45), M)
    assert math.isclose(metrics.exact_ot(x, y, p, a=a, root=False), ref_w, rel_tol=1e-10)
    # equal sizes: the assignment solver and the network simplex agree
    z = y[:40]
    assert math.isclose(metrics.exact_ot(x[:40], z, p, method="assignment"),
                        metrics.exact_ot(x[:40], z, p, method="emd"), rel_tol=1e-10)


def test_sinkhorn_metric():
    from otkernels import SamplesLoss

    x, y = feats(120, 2, 29), feats(100, 2, 30, shift=1.0)
    val = metrics.sinkhorn(x, y, blur=0.05)
    assert_rel(val, SamplesLoss("sinkhorn", p=2, blur=0.05)(x, y), 1e-12, "sinkhorn")
    # small blur: S_ε → ½ W₂² (cost ½|x−y|²)
    w2sq = metrics.exact_ot(x, y, 2, root=False, method="emd") if ot is not None else None
    if w2sq is not None:
        close = float(metrics.sinkhorn(x, y, blur=0.01, scaling=0.9))
        assert abs(close - w2sq / 2) < 0.03 * w2sq / 2
    n = metrics.sinkhorn(x, y, normalize=True)
    assert_rel(n, SamplesLoss("sinkhorn", p=2, blur=0.05)(metrics.l2_normalize(x), metrics.l2_normalize(y)),
               1e-12, "normalized")


def test_exact_ot_bad_input():
    x = feats(30, 2)
    with pytest.raises(ValueError, match="max_pairs"):
        metrics.exact_ot(x, x, max_pairs=100)
    with pytest.raises(ValueError, match="assignment"):
        metrics.exact_ot(x, x[:20], method="assignment")
    with pytest.raises(ValueError, match="b must have 30 weights"):
        metrics.exact_ot(x, x, b=torch.ones(29), method="emd")


# ============================================================================= evaluate
def test_evaluate_matches_the_functions():
    real, fake = feats(260, 6, 31), feats(240, 6, 32, shift=0.3)
    logits = feats(240, 10, 33) * 3
    out = metrics.evaluate(real, fake, metrics=metrics.DEFAULT_METRICS + ("mmr", "exact_ot"),
                           classifier_logits=logits, kid_subsets=10, progress=True, timings=True)
    assert all(isinstance(v, float) for v in out.values()), out
    assert out["fid"] == pytest.approx(metrics.fid(real, fake), rel=1e-12)
    assert out["sinkhorn"] == pytest.approx(float(metrics.sinkhorn(real, fake)), rel=1e-12)
    bw = metrics.median_bandwidth(real, fake)
    assert out["mmd_bandwidth"] == bw
    assert out["mmd2"] == pytest.approx(float(metrics.mmd2(real, fake, "gaussian", bw, unbiased=True)), rel=1e-10)
    assert out["mmd2_biased"] == pytest.approx(float(metrics.mmd2(real, fake, "gaussian", bw)), rel=1e-10)
    assert {n: out[n] for n in ("precision", "recall")} == metrics.precision_recall(real, fake, 3)
    assert {n: out[n] for n in ("density", "coverage")} == metrics.density_coverage(real, fake, 5)
    kid_m, kid_s = metrics.kid(real, fake, subsets=10, subset_size=240)
    assert (out["kid_mean"], out["kid_std"]) == (kid_m, kid_s)
    r = metrics.mode_mixture(logits=logits)
    assert out["mmr"] == r["mmr"] and out["missing_classes"] == r["missing_classes"]
    assert out["w2"] == metrics.exact_ot(real, fake, 2)
    assert all(out[f"time_{n}"] >= 0 for n in ("sinkhorn", "mmd", "fid", "prdc", "kid", "mmr", "exact_ot"))


def test_evaluate_bad_input():
    real, fake = feats(40, 4), feats(30, 4)
    with pytest.raises(ValueError, match=r"same feature dimension.*real \(40, 4\) and fake \(30, 5\)"):
        metrics.evaluate(real, feats(30, 5))
    bad = fake.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="fake contains NaN"):
        metrics.evaluate(real, bad)
    with pytest.raises(ValueError, match=r"fake has 3 samples.*k_pr = 3 need at least 4"):
        metrics.evaluate(real, fake[:3], metrics=("prdc",))
    with pytest.raises(ValueError, match=r"real has 5 samples.*max\(k_pr, k_dc\) = 5 need at least 6"):
        metrics.evaluate(real[:5], fake, metrics=("prdc", "fid"))
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.evaluate(real, fake, metrics=("fid", "inception_score"))
    with pytest.raises(ValueError, match="needs classifier_probs"):
        metrics.evaluate(real, fake, metrics=("mmr",))
    with pytest.raises(ValueError, match="31 rows but fake has 30"):
        metrics.evaluate(real, fake, classifier_probs=torch.full((31, 2), 0.5))
    with pytest.raises(ValueError, match="classifier_probs are not probabilities"):
        metrics.evaluate(real, fake, classifier_probs=torch.full((30, 2), 0.7))
