"""Blocked backend: pure torch on any device, O((N+M)·D + tile) memory.

Reductions walk (row block × column block) tiles of the cost with an online log-sum-exp
(FlashAttention's running max and sum), so no N×M matrix is stored.  Gradients come from
closed forms in ``torch.autograd.Function``s that walk the tiles again: for the Sinkhorn
extrapolation ``∂f_i/∂x_i = Σ_j P_ij ∇_x C(x_i, y_j)`` (attention's P·V), for kernel sums
the three products with ``k`` and ``∂k/∂d²``.

*Cached strategy*: the cost matrices that fit :func:`otkernels.backends.cache_budget` on a
CPU tensor (greedily, ``C_xy`` first, then ``C_xx``, ``C_yy``) are computed once and every pass reads tiles from them (the loop reuses
them ~60 times; recomputing a 10k×10k×128 GEMM costs more than reading 400 MB).  The
column reduction of a symmetric cost reads the same matrix transposed, so ``C_xy`` and
``C_yx`` share one cache.

On this CPU ``exp`` of arguments below −87 (float32) returns denormals ~100× slower than
normal values; arguments are clamped at −80 (float32) / −700 (float64) before ``exp``.
The clamped terms are below 1e-34 relative to the row maximum's term (which is 1): harmless.
"""
from __future__ import annotations

import torch

from ..costs import diff_sum
from . import _double, cache_budget, cache_plan

NAME = "blocked"
TILE = 1 << 18  # elements in one (B, rows, cols) tile: ~1 MB in float32, fits L2
MAX_COLS = 8192
TWO_MIN_D = 8  # softmin_two shares a tile between the two Sinkhorn updates only above this D


def available():
    return True, "pure torch, any device"


def _exp_floor(dtype):
    return -700.0 if dtype == torch.float64 else -80.0


def _grad_floor(dtype):
    # exp(floor) * g * y must stay a normal float (denormals make GEMMs ~100x slower)
    return -500.0 if dtype == torch.float64 else -50.0


def _blocks(n, size):
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _lse_rows(t, mx, s, floor):
    """Online log-sum-exp over the last dim: folds the tile t (B,n,m) (overwritten) into the
    running row max ``mx`` and rescaled sum ``s`` (B,n,1) (None at the first tile)."""
    tmax = t.amax(2, keepdim=True)
    if mx is None:
        mx = tmax
    else:
        new = torch.maximum(mx, tmax)
        s.mul_((mx - new).exp_())
        mx = new
    ts = t.sub_(mx).clamp_(min=floor).exp_().sum(2, keepdim=True)
    return mx, (ts if s is None else s.add_(ts))


class BlockedCost:
    """Cost handle ``C(x_i, y_j)``, x (B,N,D) first argument (gets gradients), y (B,M,D).

    ``cache``: a dense matrix holding ``C(x, y)`` (B,N,M), or, with ``transpose=True``,
    ``C(y, x)`` (B,M,N) read transposed; None recomputes every tile.
    """

    def __init__(self, x, y, cost, cache=None, transpose=False):
        self.x, self.xd, self.y, self.cost = x, x.detach(), y.detach(), cost
        self.cache, self.transpose = cache, transpose
        B, N, M = x.shape[0], x.shape[1], y.shape[1]
        self.bm = max(1, min(M, MAX_COLS, TILE // B))
        self.bn = max(1, min(N, TILE // (B * self.bm)))

    def tile(self, i0, i1, j0, j1):
        """C tile (B, i1−i0, j1−j0) and whether it is a fresh buffer we may overwrite."""
        if self.cache is None:
            return self.cost(self.xd[:, i0:i1], self.y[:, j0:j1]), True
        if self.transpose:
            return self.cache[:, j0:j1, i0:i1].transpose(1, 2), False
        return self.cache[:, i0:i1, j0:j1], False

    def _scaled(self, C, own, eps, h_j, keep=False):
        """``h_j − C_ij/ε`` as a fresh tile (forward and backward use the same float ops,
        so the backward's exponents ``t − lse`` stay ≤ 0 even when C/ε exceeds float precision)."""
        if own and not keep:
            return C.mul_(-1.0 / eps).add_(h_j)
        if own:
            return C.mul(-1.0 / eps).add_(h_j)
        return torch.add(h_j, C, alpha=-1.0 / eps)

    @torch.no_grad()
    def lse(self, eps, h):
        """``log Σ_j exp(h_j − C_ij/ε)``: h (B,M) -> (B,N), online over column blocks."""
        B, N, M = self.x.shape[0], self.x.shape[1], self.y.shape[1]
        out = h.new_empty(B, N)
        floor = _exp_floor(h.dtype)
        for i0, i1 in _blocks(N, self.bn):
            mx = s = None
            for j0, j1 in _blocks(M, self.bm):
                C, own = self.tile(i0, i1, j0, j1)
                mx, s = _lse_rows(self._scaled(C, own, eps, h[:, None, j0:j1]), mx, s, floor)
            out[:, i0:i1] = s.log_().add_(mx).squeeze(2)
        return out

    def softmin(self, eps, h):
        """−ε log Σ_j exp(h_j − C_ij/ε): h (B,M) -> (B,N)."""
        return self.lse(eps, h).mul_(-eps)

    @torch.no_grad()
    def softmin_two(self, eps, h, h_t):
        """This softmin (h (B,M) -> (B,N)) and its transpose's, ``−ε log Σ_i exp(h_t_i −
        C_ij/ε)`` (h_t (B,N) -> (B,M)), from one computation of each tile — the two Sinkhorn
        updates of an iteration.  None when the cost is cached (reading it twice is cheap),
        not symmetric, or D ≤ 8 (measured, 4k×4k, one thread: 1.45× faster at D=128 where
        the tile's GEMM dominates, 0.89× at D=3 where the extra column passes do)."""
        if self.cache is not None or not self.cost.symmetric or self.x.shape[-1] <= TWO_MIN_D:
            return None
        B, N, M = self.x.shape[0], self.x.shape[1], self.y.shape[1]
        out = h.new_empty(B, N)
        floor = _exp_floor(h.dtype)
        cm = h.new_full((B, M), float("-inf"))  # running column max and sum
        cs = h.new_zeros(B, M)
        for i0, i1 in _blocks(N, self.bn):
            mx = s = None
            for j0, j1 in _blocks(M, self.bm):
                C = self.cost(self.xd[:, i0:i1], self.y[:, j0:j1]).mul_(-1.0 / eps)  # −C/ε
                mx, s = _lse_rows(C + h[:, None, j0:j1], mx, s, floor)
                u = C.add_(h_t[:, i0:i1, None])  # columns: h_t_i − C_ij/ε
                old, new = cm[:, j0:j1], torch.maximum(cm[:, j0:j1], u.amax(1))
                cs[:, j0:j1].mul_((old - new).clamp_(min=floor).exp_())
                cs[:, j0:j1] += u.sub_(new[:, None, :]).clamp_(min=floor).exp_().sum(1)
                cm[:, j0:j1] = new
            out[:, i0:i1] = s.log_().add_(mx).squeeze(2)
        return out.mul_(-eps), cs.log_().add_(cm).mul_(-eps)

    def softmin_grad(self, eps, h):
        """Same value; backward ``Σ_j P_ij ∇_x C(x_i, y_j)`` by tiles (never builds P)."""
        if not self.x.requires_grad:
            return self.softmin(eps, h)
        return _SoftminGrad.apply(self.x, self, eps, h.detach())

    def grad_x(self, eps, h, f, g, s=None):
        """``Σ_j g_i P_ij s_j ∇_x C(x_i, y_j)``, ``P_ij = exp(h_j − C_ij/ε + f_i/ε)``: (B,N,D).

        h, s (B,M); f, g (B,N); ``s`` (signed column weights) defaults to 1.
        """
        return self._grad(eps, h, f / eps, g, s)

    @torch.no_grad()
    def _grad(self, eps, h, shift, g, s=None):
        """``Σ_j g_i exp(h_j − C_ij/ε + shift_i) s_j ∇_x C(x_i, y_j)``, (B,N,D)."""
        B, N, M = self.x.shape[0], self.x.shape[1], self.y.shape[1]
        gx = torch.zeros_like(self.xd)
        floor = _grad_floor(h.dtype)
        for i0, i1 in _blocks(N, self.bn):
            for j0, j1 in _blocks(M, self.bm):
                C, own = self.tile(i0, i1, j0, j1)
                W = self._scaled(C, own, eps, h[:, None, j0:j1], keep=True).add_(shift[:, i0:i1, None])
                W = W.clamp_(min=floor).exp_().mul_(g[:, i0:i1, None])
                if s is not None:
                    W.mul_(s[:, None, j0:j1])
                gx[:, i0:i1] += self.cost.apply_grad(W, self.xd[:, i0:i1], self.y[:, j0:j1], C, inplace=True)
        return gx


class _SoftminGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle, eps, h):
        lse = handle.lse(eps, h)
        ctx.handle, ctx.eps = handle, eps
        ctx.save_for_backward(h, lse)
        return lse * -eps

    @staticmethod
    def backward(ctx, g):
        h, lse = ctx.saved_tensors
        H = ctx.handle
        if _double.create_graph():
            return _double.softmin_backward(H.x, H.y, h, ctx.eps, H.cost, g)[0], None, None, None
        return H._grad(ctx.eps, h, -lse, g), None, None, None


@torch.no_grad()
def dense_cost(x, y, cost):
    """C(x, y) as one (B,N,M) matrix, computed by row blocks (no larger temporaries)."""
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    C = x.new_empty(B, N, M)
    rows = max(1, TILE // (B * M))
    for i0, i1 in _blocks(N, rows):
        C[:, i0:i1] = cost(x[:, i0:i1], y)
    return C


def cost_handles(x, y, cost, debias=True, cache=None):
    """``(C_xy, C_yx, C_xx, C_yy)`` handles; ``cache`` None = decide by the memory budget
    (:func:`otkernels.backends.cache_plan`: ``C_xy`` first, then ``C_xx``, ``C_yy``; never on
    GPUs, where recomputing tiles beats reading a cached cost)."""
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    item = x.element_size()
    sizes = [B * N * M * item * (1 if cost.symmetric else 2)]
    sizes += [B * N * N * item, B * M * M * item] if debias else []
    if cache is None and x.device.type != "cpu":
        cache = False
    plan = cache_plan(sizes, cache)
    xd, yd = x.detach(), y.detach()

    def handle(a, b, ad, bd, cached):
        return BlockedCost(a, b, cost, cache=dense_cost(ad, bd, cost) if cached else None)

    if plan[0]:
        K_xy = dense_cost(xd, yd, cost)
        C_xy = BlockedCost(x, y, cost, cache=K_xy)
        if cost.symmetric:  # the column reduction reads C_xy transposed
            C_yx = BlockedCost(y, x, cost, cache=K_xy, transpose=True)
        else:
            C_yx = BlockedCost(y, x, cost, cache=dense_cost(yd, xd, cost))
    else:
        C_xy, C_yx = BlockedCost(x, y, cost), BlockedCost(y, x, cost)
    C_xx = C_yy = None
    if debias:
        C_xx, C_yy = handle(x, x, xd, xd, plan[1]), handle(y, y, yd, yd, plan[2])
    return C_xy, C_yx, C_xx, C_yy


# ----------------------------------------------------------------------------- kernel sums
def kernel_sum(x, y, b, kernel):
    """``Σ_j k(x_i, y_j) b_j``: x (B,N,D), y (B,M,D), b (B,M) -> (B,N), gradients for x, y, b."""
    return _KernelSum.apply(x, y, b, kernel)


def _tiles(N, M, B):
    bm = max(1, min(M, MAX_COLS, TILE // B))
    bn = max(1, min(N, TILE // (B * bm)))
    return [((i0, i1), (j0, j1)) for i0, i1 in _blocks(N, bn) for j0, j1 in _blocks(M, bm)]


class _KernelSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, b, kernel):
        B, N, M = x.shape[0], x.shape[1], y.shape[1]
        out = x.new_zeros(B, N)
        for (i0, i1), (j0, j1) in _tiles(N, M, B):
            K = kernel(x[:, i0:i1], y[:, j0:j1])
            out[:, i0:i1] += torch.bmm(K, b[:, j0:j1, None]).squeeze(2)
        ctx.kernel = kernel
        ctx.save_for_backward(x, y, b)
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, b = ctx.saved_tensors
        nx, ny, nb = ctx.needs_input_grad[:3]
        if _double.create_graph():
            return (*_double.kernel_sum_backward(x, y, b, ctx.kernel, g, (nx, ny, nb)), None)
        B, N, M = x.shape[0], x.shape[1], y.shape[1]
        gx = torch.zeros_like(x) if nx else None
        gy = torch.zeros_like(y) if ny else None
        gb = torch.zeros_like(b) if nb else None
        for (i0, i1), (j0, j1) in _tiles(N, M, B):
            xt, yt, bt, gt = x[:, i0:i1], y[:, j0:j1], b[:, j0:j1], g[:, i0:i1]
            K, dK = ctx.kernel.value_and_dk(xt, yt)
            if nb:
                gb[:, j0:j1] += torch.bmm(gt[:, None, :], K).squeeze(1)
            if nx or ny:
                W = dK.mul_(gt[:, :, None]).mul_(bt[:, None, :])  # g_i b_j k'(d²_ij); ∇_x d² = 2(x−y)
                if nx:  # Σ_j W_ij (x_i − y_j) without the expanded form's cancellation (costs.diff_sum)
                    gx[:, i0:i1] += 2 * diff_sum(W, xt, yt, inplace=not ny)
                if ny:
                    gy[:, j0:j1] += 2 * diff_sum(W.transpose(1, 2), yt, xt, inplace=True)
        return gx, gy, gb, None


# ----------------------------------------------------------------------------- plan operators
# The entropic plan π_ij = exp(u_i + v_j − C(x_i, y_j)/ε) (otkernels.plan), by tiles: never an
# N×M matrix.  plan_apply_lse is this backend's one-pass plan product (torch tiles); the
# backward, the sampler and the top-k below are the torch tile engine every backend's plan
# uses (they run on any device).

def _plan_tiles(B, N, M, width=1):
    """Row and column blocks of a (B,N,M) plan whose tiles hold ≤ TILE·… elements, with
    ``width`` values per entry (a K-column product, k Gumbel draws)."""
    bm = max(1, min(M, MAX_COLS, TILE // max(1, B * width)))
    bn = max(1, min(N, TILE // max(1, B * bm * width)))
    return _blocks(N, bn), _blocks(M, bm)


def _scores(cost, x, y, v, eps, i0, i1, j0, j1):
    """The log-plan tile without its row term, ``v_j − C(x_i, y_j)/ε`` (B, i1−i0, j1−j0)."""
    return cost(x[:, i0:i1], y[:, j0:j1]).mul_(-1.0 / eps).add_(v[:, None, j0:j1])


def _finite_or_zero(m):
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


@torch.no_grad()
def plan_apply_lse(x, y, v, V, eps, p=2, precision=None):
    """``(S (B,N,K), lse (B,N))``: ``lse_i = log Σ_j exp(v_j − C(x_i, y_j)/ε)`` and
    ``S_i = Σ_j exp(v_j − C_ij/ε − lse_i) V_j``, in one pass over column blocks (a running row
    maximum rescales the (rows, K) accumulator and the row sum: FlashAttention's output
    update).  x (B,N,D), y (B,M,D), v (B,M), V (B,M,K).  ``precision`` is ignored."""
    from ..costs import make_cost

    cost = make_cost(p, None)
    B, N, M, K = x.shape[0], x.shape[1], y.shape[1], V.shape[2]
    out = V.new_zeros(B, N, K)
    lse = V.new_full((B, N), float("-inf"))
    rows, cols = _plan_tiles(B, N, M)
    floor = _exp_floor(x.dtype)
    for i0, i1 in rows:
        mx = acc = s = None
        for j0, j1 in cols:
            L = _scores(cost, x, y, v, eps, i0, i1, j0, j1)
            tmax = L.amax(2, keepdim=True)
            if mx is None:
                mx = tmax
            else:
                new = torch.maximum(mx, tmax)
                r = (mx - _finite_or_zero(new)).clamp_(min=floor).exp_()
                acc.mul_(r)
                s.mul_(r)
                mx = new
            W = L.sub_(_finite_or_zero(mx)).clamp_(min=floor).exp_()
            W.masked_fill_(torch.isneginf(mx).expand_as(W), 0.0)
            ts = W.sum(2, keepdim=True)
            s = ts if s is None else s.add_(ts)
            acc = torch.bmm(W, V[:, j0:j1]) if acc is None else acc.baddbmm_(W, V[:, j0:j1])
        pos = s > 0
        out[:, i0:i1] = torch.where(pos, acc / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(acc))
        lse[:, i0:i1] = torch.where(pos, s.log() + _finite_or_zero(mx), torch.full_like(s, float("-inf")))[..., 0]
    return out, lse


@torch.no_grad()
def plan_backward(x, y, r, v, V, G, eps, p=2, c=None, need=(True, True, True, True)):
    """Backward of ``S_i = Σ_j π_ij V_j``, π_ij = exp(r_i + v_j − C(x_i, y_j)/ε), for an upstream
    gradient G (B,N,K), with r treated as given: ``(dx (B,N,D), dy (B,M,D), dv (B,M),
    dV (B,M,K))`` (None where ``need`` is False).  ``c`` (B,N): a per-row offset subtracted
    from G_i·V_j — ``G_i·S_i`` for the row-normalised product (r = −log-sum-exp), whose
    softmax derivative it is.  Per tile: W_ij = π_ij (G_i·V_j − c_i); dL_ij = W_ij with
    L_ij = v_j − C_ij/ε, so dx_i = −Σ_j W_ij ∇_x C_ij / ε, dy_j = −Σ_i W_ij ∇_y C_ij / ε,
    dv_j = Σ_i W_ij, dV_j = Σ_i π_ij G_i.  O(tile) memory."""
    from ..costs import make_cost

    cost = make_cost(p, None)
    nx, ny, nv, nV = need
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    dx = torch.zeros_like(x) if nx else None
    dy = torch.zeros_like(y) if ny else None
    dv = torch.zeros_like(v) if nv else None
    dV = torch.zeros_like(V) if nV else None
    rows, cols = _plan_tiles(B, N, M)
    floor = _grad_floor(x.dtype)
    for i0, i1 in rows:
        for j0, j1 in cols:
            xt, yt = x[:, i0:i1], y[:, j0:j1]
            C = cost(xt, yt)
            P = (r[:, i0:i1, None] + v[:, None, j0:j1] - C / eps).clamp_(min=floor).exp_()
            if nV:
                dV[:, j0:j1] += torch.bmm(P.transpose(1, 2), G[:, i0:i1])
            if not (nx or ny or nv):
                continue
            W = torch.bmm(G[:, i0:i1], V[:, j0:j1].transpose(1, 2))      # G_i·V_j
            if c is not None:
                W.sub_(c[:, i0:i1, None])
            W.mul_(P)
            if nv:
                dv[:, j0:j1] += W.sum(1)
            if nx:
                dx[:, i0:i1] -= cost.apply_grad(W, xt, yt, C) / eps
            if ny:
                dy[:, j0:j1] -= cost.apply_grad(W.transpose(1, 2), yt, xt, C.transpose(1, 2)) / eps
    return dx, dy, dv, dV


@torch.no_grad()
def plan_sample(x, y, v, eps, k, p=2, generator=None):
    """k column indices per row, j ~ π_i· ∝ exp(v_j − C(x_i, y_j)/ε), by the Gumbel-max trick
    over column tiles (the maximum over disjoint tiles composes): (B,N,k) long.  Noise from
    ``generator`` (on the points' device; None: torch's global generator)."""
    from ..costs import make_cost

    cost = make_cost(p, None)
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    best = x.new_full((B, N, k), float("-inf"))
    idx = torch.zeros(B, N, k, dtype=torch.long, device=x.device)
    rows, cols = _plan_tiles(B, N, M, width=k)
    for i0, i1 in rows:
        for j0, j1 in cols:
            L = _scores(cost, x, y, v, eps, i0, i1, j0, j1)     # (B,n,m)
            g = torch.rand(B, i1 - i0, j1 - j0, k, dtype=x.dtype, device=x.device, generator=generator)
            g = g.clamp_(min=torch.finfo(x.dtype).tiny).log_().neg_().log_().neg_()       # Gumbel(0, 1)
            val, arg = (g.add_(L[..., None])).max(2)                                        # (B,n,k)
            take = val > best[:, i0:i1]
            best[:, i0:i1] = torch.where(take, val, best[:, i0:i1])
            idx[:, i0:i1] = torch.where(take, arg + j0, idx[:, i0:i1])
    return idx


@torch.no_grad()
def plan_topk(x, y, u, v, eps, k, p=2):
    """The k largest entries of each row of π = exp(u_i + v_j − C(x_i, y_j)/ε): values
    (B,N,k) and column indices (B,N,k) long, in decreasing order; a running top-k merged
    over column tiles."""
    from ..costs import make_cost

    cost = make_cost(p, None)
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    vals = x.new_full((B, N, k), float("-inf"))
    idx = torch.zeros(B, N, k, dtype=torch.long, device=x.device)
    rows, cols = _plan_tiles(B, N, M)
    for i0, i1 in rows:
        for j0, j1 in cols:
            L = _scores(cost, x, y, v, eps, i0, i1, j0, j1)
            tv, ti = L.topk(min(k, j1 - j0), dim=2)
            cv = torch.cat([vals[:, i0:i1], tv], 2)
            ci = torch.cat([idx[:, i0:i1], ti + j0], 2)
            top, pos = cv.topk(k, dim=2)
            vals[:, i0:i1], idx[:, i0:i1] = top, ci.gather(2, pos)
    return (vals + u[:, :, None]).exp_(), idx

