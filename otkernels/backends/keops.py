"""KeOps backend: the reductions as pykeops ``LazyTensor`` formulas (symbolic N×M, O(N+M) memory).

For CUDA tensors when Triton is missing (``backend="auto"``), and as a second, independent
GPU implementation to test the Triton kernels against.  Same interface as ``blocked.py``:

* softmin rows: ``LazyTensor.logsumexp`` of ``h_j − C_ij/ε`` over j; the column reduction is
  the handle of the swapped pair (C(y, x));
* ``grad_x``: a sum reduction of ``P_ij s_j ∇_x C(x_i, y_j)`` with
  ``P_ij = exp(h_j − C_ij/ε + f_i/ε)`` (``∇_x C = x_i − y_j`` for p=2, its unit vector for p=1);
  ``softmin_grad``'s backward normalises the plan inside a ``SumSoftMaxWeight`` reduction
  instead (accurate in float32 when ``C/ε`` is huge);
* kernel sums ``Σ_j k(x_i, y_j) b_j`` and their closed-form gradients (two formulas per
  kernel: the gradients w.r.t. y and b reuse them with x and y swapped).

Costs and kernels are geomloss's, with the same clamp ``sqrt(max(d², 1e-8))``.  ε and 1/σ²
enter the formulas as parameters (``Pm``), not literals, so the ε-schedule of the Sinkhorn
loop reuses one compiled formula.  KeOps compiles one binary per (formula, D, dtype) and caches
it (``KEOPS_CACHE_FOLDER``); the first call of each takes ~10 s on CPU.

Availability: pykeops imports and a CUDA device is present; on a CPU machine (pykeops compiles
C++ for CPU) only with ``OTKERNELS_KEOPS_CPU=1``: KeOps on CPU is for testing (each new D
costs compilations, and the ``native`` backend is faster there).  float16/bfloat16 points are
computed in float32.  A cloud of a single point runs on ``blocked``'s tiles (:func:`_single_point`).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import warnings

import torch

from .._env import flag
from ..costs import Cost, Kernel
from . import _double

NAME = "keops"
_CLAMP = 1e-8


@functools.lru_cache(maxsize=None)
def _import_status():
    try:
        with warnings.catch_warnings():  # pykeops warns about CUDA on CPU machines
            warnings.simplefilter("ignore")
            import pykeops
            from pykeops.torch import LazyTensor  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"pykeops does not import: {type(e).__name__}: {e}"
    return True, f"pykeops {pykeops.__version__}"


def _cpu_opt_in() -> bool:
    return flag("OTKERNELS_KEOPS_CPU")


def available():
    ok, why = _import_status()
    if not ok:
        return False, why
    if torch.cuda.is_available():
        return True, f"{why} on {torch.cuda.get_device_name()}"
    if _cpu_opt_in():
        cxx = os.environ.get("CXX") or "g++"
        if shutil.which(cxx) is None:
            return False, f"{why}: no C++ compiler ({cxx}) to build KeOps formulas for CPU"
        return True, f"{why} on CPU (OTKERNELS_KEOPS_CPU=1: slow, each new formula compiles)"
    return False, (f"{why}, but no CUDA device: the keops backend targets GPUs (set "
                   "OTKERNELS_KEOPS_CPU=1 to run its formulas on CPU)")


def _heal_cache(fn):
    """Run a KeOps reduction; if it fails to load a truncated binary from the KeOps cache (a
    compilation killed half-way, or two processes compiling the same formula), delete that
    binary and run once more: KeOps then compiles it again."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ImportError as e:
            m = re.search(r"(/\S+\.so)\b", str(e))
            if m is None or not os.path.isfile(m.group(1)):
                raise
            warnings.warn(f"otkernels: removing a broken KeOps binary and compiling it again: {e}")
            os.remove(m.group(1))
            return fn(*args, **kwargs)
    return run


def _lazy():
    from pykeops.torch import LazyTensor
    return LazyTensor


def _float(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _i(t):
    """(B,N,D) or (B,N) -> an ``i``-indexed LazyTensor (B,N,1,·)."""
    t = t if t.dim() == 3 else t[:, :, None]
    return _lazy()(t[:, :, None, :].contiguous())


def _j(t):
    """(B,M,D) or (B,M) -> a ``j``-indexed LazyTensor (B,1,M,·)."""
    t = t if t.dim() == 3 else t[:, :, None]
    return _lazy()(t[:, None, :, :].contiguous())


def _param(value, like):
    """A scalar parameter: changing it does not recompile the formula."""
    return _lazy()(torch.full((1, 1, 1, 1), float(value), dtype=like.dtype, device=like.device))


def _clamped_sqdist(x_i, y_j):
    """``max(‖x_i − y_j‖², 1e-8)`` and the raw ``‖x_i − y_j‖²``."""
    d2 = x_i.sqdist(y_j)
    return (d2 - _CLAMP).relu() + _CLAMP, d2


def _cost(x_i, y_j, p):
    if p == 2:
        return x_i.sqdist(y_j) / 2
    return _clamped_sqdist(x_i, y_j)[0].sqrt()


class KeOpsCost:
    """Cost handle ``C(x_i, y_j)`` (p = 1 or 2), x (B,N,D) first argument (gets gradients)."""

    def __init__(self, x, y, cost):
        self.x, self.xd, self.y, self.p = x, _float(x.detach()), _float(y.detach()), cost.p

    @torch.no_grad()
    @_heal_cache
    def softmin(self, eps, h):
        """−ε log Σ_j exp(h_j − C_ij/ε): h (B,M) -> (B,N), no gradient."""
        x_i, y_j = _i(self.xd), _j(self.y)
        h_j = _j(h.to(self.xd.dtype))
        lse = (h_j - _cost(x_i, y_j, self.p) * _param(1 / eps, self.xd)).logsumexp(dim=2)
        return (-eps * lse[:, :, 0]).to(h.dtype)

    def softmin_grad(self, eps, h):
        """Same value; backward ``Σ_j P_ij ∇_x C(x_i, y_j)`` with the row-normalised plan
        (:meth:`plan_grad`)."""
        if not self.x.requires_grad:
            return self.softmin(eps, h)
        return _SoftminGrad.apply(self.x, self, eps, h.detach())

    @torch.no_grad()
    @_heal_cache
    def plan_grad(self, eps, h):
        """``Σ_j P_ij ∇_x C(x_i, y_j)`` with ``P = softmax_j(h_j − C_ij/ε)`` normalised inside one
        KeOps ``SumSoftMaxWeight`` reduction (online max): the rows sum to 1 to rounding even when
        ``C/ε`` exceeds float32's precision, unlike ``exp(h_j − C_ij/ε + f_i/ε)`` rebuilt from a
        stored ``f``.  (B,N,D)."""
        dt = self.xd.dtype
        x_i, y_j = _i(self.xd), _j(self.y)
        ie = _param(1 / eps, self.xd)
        if self.p == 2:
            C, V = x_i.sqdist(y_j) / 2, x_i - y_j
        else:
            t = x_i.sqdist(y_j) - _CLAMP
            C = (t.relu() + _CLAMP).sqrt()
            V = (x_i - y_j) * (t.step() / C)
        return (_j(h.to(dt)) - C * ie).sumsoftmaxweight(V, dim=2).to(self.x.dtype)

    @torch.no_grad()
    @_heal_cache
    def grad_x(self, eps, h, f, g, s=None):
        """``Σ_j g_i P_ij s_j ∇_x C(x_i, y_j)``, ``P_ij = exp(h_j − C_ij/ε + f_i/ε)``: (B,N,D)."""
        dt = self.xd.dtype
        x_i, y_j = _i(self.xd), _j(self.y)
        ie = _param(1 / eps, self.xd)
        if s is None:  # one formula with or without s (each formula compiles once per D)
            s = torch.ones_like(h)
        if self.p == 2:
            C = x_i.sqdist(y_j) / 2
            W = (_j(h.to(dt)) - C * ie + _i(f.to(dt)) * ie).exp() * _j(s.to(dt))
        else:  # (x − y)/‖x − y‖, zero inside the clamp
            t = x_i.sqdist(y_j) - _CLAMP
            C = (t.relu() + _CLAMP).sqrt()
            W = (_j(h.to(dt)) - C * ie + _i(f.to(dt)) * ie).exp() * _j(s.to(dt)) * t.step() / C
        out = (W * (x_i - y_j)).sum(dim=2)
        return (out * g[:, :, None].to(dt)).to(self.x.dtype)


class _SoftminGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle, eps, h):
        ctx.handle, ctx.eps = handle, eps
        ctx.save_for_backward(h)
        return handle.softmin(eps, h)

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        H = ctx.handle
        if _double.create_graph():
            return _double.softmin_backward(H.x, H.y.to(H.x.dtype), h.to(H.x.dtype), ctx.eps, Cost(H.p), g)[0], \
                None, None, None
        G = ctx.handle.plan_grad(ctx.eps, h)
        return G * g[:, :, None].to(G.dtype), None, None, None


@torch.no_grad()
@_heal_cache
def plan_apply(x, y, u, v, V, eps, p=2, precision=None):
    """``Σ_j exp(u_i + v_j − C(x_i, y_j)/ε) V_j``: x (B,N,D), y (B,M,D), u (B,N), v (B,M),
    V (B,M,K) -> (B,N,K): one KeOps sum reduction (the plan's front passes u with the row
    log-sum-exp removed, so the exponentials are ≤ 1)."""
    xd, yd = _float(x.detach()), _float(y.detach())
    dt = xd.dtype
    x_i, y_j = _i(xd), _j(yd)
    L = _i(u.to(dt)) + _j(v.to(dt)) - _cost(x_i, y_j, p) * _param(1 / eps, xd)
    return (L.exp() * _j(V.to(dt))).sum(dim=2).to(x.dtype)


def _single_point(x, y):
    """A cloud of one point: KeOps reads an axis of size 1 as a parameter, not an ``i``/``j``
    variable (its reductions then return the wrong shape), so such calls run on ``blocked``'s
    torch tiles (one point: no N×M work to speak of)."""
    return x.shape[-2] == 1 or y.shape[-2] == 1


def cost_handles(x, y, cost, debias=True, cache=None):
    """``(C_xy, C_yx, C_xx, C_yy)``; a user callable cost or p ∉ {1, 2} goes to the ``blocked`` handles;
    ``cache`` is ignored for the built-in costs (KeOps recomputes every pair)."""
    if not cost.fused or _single_point(x, y):
        from . import blocked
        return blocked.cost_handles(x, y, cost, debias=debias, cache=cache)
    C_xx, C_yy = (KeOpsCost(x, x, cost), KeOpsCost(y, y, cost)) if debias else (None, None)
    return KeOpsCost(x, y, cost), KeOpsCost(y, x, cost), C_xx, C_yy


# ----------------------------------------------------------------------------- kernel sums
def _kernel_formula(x, y, name, blur, grad):
    """LazyTensor ``k(x_i, y_j)`` or, with ``grad``, ``2 ∂k/∂d²`` (d² unscaled)."""
    x_i, y_j = _i(x), _j(y)
    inv_s2 = _param(1.0 if name == "energy" else 1.0 / blur ** 2, x)
    d2 = x_i.sqdist(y_j)
    if name == "gaussian":
        k = (d2 * inv_s2 * -0.5).exp()
        return k * -inv_s2 if grad else k
    d2s = d2 * inv_s2 if name == "laplacian" else d2
    m2 = (d2s - _CLAMP).relu() + _CLAMP
    if name == "laplacian":
        k = (-m2.sqrt()).exp()
        return -k * inv_s2 * m2.rsqrt() * (d2s - _CLAMP).step() if grad else k
    return -m2.rsqrt() * (d2s - _CLAMP).step() if grad else -m2.sqrt()


@torch.no_grad()
@_heal_cache
def _kernel_rows(x, y, b, name, blur):
    """``Σ_j k(x_i, y_j) b_j`` (B,N)."""
    return (_kernel_formula(x, y, name, blur, False) * _j(b)).sum(dim=2)[:, :, 0]


@torch.no_grad()
@_heal_cache
def _kernel_grad_rows(x, y, w, name, blur):
    """``Σ_j 2 k'(d²_ij) w_j (x_i − y_j)`` (B,N,D)."""
    return (_kernel_formula(x, y, name, blur, True) * _j(w) * (_i(x) - _j(y))).sum(dim=2)


class _KernelSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, b, name, blur):
        ctx.name, ctx.blur = name, blur
        ctx.save_for_backward(x, y, b)
        return _kernel_rows(x, y, b, name, blur)

    @staticmethod
    def backward(ctx, g):
        x, y, b = ctx.saved_tensors
        nx, ny, nb = ctx.needs_input_grad[:3]
        if _double.create_graph():
            return (*_double.kernel_sum_backward(x, y, b, Kernel(ctx.name, ctx.blur), g, (nx, ny, nb)), None, None)
        gx = _kernel_grad_rows(x, y, b, ctx.name, ctx.blur) * g[:, :, None] if nx else None
        gy = _kernel_grad_rows(y, x, g, ctx.name, ctx.blur) * b[:, :, None] if ny else None
        gb = _kernel_rows(y, x, g, ctx.name, ctx.blur) if nb else None
        return gx, gy, gb, None, None


def kernel_sum(x, y, b, kernel):
    """``Σ_j k(x_i, y_j) b_j``: x (B,N,D), y (B,M,D), b (B,M) -> (B,N), gradients for x, y, b."""
    from ..costs import Kernel
    if not isinstance(kernel, Kernel) or _single_point(x, y):  # a user callable: torch tiles
        from . import blocked
        return blocked.kernel_sum(x, y, b, kernel)
    dt = x.dtype
    out = _KernelSum.apply(_float(x), _float(y), _float(b), kernel.name, kernel.blur)
    return out.to(dt)
