"""Double backward for the backends whose backward passes are closed-form kernels.

``blocked``, ``native``, ``triton`` and ``keops`` compute first-order gradients in fused
passes that build no autograd graph.  When the caller asks for a differentiable gradient
(``torch.autograd.grad(..., create_graph=True)``, Hessian-vector products, gradient
penalties), their ``backward`` calls the functions below instead: the same gradient,
recomputed with plain torch ops on the dense cost or kernel matrix and differentiated by
torch autograd — exactly what the ``tensorized`` backend (and geomloss's) does, so second
derivatives agree with it.  Memory O(B·N·M) for that call, as on ``tensorized``.

Each argument slot is differentiated through its own view (``t.view_as(t)``), so a kernel
sum called with the same tensor in both slots (``Σ_j k(x_i, x_j) a_j``) returns the two
partial derivatives the autograd engine expects, not the total twice.
"""
from __future__ import annotations

import torch


def create_graph() -> bool:
    """True inside a ``backward`` that was asked for a differentiable result."""
    return torch.is_grad_enabled()


def _grads(out, inputs, needs, g):
    with torch.enable_grad():
        wrt = [t for t, n in zip(inputs, needs) if n]
        got = iter(torch.autograd.grad(out, wrt, g, create_graph=True, allow_unused=True))
    res = []
    for t, n in zip(inputs, needs):
        if not n:
            res.append(None)
            continue
        gt = next(got)
        res.append(torch.zeros_like(t) if gt is None else gt)
    return res


def softmin_backward(x, y, h, eps, cost, g, needs=(True, False, False)):
    """Differentiable backward of ``f_i = −ε log Σ_j exp(h_j − C(x_i, y_j)/ε)``: x (B,N,D),
    y (B,M,D), h (B,M), g (B,N) = ∂L/∂f; returns ``[∂L/∂x, ∂L/∂y, ∂L/∂h]`` (None where
    ``needs`` is False)."""
    with torch.enable_grad():
        xs, ys, hs = x.view_as(x), y.view_as(y), h.view_as(h)
        f = -eps * (hs[:, None, :] - cost(xs, ys) / eps).logsumexp(2)
    return _grads(f, (xs, ys, hs), needs, g)


def ragged_softmin_backward(x, y, xo, yo, h, eps, cost, g):
    """:func:`softmin_backward` (∂L/∂x only) of a ragged batch, segment by segment: x (Nx,D),
    y (Ny,D) stacked, ``xo``/``yo`` (S+1,) offsets, h (S,m_max) and g (S,n_max) padded, eps a
    float or (S,1) one ε per segment; returns ∂L/∂x (Nx,D).  Memory: the largest segment's
    dense cost matrix at a time."""
    xo, yo = [int(v) for v in xo], [int(v) for v in yo]
    out = []
    for q in range(len(xo) - 1):
        n, m = xo[q + 1] - xo[q], yo[q + 1] - yo[q]
        e = eps[q] if isinstance(eps, torch.Tensor) else eps
        out.append(softmin_backward(x[None, xo[q]:xo[q + 1]], y[None, yo[q]:yo[q + 1]], h[q:q + 1, :m], e, cost,
                                    g[q:q + 1, :n])[0][0])
    return torch.cat(out)


def kernel_sum_backward(x, y, b, kernel, g, needs=(True, True, True)):
    """Differentiable backward of ``out_i = Σ_j k(x_i, y_j) b_j``: x (B,N,D), y (B,M,D),
    b (B,M), g (B,N); returns ``[∂L/∂x, ∂L/∂y, ∂L/∂b]``."""
    with torch.enable_grad():
        xs, ys, bs = x.view_as(x), y.view_as(y), b.view_as(b)
        out = (kernel(xs, ys) @ bs.unsqueeze(-1)).squeeze(-1)
    return _grads(out, (xs, ys, bs), needs, g)
