"""Dense backend: the full (B,N,M) cost matrix, plain torch ops, torch autograd.

The readable reference of the reductions, and the fastest path for small problems
(a few kernel launches, no Python loop over tiles).  Memory O(B·N·M).
"""
from __future__ import annotations

import torch

NAME = "tensorized"


def available():
    return True, "pure torch, any device"


class DenseCost:
    """Cost handle on a dense matrix ``C(x_i, y_j)``, (B,N,M); gradients reach ``x`` only."""

    def __init__(self, x, y, cost):
        self.x, self.y, self.cost = x, y.detach(), cost
        with torch.no_grad():
            self.C = cost(x.detach(), self.y)

    def softmin(self, eps, h):
        """−ε log Σ_j exp(h_j − C_ij/ε): h (B,M) -> (B,N)."""
        return -eps * (h[:, None, :] - self.C / eps).logsumexp(2)

    def softmin_grad(self, eps, h):
        """Same value, differentiable w.r.t. x through torch autograd (as geomloss)."""
        if not self.x.requires_grad:
            return self.softmin(eps, h)
        C = self.cost(self.x, self.y)
        return -eps * (h.detach()[:, None, :] - C / eps).logsumexp(2)

    @torch.no_grad()
    def grad_x(self, eps, h, f, g, s=None):
        """``Σ_j g_i P_ij s_j ∇_x C(x_i, y_j)``, ``P_ij = exp(h_j − C_ij/ε + f_i/ε)``: (B,N,D)."""
        W = (h[:, None, :] - self.C / eps + f[:, :, None] / eps).exp() * g[:, :, None]
        if s is not None:
            W = W * s[:, None, :]
        return self.cost.apply_grad(W, self.x.detach(), self.y, self.C)


def cost_handles(x, y, cost, debias=True):
    """``(C_xy, C_yx, C_xx, C_yy)`` for x (B,N,D), y (B,M,D); C_xx, C_yy None without debias."""
    C_xx, C_yy = (DenseCost(x, x, cost), DenseCost(y, y, cost)) if debias else (None, None)
    return DenseCost(x, y, cost), DenseCost(y, x, cost), C_xx, C_yy


def kernel_sum(x, y, b, kernel):
    """``Σ_j k(x_i, y_j) b_j``: x (B,N,D), y (B,M,D), b (B,M) -> (B,N); full autograd."""
    return (kernel(x, y) @ b.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def plan_apply(x, y, u, v, V, eps, p=2, precision=None):
    """``Σ_j exp(u_i + v_j − C(x_i, y_j)/ε) V_j``: x (B,N,D), y (B,M,D), u (B,N), v (B,M),
    V (B,M,K) -> (B,N,K), from the dense log-plan (each row shifted by its maximum)."""
    from ..costs import make_cost

    L = v[:, None, :] - make_cost(p, None)(x, y) / eps                    # (B,N,M)
    m = L.amax(2, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))          # all −inf rows give 0
    return torch.bmm((L - m).exp_(), V) * (u[:, :, None] + m).exp()

