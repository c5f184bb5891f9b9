"""Ragged batches in one launch per reduction (issue 21).

S Sinkhorn problems of different sizes, x (Nx,D) and y (Ny,D) stacked with offsets
``xo`` / ``yo`` (S+1,), run through the one Sinkhorn loop together: the potentials are
padded (S, n_max) / (S, m_max) — zero weights, never read by the kernels — and every softmin
is one call of the backend's ragged kernel over all segments (``backend.ragged_handles``;
native on CPU).  The points are never padded or copied per segment, and no cost is computed
between a point and a padded slot.  Each segment keeps its own centring, diameter and
ε-schedule (:func:`otkernels.sinkhorn.ragged_schedule`), so the results equal a Python loop
over the segments (to rounding).

Memory: the padded potentials, S·(n_max + m_max) values each; no cost matrix is cached (the
kernels recompute tiles).  Early stopping (``tol``) stops all segments together, when the
worst marginal error is within ``tol``.
"""
from __future__ import annotations

import torch

from ._checks import check_weights
from .sinkhorn import Stopping, epsilon_schedule, ragged_schedule, sinkhorn


def _index(offsets, device):
    """(segment id, position in its segment) of every stacked point, and the segments' sizes."""
    o = torch.as_tensor(offsets, dtype=torch.int64)
    sizes = o[1:] - o[:-1]
    seg = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    pos = torch.arange(int(o[-1])) - o[:-1][seg]
    return seg.to(device), pos.to(device), sizes


def _pad(v, seg, pos, S, n):
    """(N,) stacked values -> (S, n) padded with zeros (differentiable)."""
    out = v.new_zeros(S, n)
    return out.index_put((seg, pos), v)


def _segment_extent(x, seg, S, reduce):
    D = x.shape[1]
    init = torch.full((S, D), float("inf") if reduce == "amin" else -float("inf"), dtype=x.dtype, device=x.device)
    return init.scatter_reduce(0, seg[:, None].expand(-1, D), x, reduce=reduce)


def _diameters(x, xs, y, ys, S):
    """Each segment's bounding-box diagonal over its x and y points (``max_diameter`` per segment)."""
    lo = torch.minimum(_segment_extent(x, xs, S, "amin"), _segment_extent(y, ys, S, "amin"))
    hi = torch.maximum(_segment_extent(x, xs, S, "amax"), _segment_extent(y, ys, S, "amax"))
    return (hi - lo).norm(dim=1).tolist()


def _center(x, xs, y, ys, S):
    """Each segment translated by the mean of its x and y points (a constant)."""
    with torch.no_grad():
        D = x.shape[1]
        tot = x.new_zeros(S, D).index_add_(0, xs, x).index_add_(0, ys, y)
        cnt = torch.bincount(torch.cat([xs, ys]), minlength=S).to(x.dtype)
        c = tot / cnt[:, None]
    return x - c[xs], y - c[ys]


def ragged_sinkhorn(loss, handles_of, a, x, xo, b, y, yo, rho):
    """The Sinkhorn loss of every segment: (S,) values, or with ``loss.potentials`` the stacked
    ``(F (Nx,), G (Ny,))``.  ``loss``: the :class:`SamplesLoss` (its options; ``rho`` its
    reach^p); ``handles_of``: the backend's ``ragged_handles``; a (Nx,), b (Ny,) or None
    (uniform per segment)."""
    S = len(xo) - 1
    xs, xp, n = _index(xo, x.device)
    ys, yp, m = _index(yo, y.device)
    nmax, mmax = int(n.max()), int(m.max())
    if a is None:  # uniform in each segment
        a = (1.0 / n.to(x.dtype)).to(x.device)[xs]
        b = (1.0 / m.to(x.dtype)).to(x.device)[ys]
    A, Bw = _pad(a.reshape(-1), xs, xp, S, nmax), _pad(b.reshape(-1), ys, yp, S, mmax)
    check_weights("a", A)
    check_weights("b", Bw)
    if loss.diameter is not None:
        diam = [loss.diameter] * S
    else:
        diam = _diameters(x.detach(), xs, y.detach(), ys, S)
    x, y = _center(x, xs, y, ys, S)
    schedule = ragged_schedule([epsilon_schedule(loss.p, d, loss.blur, loss.scaling) for d in diam],
                               x.dtype, x.device)
    handles = handles_of(x, xo, y, yo, loss.cost, debias=loss.debias)
    stop = (Stopping(loss.tol, loss.max_iter, loss.check_every)
            if loss.tol is not None or loss.max_iter is not None else None)
    out = sinkhorn(A, Bw, handles, schedule, rho=rho, debias=loss.debias,
                   potentials=loss.potentials, stop=stop)
    loss.last_info = {"annealing": len(schedule), "segments": S, **(stop.info if stop is not None else {})}
    if loss.potentials:
        F, G = out
        return F[xs, xp], G[ys, yp]
    return out
