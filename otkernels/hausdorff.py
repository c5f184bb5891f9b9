"""The ε-Hausdorff divergence (Feydy & Trouvé, 2018), with exact gradients.

For a measure α = Σ α_i δ_{x_i}, let ``a`` be its *symmetric* entropic OT potential, the
fixed point ``a(z) = −ε log Σ_k α_k exp((a(x_k) − C(z, x_k))/ε)`` (the debiasing term of the
Sinkhorn divergence), evaluated on x (``a_x``) and extrapolated to y (``a_y``); same for β
with ``b``.  Then

    H_ε(α, β) = ½ [ ⟨α, b_x − a_x⟩ + ⟨β, a_y − b_y⟩ ]  = ½ ⟨α − β, b − a⟩.

H_ε is symmetric, H_ε(α, α) = 0; as ε → 0, a → 0 on the support and b_x → min_j C(x, y_j):
H_0 = ½[⟨α, min_j C(·, y_j)⟩ + ⟨β, min_i C(x_i, ·)⟩], a soft (averaged) Hausdorff distance;
as ε → ∞, H_ε → the kernel norm with k = −C (the energy distance for p=1).

geomloss 0.2.6–0.3.1 routes ``loss="hausdorff"`` to its kernel code with no kernel and fails
with ``KeyError: None``.

Gradients: ``⟨α, a_x⟩ = ½OT_ε(α,α)`` and ``⟨α, b_x⟩`` (b does not depend on α, x) take the
envelope gradient of the extrapolation step; ``⟨β, a_y⟩`` depends on x and α through the
potential ``a``, so its gradient needs the adjoint of the fixed point: solve
``(I + Pᵀ) w = −Qᵀβ`` (P the symmetric plan of α row-normalised, Q the plan from y to α)
by Richardson iterations (the spectrum of P lies in (0, 1] for the positive-definite kernels
exp(−C/ε) of p = 1, 2), then add ``∂_x Sᵀ w`` and ``∂_α Sᵀ w``; and ``∂⟨α, a_x⟩/∂α_i`` is
``a_i − ε/2`` (the plan-mass term of OT_ε(α,α)), exact for any total mass.  These extra terms are added
as ``⟨G, x⟩ − ⟨G, x⟩.detach()`` so any backend with ``softmin`` and ``grad_x`` supports them.
"""
from __future__ import annotations

import torch

from .sinkhorn import log_weights, scal, sinkhorn_sym


def _signed_plan_matvec(C, eps, logs, w):
    """``Σ_i w_i exp(logs_i − C(z, x_i)/ε)`` for signed w, as log-domain pieces.

    Returns ``(lp, ln)`` with the result = exp(lp) − exp(ln), (B, rows of C).
    """
    floor = logs.min() - 1e5
    out = []
    for part in (w.clamp(min=0), (-w).clamp(min=0)):
        h = torch.where(part > 0, logs + part.clamp(min=1e-300 if part.dtype == torch.float64 else 1e-38).log(), floor)
        out.append(-C.softmin(eps, h) / eps)
    return out


def _adjoint_terms(C_xx, C_xy, eps, a_log, f_aa, a_x, b_log, T, tol, maxiter=200):
    """Gradient of ⟨β, T⟩ w.r.t. x and α through the potential ``a`` (not the first-slot terms).

    C_xx: handle C(x, x); C_xy: handle C(x, y); f_aa: the potential used in the extrapolation
    (B,N); a_x = S(f_aa) on x (B,N); T = a_y (B,M).  Returns (G_x (B,N,D), G_α (B,N)).
    """
    la = a_log + f_aa / eps  # log α_k + a_k/ε
    # (Qᵀβ)_k / α_k = exp(a_k/ε − s_k/ε), s = softmin over y with h = log β + T/ε
    hq = b_log + T / eps
    qb = (f_aa / eps - C_xy.softmin(eps, hq) / eps).exp()  # (Qᵀβ)_k / α_k
    alpha = a_log.exp() * (a_log > -1e4)
    v = -alpha * qb

    def Pt(w):  # (Pᵀ w)_k = α_k e^{a_k/ε} Σ_i w_i exp(a_x_i/ε − C_ik/ε)
        lp, ln = _signed_plan_matvec(C_xx, eps, a_x / eps, w)
        return (la + lp).exp() - (la + ln).exp()

    w = v.clone()
    vnorm = v.abs().amax().clamp(min=1e-300)
    for _ in range(maxiter):  # Richardson, ω = 2/3 for a spectrum of I + Pᵀ inside (1, 2]
        r = v - w - Pt(w)
        w = w + (2.0 / 3.0) * r
        if r.abs().amax() <= tol * vnorm:
            break
    u = torch.where(alpha > 0, w / alpha.clamp(min=1e-300), torch.zeros_like(w))
    ones = torch.ones_like(f_aa)
    # ∂_x Sᵀ w: Σ_k P_mk (w_m + α_m u_k) ∇_1 C(x_m, x_k); the Q-term on C(x, y)
    G_x = (C_xx.grad_x(eps, la, a_x, w) + C_xx.grad_x(eps, la, a_x, alpha, s=u)
           + C_xy.grad_x(eps, hq, eps * a_log + f_aa, ones))
    # ∂_α: −ε[(Qᵀβ)_k + (Pᵀw)_k]/α_k
    lp, ln = _signed_plan_matvec(C_xx, eps, a_x / eps, w)
    ptw_over_alpha = (f_aa / eps + lp).exp() - (f_aa / eps + ln).exp()
    G_a = -eps * (qb + ptw_over_alpha)
    return G_x, G_a


def hausdorff(handles, a, x, b, y, eps_list, potentials=False):
    """H_ε(α, β) (B,) or potentials ``(b_x − a_x, a_y − b_y)``; see the module docstring."""
    C_xy, C_yx, C_xx, C_yy = handles
    a_log, b_log = log_weights(a), log_weights(b)
    eps = eps_list[-1]
    (a_x, a_y), f_aa = sinkhorn_sym(C_xx, a_log, eps_list, None, extrapolate=(C_yx,), with_iterate=True)
    (b_y, b_x), g_bb = sinkhorn_sym(C_yy, b_log, eps_list, None, extrapolate=(C_xy,), with_iterate=True)
    if potentials:
        return b_x - a_x, a_y - b_y
    H = 0.5 * (scal(a, b_x - a_x) + scal(b, a_y - b_y))
    if not (x.requires_grad or y.requires_grad or a.requires_grad or b.requires_grad):
        return H
    with torch.no_grad():
        tol = 1e-13 if x.dtype == torch.float64 else 1e-6
        Gx, Ga = _adjoint_terms(C_xx, C_xy, eps, a_log, f_aa, a_x.detach(), b_log, a_y.detach(), tol)
        Gy, Gb = _adjoint_terms(C_yy, C_yx, eps, b_log, g_bb, b_y.detach(), a_log, b_x.detach(), tol)
        # ∂⟨α, a_x⟩/∂α_i = a_i − ε/2 (the plan-mass term of OT_ε(α,α)); autograd sees a_i only
        Ga, Gb = Ga + eps / 2, Gb + eps / 2
    extra = 0.5 * ((Gx * x).sum((1, 2)) + (Ga * a).sum(1) + (Gy * y).sum((1, 2)) + (Gb * b).sum(1))
    return H + extra - extra.detach()

