"""Maximum mean discrepancy: radial kernels on the backends, polynomial (KID) in GEMM tiles.

With K the kernel matrices and N, M the sample counts,

* biased  ``MMD²_b = ΣK_xx/N² + ΣK_yy/M² − 2ΣK_xy/(NM)`` (geomloss's kernel losses return
  ½·MMD²_b);
* unbiased ``MMD²_u`` drops the diagonals: ``(ΣK_xx − N·k(0))/(N(N−1)) + (ΣK_yy − M·k(0))/(M(M−1))
  − 2ΣK_xy/(NM)``.

Radial kernels (σ = bandwidth, geomloss's formulas and clamps, :class:`otkernels.costs.Kernel`):
gaussian ``exp(−|x−y|²/2σ²)``, laplacian ``exp(−|x−y|/σ)``, energy ``−|x−y|`` (its MMD² is the
energy distance).  Their sums ``Σ_j k(x_i, y_j)`` run on the backend the ``auto`` rule picks
(the fused native kernels on CPU): nothing N×M is stored, and gradients w.r.t. both feature
sets are available, so :func:`mmd2` is a training loss.  Several bandwidths sum their kernels.

Polynomial ``k(x, y) = (γ⟨x, y⟩ + c)^d`` (KID: d = 3, γ = 1/D, c = 1) is GEMM-bound: sums in
matmul tiles with a closed-form backward (:func:`polynomial_mmd2`); :func:`kid` averages the
unbiased estimate over random subsets as torch-fidelity and torchmetrics do.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import backends
from ..costs import Kernel
from ._validate import as_features, as_pair, check_int

RADIAL = Kernel.NAMES  # ("gaussian", "laplacian", "energy")
TILE = 1 << 22  # elements of one polynomial-kernel tile


# ----------------------------------------------------------------------------- bandwidths
@torch.no_grad()
def median_bandwidth(x, y=None, *, max_points=1000, seed=0) -> float:
    """Median heuristic: the median pairwise distance of the pooled samples (x and y).

    Exact when the pooled set has at most ``max_points`` points, else computed on that many
    points drawn without replacement (``seed``): the median of ~5·10⁵ distances.
    """
    x = as_features("x", x, min_samples=1, allow_grad=False)
    z = x if y is None else torch.cat([x, as_features("y", y, allow_grad=False).to(x.dtype)])
    if z.shape[0] < 2:
        raise ValueError("the median heuristic needs at least 2 points")
    max_points = check_int("max_points", max_points, minimum=2)
    if z.shape[0] > max_points:
        g = torch.Generator().manual_seed(int(seed))
        z = z[torch.randperm(z.shape[0], generator=g)[:max_points].to(z.device)]
    z = z.to(torch.float64)
    d = torch.pdist(z - z.mean(0))
    med = float(d.median())
    if med <= 0:
        raise ValueError("the median pairwise distance is 0 (most points coincide): give a bandwidth")
    return med


def _bandwidths(bandwidth, kernel, x, y):
    if kernel == "energy":
        return [1.0]  # no scale parameter
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be a number, a sequence of numbers or 'median', got {bandwidth!r}")
        return [median_bandwidth(x.detach(), y.detach())]
    seq = list(bandwidth) if isinstance(bandwidth, (list, tuple)) else [bandwidth]
    if not seq:
        raise ValueError("bandwidth is an empty sequence")
    out = []
    for s in seq:
        if isinstance(s, torch.Tensor):
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (math.isfinite(s) and s > 0):
            raise ValueError(f"bandwidth must be > 0 and finite, got {s!r}")
        out.append(float(s))
    return out


# ----------------------------------------------------------------------------- radial MMD
def _backend(backend, N, M, D, device):
    if backend == "auto":
        n = max(N, M)
        backend = backends.select(1, n, n, D, device, kind="kernel")
    return backends.get(backend)


def kernel_means(x, y, kernel="gaussian", bandwidth=1.0, *, backend="auto"):
    """``(ΣK_xx/N², ΣK_yy/M², ΣK_xy/(NM), k(0))`` as 0-dim tensors (differentiable), for one
    bandwidth; x (N, D), y (M, D)."""
    N, M, D = x.shape[0], y.shape[0], x.shape[1]
    be = _backend(backend, N, M, D, x.device)
    k = Kernel(kernel, bandwidth)
    with torch.no_grad():  # translation invariance: centre for float32 accuracy (as SamplesLoss)
        c = torch.cat([x.detach(), y.detach()]).mean(0)
    xc, yc = (x - c)[None], (y - c)[None]
    a = torch.full((1, N), 1.0 / N, dtype=x.dtype, device=x.device)
    b = torch.full((1, M), 1.0 / M, dtype=x.dtype, device=x.device)
    mxx = (be.kernel_sum(xc, xc, a, k) * a).sum()
    myy = (be.kernel_sum(yc, yc, b, k) * b).sum()
    mxy = (be.kernel_sum(xc, yc, b, k) * a).sum()
    z = torch.zeros(1, 1, D, dtype=x.dtype, device=x.device)
    k0 = k(z, z).reshape(())
    return mxx, myy, mxy, k0


def _combine(mxx, myy, mxy, k0, N, M, unbiased):
    if not unbiased:
        return mxx + myy - 2 * mxy
    return (N * mxx - k0) / (N - 1) + (M * myy - k0) / (M - 1) - 2 * mxy


def mmd2(x, y, kernel="gaussian", bandwidth=1.0, *, unbiased=False, backend="auto"):
    """Squared MMD between feature sets x (N, D) and y (M, D) -> 0-dim tensor (differentiable).

    kernel: "gaussian", "laplacian", "energy" (exact kernel sums on the backends) or
    "polynomial" (KID's cubic kernel, :func:`polynomial_mmd2`).  bandwidth: σ > 0, a sequence
    of σ's (their kernels are summed), or "median" (:func:`median_bandwidth`); ignored by
    energy and polynomial.  unbiased: drop the diagonal terms (needs N, M ≥ 2).
    backend: "auto" (:func:`otkernels.backends.select`), "tensorized", "blocked", "native", ...
    """
    if kernel == "polynomial":
        return polynomial_mmd2(x, y, unbiased=unbiased)
    if kernel not in RADIAL:
        raise ValueError(f"kernel={kernel!r} is unknown: expected one of {RADIAL + ('polynomial',)}")
    x, y = as_pair(x, y, min_samples=2 if unbiased else 1, names=("x", "y"))
    N, M = x.shape[0], y.shape[0]
    total = None
    for s in _bandwidths(bandwidth, kernel, x, y):
        v = _combine(*kernel_means(x, y, kernel, s, backend=backend), N, M, unbiased)
        total = v if total is None else total + v
    return total


# ----------------------------------------------------------------------------- polynomial
def _blocks(n, step):
    return [(i, min(n, i + step)) for i in range(0, n, step)]


class _PolySum(torch.autograd.Function):
    """``Σ_ij (γ⟨x_i, y_j⟩ + c)^d`` over GEMM tiles; x (N, D), y (M, D) -> 0-dim."""

    @staticmethod
    def forward(ctx, x, y, degree, gamma, coef0):
        N, M = x.shape[0], y.shape[0]
        bm = max(1, min(M, TILE // max(1, N)))
        bn = max(1, min(N, TILE // bm))
        acc = torch.zeros((), dtype=torch.float64, device=x.device)
        for i0, i1 in _blocks(N, bn):
            for j0, j1 in _blocks(M, bm):
                t = torch.addmm(torch.full((), coef0, dtype=x.dtype, device=x.device),
                                x[i0:i1], y[j0:j1].T, alpha=gamma)
                acc += t.pow_(degree).sum(dtype=torch.float64)
        ctx.save_for_backward(x, y)
        ctx.args = (degree, gamma, coef0, bn, bm)
        return acc.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        degree, gamma, coef0, bn, bm = ctx.args
        nx, ny = ctx.needs_input_grad[:2]
        gx = torch.zeros_like(x) if nx else None
        gy = torch.zeros_like(y) if ny else None
        scale = g * degree * gamma
        for i0, i1 in _blocks(x.shape[0], bn):
            for j0, j1 in _blocks(y.shape[0], bm):
                t = torch.addmm(torch.full((), coef0, dtype=x.dtype, device=x.device),
                                x[i0:i1], y[j0:j1].T, alpha=gamma)
                w = t.pow_(degree - 1).mul_(scale)  # ∂k/∂⟨x,y⟩ times the incoming gradient
                if nx:
                    gx[i0:i1] += w @ y[j0:j1]
                if ny:
                    gy[j0:j1] += w.T @ x[i0:i1]
        return gx, gy, None, None, None


def _poly_params(degree, gamma, coef0, D):
    degree = check_int("degree", degree, minimum=1)
    gamma = 1.0 / D if gamma is None else float(gamma)
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be None or > 0, got {gamma}")
    coef0 = float(coef0)
    if not math.isfinite(coef0):
        raise ValueError(f"coef0 must be finite, got {coef0}")
    return degree, gamma, coef0


def polynomial_mmd2(x, y, *, degree=3, gamma=None, coef0=1.0, unbiased=True):
    """MMD² with ``k(x, y) = (γ⟨x, y⟩ + c)^d`` (γ = 1/D by default: KID's kernel), x (N, D),
    y (M, D) -> 0-dim tensor; tiles of ``TILE`` elements, closed-form gradients."""
    x, y = as_pair(x, y, min_samples=2 if unbiased else 1, names=("x", "y"))
    N, M = x.shape[0], y.shape[0]
    degree, gamma, coef0 = _poly_params(degree, gamma, coef0, x.shape[1])
    sxx = _PolySum.apply(x, x, degree, gamma, coef0)
    syy = _PolySum.apply(y, y, degree, gamma, coef0)
    sxy = _PolySum.apply(x, y, degree, gamma, coef0)
    if not unbiased:
        return sxx / N ** 2 + syy / M ** 2 - 2 * sxy / (N * M)
    dx = ((x * x).sum(1) * gamma + coef0).pow(degree).sum()  # the diagonals, as computed
    dy = ((y * y).sum(1) * gamma + coef0).pow(degree).sum()
    return (sxx - dx) / (N * (N - 1)) + (syy - dy) / (M * (M - 1)) - 2 * sxy / (N * M)


@torch.no_grad()
def kid(real, fake, *, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1.0,
        seed=0, generator=None):
    """Kernel Inception Distance: unbiased polynomial MMD² on ``subsets`` random subsets of
    ``subset_size`` real and fake samples -> ``(mean, std)`` floats (std with ddof = 0).

    As torchmetrics' ``KernelInceptionDistance``: each subset draws ``randperm(N)[:m]`` of the
    real then ``randperm(M)[:m]`` of the fake samples from ``generator`` (default: a CPU
    generator seeded with ``seed``), so a generator seeded like torch's global RNG reproduces
    its subsets.  subset_size must not exceed either sample count.
    """
    x, y = as_pair(real, fake, min_samples=2, allow_grad=False)
    subsets = check_int("subsets", subsets, minimum=1)
    m = check_int("subset_size", subset_size, minimum=2)
    if m > x.shape[0] or m > y.shape[0]:
        raise ValueError(f"subset_size={m} exceeds the number of samples (real {x.shape[0]}, "
                         f"fake {y.shape[0]})")
    degree, gamma, coef0 = _poly_params(degree, gamma, coef0, x.shape[1])
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    idx = []
    for _ in range(subsets):
        ir = torch.randperm(x.shape[0], generator=g)[:m]
        iff = torch.randperm(y.shape[0], generator=g)[:m]
        idx.append((ir, iff))
    # subsets per batched matmul: kernel tiles ≤ TILE entries, gathered features ≤ 2^23 entries;
    # every chunk reuses the same three buffers (no per-chunk allocations for the heap to keep)
    D = x.shape[1]
    chunk = max(1, min(TILE // (m * m), (1 << 23) // (m * D), subsets))
    xbuf = x.new_empty(chunk * m, D)
    ybuf = y.new_empty(chunk * m, D)
    kbuf = x.new_empty(chunk, m, m)
    scores = []
    for c0 in range(0, subsets, chunk):
        sel = idx[c0:c0 + chunk]
        c = len(sel)
        xr = torch.index_select(x, 0, torch.cat([i for i, _ in sel]).to(x.device), out=xbuf[:c * m]).view(c, m, D)
        yf = torch.index_select(y, 0, torch.cat([j for _, j in sel]).to(y.device), out=ybuf[:c * m]).view(c, m, D)

        def ksum(a, b, diag):  # Σ (γ⟨a_i, b_j⟩ + c)^d over each subset's pairs (without the diagonal)
            k = torch.bmm(a, b.transpose(1, 2), out=kbuf[:c]).mul_(gamma).add_(coef0).pow_(degree)
            tot = k.sum((1, 2)).double()
            return tot - torch.diagonal(k, dim1=1, dim2=2).sum(1).double() if diag else tot

        v = (ksum(xr, xr, True) + ksum(yf, yf, True)) / (m * (m - 1)) - 2 * ksum(xr, yf, False) / m ** 2
        scores.append(v)
    scores = torch.cat(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))
