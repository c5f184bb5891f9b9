"""Triton backend: fused FlashAttention-style kernels for CUDA GPUs, O((N+M)·D) memory.

The reductions of the Sinkhorn loop and of the kernel norms (see ``backends/__init__.py``)
as Triton kernels (``kernels.py``) behind ``torch.autograd.Function``s (``ops.py``): one pass
per softmin (cost tiles from ``tl.dot``, online log-sum-exp in base 2), one pass per
gradient (``Σ_j P_ij ∇_x C``: attention's P·V), kernel sums and their gradients, arg-min/max,
and the transport plan applied to a matrix (:func:`plan_apply`, attention's P·V unnormalised).
Batches are a grid axis.  A user callable cost goes to the ``blocked`` backend's handles.

Availability: a CUDA device, or ``TRITON_INTERPRET=1`` (Triton's interpreter runs the same
kernels on CPU tensors, slowly: for tests).  ``backend="auto"`` picks it for CUDA tensors.

Precision of float32 points (``SamplesLoss(precision=...)``, :func:`ops.precision_scope`,
:func:`ops.set_precision` or ``OTKERNELS_TRITON_PRECISION``; see ``otkernels/_precision.py``):
``"tf32x3"`` by default (three TF32 tensor-core products: float32 accuracy), ``"tf32"``
(operands rounded to the nearest TF32; values ~5e-6, gradients at small blur ~7e-2),
``"ieee"`` (float32 FMA, no tensor cores) and ``"bf16"`` (~1e-2).  The squared norms come
from the same rounded points.  float64 problems stay float64 end to end.  The Sinkhorn gradient is
computed with the plan normalised in the same pass as the value (accurate in float32 even
when ``C/ε`` reaches 1e6, where rebuilding ``exp(h − C/ε + f/ε)`` from the stored ``f`` is
off by 1e-2).

Targets on a GPU (not measured here: no GPU was lent while this was written;
``benchmarks/bench_gpu.py`` measures them):

* N=M=50k, D=128, float32 with TF32: Sinkhorn divergence forward+backward ≥ 10× faster than
  geomloss's KeOps (``online``) backend, value within 1e-4 relative of float64;
* one softmin pass at N=M=100k, D=128 in bfloat16 within 2× of the tensor-core roofline
  (≈ 2.6 ms on an H100: the 1e10 exponentials and the 2.6 TFLOP of ``tl.dot``).
"""
from __future__ import annotations

import torch

from .. import _double
from ..._env import flag
from ...costs import Cost

NAME = "triton"

try:
    import triton  # noqa: F401
except ImportError as e:  # optional dependency
    HAS_TRITON, _IMPORT_ERROR = False, e
else:
    HAS_TRITON, _IMPORT_ERROR = True, None
    from . import ops
    from .ops import (argmax, argmin, get_precision, kernel_sum as kernel_sum_op, precision_scope,  # noqa: F401
                      set_precision, softmin)


def plan_apply(x, y, u, v, V, eps, p=2, precision=None):
    """``out_ik = Σ_j exp(u_i + v_j − C(x_i, y_j)/ε) V_jk``: the transport plan applied to V in
    one fused pass, O((N+M)·(D+K)) memory (issue 19); C = ½‖x−y‖² (p=2) or
    ``sqrt(max(‖x−y‖², 1e-8))`` (p=1).  x (B,N,D), y (B,M,D), u (B,N), v (B,M), V (B,M,K) ->
    (B,N,K) in the accumulator dtype (float64 for float64 points, else float32); unbatched
    shapes too.  No autograd.  See :func:`ops.plan_apply`."""
    if not HAS_TRITON:
        raise ImportError(f"triton is not installed ({_IMPORT_ERROR}); pip install 'otkernels[triton]'")
    return ops.plan_apply(x, y, u, v, V, eps, p=p, precision=precision)


def _interpret_env() -> bool:
    return flag("TRITON_INTERPRET")


def available():
    if not HAS_TRITON:
        return False, f"triton is not installed ({_IMPORT_ERROR}); pip install 'otkernels[triton]'"
    if _interpret_env():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU emulation, slow"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if _cpu_opt_in():
        return True, (f"triton {triton.__version__}: CPU tensors in Triton's interpreter "
                      "(OTKERNELS_TRITON_CPU=1: CPU emulation, slow)")
    return False, ("no CUDA device (set OTKERNELS_TRITON_CPU=1, or TRITON_INTERPRET=1 before the "
                   "import, to run the Triton kernels on CPU in Triton's interpreter)")


def _cpu_opt_in() -> bool:
    """``OTKERNELS_TRITON_CPU=1``: CPU tensors run the kernels in the interpreter (``ops``
    loads a second, interpreted copy of ``kernels.py``), while compiling for a GPU still works
    in the same process (the test suite uses both)."""
    return flag("OTKERNELS_TRITON_CPU")


class TritonCost:
    """Cost handle ``C(x_i, y_j)`` (p = 1 or 2), x (B,N,D) first argument (gets gradients)."""

    def __init__(self, x, y, cost, norms=None, precision=None):
        self.x, self.xd, self.y, self.p = x, x.detach(), y.detach(), cost.p
        self.sym = x is y  # C(x, x): the symmetric pass computes half of the tiles
        self.precision = ops.resolve_precision(x.dtype, precision)  # fixed for forward and backward
        self.mode = ops._compiled.SOFTMIN_P2 if self.p == 2 else ops._compiled.SOFTMIN_P1
        self.xx, self.yy = norms if norms is not None else (ops.sqnorms(self.xd, self.precision),
                                                            ops.sqnorms(self.y, self.precision))

    def softmin(self, eps, h):
        """−ε log Σ_j exp(h_j − C_ij/ε): h (B,M) -> (B,N), no gradient.  For C(x, x) from the
        tiles on and above the diagonal (half the dot work, :func:`ops.softmin_two`)."""
        if self.sym:
            two = ops.softmin_two(self.xd, self.y, h, None, eps, self.p, self.xx, self.yy,
                                  precision=self.precision, sym=True)
            if two is not None:
                return two[0].to(h.dtype)
        out = ops.softmin_rows(self.xd, self.y, h, eps, self.p, self.xx, self.yy, precision=self.precision)
        return out.to(h.dtype)

    def softmin_two(self, eps, h, h_t):
        """This softmin (h (B,M) -> (B,N)) and its transpose's (h_t (B,N) -> (B,M)) from one
        set of cost tiles (Sinkhorn's two updates of an iteration), or None (two passes)."""
        if self.sym:
            return None
        two = ops.softmin_two(self.xd, self.y, h, h_t, eps, self.p, self.xx, self.yy, precision=self.precision)
        if two is None:
            return None
        return two[0].to(h.dtype), two[1].to(h_t.dtype)

    def softmin_grad(self, eps, h):
        """Same value, differentiable w.r.t. x: one fused pass computes the value and
        ``Σ_j P_ij ∇_x C(x_i, y_j)`` with the plan normalised in the pass (attention's forward
        with V = y); the backward only scales it by the incoming gradient."""
        if not self.x.requires_grad:
            return self.softmin(eps, h)
        return _SoftminGrad.apply(self.x, self, eps, h.detach())

    @torch.no_grad()
    def grad_x(self, eps, h, f, g, s=None):
        """``Σ_j g_i P_ij s_j ∇_x C(x_i, y_j)``, ``P_ij = exp(h_j − C_ij/ε + f_i/ε)``: (B,N,D)."""
        out = ops.weighted_grad(self.xd, self.y, self.mode, eps, hc=h, rr=f, cw=s, xx=self.xx, yy=self.yy,
                                precision=self.precision)
        return (out * g[:, :, None].to(out.dtype)).to(self.xd.dtype)

    def value_and_grad(self, eps, h):
        """The softmin (B,N) and ``Σ_j P_ij ∇_x C`` (B,N,D) from one pass (acc dtype)."""
        return ops.softmin_and_grad(self.xd, self.y, h, eps, self.p, self.xx, self.yy, precision=self.precision)

    @staticmethod
    def row_weights(g):
        """The incoming gradient (B,N) as the weights of the rows of ``value_and_grad``'s gradient."""
        return g


class TritonRaggedCost:
    """Cost handle of a ragged batch (issue 21), the Triton twin of ``native.RaggedCost``:
    segment q pairs the rows ``xo[q]:xo[q+1]`` of x (Nx,D) (first argument, gets gradients)
    with ``yo[q]:yo[q+1]`` of y (Ny,D); every softmin is one launch over all segments
    (grid: row blocks × segments, :func:`ops.softmin_ragged`).  Potentials are padded:
    h (S,m_max) -> (S,n_max), zeros past a segment's end.  ``eps``: a float or (S,1) one ε per
    segment."""

    def __init__(self, x, xo, y, yo, nmax, cost, norms, precision, rows):
        self.x, self.xd, self.y, self.p, self.nmax = x, x.detach(), y.detach(), cost.p, nmax
        self.xo, self.yo, self.xx, self.yy, self.precision = xo, yo, norms[0], norms[1], precision
        self.rows = rows  # (segment, position) of every stacked row of x

    def softmin(self, eps, h):
        return ops.softmin_ragged(self.xd, self.y, self.xo, self.yo, h, eps, self.nmax, self.p, self.xx, self.yy,
                                  precision=self.precision).to(h.dtype)

    softmin_grad = TritonCost.softmin_grad

    def value_and_grad(self, eps, h):
        return ops.softmin_grad_ragged(self.xd, self.y, self.xo, self.yo, h, eps, self.nmax, self.p, self.xx,
                                       self.yy, precision=self.precision)

    def row_weights(self, g):
        return g[self.rows]


class _SoftminGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle, eps, h):
        f, G = handle.value_and_grad(eps, h)
        ctx.x_dtype, ctx.handle, ctx.eps = x.dtype, handle, eps
        ctx.save_for_backward(G, h)
        return f.to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        G, h = ctx.saved_tensors
        H = ctx.handle
        if _double.create_graph():
            if isinstance(H, TritonRaggedCost):
                return _double.ragged_softmin_backward(H.x, H.y, H.xo, H.yo, h, ctx.eps, Cost(H.p), g), None, None, None
            return _double.softmin_backward(H.x, H.y, h, ctx.eps, Cost(H.p), g)[0], None, None, None
        return (G * H.row_weights(g)[..., None].to(G.dtype)).to(ctx.x_dtype), None, None, None


def ragged_supported(x, y, cost):
    """Whether :func:`ragged_handles` applies: CUDA (or interpreted) float32/64 points, p = 1, 2."""
    return (HAS_TRITON and cost.fused and x.dtype in (torch.float32, torch.float64) and y.dtype == x.dtype
            and x.device == y.device and (x.is_cuda or ops.interpreting(x.device)))


def ragged_handles(x, xo, y, yo, cost, debias=True):
    """``(C_xy, C_yx, C_xx, C_yy)`` of a ragged batch: x (Nx,D), y (Ny,D) stacked segments,
    ``xo`` / ``yo`` (S+1,) offsets; None where :func:`ragged_supported` says no."""
    if not ragged_supported(x, y, cost):
        return None
    xo = torch.as_tensor(xo, dtype=torch.int64)
    yo = torch.as_tensor(yo, dtype=torch.int64)
    from ...ragged import _index
    (xs, xp, n), (ys, yp, m) = _index(xo, x.device), _index(yo, x.device)
    rows = (xs, xp), (ys, yp)
    xo_d, yo_d = xo.to(x.device), yo.to(x.device)
    prec = ops.resolve_precision(x.dtype)
    nx, ny = ops.sqnorms(x.detach(), prec), ops.sqnorms(y.detach(), prec)
    nmax, mmax = int(n.max()), int(m.max())

    def handle(a, ao, b, bo, k, norms, r):
        return TritonRaggedCost(a, ao, b, bo, k, cost, norms, prec, r)

    C_xy, C_yx = handle(x, xo_d, y, yo_d, nmax, (nx, ny), rows[0]), handle(y, yo_d, x, xo_d, mmax, (ny, nx), rows[1])
    if not debias:
        return C_xy, C_yx, None, None
    return C_xy, C_yx, handle(x, xo_d, x, xo_d, nmax, (nx, nx), rows[0]), handle(y, yo_d, y, yo_d, mmax, (ny, ny), rows[1])


def cost_handles(x, y, cost, debias=True, cache=None):
    """``(C_xy, C_yx, C_xx, C_yy)`` handles; ``cache`` is ignored for the built-in costs (tiles
    are recomputed: on a GPU a tensor-core GEMM beats reading a cached cost)."""
    if not cost.fused:
        from .. import blocked
        return blocked.cost_handles(x, y, cost, debias=debias, cache=cache)
    prec = ops.resolve_precision(x.dtype)  # the current scope (SamplesLoss(precision=...))
    nx, ny = ops.sqnorms(x.detach(), prec), ops.sqnorms(y.detach(), prec)
    C_xy, C_yx = TritonCost(x, y, cost, (nx, ny), prec), TritonCost(y, x, cost, (ny, nx), prec)
    C_xx, C_yy = ((TritonCost(x, x, cost, (nx, nx), prec), TritonCost(y, y, cost, (ny, ny), prec))
                  if debias else (None, None))
    return C_xy, C_yx, C_xx, C_yy


def kernel_sum(x, y, b, kernel):
    """``Σ_j k(x_i, y_j) b_j``: x (B,N,D), y (B,M,D), b (B,M) -> (B,N), gradients for x, y, b."""
    from ...costs import Kernel
    if not isinstance(kernel, Kernel):  # a user callable: torch tiles
        from .. import blocked
        return blocked.kernel_sum(x, y, b, kernel)
    return ops.kernel_sum(x, y, b, kernel.name, kernel.blur).to(b.dtype)
