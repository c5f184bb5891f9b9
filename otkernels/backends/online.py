"""``backend="online"`` (and ``"multiscale"``): never an N×M matrix, whatever
:func:`otkernels.backends.cache_budget` allows.

geomloss users pick ``"online"`` to keep memory at O((N+M)·D).  Here every Sinkhorn pass
recomputes its cost tiles: with the fused C++ kernels of ``native`` on CPU tensors when they
are available (their uncached passes: GEMM tiles for D > 8, direct distances for D ≤ 8), else
with ``blocked``'s torch tiles (an online log-sum-exp); kernel sums never cache on either.
Peak memory is the points, the potentials and one tile per thread (N = M = 30k, D = 3: see
docs/benchmarks.md).  ``"multiscale"`` maps here too: geomloss's multiscale solver is also
O(N+M) memory, and otkernels computes its exact (untruncated) value.
"""
from __future__ import annotations

from . import _usable, blocked

NAME = "online"
available = blocked.available


def _native(*tensors):
    """The native module when it can take these tensors, else None."""
    if not _usable("native"):
        return None
    from . import native
    return native if native.supports(*tensors) else None


def cost_handles(x, y, cost, debias=True, cache=None):
    """``(C_xy, C_yx, C_xx, C_yy)`` with no cost cache (``cache`` is ignored: tiles are
    recomputed in every pass)."""
    base = _native(x, y) or blocked
    return base.cost_handles(x, y, cost, debias=debias, cache=False)


def kernel_sum(x, y, b, kernel):
    """``Σ_j k(x_i, y_j) b_j``: native's or blocked's (neither stores the kernel matrix)."""
    return (_native(x, y, b) or blocked).kernel_sum(x, y, b, kernel)


def plan_apply_lse(x, y, v, V, eps, p=2, precision=None):
    """The one-pass row-stochastic product and log-sum-exp (see ``blocked.plan_apply_lse``)."""
    return (_native(x, y, V) or blocked).plan_apply_lse(x, y, v, V, eps, p)

