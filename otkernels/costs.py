"""Ground costs and kernels, written once for every backend.

A :class:`Cost` knows how to build a cost tile ``C[b, i, j] = C(x_i, y_j)`` from two
point clouds ``x (B,n,D)``, ``y (B,m,D)`` and how to apply its gradient to a weight tile
``W (B,n,m)``: ``Σ_j W_ij ∇_x C(x_i, y_j)``.  Built-in costs follow geomloss exactly:

* ``p=2``: ``C = ½‖x−y‖²``, computed as ``(‖x‖² − 2⟨x,y⟩ + ‖y‖²)/2``;
* ``p=1``: ``C = sqrt(max(‖x−y‖², 1e-8))`` (geomloss's clamp: gradient 0 at coincident
  points), computed from coordinate differences: geomloss's expanded formula loses ~3e-4
  relative accuracy in float32 near coincident points (e.g. the diagonal of C(x, x)).

A :class:`Kernel` is a function of the squared distance, ``k(‖x−y‖²)`` (gaussian, laplacian,
energy), with the same geomloss clamps.

Gradients ``Σ_j W_ij (x_i − y_j)`` (of ``sqdist``, ``dist``, :meth:`Cost.apply_grad`) go
through :func:`diff_sum`: the expanded ``x_i Σ_j W_ij − Σ_j W_ij y_j`` (one GEMM) cancels
catastrophically when a row's weight sits on a pair with ``y_j ≈ x_i`` (the diagonal of a
self-cost or self-kernel, a plan at small ε between matched clouds): a gradient of 3e-19
where the exact one is 4e-98.  The native kernels form every difference inside the tile;
the torch backends apply each row's largest weight to its exact difference.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

_DIST_CLAMP = 1e-8  # geomloss clamps squared distances at 1e-8 before a square root


def dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(‖x_i − y_j‖², 1e-8))`` from coordinate differences (no cancellation near
    coincident points, unlike the expanded formula): (B,n,D), (B,m,D) -> (B,n,m).
    Differentiable to any order (torch's ``cdist`` backward is not itself differentiable)."""
    return _Dist.apply(x, y)


class _Dist(torch.autograd.Function):
    """``cdist`` clamped at 1e-4, with a backward written in differentiable torch ops:
    ∂d_ij/∂x_i = (x_i − y_j)/d_ij, zero where the clamp is active (geomloss's convention)."""

    @staticmethod
    def forward(ctx, x, y):
        d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").clamp_min_(math.sqrt(_DIST_CLAMP))
        ctx.save_for_backward(x, y, d)
        return d

    @staticmethod
    def backward(ctx, g):
        x, y, d = ctx.saved_tensors
        W = torch.where(d > math.sqrt(_DIST_CLAMP), g / d, torch.zeros((), dtype=g.dtype, device=g.device))
        gx = diff_sum(W, x, y) if ctx.needs_input_grad[0] else None
        gy = diff_sum(W.transpose(1, 2), y, x) if ctx.needs_input_grad[1] else None
        return gx, gy


def diff_sum(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``Σ_j W_ij (x_i − y_j)``: W (B,n,m), x (B,n,D), y (B,m,D) -> (B,n,D), without the
    cancellation of the expanded form.

    Each row's largest ``|W_ij|`` multiplies the exact difference ``x_i − y_{j*}``; the other
    weights go through the expanded form ``x_i Σ_j W_ij − Σ_j W_ij y_j`` (one GEMM), whose
    error is then ``ε_mach·Σ_{j≠j*} |W_ij| (|x_i| + |y_j|)``: exact where one pair dominates
    a row (diagonals of self-costs and self-kernels, plans at small ε between matched points),
    the expanded form's accuracy elsewhere.  (The native kernels form every difference in the
    tile.)  ``inplace``: W may be overwritten (a tile the caller owns).  Differentiable."""
    if W.shape[-1] == 0 or W.shape[-2] == 0:
        return torch.zeros_like(x)
    j = W.abs().argmax(2, keepdim=True)                         # (B,n,1) the dominant pair
    wd = W.gather(2, j)
    rest = W.scatter_(2, j, 0.0) if inplace and not W.requires_grad else W.scatter(2, j, 0.0)
    yj = y.gather(1, j.expand(-1, -1, y.shape[-1]))             # (B,n,D)
    return torch.baddbmm(x * rest.sum(2, keepdim=True), rest, y, alpha=-1) + wd * (x - yj)


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``‖x_i − y_j‖²`` as ``‖x‖² − 2⟨x,y⟩ + ‖y‖²``; x (B,n,D), y (B,m,D) -> (B,n,m).
    Its gradient ``2 Σ_j G_ij (x_i − y_j)`` goes through :func:`diff_sum` (differentiable)."""
    return _SqDist.apply(x, y)


def _sqdist(x, y):
    xx = (x * x).sum(-1).unsqueeze(2)
    yy = (y * y).sum(-1).unsqueeze(1)
    return torch.baddbmm(xx + yy, x, y.transpose(1, 2), alpha=-2)


class _SqDist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return _sqdist(x, y)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        gx = 2 * diff_sum(g, x, y) if ctx.needs_input_grad[0] else None
        gy = 2 * diff_sum(g.transpose(1, 2), y, x) if ctx.needs_input_grad[1] else None
        return gx, gy


class Cost:
    """A ground cost C(x, y) on (B,n,D) x (B,m,D) tiles.

    ``p`` ≥ 1 for the built-in (symmetric, translation-invariant) costs ``‖x−y‖^p / p``
    (p = 2: ½‖x−y‖², p = 1: ‖x−y‖, geomloss's two; other p are an otkernels extension that
    the torch backends compute: :attr:`fused` says whether the native/Triton/KeOps kernels
    have it), None for a user callable ``fn(x, y) -> (B,n,m)`` (geomloss's ``cost=``
    convention), which is then differentiated by autograd tile by tile.
    """

    def __init__(self, p: Optional[int] = 2, fn: Optional[Callable] = None, name: str = ""):
        self.p, self.fn = p, fn
        self.name = name or (f"p={p}" if fn is None else getattr(fn, "__name__", "callable"))

    @property
    def builtin(self) -> bool:
        return self.fn is None

    symmetric = builtin  # C(x, y) = C(y, x): lets a backend reuse one matrix for C_xy and C_yx

    @property
    def fused(self) -> bool:
        """A cost the fused kernels (native, Triton, KeOps) compute: built-in with p = 1 or 2."""
        return self.fn is None and self.p in (1, 2)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Dense tile (B,n,m), differentiable through torch autograd."""
        if self.fn is not None:
            return self.fn(x, y)
        if self.p == 2:
            return sqdist(x, y) / 2
        if self.p == 1:
            return dist(x, y)
        return dist(x, y) ** self.p / self.p

    def apply_grad(self, W: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   C: Optional[torch.Tensor] = None, inplace: bool = False) -> torch.Tensor:
        """``Σ_j W_ij ∇_x C(x_i, y_j)`` for a weight tile W (B,n,m) -> (B,n,D), through
        :func:`diff_sum` for the built-in costs.

        ``C`` (the cost tile, if the caller has it) saves a recomputation for p=1;
        ``inplace``: W may be overwritten.
        """
        if self.fn is not None:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.fn(xg, y.detach()), xg, W)
            return g
        if self.p != 2:  # ∇_x ‖x−y‖^p/p = ‖x−y‖^(p−2) (x − y)
            d = dist(x, y) if (C is None or self.p != 1) else C
            # d == 1e-4 exactly where geomloss's clamp is active: zero gradient there.
            W, inplace = torch.where(d > math.sqrt(_DIST_CLAMP), W * d ** (self.p - 2),
                                     torch.zeros((), dtype=W.dtype, device=W.device)), True
        return diff_sum(W, x, y, inplace=inplace)


def make_cost(p: int, cost) -> Cost:
    """Turn geomloss's ``p`` / ``cost`` arguments into a :class:`Cost`.

    ``cost`` may be None (from ``p``), a callable ``(x, y) -> (B,N,M)``, one of the KeOps
    formula strings geomloss uses for its built-in costs (``"(SqDist(X,Y) / IntCst(2))"``,
    ``"Norm2(X-Y)"``), or the names ``"sqeuclidean"`` (= ½‖x−y‖², p=2) and ``"euclidean"`` (p=1).
    A geomloss multiscale tuple ``(formula, routine)`` is read through its formula.
    """
    if cost is None:
        return Cost(p)
    if isinstance(cost, tuple) and len(cost) == 2:
        cost = cost[0]
    if isinstance(cost, str):
        key = cost.replace(" ", "").lower()
        table = {"(sqdist(x,y)/intcst(2))": 2, "sqdist(x,y)/intcst(2)": 2, "sqeuclidean": 2,
                 "norm2(x-y)": 1, "euclidean": 1}
        if key not in table:
            raise ValueError(
                f"cost={cost!r} is not a cost otkernels knows: use 'sqeuclidean' (½|x-y|², p=2), "
                f"'euclidean' (|x-y|, p=1), geomloss's formulas '(SqDist(X,Y) / IntCst(2))' and "
                f"'Norm2(X-Y)', or a callable (x, y) -> (B,N,M) tensor.")
        return Cost(table[key])
    if callable(cost):
        return Cost(None, fn=cost)
    raise TypeError(f"cost must be None, a string or a callable (x, y) -> (B,N,M), got {type(cost).__name__}")


class Kernel:
    """A radial kernel ``k(d2)`` of the squared distance ``d2 = ‖x−y‖²`` (geomloss's formulas).

    gaussian ``exp(−d2 / 2σ²)``; laplacian ``exp(−sqrt(max(d2/σ², 1e-8)))``;
    energy ``−sqrt(max(d2, 1e-8))``; σ = blur.
    """

    NAMES = ("gaussian", "laplacian", "energy")

    def __init__(self, name: str, blur: float):
        if name not in self.NAMES:
            raise ValueError(f"unknown kernel {name!r}: expected one of {self.NAMES}")
        self.name, self.blur = name, float(blur)

    def _scaled(self, x, y):
        if self.name == "energy":
            return x, y
        return x / self.blur, y / self.blur

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Dense kernel tile k(x_i, y_j), (B,n,D) x (B,m,D) -> (B,n,m), autograd-friendly."""
        xs, ys = self._scaled(x, y)
        if self.name == "gaussian":
            return (-sqdist(xs, ys) / 2).exp()
        d = dist(xs, ys)
        return (-d).exp() if self.name == "laplacian" else -d

    def value_and_dk(self, x: torch.Tensor, y: torch.Tensor):
        """Tiles ``k`` and ``∂k/∂(d2)`` w.r.t. the *unscaled* squared distance (B,n,m)."""
        xs, ys = self._scaled(x, y)
        s2 = 1.0 if self.name == "energy" else self.blur ** 2
        if self.name == "gaussian":
            k = (-sqdist(xs, ys) / 2).exp()
            return k, -k / (2 * s2)
        d = dist(xs, ys)
        live = d > math.sqrt(_DIST_CLAMP)  # the clamp: no gradient at coincident points
        inv = torch.where(live, 1 / (2 * d * s2), torch.zeros((), dtype=d.dtype, device=d.device))
        if self.name == "laplacian":
            k = (-d).exp()
            return k, -k * inv
        return -d, -inv
