"""Optimal transport between feature sets: entropic (Sinkhorn, any size) and exact (small sets).

* :func:`sinkhorn` is ``otkernels.SamplesLoss("sinkhorn", ...)`` on uniform weights, with the
  geomloss conventions (cost ½|x−y|² for p = 2, |x−y| for p = 1, ε = blur^p); ``debias=True``
  gives the Sinkhorn divergence S_ε, ≥ 0 and 0 for equal sets.  ``normalize=True`` first puts
  every feature vector on the unit sphere (common practice for deep features).
* :func:`exact_ot` solves the unregularised problem with cost |x−y|^p (no ½) through POT's
  network simplex (``ot.emd2``) or, for two uniform sets of equal size, scipy's
  ``linear_sum_assignment`` (an optimal plan is a permutation).  It returns W_p (``root=True``)
  or W_p^p; it builds the N×M cost matrix, so it is for reference sizes only.
"""
from __future__ import annotations

import torch

from ..samples_loss import SamplesLoss
from ._validate import as_pair, check_int

EXACT_MAX_PAIRS = 25_000_000  # N·M of exact_ot's float64 cost matrix (200 MB)


def l2_normalize(x, eps=1e-12):
    """Rows scaled to unit Euclidean norm (zero rows stay zero): (N, D) -> (N, D)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def sinkhorn(real, fake, *, blur=0.05, p=2, scaling=0.5, debias=True, normalize=False,
             backend="auto", **kwargs):
    """Sinkhorn divergence (``debias=True``) or entropic OT cost between feature sets
    real (N, D) and fake (M, D) -> 0-dim tensor, differentiable; ``kwargs`` go to
    :class:`otkernels.SamplesLoss` (e.g. ``reach``, ``diameter``)."""
    x, y = as_pair(real, fake)
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    loss = SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, debias=debias,
                       backend=backend, **kwargs)
    return loss(x, y)


@torch.no_grad()
def exact_ot(x, y, p=2, *, a=None, b=None, method="auto", root=True, max_pairs=EXACT_MAX_PAIRS):
    """Exact Wasserstein distance W_p with cost |x−y|^p -> float (W_p^p when ``root=False``).

    x (N, D), y (M, D); weights a (N,), b (M,) (default uniform; normalised to sum 1).
    method: "emd" (POT ``ot.emd2``), "assignment" (scipy; N = M and uniform weights) or
    "auto" (assignment when it applies, else emd).
    """
    x, y = as_pair(x, y, names=("x", "y"), allow_grad=False)
    p = check_int("p", p, minimum=1)
    N, M = x.shape[0], y.shape[0]
    if N * M > max_pairs:
        raise ValueError(f"exact_ot builds the {N}×{M} cost matrix ({N * M} > max_pairs = "
                         f"{max_pairs}): use sinkhorn() for large sets, or raise max_pairs")
    uniform = a is None and b is None
    if method == "auto":
        method = "assignment" if uniform and N == M else "emd"
    xd, yd = x.double().cpu(), y.double().cpu()
    c = torch.cat([xd, yd]).mean(0)
    C = torch.cdist(xd - c, yd - c, compute_mode="donot_use_mm_for_euclid_dist") ** p
    C = C.numpy()
    if method == "assignment":
        if not (uniform and N == M):
            raise ValueError("method='assignment' needs two uniform sets of the same size "
                             f"(got N = {N}, M = {M}, weights {'given' if not uniform else 'none'})")
        from scipy.optimize import linear_sum_assignment

        r, col = linear_sum_assignment(C)
        value = float(C[r, col].mean())
    elif method == "emd":
        try:
            import ot
        except ImportError as e:
            raise ImportError("exact_ot(method='emd') needs POT: pip install pot") from e
        wa = _weights("a", a, N)
        wb = _weights("b", b, M)
        value = float(ot.emd2(wa, wb, C, numItermax=max(100_000, 50 * (N + M) ** 2 // 10)))
    else:
        raise ValueError(f"method must be 'auto', 'emd' or 'assignment', got {method!r}")
    return value ** (1.0 / p) if root else value


def _weights(name, w, n):
    import numpy as np

    if w is None:
        return np.full(n, 1.0 / n)
    w = torch.as_tensor(w).detach().double().cpu().reshape(-1)
    if w.numel() != n:
        raise ValueError(f"{name} must have {n} weights, got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"{name} must be finite, non-negative weights with a positive sum")
    return (w / w.sum()).numpy()
