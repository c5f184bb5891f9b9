"""The Sinkhorn loop, written once over a ``softmin`` reduction (geomloss semantics).

Every backend supplies *cost handles* with two methods (see ``backends/__init__.py``):

* ``C.softmin(eps, h) -> (B,N)``: ``−ε log Σ_j exp(h_j − C_ij/ε)``, no gradient;
* ``C.softmin_grad(eps, h) -> (B,N)``: the same value, differentiable w.r.t. the *first*
  point cloud of ``C`` (``h`` is treated as a constant).

The loop anneals ε along geomloss's schedule, averages old and new potentials at each step,
and ends with one full "extrapolation" update that alone carries gradients (the envelope
gradient of the dual problem, exact at convergence).
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch


def dampening(eps: float, rho: Optional[float]) -> float:
    """λ = 1 / (1 + ε/ρ) for unbalanced OT (KL marginal penalty ρ), 1 when balanced."""
    return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)


def sides(rho):
    """``(ρ_x, ρ_y)`` from ``rho``: None (balanced), one ρ (both marginals penalised) or a pair
    (semi-unbalanced when one is None: that marginal is a hard constraint)."""
    return tuple(rho) if isinstance(rho, (tuple, list)) else (rho, rho)


def log_weights(a: torch.Tensor) -> torch.Tensor:
    """log(a) with zero weights mapped to −1e5 (geomloss's convention)."""
    return torch.where(a > 0, a.log(), torch.full_like(a, -100000.0))


def max_diameter(x: torch.Tensor, y: torch.Tensor) -> float:
    """Diagonal of the bounding box of all the points of x (..,D) and y (..,D)."""
    D = x.shape[-1]
    x, y = x.reshape(-1, D), y.reshape(-1, D)
    mins = torch.minimum(x.min(0).values, y.min(0).values)
    maxs = torch.maximum(x.max(0).values, y.max(0).values)
    return (maxs - mins).norm().item()


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> List[float]:
    """``[diameter^p] + [exp(e) for e in arange(p log d, p log blur, p log scaling)] + [blur^p]``."""
    if diameter <= 0:  # all points coincide: geomloss fails on log(0); start at blur instead
        diameter = blur
    return ([diameter ** p]
            + [float(np.exp(e)) for e in np.arange(p * np.log(diameter), p * np.log(blur), p * np.log(scaling))]
            + [blur ** p])


def _step(item):
    """One ε of the schedule: a float, or for ragged batches ``(ε (S,1), active (S,1))``: one ε
    per segment, each segment on its own schedule (aligned at the end); inactive segments
    (a shorter schedule, not started yet) keep their potentials.  See :func:`ragged_schedule`."""
    return item if isinstance(item, tuple) else (item, None)


def _avg(old, new, active):
    out = 0.5 * (old + new)
    return out if active is None else torch.where(active, out, old)


def ragged_schedule(lists, dtype, device):
    """Per-segment ε-schedules (each from :func:`epsilon_schedule`, all ending at blur^p)
    as one schedule for the loop: the lists aligned at their end, items ``(ε (S,1), active
    (S,1))`` — a segment not started yet carries its first ε, so that item 0 holds every
    segment's initial ε — then the common final ε as a float.  Each segment then follows
    exactly the updates of its own loop."""
    K, final = max(len(e) for e in lists), lists[0][-1]
    if any(e[-1] != final for e in lists):
        raise ValueError("ragged schedules must share their final ε")
    items = []
    for k in range(K - 1):
        start = [K - len(e) for e in lists]
        eps = torch.tensor([e[max(k - s0, 0)] for e, s0 in zip(lists, start)], dtype=dtype, device=device)
        on = torch.tensor([k >= s0 for s0 in start], device=device)
        items.append((eps[:, None], None if bool(on.all()) else on[:, None]))
    return items + [final]


def sinkhorn_pair(C_xy, C_yx, a_log, b_log, eps_list, rho, grad=True, stop=None):
    """OT_ε(α, β): returns the potentials ``(f_ba (B,N), g_ab (B,M))`` after the last extrapolation.

    ``rho``: None, ρ, or ``(ρ_x, ρ_y)``: f (on x, α's marginal) is damped by λ(ε, ρ_x), g by
    λ(ε, ρ_y) (the first-order condition of the KL penalty on each marginal).  ``stop``: a :class:`Stopping` (None: geomloss's loop exactly): more Sinkhorn updates at the
    final ε until the marginal error is within ``stop.tol``."""
    def both(eps, hb, ha):  # the two updates use the same old potentials: one pass if possible
        two = C_xy.softmin_two(eps, hb, ha) if hasattr(C_xy, "softmin_two") else None
        return two if two is not None else (C_xy.softmin(eps, hb), C_yx.softmin(eps, ha))

    rho_x, rho_y = sides(rho)
    with torch.no_grad():
        eps, _ = _step(eps_list[0])
        lx, ly = dampening(eps, rho_x), dampening(eps, rho_y)
        f_ba, g_ab = both(eps, b_log, a_log)
        f_ba, g_ab = lx * f_ba, ly * g_ab
        for item in eps_list:
            eps, on = _step(item)
            lx, ly = dampening(eps, rho_x), dampening(eps, rho_y)
            ft_ba, gt_ab = both(eps, b_log + g_ab / eps, a_log + f_ba / eps)
            f_ba, g_ab = _avg(f_ba, lx * ft_ba, on), _avg(g_ab, ly * gt_ab, on)
        if stop is not None:
            eps = eps_list[-1]

            def step(fg):  # alternating (Gauss-Seidel) updates: much faster than averaged ones here
                f, g = fg
                g = ly * C_yx.softmin(eps, a_log + f / eps)        # (f, g): columns exact (balanced)
                ft = lx * C_xy.softmin(eps, b_log + g / eps)
                return (ft, g), (ft - f).abs().amax() / eps        # (f, g): the rows' log-error
            f_ba, g_ab = stop.run("pair", step, (f_ba, g_ab))
    eps = eps_list[-1]
    sm = "softmin_grad" if grad else "softmin"
    hb, ha = (b_log + g_ab / eps).detach(), (a_log + f_ba / eps).detach()
    return lx * getattr(C_xy, sm)(eps, hb), ly * getattr(C_yx, sm)(eps, ha)


class Stopping:
    """Early stopping at the final ε (an otkernels extension; off by default, so the loop is
    geomloss's).  After the annealing, Sinkhorn updates continue at the final ε — alternating
    ``g ← λ softmin(f)``, ``f̃ ← λ softmin(g)`` for OT(α, β) (the averaged simultaneous update of
    the annealing converges far more slowly at a fixed ε), the same averaged update for the
    symmetric debias loops — until the marginal error ``max |f̃ − f|/ε`` (for balanced OT the
    largest |log(row sum / a_i)| of the plan of (f, g), whose columns are exact) is ≤ ``tol``,
    or ``max_iter`` iterations, or ``STALL`` iterations without a new low (the dtype's floor:
    ``"stalled"`` in ``info``).  The error comes from the updates' own passes (no extra
    reduction); it is read on the host every ``check_every`` iterations only (one sync each on
    CUDA).  ``tol=None`` with ``max_iter``: exactly max_iter more iterations.  ``info`` records,
    per loop ("pair", "xx", "yy"), the iterations run and the last error read."""

    def __init__(self, tol=None, max_iter=None, check_every=5):
        self.tol, self.max_iter, self.check_every = tol, max_iter, int(check_every)
        self.info = {}

    STALL = 50  # with tol: stop when the error read has not reached a new low (by 0.1%) in this many iterations

    def run(self, name, step, state):
        n = self.max_iter if self.max_iter is not None else 1000
        err, k, best, low_at, stalled = None, 0, math.inf, 0, False
        for k in range(1, n + 1):
            state, e = step(state)
            if self.tol is not None and (k % self.check_every == 0 or k == n):
                err = float(e)
                if err < 0.999 * best:
                    best, low_at = err, k
                stalled = err > self.tol and k - low_at >= self.STALL  # the dtype's floor
                if err <= self.tol or stalled:
                    break
            elif k == n:
                err = float(e)
        self.info[name] = {"iterations": k, "marginal_error": err, "stalled": stalled}
        return state


def sinkhorn_sym(C_xx, a_log, eps_list, rho, grad=True, extrapolate=(), with_iterate=False, stop=None,
                 name="xx"):
    """OT_ε(α, α)/2 potential ``f_aa (B,N)``, symmetric loop (geomloss's debias term).

    ``extrapolate``: extra cost handles ``C(z, x)`` on which the same (pre-extrapolation)
    potential is also evaluated, e.g. for the Hausdorff divergence.  Returns the list
    ``[f on x, f on each extrapolated cloud]``, and the loop's last iterate if ``with_iterate``.
    """
    with torch.no_grad():
        eps, _ = _step(eps_list[0])
        lam = dampening(eps, rho)
        f_aa = lam * C_xx.softmin(eps, a_log)
        for item in eps_list:
            eps, on = _step(item)
            lam = dampening(eps, rho)
            ft_aa = lam * C_xx.softmin(eps, a_log + f_aa / eps)
            f_aa = _avg(f_aa, ft_aa, on)
        if stop is not None:
            eps = eps_list[-1]

            def step(f):
                ft = lam * C_xx.softmin(eps, a_log + f / eps)
                return 0.5 * (f + ft), (ft - f).abs().amax() / eps
            f_aa = stop.run(name, step, f_aa)
    eps = eps_list[-1]
    h = (a_log + f_aa / eps).detach()
    sm = "softmin_grad" if grad else "softmin"
    out = [lam * getattr(C, sm)(eps, h) for C in (C_xx, *extrapolate)]
    return (out, f_aa) if with_iterate else out


def scal(a: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Batched dot product ⟨a, f⟩: (B,N), (B,N) -> (B,)."""
    return (a * f).sum(1)


class _UnbalancedValue(torch.autograd.Function):
    """``(ρ + ε/2) ⟨a, u⟩`` with the *correct* envelope gradient.

    geomloss's value for unbalanced OT is ``(ρ+ε/2)·⟨a, u⟩`` (u = 1 − e^{−f/ρ} or
    e^{−f_aa/ρ} − e^{−f_ba/ρ}); its autograd gradient keeps the factor ρ+ε/2, while the
    derivative of the value at the optimum has ρ+ε (geomloss wrote that backward but never
    wires it in).  Backward: ∂/∂u = (ρ+ε)·a, ∂/∂a = (ρ+ε)·u + shift, where shift = −ε/2 for
    the biased OT_ε (it comes from the plan-mass term) and 0 for the debiased divergence.
    Checked against finite differences in tests/test_sinkhorn.py.
    """

    @staticmethod
    def forward(ctx, a, u, rho, eps, shift):
        ctx.save_for_backward(a, u)
        ctx.rho, ctx.eps, ctx.shift = rho, eps, shift
        return (rho + eps / 2) * (a * u).sum(1)

    @staticmethod
    def backward(ctx, g):
        a, u = ctx.saved_tensors
        k = ctx.rho + ctx.eps
        g = g[:, None]
        ga = g * (k * u + ctx.shift) if ctx.needs_input_grad[0] else None
        gu = g * (k * a) if ctx.needs_input_grad[1] else None
        return ga, gu, None, None, None


def _side(w, f_self, f_cross, rho, eps, debias, other_soft):
    """One marginal's term of the value, (B,): ``⟨w, f_cross − f_self⟩`` (debias) or ``⟨w, f⟩``
    for a hard marginal; ``(ρ + ε/2)⟨w, e^{−f_self/ρ} − e^{−f_cross/ρ}⟩`` (debias) or
    ``(ρ + ε/2)⟨w, 1 − e^{−f/ρ}⟩`` for a KL-penalised one (geomloss's value)."""
    if rho is None:
        if debias:
            return scal(w, f_cross - f_self)
        v = scal(w, f_cross)
        if other_soft:  # semi-unbalanced: the masses are free, ∂/∂w = f − ε/2 (envelope, see _UnbalancedValue)
            v = v - (eps / 2) * (w.sum(1) - w.sum(1).detach())
        return v
    e = lambda f: (-f / rho).exp()  # noqa: E731
    if debias:
        return _UnbalancedValue.apply(w, e(f_self) - e(f_cross), rho, eps, 0.0)
    return _UnbalancedValue.apply(w, 1 - e(f_cross), rho, eps, -eps / 2)


def sinkhorn_value(eps, rho, a, b, f_aa, g_bb, g_ab, f_ba, debias=True):
    """Sinkhorn divergence (debias) or OT_ε from the final potentials, (B,).

    ``rho``: None, ρ or ``(ρ_x, ρ_y)``: the value is a sum of one term per marginal, each
    balanced (hard) or KL-penalised (:func:`_side`)."""
    rho_x, rho_y = sides(rho)
    return (_side(a, f_aa, f_ba, rho_x, eps, debias, rho_y is not None)
            + _side(b, g_bb, g_ab, rho_y, eps, debias, rho_x is not None))


def sinkhorn(a, b, handles, eps_list, rho=None, debias=True, potentials=False, stop=None):
    """Run the loop on cost handles ``(C_xy, C_yx, C_xx, C_yy)``; a (B,N), b (B,M) weights;
    ``rho``: None (balanced), ρ, or ``(ρ_x, ρ_y)`` (semi-unbalanced when one is None).

    Returns the divergence (B,) or, with ``potentials``, ``(F (B,N), G (B,M))``.  ``stop``: a
    :class:`Stopping` for early stopping at the final ε (None: geomloss's loop).
    """
    C_xy, C_yx, C_xx, C_yy = handles
    a_log, b_log = log_weights(a), log_weights(b)
    f_ba, g_ab = sinkhorn_pair(C_xy, C_yx, a_log, b_log, eps_list, rho, stop=stop)
    f_aa = g_bb = None
    if debias:
        rho_x, rho_y = sides(rho)  # OT(α, α) penalises both marginals with ρ_x, OT(β, β) with ρ_y
        (f_aa,) = sinkhorn_sym(C_xx, a_log, eps_list, rho_x, stop=stop, name="xx")
        (g_bb,) = sinkhorn_sym(C_yy, b_log, eps_list, rho_y, stop=stop, name="yy")
    if potentials:
        return (f_ba - f_aa, g_ab - g_bb) if debias else (f_ba, g_ab)
    return sinkhorn_value(eps_list[-1], rho, a, b, f_aa, g_bb, g_ab, f_ba, debias)
