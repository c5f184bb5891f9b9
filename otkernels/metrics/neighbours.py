"""k-nearest-neighbour metrics without a distance matrix: improved precision/recall
(Kynkäänniemi et al., 2019) and density/coverage (Naeem et al., 2020), as the ``prdc`` package.

Every pass computes squared distances ``|x|² + |y|² − 2⟨x, y⟩`` in GEMM tiles of at most
``TILE`` elements and reduces each tile at once (a running top-k merge, counts, any-hits), so
memory is O((N + M)·(k + D)) whatever N and M.

Definitions (r_k(z): distance from z to its k-th nearest neighbour in its own set, the point
itself excluded — prdc's ``(k+1)``-th smallest distance with the self-distance 0 included;
all comparisons strict, as prdc):

* precision = fraction of fake points inside some real ball B(x_i, r_k(x_i));
* recall    = fraction of real points inside some fake ball B(y_j, r_k(y_j));
* density   = (1/k) · mean over fake points of the number of real balls containing them;
* coverage  = fraction of real points whose nearest fake point lies inside their own ball.

Distances are computed in ``dtype`` (default: the features' dtype).  In float32 the points are
first translated by their common mean (less cancellation); prdc computes in float64 (sklearn)
and rounds to float32, so a fake point within ~1e-7 relative of a ball's boundary can be
counted differently — compare in float64 for bit-for-bit agreement on decisions.
"""
from __future__ import annotations

import torch

from ._validate import as_features, as_pair, check_int, compute_dtype

TILE = 1 << 22  # elements of one distance tile


def _row_block(M, tile=TILE):
    bm = min(M, tile)
    return max(1, tile // bm), bm


def _prepare(x, y, dtype):
    """Cast to the compute dtype; translate by the common mean below float64."""
    x, y = x.detach().to(dtype), y.detach().to(dtype)
    if dtype != torch.float64:
        c = _center(x, y)
        x, y = (x - c, y - c) if y is not x else (x - c,) * 2
    return x, y


@torch.no_grad()
def knn(x, y=None, k=3, *, dtype=None):
    """The k nearest neighbours of each x_i among the y_j (among the other x's when y is None,
    the point itself excluded by index) -> ``(dist (N, k), index (N, k))``, ascending.

    x (N, D), y (M, D); blocked over both sets with a running top-k merge.
    """
    k = check_int("k", k, minimum=1)
    self_mode = y is None
    if self_mode:
        x = as_features("x", x, min_samples=k + 1, allow_grad=False)
        y = x
    else:
        x, y = as_pair(x, y, names=("x", "y"), allow_grad=False)
        if y.shape[0] < k:
            raise ValueError(f"y has {y.shape[0]} samples, fewer than k = {k}")
    dt = compute_dtype(dtype, x)
    xs, ys = _prepare(x, y if not self_mode else x, dt)
    d2, idx = _knn_sq(xs, ys, k, self_mode)
    return d2.sqrt(), idx


CENTERED_COLS = 4096  # column block when tiles are centred on the fly (the copy per tile stays small)


def _center(x, y, rows=1024):
    """The common mean of x and y in x's dtype: float64 sums of blocks of rows (a float64 sum
    of the whole set would convert it whole: 0.8 GB at 50k × 2048), no concatenated copy."""
    acc = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for z in (x, y):
        for i in range(0, z.shape[0], rows):
            acc += z[i:i + rows].sum(0, dtype=torch.float64)
    return (acc / (x.shape[0] + y.shape[0])).to(x.dtype)


def _sqnorms(x, center=None, rows=8192):
    """|x_i − center|² (N,), a block of rows at a time (no centred copy of x)."""
    if center is None:
        return (x * x).sum(1)
    return torch.cat([((x[i:i + rows] - center) ** 2).sum(1) for i in range(0, x.shape[0], rows)]) \
        if x.shape[0] else x.new_zeros(0)


def _blocks(M, center):
    return _row_block(M, TILE) if center is None else (max(1, TILE // min(M, CENTERED_COLS)), min(M, CENTERED_COLS))


def _tile(z, a, b, center):
    return z[a:b] if center is None else z[a:b] - center


def _knn_sq(x, y, k, exclude_self, row_offset=0, center=None):
    """Squared distances of the k nearest y_j to each x_i (ascending) and their indices.
    ``exclude_self``: row i is the point y_{row_offset + i} (x a block of rows of y: a shard
    in :mod:`otkernels.distributed`), left out of its own neighbours.  ``center``: the tiles
    are translated by it on the fly (float32 accuracy without a centred copy of x and y)."""
    N, M = x.shape[0], y.shape[0]
    bn, bm = _blocks(M, center)
    yy = _sqnorms(y, center)
    xx = _sqnorms(x, center)
    out_v = torch.empty(N, k, dtype=x.dtype, device=x.device)
    out_i = torch.empty(N, k, dtype=torch.long, device=x.device)
    for i0 in range(0, N, bn):
        i1 = min(N, i0 + bn)
        best_v = best_i = None
        xb = _tile(x, i0, i1, center)
        for j0 in range(0, M, bm):
            j1 = min(M, j0 + bm)
            # |y|² − 2⟨x, y⟩: the row constant |x|² does not change the order
            s = torch.addmm(yy[None, j0:j1], xb, _tile(y, j0, j1, center).T, alpha=-2)
            a0, a1 = i0 + row_offset, i1 + row_offset  # the rows' own indices among the y's
            if exclude_self and j0 < a1 and a0 < j1:
                r = torch.arange(max(a0, j0), min(a1, j1), device=x.device)
                s[r - a0, r - j0] = float("inf")
            kk = min(k, j1 - j0)
            v, i = torch.topk(s, kk, dim=1, largest=False, sorted=False)
            i += j0
            if best_v is not None:
                v, sel = torch.topk(torch.cat([best_v, v], 1), k, dim=1, largest=False, sorted=False)
                i = torch.gather(torch.cat([best_i, i], 1), 1, sel)
            best_v, best_i = v, i
        v, order = torch.sort(best_v, dim=1)
        out_v[i0:i1] = (v + xx[i0:i1, None]).clamp_(min=0)
        out_i[i0:i1] = torch.gather(best_i, 1, order)
    return out_v, out_i


@torch.no_grad()
def knn_radii(x, k=3, *, dtype=None):
    """Distance from each x_i to its k-th nearest other point: (N, D) -> (N,) (prdc's radii)."""
    return knn(x, None, k, dtype=dtype)[0][:, -1]


@torch.no_grad()
def prdc(real, fake, k=None, *, k_pr=3, k_dc=5, dtype=None):
    """Precision, recall (k = ``k_pr``) and density, coverage (k = ``k_dc``) -> dict of floats.

    ``k`` sets both (``prdc.compute_prdc(real, fake, nearest_k=k)``).  real (N, D), fake (M, D),
    N ≥ k_dc + 1 and M ≥ k_pr + 1 (the radii exclude the point itself).  Three blocked passes:
    real×real (radii), fake×fake (radii), real×fake (every count).
    """
    return _prdc(real, fake, k, k_pr, k_dc, dtype, ("precision", "recall", "density", "coverage"))


def precision_recall(real, fake, k=3, *, dtype=None):
    """Improved precision and recall with k-NN radii -> ``{"precision", "recall"}``."""
    return _prdc(real, fake, None, k, None, dtype, ("precision", "recall"))


def density_coverage(real, fake, k=5, *, dtype=None):
    """Density and coverage with the real k-NN radii -> ``{"density", "coverage"}``."""
    return _prdc(real, fake, None, None, k, dtype, ("density", "coverage"))


@torch.no_grad()
def _prdc(real, fake, k, k_pr, k_dc, dtype, want):
    if k is not None:
        k_pr = k_dc = k
    if "precision" in want:
        k_pr = check_int("k_pr" if k is None else "k", k_pr, minimum=1)
    if "density" in want:
        k_dc = check_int("k_dc" if k is None else "k", k_dc, minimum=1)
    x, y = as_pair(real, fake, allow_grad=False)
    ks_real = sorted({kk for name, kk in (("precision", k_pr), ("density", k_dc)) if name in want})
    for name, n, kk in (("real", x.shape[0], max(ks_real)),
                        ("fake", y.shape[0], k_pr if "recall" in want else 0)):
        if kk and n < kk + 1:
            raise ValueError(f"{name} has {n} samples: k-NN radii with k = {kk} need at least "
                             f"k + 1 = {kk + 1} (each point's own distance is excluded)")
    dt = compute_dtype(dtype, x)
    # below float64 the tiles are translated by the common mean (less cancellation), on the
    # fly: memory stays O((N + M)·k + tiles) beyond the features themselves
    xs, ys = x.detach().to(dt), y.detach().to(dt)
    c = _center(xs, ys) if dt != torch.float64 else None
    d2_real = _knn_sq(xs, xs, max(ks_real), True, center=c)[0]
    xx, yy = _sqnorms(xs, c), _sqnorms(ys, c)
    # thresholds on s = |y|² − 2⟨x, y⟩ = d² − |x|² for a row x_i
    t_pr = d2_real[:, k_pr - 1] - xx if "precision" in want else None
    t_dc = d2_real[:, k_dc - 1] - xx if "density" in want else None
    rf2 = _knn_sq(ys, ys, k_pr, True, center=c)[0][:, -1] if "recall" in want else None
    same_k = t_pr is not None and t_dc is not None and k_pr == k_dc
    count, hit, covered, recalled = _ball_pass(xs, ys, xx, yy, t_dc, None if same_k else t_pr, rf2, center=c)
    if same_k:
        hit = count > 0
    out = {}
    if "precision" in want:
        out["precision"] = float(hit.double().mean())
    if "recall" in want:
        out["recall"] = float(recalled.double().mean())
    if "density" in want:
        out["density"] = float(count.double().mean()) / k_dc
    if "coverage" in want:
        out["coverage"] = float(covered.double().mean())
    return out


def _ball_pass(xs, ys, xx, yy, t_dc, t_pr, rf2, center=None):
    """One blocked pass over the pairs (real x_i, fake y_j), s_ij = |y_j|² − 2⟨x_i, y_j⟩:
    ``count`` (M,) real balls (thresholds ``t_dc`` (N,) on s) holding each y_j; ``hit`` (M,)
    y_j in some ball of ``t_pr``; ``covered`` (N,) nearest y inside x_i's ``t_dc`` ball;
    ``recalled`` (N,) x_i in some fake ball (squared radii ``rf2`` (M,)).  A None threshold
    skips its counts.  The rows may be a block of the real set (:mod:`otkernels.distributed`
    reduces the column counts over the blocks).  ``center``: tiles translated on the fly
    (xx, yy are then the centred squared norms)."""
    N, M = xs.shape[0], ys.shape[0]
    bn, bm = _blocks(M, center)
    count = torch.zeros(M, dtype=torch.int64, device=xs.device)
    hit = torch.zeros(M, dtype=torch.bool, device=xs.device)
    covered = torch.zeros(N, dtype=torch.bool, device=xs.device)
    recalled = torch.zeros(N, dtype=torch.bool, device=xs.device)
    for i0 in range(0, N, bn):
        i1 = min(N, i0 + bn)
        xb = _tile(xs, i0, i1, center)
        for j0 in range(0, M, bm):
            j1 = min(M, j0 + bm)
            s = torch.addmm(yy[None, j0:j1], xb, _tile(ys, j0, j1, center).T, alpha=-2)
            if t_dc is not None:
                count[j0:j1] += (s < t_dc[i0:i1, None]).sum(0, dtype=torch.int32)
                covered[i0:i1] |= s.amin(1) < t_dc[i0:i1]
            if t_pr is not None:
                hit[j0:j1] |= (s < t_pr[i0:i1, None]).any(0)
            if rf2 is not None:  # d² < r_j² ⟺ s − r_j² < −|x_i|²
                recalled[i0:i1] |= (s - rf2[None, j0:j1]).amin(1) < -xx[i0:i1]
    return count, hit, covered, recalled
