"""Assignment reductions: the best ``j`` for every ``x_i``, without an N×M matrix.

* :func:`argmax_inner`: ``max_j ⟨x_i, y_j⟩ + h_j`` — the c-transform of semi-discrete OT for
  the cost −⟨x, y⟩ (Laguerre / power cells with h the dual weights);
* :func:`argmin_sqdist`: ``min_j |x_i − y_j|² + h_j`` — nearest neighbours (h = None) and
  power diagrams for the squared Euclidean cost.

Both return ``(values, indices)`` shaped like the rows of x: x (N,D) or (B,N,D), y (M,D) or
(B,M,D), h (M,) or (B,M).  Ties go to the first index (as ``torch.max``).  Squared distances
are ``|x|² + |y|² − 2⟨x, y⟩`` clamped at 0 (the native kernels compute them directly for
D ≤ 8).  No gradient flows through these functions: differentiate the value at the returned
indices instead, e.g. ``(x * y[idx]).sum(-1) + h[idx]``.

``backend``: ``"auto"`` (CUDA tensors: the Triton kernels when Triton is installed; CPU
float32/float64 tensors: the native kernels when the extension is available; else torch),
``"native"``, ``"triton"`` (CUDA tensors compiled; CPU tensors in Triton's interpreter, slow:
for tests) or ``"torch"`` (blocked over y: memory O(N·block + M·D)).  ``OTKERNELS_DISABLE``
turns ``native``/``triton`` off for ``auto`` as for the Sinkhorn backends.
"""
from __future__ import annotations

import torch

BLOCK = 1 << 22  # elements of one (B, N, block) score tile in the torch path


def _prepare(x, y, h):
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() not in (2, 3) or y.dim() != x.dim():
        raise ValueError(f"x and y must both be (N,D) or both (B,N,D), got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    batched = x.dim() == 3
    xb, yb = (x, y) if batched else (x[None], y[None])
    if xb.shape[0] != yb.shape[0] or xb.shape[2] != yb.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same batch size and dimension")
    if yb.shape[1] == 0:
        raise ValueError("y must have at least one point")
    if x.dtype != y.dtype or x.device != y.device:
        raise TypeError(f"x and y must share dtype and device, got {x.dtype}/{x.device} and {y.dtype}/{y.device}")
    hb = None
    if h is not None:
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"h must be a torch.Tensor or None, got {type(h).__name__}")
        want = (yb.shape[0], yb.shape[1]) if batched else (yb.shape[1],)
        if tuple(h.shape) != want:
            raise ValueError(f"h must have shape {want} to match y, got {tuple(h.shape)}")
        if h.dtype != x.dtype or h.device != x.device:
            raise TypeError(f"h must have the dtype and device of x ({x.dtype}, {x.device}), got {h.dtype}, {h.device}")
        hb = h if batched else h[None]
    return batched, xb.detach(), yb.detach(), None if hb is None else hb.detach()


def _use_native(backend, x):
    if backend not in ("auto", "native"):
        return False
    from .backends import _disabled, native

    if backend == "auto" and "native" in _disabled():
        return False
    ok = native.supports(x) and native._load() is not None
    if backend == "native" and not ok:
        why = native.info().get("unavailable") or f"needs float32/float64 CPU tensors, got {x.dtype} on {x.device}"
        raise ValueError(f"backend='native' cannot run this: {why}")
    return ok


def _use_triton(backend, x):
    """Explicit ``"triton"`` (any device: CPU runs in the interpreter), or ``"auto"`` on CUDA."""
    if backend not in ("auto", "triton") or (backend == "auto" and x.device.type != "cuda"):
        return False
    from .backends import _disabled
    from .backends import triton as tb

    if backend == "auto" and "triton" in _disabled():
        return False
    if not tb.HAS_TRITON:
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run this: {tb.available()[1]}")
        return False
    return True


def _triton(x, y, h, mode):
    from .backends.triton import ops

    v, i = ops.argminmax_rows(x, y, h, "dot" if mode == 0 else "sqdist", maximize=mode == 0)
    return v.to(x.dtype), i


@torch.no_grad()
def _torch_blocked(x, y, h, mode):
    """x (B,N,D), y (B,M,D), h (B,M) or None; mode 0 argmax inner, 1 argmin sqdist."""
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    bm = max(1, min(M, BLOCK // max(1, B * N)))
    best_v = best_i = None
    xx = (x * x).sum(-1, keepdim=True) if mode == 1 else None
    for j0 in range(0, M, bm):
        yj = y[:, j0:j0 + bm]
        s = torch.bmm(x, yj.transpose(1, 2))
        if mode == 1:
            s = (xx + (yj * yj).sum(-1)[:, None, :] - 2 * s).clamp_(min=0)
        if h is not None:
            s = s + h[:, None, j0:j0 + bm]
        v, i = s.max(2) if mode == 0 else s.min(2)
        i = i + j0
        if best_v is None:
            best_v, best_i = v, i
        else:
            better = v > best_v if mode == 0 else v < best_v  # strict: ties keep the first index
            best_v = torch.where(better, v, best_v)
            best_i = torch.where(better, i, best_i)
    return best_v, best_i


def _run(x, y, h, mode, backend):
    if backend not in ("auto", "native", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'native', 'triton' or 'torch', got {backend!r}")
    batched, xb, yb, hb = _prepare(x, y, h)
    if _use_triton(backend, xb):
        v, i = _triton(xb, yb, hb, mode)
    elif _use_native(backend, xb):
        from .backends import native

        v, i = (native.argmax_inner if mode == 0 else native.argmin_sqdist)(xb, yb, hb)
    else:
        v, i = _torch_blocked(xb, yb, hb, mode)
    return (v, i) if batched else (v[0], i[0])


def argmax_inner(x, y, h=None, backend="auto"):
    """``(max_j ⟨x_i, y_j⟩ + h_j, argmax_j)``: x (N,D)/(B,N,D), y (M,D)/(B,M,D), h (M,)/(B,M)."""
    return _run(x, y, h, 0, backend)


def argmin_sqdist(x, y, h=None, backend="auto"):
    """``(min_j |x_i − y_j|² + h_j, argmin_j)``: nearest neighbours when h is None."""
    return _run(x, y, h, 1, backend)
