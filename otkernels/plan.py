"""Entropic transport plans as operators, never stored: ``otkernels.plan``.

The plan of an entropic OT problem between ``α = Σ a_i δ_{x_i}`` and ``β = Σ b_j δ_{y_j}``,

    π_ij = a_i b_j exp((f_i + g_j − C(x_i, y_j)) / ε) = exp(u_i + v_j − C_ij/ε),
    u = log a + f/ε,  v = log b + g/ε,

(geomloss's conventions: C = ½|x−y|² for p = 2, |x−y| for p = 1, ε = blur^p) is an N×M
matrix that this module never builds (except :meth:`TransportPlan.dense`, for small
problems).  Every operator is one pass over tiles of the cost, O((N+M)·(D+K)) memory:

* ``P @ V`` and ``P.T @ U`` (:meth:`TransportPlan.apply`): the backend's fused ``plan_apply``
  reduction (native C++, Triton, KeOps, torch tiles) after its softmin gives each row's
  log-sum-exp, so the exponentials it sums are ≤ 1; differentiable w.r.t. x, y, V and the
  potentials (a tiled backward: :func:`otkernels.backends.blocked.plan_backward`);
* the barycentric map ``T(x_i) = Σ_j π_ij y_j / Σ_j π_ij`` (row-normalised, no cancellation);
* :meth:`~TransportPlan.marginals` (row and column sums: how far from a and b the plan is);
* :meth:`~TransportPlan.sample` (k columns per row, j ~ π_i·, Gumbel-max over tiles) and
  :meth:`~TransportPlan.sample_pairs` (pairs (i, j) ~ π, for coupling minibatches);
* :meth:`~TransportPlan.topk` (a sparse plan: the k largest entries per row).

The sampler, top-k and backward run the torch tile engine of ``backends.blocked`` on the
points' device (GPU included) whatever the backend; ``apply``, the log-sum-exps and the
solve run on the chosen backend.

:func:`transport_plan` solves with ``SamplesLoss("sinkhorn", debias=False,
potentials=True, tol=tol)``: the annealed loop's potentials alone give an accurate value, but
the plan they define can be ~20% off its marginals, so its early stopping continues with full
Sinkhorn updates at the final ε until ``max_i |f_new − f|/ε ≤ tol`` (balanced: the largest
``|log(row sum / a_i)|``), ``max_iter`` updates or a stall; the reached error and the
iterations are stored on the plan (``marginal_error``, ``iterations``, ``info["stalled"]``).
"""
from __future__ import annotations

import torch

from . import _precision, backends
from ._checks import check_finite, check_float_param, check_point_pair, check_tensor, check_weights
from .sinkhorn import log_weights

__all__ = ["TransportPlan", "transport_plan"]


def _points(x, y):
    check_tensor("x", x)
    check_tensor("y", y)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (N,D) or (B,N,D), got shape {tuple(x.shape)}")
    if y.dim() != x.dim():
        raise ValueError(f"x and y must both be (N,D) or both (B,N,D), got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same dimension D, got {x.shape[-1]} and {y.shape[-1]}")
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[-2] == 0 or y.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"empty point cloud or D = 0: x {tuple(x.shape)}, y {tuple(y.shape)}")
    check_point_pair(x, y)
    batched = x.dim() == 3
    return batched, (x if batched else x[None]), (y if batched else y[None])


def _vector(name, w, B, n, x, batched, default=None):
    """A per-point vector (weights or potentials) as (B, n) in x's dtype and device."""
    if w is None:
        return default
    check_tensor(name, w)
    want = (B, n) if batched else (n,)
    if tuple(w.shape) not in (want, want + (1,)):
        raise ValueError(f"{name} must have shape {want} (one value per point), got {tuple(w.shape)}")
    if w.device != x.device:
        raise ValueError(f"{name} must be on the points' device {x.device}, got {w.device}")
    return w.reshape(B, n).to(x.dtype)


def _module(backend, B, N, M, D, device):
    name = backends.select(B, N, M, D, device) if backend == "auto" else backend
    mod = backends.get(name)
    if not (hasattr(mod, "plan_apply_lse") or hasattr(mod, "plan_apply")):
        raise ValueError(f"backend={name!r} has no plan reduction (plan_apply_lse or plan_apply)")
    return mod


class TransportPlan:
    """The entropic plan ``π_ij = a_i b_j exp((f_i + g_j − C(x_i, y_j))/ε)`` as an operator.

    x (N,D) or (B,N,D), y (M,D) or (B,M,D); f (N,) / (B,N), g (M,) / (B,M): dual potentials
    as ``SamplesLoss("sinkhorn", debias=False, potentials=True)`` returns them (or any
    potentials, e.g. :func:`transport_plan`'s refined ones); a, b: weights (default
    uniform, normalised to sum 1); ``blur`` (ε = blur^p) or ``eps``; p = 1 or 2.  Gradients
    flow to x, y, V and f, g when they require them (the potentials are taken as given:
    no implicit differentiation through a solve).  Outputs follow the inputs' batching.
    """

    def __init__(self, x, y, f, g, a=None, b=None, *, blur=None, eps=None, p=2, backend="auto",
                 precision=None, info=None):
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        if (blur is None) == (eps is None):
            raise ValueError("give exactly one of blur (ε = blur^p) and eps")
        self.eps = (check_float_param("blur", blur) ** p) if eps is None else check_float_param("eps", eps)
        self.p, self.precision = p, _precision.check(precision)
        self._batched, x, y = _points(x, y)
        if x.dtype in (torch.float16, torch.bfloat16):  # computed in float32 (as SamplesLoss)
            x, y = x.float(), y.float()
        B, N, M, D = x.shape[0], x.shape[1], y.shape[1], x.shape[2]
        f = _vector("f", f, B, N, x, self._batched)
        g = _vector("g", g, B, M, x, self._batched)
        if f is None or g is None:
            raise ValueError("f and g (the dual potentials) are required")
        check_finite("f", f.detach())
        check_finite("g", g.detach())
        uni = lambda n: torch.full((B, n), 1.0 / n, dtype=x.dtype, device=x.device)  # noqa: E731
        a = _vector("a", a, B, N, x, self._batched, uni(N))
        b = _vector("b", b, B, M, x, self._batched, uni(M))
        check_weights("a", a.detach())
        check_weights("b", b.detach())
        a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
        with torch.no_grad():  # translation invariant costs: centred points lose less to rounding
            c = torch.cat([x.reshape(-1, D), y.reshape(-1, D)]).mean(0)
        self.x, self.y, self._c = x - c, y - c, c
        self.u = log_weights(a) + f / self.eps
        self.v = log_weights(b) + g / self.eps
        self.backend = backend
        self._mod = _module(backend, B, N, M, D, x.device)
        self.info = dict(info or {})

    # ------------------------------------------------------------------ views
    @classmethod
    def _raw(cls, x, y, u, v, eps, p, mod, precision, batched, info, backend, c):
        self = cls.__new__(cls)
        self.x, self.y, self.u, self.v, self.eps, self.p, self._c = x, y, u, v, eps, p, c
        self._mod, self.precision, self._batched, self.info, self.backend = mod, precision, batched, info, backend
        return self

    @property
    def T(self) -> "TransportPlan":
        """The transposed plan πᵀ (M×N): ``plan.T @ U`` is ``πᵀ U``."""
        return TransportPlan._raw(self.y, self.x, self.v, self.u, self.eps, self.p, self._mod, self.precision,
                                  self._batched, self.info, self.backend, self._c)

    @property
    def shape(self):
        B, N, M = self.x.shape[0], self.x.shape[1], self.y.shape[1]
        return (B, N, M) if self._batched else (N, M)

    @property
    def marginal_error(self):
        """The refinement's last ``max |f_new − f|/ε`` (None for a plan built from potentials)."""
        return self.info.get("marginal_error")

    @property
    def iterations(self):
        """Full Sinkhorn updates of the refinement (None for a plan built from potentials)."""
        return self.info.get("iterations")

    def _out(self, t):
        return t if self._batched else t[0]

    # ------------------------------------------------------------------ reductions
    def _lse(self):
        """log Σ_j exp(v_j − C_ij/ε) (B,N), from the backend's fused softmin (no gradient)."""
        from .costs import make_cost

        with torch.no_grad(), _precision.scope(self.precision):
            kw = {} if self._mod.NAME == "tensorized" else {"cache": False}
            h = self._mod.cost_handles(self.x.detach(), self.y.detach(), make_cost(self.p, None), debias=False, **kw)[0]
            return h.softmin(self.eps, self.v.detach()) / (-self.eps)

    def _values(self, V, name):
        check_tensor(name, V)
        B, M = self.x.shape[0], self.y.shape[1]
        if V.device != self.x.device:
            raise ValueError(f"{name} must be on the points' device {self.x.device}, got {V.device}")
        vec = V.dim() == (2 if self._batched else 1)
        Vb = V[..., None] if vec else V
        Vb = Vb if self._batched else Vb[None]
        if Vb.dim() != 3 or Vb.shape[0] != B or Vb.shape[1] != M:
            want = f"({B},{M},K) or ({B},{M})" if self._batched else f"({M},K) or ({M},)"
            raise ValueError(f"{name} must have shape {want}: one row per point of the plan's second "
                             f"cloud, got {tuple(V.shape)}")
        check_finite(name, V.detach())
        return Vb.to(self.x.dtype), vec

    def apply(self, V, normalize=False):
        """``π @ V``: V (M,K) or (M,) [(B,M,K) / (B,M)] -> (N,K) or (N,) [(B,…)].

        ``normalize``: ``Σ_j π_ij V_j / Σ_j π_ij`` (the rows made stochastic; exact even where
        a row's mass underflows).  Differentiable w.r.t. x, y, V, f, g."""
        Vb, vec = self._values(V, "V")
        out = _PlanApply.apply(self.x, self.y, self.u, self.v, Vb, self, bool(normalize))
        out = out[..., 0] if vec else out
        return self._out(out)

    def _row_product(self, V):
        """``(S, lse)``: the row-stochastic plan times V (B,N,K) and each row's log-sum-exp
        (B,N), no gradient: one fused pass where the backend has ``plan_apply_lse`` (native,
        blocked), else its softmin then its ``plan_apply``."""
        x, y, v = self.x.detach(), self.y.detach(), self.v.detach()
        with torch.no_grad(), _precision.scope(self.precision):
            if hasattr(self._mod, "plan_apply_lse"):
                return self._mod.plan_apply_lse(x, y, v, V.detach(), self.eps, self.p, precision=self.precision)
            lse = self._lse()
            safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
            S = self._mod.plan_apply(x, y, -safe, v, V.detach(), self.eps, self.p, precision=self.precision)
            return S.masked_fill(torch.isneginf(lse)[..., None], 0.0), lse

    __matmul__ = apply

    def barycentric_map(self):
        """``T(x_i) = Σ_j π_ij y_j / Σ_j π_ij``: (N,D) [(B,N,D)], in the input coordinates."""
        return self.apply(self._out(self.y), normalize=True) + self._c  # y is stored centred

    def marginals(self):
        """``(π 1 (N,), πᵀ 1 (M,))`` [(B,·)]: compare with a and b to see how converged the plan is."""
        with torch.no_grad():
            rows = (self.u + self._lse()).exp()
            cols = (self.v + self.T._lse()).exp()
        return self._out(rows), self._out(cols)

    @torch.no_grad()
    def sample(self, k=1, generator=None):
        """k column indices per row, drawn independently ∝ row i of π: (N,k) [(B,N,k)] long.
        ``generator``: a torch.Generator on the points' device (None: the global one)."""
        from .backends import blocked

        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        return self._out(blocked.plan_sample(self.x.detach(), self.y.detach(), self.v.detach(), self.eps, k,
                                             self.p, generator))

    @torch.no_grad()
    def sample_pairs(self, n, generator=None):
        """n pairs (i, j) ~ π (i from the row sums, then j ~ π_i·): (i (n,), j (n,)) long
        [(B,n) each]: a coupling minibatch."""
        from .backends import blocked

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        rows, _ = self.marginals()
        rows = rows if self._batched else rows[None]
        i = torch.multinomial(rows / rows.sum(1, keepdim=True), n, replacement=True, generator=generator)
        xi = self.x.detach().gather(1, i[..., None].expand(-1, -1, self.x.shape[2]))
        j = blocked.plan_sample(xi, self.y.detach(), self.v.detach(), self.eps, 1, self.p, generator)[..., 0]
        return self._out(i), self._out(j)

    @torch.no_grad()
    def topk(self, k):
        """The k largest entries of each row: (values (N,k), column indices (N,k)) [(B,N,k)],
        decreasing: a sparse plan with k entries per row."""
        from .backends import blocked

        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.y.shape[1]:
            raise ValueError(f"k must be an int in [1, M = {self.y.shape[1]}], got {k!r}")
        vals, idx = blocked.plan_topk(self.x.detach(), self.y.detach(), self.u.detach(), self.v.detach(),
                                      self.eps, k, self.p)
        return self._out(vals), self._out(idx)

    @torch.no_grad()
    def dense(self, max_bytes=1 << 30):
        """The whole plan (N,M) [(B,N,M)], for small problems: a ValueError when it would take
        more than ``max_bytes`` (default 1 GiB)."""
        from .costs import make_cost

        B, N, M = self.x.shape[0], self.x.shape[1], self.y.shape[1]
        nbytes = B * N * M * self.x.element_size()
        if nbytes > max_bytes:
            raise ValueError(f"the dense plan would take {nbytes / 2 ** 20:.1f} MiB, more than max_bytes = "
                             f"{max_bytes / 2 ** 20:.1f} MiB: use the plan's operators (apply, sample, topk), "
                             "or raise max_bytes")
        C = make_cost(self.p, None)(self.x.detach(), self.y.detach())
        return self._out((self.u.detach()[:, :, None] + self.v.detach()[:, None, :] - C / self.eps).exp_())

    def __repr__(self):
        return (f"TransportPlan(shape={self.shape}, eps={self.eps:.3g}, p={self.p}, backend={self._mod.NAME!r}"
                + (f", marginal_error={self.marginal_error:.2g}, iterations={self.iterations}"
                   if self.marginal_error is not None else "") + ")")


class _PlanApply(torch.autograd.Function):
    """``S_i = Σ_j softmax_j(v_j − C_ij/ε) V_j`` (the plan's fused row product), scaled by
    ``exp(u_i + lse_i)`` unless ``normalize``; backward by tiles (``blocked.plan_backward``)."""

    @staticmethod
    def forward(ctx, x, y, u, v, V, plan, normalize):
        S, lse = plan._row_product(V)
        S = S.to(V.dtype)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(V.dtype)
        out = S if normalize else S * (u.detach() + safe)[..., None].exp().masked_fill(
            torch.isneginf(lse)[..., None], 0.0)
        ctx.save_for_backward(x, y, u, v, V, safe, out)
        ctx.eps, ctx.p, ctx.normalize = plan.eps, plan.p, normalize
        return out

    @staticmethod
    def backward(ctx, G):
        from .backends import blocked

        x, y, u, v, V, lse, out = ctx.saved_tensors
        nx, ny, nu, nv, nV = ctx.needs_input_grad[:5]
        if ctx.normalize:  # softmax derivative: W_ij = Q_ij (G_i·V_j − G_i·S_i); no u dependence
            r, c, du = -lse, (G * out).sum(2), None
        else:
            r, c = u.detach(), None
            du = (G * out).sum(2) if nu else None
        dx, dy, dv, dV = blocked.plan_backward(x.detach(), y.detach(), r, v.detach(), V.detach(), G, ctx.eps, ctx.p,
                                               c=c, need=(nx, ny, nv, nV))
        return dx, dy, du, dv, dV, None, None


def transport_plan(x, y, a=None, b=None, *, blur=0.05, p=2, reach=None, scaling=0.5, diameter=None,
                   tol=1e-6, max_iter=1000, backend="auto", precision=None) -> TransportPlan:
    """Solve entropic OT between ``Σ a_i δ_{x_i}`` and ``Σ b_j δ_{y_j}`` and return its plan.

    x (N,D) / (B,N,D), y (M,D) / (B,M,D); a, b weights (default uniform; normalised to 1).
    blur, p, reach (None: balanced; else the KL marginal penalty ρ = reach^p; a pair
    (reach_x, reach_y) for semi-unbalanced OT), scaling,
    diameter: as :class:`otkernels.SamplesLoss`.  ``tol``: the solve is ``SamplesLoss(...,
    tol=tol, max_iter=max_iter, check_every=1)``: after the annealing, alternating updates at
    ε = blur^p until ``max |f_new − f|/ε ≤ tol`` (balanced: the rows' relative marginal
    error), ``max_iter`` updates, or ``Stopping.STALL`` updates without a new low (the dtype's
    floor, ~1e-4 in float32 at C/ε ~ 60; ``plan.info["stalled"]``); None: geomloss's loop
    alone.
    The solve is not differentiated: gradients of the plan's operators treat the potentials
    as constants.  Memory: the backend's (a cost cache within
    :func:`otkernels.backends.cache_budget` on CPU), never more.
    """
    from .samples_loss import SamplesLoss

    batched, xb, yb = _points(x, y)
    B, N, M = xb.shape[0], xb.shape[1], yb.shape[1]
    if tol is not None:
        tol = check_float_param("tol", tol)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    blur = check_float_param("blur", blur)
    uni = lambda n: torch.full((B, n), 1.0 / n, dtype=xb.dtype, device=xb.device)  # noqa: E731
    ab = _vector("a", a, B, N, xb, batched, uni(N))
    bb = _vector("b", b, B, M, xb, batched, uni(M))
    check_weights("a", ab.detach())
    check_weights("b", bb.detach())
    ab, bb = ab / ab.sum(1, keepdim=True), bb / bb.sum(1, keepdim=True)
    refine = {} if tol is None else {"tol": tol, "max_iter": max_iter, "check_every": 1}
    loss = SamplesLoss("sinkhorn", p=p, blur=blur, reach=reach, diameter=diameter, scaling=scaling, debias=False,
                       potentials=True, backend=backend, precision=precision, **refine)
    with torch.no_grad():
        xs, ys = xb.detach(), yb.detach()
        if xs.dtype in (torch.float16, torch.bfloat16):
            xs, ys, ab, bb = xs.float(), ys.float(), ab.float(), bb.float()
        f, g = loss(ab, xs, bb, ys)
    pair = loss.last_info.get("pair", {})
    info = {"marginal_error": pair.get("marginal_error"), "iterations": pair.get("iterations", 0), "tol": tol,
            "stalled": pair.get("stalled", False)}
    out = lambda t: t if batched else t[0]  # noqa: E731
    return TransportPlan(x, y, out(f.to(xb.dtype)), out(g.to(xb.dtype)), out(ab), out(bb), eps=blur ** p, p=p,
                         backend=backend, precision=precision, info=info)
