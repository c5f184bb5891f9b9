"""Exact sharded OT, MMD, metrics and assignment over ``torch.distributed`` (NCCL, gloo).

Each rank holds a *shard* of the points: rows ``x_r`` (N_r,D) or (B,N_r,D) of α with weights
``a_r``, rows ``y_r`` of β with ``b_r`` (any split, uneven or empty shards included; the
global clouds are the shards concatenated in rank order).  The functions here return what
the single-process functions return on the concatenated clouds, up to float round-off:

* :class:`SamplesLoss` — ``otkernels.SamplesLoss`` with a ``process_group``: Sinkhorn
  divergence / OT_ε (balanced or unbalanced, debiased or not, any p and backend, early
  stopping), the ε-Hausdorff divergence and the kernel losses (energy, gaussian, laplacian:
  ½·MMD²).  The value is the global one on every rank; its gradient on a rank is the
  gradient with respect to *that rank's* points and weights (backward on every rank, as with
  DDP); ``potentials=True`` returns each rank's rows of the potentials;
* :func:`mmd2`, :func:`polynomial_mmd2`, :func:`kid` — :mod:`otkernels.metrics`' MMD²
  (biased or unbiased, radial or polynomial kernels, the median bandwidth) and KID (the same
  subsets) of sharded feature sets;
* :func:`prdc`, :func:`fid`, :func:`feature_stats` — precision / recall / density / coverage
  with both feature sets sharded, and the Fréchet distance from statistics merged across ranks;
* :func:`argmax_inner`, :func:`argmin_sqdist` — the assignment reductions of
  :mod:`otkernels.assign` with the *targets* sharded (queries replicated): global indices;
* :func:`gather` — a rank-ordered all-gather of uneven shards (the helper the rest uses).

How (one Sinkhorn loop, every backend's kernels).  The points of both clouds are
all-gathered once per call.  :func:`otkernels.sinkhorn.sinkhorn` runs unchanged on four
*sharded cost handles* built from the backend's own handles on blocks of the cost matrix:

* OT(α, β): rank r holds the block C(x_r, y).  One pass (the backend's fused
  ``softmin_two`` where it has one) gives the rank's complete row softmins f_r (the column
  vector h = log b + g/ε is all-gathered first) and *partial* column softmins of every y_j
  over x_r only; those are merged exactly across ranks (all-gather of the (B, M) partials and
  a log-sum-exp: −ε log Σ_r exp(−p_rj/ε)).  Work N_r·M per iteration: 1/W of one process's.
* the debias loops OT(α, α), OT(β, β): the symmetric matrix is cut so that every unordered
  pair of points is computed once over all ranks (rank r: its diagonal block, the first half
  of each later rank's columns, the second half of its own rows against each earlier rank);
  each block's row and column softmins are partials, merged the same way.  Work ≈ N·N_r/2.
* the final extrapolation (the only step with gradients) uses the rank's rows against the
  whole other cloud, C(x_r, y), C(y_r, x), C(x_r, x), C(y_r, y), so the backward is local
  (``softmin_grad`` differentiates the first argument only); the three not cached above are
  computed once, uncached.

The blocks are cached within :func:`otkernels.backends.cache_budget` per process (pair block
first), so W processes cache W budgets' worth.  The ε-schedule's diameter comes from an
all-reduced bounding box, the centring translation from an all-reduced mean, so every rank
anneals the same way.  The value ``Σ_i a_i f_i + Σ_j b_j g_j`` (and the unbalanced formula,
also a sum over points) is reduced with one all-reduce and returned as
``local + (global − local).detach()``: global in value, this rank's share in gradient.

Communication per Sinkhorn iteration (B batches, N = ΣN_r, M = ΣM_r, W ranks, s bytes per
element), received by each rank: OT(α, β) all-gathers the B·M values of h and the W·B·M
partial column softmins; the debias loops B·N + W·B·N and B·M + W·B·M: in all
**(W + 1)·B·(N + 2M)·s** with ``debias=True``, (W + 1)·B·M·s without (the gathers of h pad
the shards to the largest).  Once per call: the points, B·(N + M)·D·s.  Overlap: the
partials of OT(α, β) go in ``PAIR_CHUNKS`` all-gathers, each started before the next column
chunk is computed; the debias loops' gather of h runs during the diagonal block.
"""
from __future__ import annotations

import inspect
import time

import torch
import torch.distributed as dist

from . import _precision, backends
from ._checks import check_finite, check_same_device, check_tensor, check_weights
from .costs import Kernel
from .kernel_losses import CallableKernel
from .hausdorff import hausdorff
from .samples_loss import SamplesLoss as _SamplesLoss
from .samples_loss import _offsets, _outputs, _rho, _unit
from .sinkhorn import Stopping, epsilon_schedule, scal, sinkhorn

__all__ = ["SamplesLoss", "mmd2", "polynomial_mmd2", "kid", "prdc", "fid", "feature_stats", "argmax_inner",
           "argmin_sqdist", "gather", "world", "is_sharded"]


# ----------------------------------------------------------------------------- communication
def world(group=None):
    """``(rank, world size)`` in ``group`` (None: the default group); ``(0, 1)`` when
    torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_sharded(group=None) -> bool:
    """Whether ``group`` has more than one rank (the functions here then communicate)."""
    return world(group)[1] > 1


PAIR_CHUNKS = 4  # column chunks of the OT(α, β) block: their all-gathers overlap the next chunk's pass


class _Comm:
    """Collectives of one process group on tensors of one device.  ``_Comm.blocked``: the
    seconds this process has spent blocked in them (in the call or in the wait of an
    asynchronous one: transfer plus waiting for the other ranks), for the benchmark."""

    blocked = 0.0

    def __init__(self, group, device):
        self.group, self.device = group, device
        self.rank, self.size = world(group)

    def all_gather(self, t, wait=True):
        """Every rank's ``t`` (same shape on all ranks), in rank order: a list; with
        ``wait=False`` the collective is started and a function returning the list is returned
        (call it after the independent work)."""
        t = t.detach().contiguous()
        out = [torch.empty_like(t) for _ in range(self.size)]
        t0 = time.perf_counter()
        work = dist.all_gather(out, t, group=self.group, async_op=not wait)
        _Comm.blocked += time.perf_counter() - t0
        if wait:
            return out

        def result():
            t1 = time.perf_counter()
            work.wait()
            _Comm.blocked += time.perf_counter() - t1
            return out
        return result

    def sizes(self, *ints):
        """Every rank's tuple of ints ``ints``: a list (rank order) of tuples."""
        t = torch.tensor(ints, dtype=torch.int64, device=self.device)
        return [tuple(int(v) for v in r) for r in self.all_gather(t)]

    def cat(self, t, sizes, dim=1, wait=True):
        """The rank-ordered concatenation along ``dim`` of every rank's ``t`` (``sizes[r]``
        long along ``dim``), padded to the largest shard for the collective; no gradient.
        ``wait=False``: started, a function returning it (see :meth:`all_gather`)."""
        t = t.detach()
        pad = max(sizes) - t.shape[dim]
        if pad:
            shape = list(t.shape)
            shape[dim] = pad
            t = torch.cat([t, t.new_zeros(shape)], dim)
        parts = self.all_gather(t, wait)

        def join(ps):
            return torch.cat([p.narrow(dim, 0, n) for p, n in zip(ps, sizes)], dim)
        return join(parts) if wait else lambda: join(parts())

    def reduce(self, t, op="sum"):
        """All-reduce of a detached copy of ``t``: ``"sum"``, ``"min"`` or ``"max"``."""
        t = t.detach().clone()
        t0 = time.perf_counter()
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                               "max": dist.ReduceOp.MAX}[op], group=self.group)
        _Comm.blocked += time.perf_counter() - t0
        return t


def gather(t, dim=0, group=None):
    """All-gather of uneven shards: the rank-ordered concatenation of every rank's ``t``
    along ``dim`` (the other dimensions must agree), detached.  A plain ``t`` without a group."""
    if not is_sharded(group):
        return t.detach()
    comm = _Comm(group, t.device)
    sizes = [s[0] for s in comm.sizes(t.shape[dim])]
    return comm.cat(t, sizes, dim)


# ----------------------------------------------------------------------------- Sinkhorn handles
def _merge(a, b, eps):
    """Softmins over two disjoint column sets merged: ``−ε log(e^{−a/ε} + e^{−b/ε})`` (+inf: empty)."""
    return -eps * torch.logaddexp(-a / eps, -b / eps)


def _two(C, Ct, eps, h_cols, h_rows):
    """Row softmin (over the block's columns, h_cols) and column softmin (over its rows, h_rows)
    of one block: one pass where the backend fuses them (``softmin_two``), else two."""
    two = C.softmin_two(eps, h_cols, h_rows) if hasattr(C, "softmin_two") else None
    return two if two is not None else (C.softmin(eps, h_cols), Ct.softmin(eps, h_rows))


def _empty_rows(x, H, grad):
    """The softmin of an empty shard, (B, 0); attached to x for a (B,0,D) gradient."""
    return x.sum(-1) * 0 if grad and x.requires_grad else H.new_zeros(H.shape[0], 0)


class _Shards:
    """The shards of one cloud: sizes, this rank's offset, the gathered points."""

    def __init__(self, local, sizes, comm):
        self.local, self.sizes, self.comm = local, sizes, comm
        self.start = sum(sizes[:comm.rank])
        self.n = sizes[comm.rank]
        self.all = comm.cat(local, sizes)

    def gather(self, h, wait=True):
        return self.comm.cat(h.detach(), self.sizes, wait=wait)

    def splice(self, t, gathered=None):
        """The gathered (B, total, ...) tensor with this rank's rows replaced by ``t`` itself
        (attached: gradients reach this rank's t only)."""
        G = self.gather(t) if gathered is None else gathered
        return torch.cat([G[:, :self.start], t, G[:, self.start + self.n:]], 1)

    def rows(self, t):
        """This rank's entries of a (B, total, ...) tensor."""
        return t[:, self.start:self.start + self.n]

    def mine(self, partial, eps):
        """Merge every rank's partial softmins (B, total) and keep this rank's entries."""
        P = torch.stack(self.comm.all_gather(partial))
        return (-eps * torch.logsumexp(-P / eps, 0))[:, self.start:self.start + self.n]


class _Pair:
    """OT(α, β) on rank r: the block ``C(x_r, y)`` (this rank's rows of x against all of y).
    One pass gives this rank's complete row softmins (f_r) and the column softmins of y over
    x_r only; the latter are merged across ranks (an all-gather of (B, M) partial softmins and
    a log-sum-exp): N_r·M cost entries per iteration, 1/W of the single-process work.  The
    block is cut into ``PAIR_CHUNKS`` column chunks (one backend handle and cache each): the
    all-gather of a chunk's partials is started before the next chunk is computed and waited
    for after the last, so all but the last chunk's communication overlaps compute; f_r
    merges the chunks' row softmins.  The gradient of g w.r.t. y_r (final extrapolation only)
    uses a second, uncached handle ``C(y_r, x)``."""

    def __init__(self, xs, ys, cached, make):
        self.xs, self.ys, self.make, self.Cy = xs, ys, make, None
        self.cuts = self.chunks(ys.all.shape[1])
        self.blocks = [make(xs.local, ys.all[:, j0:j1], c) for (j0, j1), c in zip(self.cuts, cached)] if xs.n else []

    @staticmethod
    def chunks(M):
        k = min(PAIR_CHUNKS, M)
        return [(M * i // k, M * (i + 1) // k) for i in range(k)]

    def rows(self, eps, hb, grad=False):
        """f_r from the whole column vector hb (B, M)."""
        if not self.blocks:
            return _empty_rows(self.xs.local, hb, grad)
        f = None
        for (j0, j1), (C, _) in zip(self.cuts, self.blocks):
            fj = C.softmin_grad(eps, hb[:, j0:j1]) if grad else C.softmin(eps, hb[:, j0:j1])
            f = fj if f is None else _merge(f, fj, eps)
        return f

    def _pass(self, eps, ha_r, hb=None):
        """One pass over the chunks: (f_r from hb, or None) and g_r, the column softmins over
        x_r merged over the ranks (each chunk's all-gather overlapping the next chunk)."""
        f, pending = None, []
        for k, (j0, j1) in enumerate(self.cuts):
            if not self.blocks:
                part = ha_r.new_full((ha_r.shape[0], j1 - j0), float("inf"))
            elif hb is None:
                part = self.blocks[k][1].softmin(eps, ha_r)
            else:
                fj, part = _two(*self.blocks[k], eps, hb[:, j0:j1], ha_r)
                f = fj if f is None else _merge(f, fj, eps)
            pending.append(self.ys.comm.all_gather(part, wait=False))
        g = torch.cat([-eps * torch.logsumexp(-torch.stack(p()) / eps, 0) for p in pending], 1)
        return f, self.ys.rows(g)

    def cols(self, eps, ha_r):
        """g_r: the column softmins over x_r, merged over the ranks."""
        return self._pass(eps, ha_r)[1]

    def both(self, eps, hb_r, ha_r):
        hb = self.ys.gather(hb_r)
        f, g = self._pass(eps, ha_r, hb)
        return (_empty_rows(self.xs.local, hb, False) if f is None else f), g

    def cols_grad(self, eps, ha):
        """g_r differentiable w.r.t. y_r, from the whole row vector ha (B, N)."""
        if not self.ys.n:
            return _empty_rows(self.ys.local, ha, True)
        if self.Cy is None:
            self.Cy = self.make(self.ys.local, self.xs.all, False)[0]
        return self.Cy.softmin_grad(eps, ha)


class _Rows:
    """C_xy for the loop: this rank's rows (f_r) of OT(α, β); the two half-updates together."""

    def __init__(self, pair):
        self.pair = pair

    def softmin(self, eps, h):
        return self.pair.rows(eps, self.pair.ys.gather(h))

    def softmin_grad(self, eps, h):
        return self.pair.rows(eps, self.pair.ys.gather(h), grad=True)

    def softmin_two(self, eps, h, h_t):
        return self.pair.both(eps, h, h_t)


class _Cols:
    """C_yx for the loop: this rank's entries (g_r) of OT(α, β)'s column softmins."""

    def __init__(self, pair):
        self.pair = pair

    def softmin(self, eps, h):
        return self.pair.cols(eps, h)

    def softmin_grad(self, eps, h):
        return self.pair.cols_grad(eps, self.pair.xs.gather(h))


class _Self:
    """C(x, x) for the debias loop, symmetric: the pairs of shards (r, s) are split so that each
    unordered pair of points is computed once over all ranks — rank r holds its diagonal block
    C(x_r, x_r), for s > r the block C(x_r, first half of x_s), for s < r the block C(second
    half of x_r, x_s) — and each block's row and column softmins are partial softmins of the
    points on either side, merged across ranks (all-gather of (B, N) and a log-sum-exp).  Work
    per rank ≈ N·N_r/2 cost entries per iteration (the single-process loop: N²/2 with its
    symmetric tiles).  The all-gather of h runs while the diagonal block (which needs this
    rank's h only) is computed.  The gradient (final extrapolation) uses an uncached handle
    C(x_r, x)."""

    def __init__(self, xs, cached, make):
        self.xs, self.make, self.Cg = xs, make, None
        sizes, r = xs.sizes, xs.comm.rank
        starts = [sum(sizes[:s]) for s in range(len(sizes))]
        spans = []
        if sizes[r]:
            spans.append(((starts[r], starts[r] + sizes[r]), None))
        for s in range(len(sizes)):
            if s == r:
                continue
            if s > r:
                u, v = (starts[r], starts[r] + sizes[r]), (starts[s], starts[s] + sizes[s] // 2)
            else:
                u, v = (starts[r] + sizes[r] // 2, starts[r] + sizes[r]), (starts[s], starts[s] + sizes[s])
            if u[1] > u[0] and v[1] > v[0]:
                spans.append((u, v))
        self.blocks = []
        for (u, v), c in zip(spans, cached):
            pu = xs.all[:, u[0]:u[1]]
            if v is None:  # the diagonal block: one symmetric handle
                self.blocks.append((u, u, make(pu, pu, c)[0], None))
            else:
                self.blocks.append((u, v, *make(pu, xs.all[:, v[0]:v[1]], c)))

    @staticmethod
    def spans_sizes(sizes, rank, B, item):
        """Bytes of this rank's blocks (for the cache plan), in the order __init__ builds them."""
        out = [B * sizes[rank] ** 2 * item] if sizes[rank] else []
        for s in range(len(sizes)):
            if s == rank:
                continue
            nu = sizes[rank] if s > rank else sizes[rank] - sizes[rank] // 2
            nv = sizes[s] // 2 if s > rank else sizes[s]
            if nu and nv:
                out.append(B * nu * nv * item)
        return out

    def softmin(self, eps, h_r):
        H = self.xs.gather(h_r, wait=False)  # started: the diagonal block (first) needs h_r only
        part = h_r.new_full((h_r.shape[0], sum(self.xs.sizes)), float("inf"))
        for (u0, u1), (v0, v1), C, Ct in self.blocks:
            if Ct is None:
                part[:, u0:u1] = _merge(part[:, u0:u1], C.softmin(eps, h_r), eps)
                continue
            H = H() if callable(H) else H
            rows, cols = _two(C, Ct, eps, H[:, v0:v1], H[:, u0:u1])
            part[:, u0:u1] = _merge(part[:, u0:u1], rows, eps)
            part[:, v0:v1] = _merge(part[:, v0:v1], cols, eps)
        if callable(H):  # no off-diagonal block on this rank: the collective still completes
            H()
        return self.xs.mine(part, eps)

    def softmin_grad(self, eps, h_r):
        H = self.xs.gather(h_r)
        if not self.xs.n:
            return _empty_rows(self.xs.local, H, True)
        if self.Cg is None:
            self.Cg = self.make(self.xs.local, self.xs.all, False)[0]
        return self.Cg.softmin_grad(eps, H)


class _RowBlock:
    """C(u, v) as a handle on *global* vectors (ε-Hausdorff): rank r computes the rows of its
    shard u_r against the gathered cloud v (the backend's handle ``C(u_r, v)``) and the rows are
    all-gathered, so every rank holds the same (B, N) results and any loop over them (with its
    convergence tests) runs identically on every rank.  ``softmin_grad`` keeps this rank's rows
    attached (the first argument, as in one process); ``grad_x`` is gathered by rows."""

    def __init__(self, us, v, cached, make):
        self.us = us
        self.C = make(us.local, v, cached)[0] if us.n else None

    def softmin(self, eps, h):
        local = self.C.softmin(eps, h) if self.C is not None else h.new_zeros(h.shape[0], 0)
        return self.us.gather(local)

    def softmin_grad(self, eps, h):
        local = self.C.softmin_grad(eps, h) if self.C is not None else _empty_rows(self.us.local, h, True)
        return self.us.splice(local)

    def grad_x(self, eps, h, f, g, s=None):
        if self.C is None:
            local = h.new_zeros(h.shape[0], 0, self.us.local.shape[2])
        else:
            local = self.C.grad_x(eps, h, self.us.rows(f), self.us.rows(g), s)
        return self.us.gather(local)


def _maker(backend, cost, device):
    """``make(u, v, cached) -> (C(u, v), C(v, u))``: the backend's handles for one block (the
    second reads the first's cache transposed on the caching backends)."""
    takes_cache = "cache" in inspect.signature(backend.cost_handles).parameters

    def make(u, v, cached):
        kw = {"cache": bool(cached)} if takes_cache and device.type == "cpu" else {}
        return backend.cost_handles(u, v, cost, debias=False, **kw)[:2]
    return make


class _GlobalStopping(Stopping):
    """Early stopping on the largest marginal error over all ranks (every rank stops together)."""

    def __init__(self, comm, *args):
        super().__init__(*args)
        self.comm = comm

    def run(self, name, step, state):
        def global_step(s):
            s, e = step(s)
            return s, self.comm.reduce(torch.as_tensor(e, dtype=torch.float64, device=self.comm.device), "max")
        return super().run(name, global_step, state)


# ----------------------------------------------------------------------------- SamplesLoss
class SamplesLoss(_SamplesLoss):
    """``otkernels.SamplesLoss`` on sharded point clouds: ``SamplesLoss(..., process_group=None)``.

    Same constructor arguments (plus ``process_group``: the ranks that hold the shards; None:
    the default group) and call forms ``L(x, y)``, ``L(a, x, b, y)`` with this rank's shards
    x (N_r,D) or (B,N_r,D), a (N_r,) / (B,N_r) (and y, b); N_r may differ between ranks and
    be 0.  Default weights are uniform over the *global* clouds (1/N).  Returns the global
    value (scalar or (B,)) on every rank, whose gradient is the gradient of the global value
    with respect to this rank's x, a, y, b — call ``backward()`` on every rank — or, with
    ``potentials=True``, this rank's rows (F_r, G_r) of the potentials.  Without an
    initialised process group (or with one rank) it is ``otkernels.SamplesLoss``.

    Not sharded (``NotImplementedError``): ragged batches, cluster labels; early stopping
    (``tol``) needs non-empty shards.  Every rank must call with the
    same B, D, dtype and options (a mismatch of B or D raises on every rank).
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, *args, **kwargs):
        if not is_sharded(self.process_group):
            return super().forward(*args, **kwargs)
        with _precision.scope(self.precision):
            if kwargs or (args and isinstance(args[-1], (list, tuple))):
                return self._sharded_ragged(args, **kwargs)
            return self._sharded(*args)

    def _sharded_ragged(self, args, x_batch=None, y_batch=None, x_offsets=None, y_offsets=None):
        """Ragged batches: each rank holds its shard of every segment (any of them may be empty
        on a rank): lists of S clouds (the same S on every rank), or (N_r, D) rows with sorted
        segment ids ``x_batch`` (a rank's ids may skip segments) or non-decreasing ``x_offsets``
        (S+1,).  Segment k of the global problem is the rank-ordered concatenation of the
        ranks' segments k; the segments are solved one after the other, as in one process."""
        if len(args) not in (2, 4):
            raise ValueError("ragged batches take (x, y) or (a, x, b, y)")
        a, x, b, y = (None, args[0], None, args[1]) if len(args) == 2 else args
        listed = isinstance(x, (list, tuple))
        err, segs = "", {}
        try:
            if (a is None) != (b is None):
                raise ValueError("give both weights a and b, or neither")
            for name, pts, w, batch, offsets in (("x", x, a, x_batch, x_offsets), ("y", y, b, y_batch, y_offsets)):
                segs[name] = _segments(name, pts, w, batch, offsets, listed)
        except (TypeError, ValueError) as e:
            err = str(e)
        first = x[0] if listed and x else x
        comm = _Comm(self.process_group, first.device if isinstance(first, torch.Tensor) else None)
        sizes = comm.sizes(bool(err), *(len(segs[n][0]) if not err else 0 for n in "xy"),
                           *(int(segs[n][2]) if not err else 0 for n in "xy"))
        if err or any(s[0] for s in sizes):
            raise ValueError("ragged batches: " + (err or "invalid input on rank "
                                                   + ", ".join(str(r) for r, s in enumerate(sizes) if s[0])))
        S = max(max(s[1], s[2]) for s in sizes)
        if S == 0 or any(s[k] != S for s in sizes for k in (1, 2) if s[k + 2] or listed):  # lists, offsets: S
            raise ValueError("ragged batches: every rank must give the same number (> 0) of segments for x and y, "
                             "got " + ", ".join(f"rank {r}: {s[1]}, {s[2]}" for r, s in enumerate(sizes)))
        if not listed:  # segment ids: this rank's trailing segments may be absent (empty)
            for name, t, w in (("x", x, a), ("y", y, b)):
                pts, ws, _ = segs[name]
                pts += [t[:0]] * (S - len(pts))
                if ws is not None:
                    ws += [w[:0]] * (S - len(ws))
        (xs, as_, _), (ys, bs_, _) = segs["x"], segs["y"]
        outs = [self._sharded(xk, yk) if as_ is None else self._sharded(as_[k], xk, bs_[k], yk)
                for k, (xk, yk) in enumerate(zip(xs, ys))]
        if not self.potentials:
            return torch.stack(outs)
        F, G = [o[0] for o in outs], [o[1] for o in outs]
        return (F, G) if listed else (torch.cat(F), torch.cat(G))

    def _shard(self, a, x, b, y, comm):
        """Checked shards (B,N_r,D), (B,M_r,D) and weights (B,N_r), (B,M_r); global sizes."""
        check_tensor("x", x)
        check_tensor("y", y)
        if x.dim() not in (2, 3) or y.dim() != x.dim():
            raise ValueError(f"x and y must both be (N,D) or both (B,N,D), got shapes {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
        if (a is None) != (b is None):
            raise ValueError("give both weights a and b, or neither")
        check_same_device(x=x, y=y, a=a, b=b)
        batched = x.dim() == 3
        xb, yb = (x, y) if batched else (x[None], y[None])
        B, N_r, M_r, D = xb.shape[0], xb.shape[1], yb.shape[1], xb.shape[2]
        sizes = comm.sizes(B, N_r, M_r, D, yb.shape[0], yb.shape[2])
        if any(s[0] != B or s[3] != D or s[4] != B or s[5] != D for s in sizes):
            raise ValueError("every rank must hold shards with the same batch size B and dimension D, got "
                             + ", ".join(f"rank {r}: B={s[0]}/{s[4]}, D={s[3]}/{s[5]}" for r, s in enumerate(sizes)))
        nx, ny = [s[1] for s in sizes], [s[2] for s in sizes]
        N, M = sum(nx), sum(ny)
        if N == 0 or M == 0:
            raise ValueError(f"empty point cloud: x has {N} points over all ranks, y has {M}")
        if D == 0:
            raise ValueError("points have dimension D = 0")
        shapes, weights = {}, []
        for name, w, n, cloud in (("a", a, N_r, "x"), ("b", b, M_r, "y")):
            if w is None:  # uniform over the global cloud
                weights.append(torch.full((B, n), 1.0 / (N if name == "a" else M), dtype=x.dtype, device=x.device))
                continue
            check_tensor(name, w)
            if w.dtype != x.dtype:
                raise TypeError(f"{name} must have the dtype of the points ({x.dtype}), got {w.dtype}")
            ok = w.shape in ((n,), (n, 1)) if not batched else w.shape in ((B, n), (B, n, 1))
            if not ok:
                raise ValueError(f"weights {name} have shape {tuple(w.shape)}, expected this rank's "
                                 f"{'(B,' if batched else '('}{n}) to match {cloud}")
            shapes[name] = w.shape
            weights.append(w.reshape(B, n))
        check_finite("x", x.detach())
        check_finite("y", y.detach())
        if a is not None:
            for name, w in zip("ab", weights):
                check_finite(name, w.detach())
                if bool((w < 0).any()):
                    check_weights(name, w)  # its message for negative weights
            totals = comm.reduce(torch.stack([weights[0].detach().sum(1), weights[1].detach().sum(1)]))
            if bool((totals <= 0).any()):
                raise ValueError("a or b has a measure with all-zero weights over all ranks: total mass must be > 0")
        return batched, shapes, weights[0], xb, weights[1], yb, nx, ny

    def _sharded(self, *args):
        l_x, a, x, l_y, b, y = self._parse(args)
        if l_x is not None or l_y is not None:
            raise NotImplementedError("otkernels.distributed.SamplesLoss: cluster labels are not sharded")
        comm = _Comm(self.process_group, x.device if isinstance(x, torch.Tensor) else None)
        batched, shapes, a, x, b, y, nx, ny = self._shard(a, x, b, y, comm)
        B, D = x.shape[0], x.shape[2]
        out_dtype = x.dtype
        if x.dtype in (torch.float16, torch.bfloat16):
            a, x, b, y = a.float(), x.float(), b.float(), y.float()
        backend = self._backend(B, max(nx), sum(ny), D, x.device, False)
        kernel_loss = self.loss in ("energy", "gaussian", "laplacian")
        if self.sphere:
            x, y = _unit("x", x), _unit("y", y)
        if self.cost.builtin and (self.kernel is None or not kernel_loss):  # as SamplesLoss: translation invariant
            x, y = _center(x, y, comm)
        if kernel_loss:
            values = self._kernel(backend, a, x, b, y, nx, ny, comm)
        elif self.loss == "hausdorff":
            values = self._hausdorff(backend, a, x, b, y, nx, ny, comm)
        else:
            values = self._sinkhorn(backend, a, x, b, y, nx, ny, comm)
        return _outputs(values, self.potentials, shapes, batched, out_dtype)

    def _sinkhorn(self, backend, a, x, b, y, nx, ny, comm):
        diameter = self.diameter if self.diameter is not None else _diameter(x, y, comm)
        eps_list = epsilon_schedule(self.p, diameter, self.blur, self.scaling)
        rho = _rho(self.reach, self.p)
        xs, ys = _Shards(x, nx, comm), _Shards(y, ny, comm)
        make = _maker(backend, self.cost, x.device)
        B, item = x.shape[0], x.element_size()
        sx = _Self.spans_sizes(nx, comm.rank, B, item) if self.debias else []
        sy = _Self.spans_sizes(ny, comm.rank, B, item) if self.debias else []
        pair_bytes = [B * xs.n * (j1 - j0) * item for j0, j1 in _Pair.chunks(sum(ny))]
        plan, k = backends.cache_plan(pair_bytes + sx + sy), len(pair_bytes)  # the pair's block first
        pair = _Pair(xs, ys, plan[:k], make)
        handles = [_Rows(pair), _Cols(pair), None, None]
        if self.debias:
            handles[2:] = _Self(xs, plan[k:k + len(sx)], make), _Self(ys, plan[k + len(sx):], make)
        if self.verbose and comm.rank == 0:
            print(f"otkernels.distributed: {backend.NAME} backend on {comm.size} ranks, {len(eps_list)} iterations")
        stop = None
        if self.tol is not None or self.max_iter is not None:
            if min(nx) == 0 or min(ny) == 0:
                raise NotImplementedError("early stopping (tol / max_iter) needs a non-empty shard of x and of y "
                                          f"on every rank, got x shards {nx}, y shards {ny}")
            stop = _GlobalStopping(comm, self.tol, self.max_iter, self.check_every)
        out = sinkhorn(a, b, tuple(handles), eps_list, rho=rho, debias=self.debias,
                       potentials=self.potentials, stop=stop)
        self.last_info = {"annealing": len(eps_list), **(stop.info if stop is not None else {})}
        if self.potentials:
            return out
        return _global(out, comm.reduce(out))

    def _hausdorff(self, backend, a, x, b, y, nx, ny, comm):
        """:func:`otkernels.hausdorff.hausdorff` unchanged on the global vectors: its four handles
        are :class:`_RowBlock` (this rank's rows, all-gathered: work N_r·(N + M) per pass for
        each cloud's rows), its points and weights the gathered clouds with this rank's rows
        attached, so the value (the same on every rank) has this rank's share of the gradient."""
        diameter = self.diameter if self.diameter is not None else _diameter(x, y, comm)
        eps_list = epsilon_schedule(self.p, diameter, self.blur, self.scaling)
        xs, ys = _Shards(x, nx, comm), _Shards(y, ny, comm)
        make = _maker(backend, self.cost, x.device)
        B, item, N, M = x.shape[0], x.element_size(), sum(nx), sum(ny)
        plan = backends.cache_plan([B * xs.n * M * item, B * ys.n * N * item, B * xs.n * N * item,
                                    B * ys.n * M * item])
        blocks = [(xs, ys), (ys, xs), (xs, xs), (ys, ys)]
        handles = tuple(_RowBlock(u, v.all, c, make) for (u, v), c in zip(blocks, plan))
        X, Y = xs.splice(x, xs.all), ys.splice(y, ys.all)
        A, Bw = xs.splice(a), ys.splice(b)
        grad = [t.requires_grad for t in (x, y, a, b)]
        if bool(comm.reduce(torch.tensor(float(any(grad)), device=x.device), "max")) and not any(grad):
            X = X.detach().requires_grad_()  # the adjoint pass runs on every rank or on none
        out = hausdorff(handles, A, X, Bw, Y, eps_list, potentials=self.potentials)
        if self.potentials:
            return xs.rows(out[0]), ys.rows(out[1])
        return out

    def _kernel(self, backend, a, x, b, y, nx, ny, comm):
        """Rows of the kernel potentials F = K_xx a − K_xy b, G = K_yy b − K_yx a against the
        gathered clouds; ⟨a_r, F_r⟩ + ⟨b_r, G_r⟩ summed over ranks is twice the loss, and its
        gradient w.r.t. this rank's points and weights is exactly the loss's (the self terms
        count both arguments: ½·2)."""
        kernel = CallableKernel(self.kernel, self.blur) if self.kernel is not None else Kernel(self.loss, self.blur)
        kxx, kxy, kyy, kyx = _kernel_rows(backend, kernel, x, y, comm.cat(x, nx), comm.cat(y, ny),
                                          comm.cat(a, nx), comm.cat(b, ny))
        F, G = kxx - kxy, kyy - kyx
        if self.potentials:
            return F, G
        s = scal(a, F) + scal(b, G)
        return _global(s, 0.5 * comm.reduce(s))


def _kernel_rows(backend, kernel, x, y, X, Y, A, B):
    """``K(x_r, X)A, K(x_r, Y)B, K(y_r, Y)B, K(y_r, X)A``: this rank's rows x_r (B,N_r,D), y_r
    against the gathered clouds X, Y with weights A, B; differentiable w.r.t. x_r, y_r only."""
    def ks(u, v, w):
        return u.sum(-1) * 0 if u.shape[1] == 0 else backend.kernel_sum(u, v, w, kernel)
    return ks(x, X, A), ks(x, Y, B), ks(y, Y, B), ks(y, X, A)


def _segments(name, x, w, batch, offsets, listed):
    """This rank's segments of one ragged cloud: ``(clouds, weights or None, from offsets)``;
    empty segments allowed (another rank may hold that segment's points)."""
    if listed:
        if not isinstance(x, (list, tuple)) or batch is not None or offsets is not None:
            raise ValueError("give lists of clouds for x and y (and no batch vectors or offsets), or neither")
        ws = None if w is None else list(w)
        if ws is not None and len(ws) != len(x):
            raise ValueError(f"one weight vector per cloud of {name}")
        return list(x), ws, False
    o = _offsets(name, x, batch, offsets, allow_empty=True)
    cut = list(zip(o[:-1], o[1:]))
    return [x[i:j] for i, j in cut], None if w is None else [w[i:j] for i, j in cut], offsets is not None


def _global(local, total):
    """``total`` in value, with ``local``'s gradient (this rank's share of the global one)."""
    return local + (total - local).detach()


def _center(x, y, comm):
    """x, y translated by the common mean of all the points of all ranks (as SamplesLoss)."""
    with torch.no_grad():
        D = x.shape[-1]
        pts = torch.cat([x.reshape(-1, D), y.reshape(-1, D)])
        tot = comm.reduce(torch.cat([pts.sum(0), pts.new_tensor([pts.shape[0]])]))
        c = tot[:D] / tot[D]
    return x - c, y - c


def _diameter(x, y, comm) -> float:
    """Diagonal of the bounding box of all the points of all ranks (all batches)."""
    with torch.no_grad():
        D = x.shape[-1]
        pts = torch.cat([x.reshape(-1, D), y.reshape(-1, D)])
        inf = torch.full((D,), float("inf"), dtype=pts.dtype, device=pts.device)
        lo = pts.min(0).values if pts.shape[0] else inf
        hi = pts.max(0).values if pts.shape[0] else -inf
        return (comm.reduce(hi, "max") - comm.reduce(lo, "min")).norm().item()


def _feature_shards(comm, x, y, names, min_samples):
    """This rank's feature shards (n_r, D) checked as the metrics check them (empty shards
    allowed) and every rank's row counts; a mismatch of D or dtype between ranks, or too few
    samples over all ranks, raises the same ValueError on every rank."""
    from .metrics._validate import as_pair

    x, y = as_pair(x, y, min_samples=0, names=names)
    sizes = comm.sizes(x.shape[0], y.shape[0], x.shape[1], x.element_size())
    if len({s[2:] for s in sizes}) != 1:
        raise ValueError(f"{names[0]} and {names[1]} must have the same feature dimension and dtype on every "
                         "rank, got (D, bytes per element) " + ", ".join(str(s[2:]) for s in sizes))
    nx, ny = [s[0] for s in sizes], [s[1] for s in sizes]
    for name, n in zip(names, (sum(nx), sum(ny))):
        if n < min_samples:
            raise ValueError(f"{name} has {n} samples over all ranks, this metric needs at least {min_samples}")
    return x, y, nx, ny


def _pair_sums(local, comm, self_terms=2):
    """Global sums Σ_{ij} of the kernel over (x, x), (y, y), (x, y) from this rank's row sums
    ``local = (x_r·X, y_r·Y, x_r·Y + y_r·X, *extra row terms)`` (one all-reduce): each with this
    rank's share of the gradient — the self sums count both arguments (× 2), the cross sum's
    two local halves are its two arguments (total / 2); extra terms are plain sums."""
    s = torch.stack(local)
    t = comm.reduce(s)
    return [_global(2 * s[0], t[0]), _global(2 * s[1], t[1]), _global(s[2], t[2] / 2),
            *(_global(s[k], t[k]) for k in range(3, len(local)))]


def mmd2(x, y, kernel="gaussian", bandwidth=1.0, *, unbiased=False, backend="auto", process_group=None):
    """:func:`otkernels.metrics.mmd2` of sharded feature sets: each rank's rows x_r (N_r, D),
    y_r (M_r, D) -> the global 0-dim value on every rank (biased or ``unbiased``, every
    kernel, ``bandwidth="median"``), differentiable w.r.t. this rank's rows.

    The feature sets are all-gathered once; rank r sums the kernel over its rows against
    them (1/W of the single-process work) and one all-reduce per bandwidth merges the three
    sums.  ``"median"``: :func:`otkernels.metrics.median_bandwidth` of the gathered sets, on
    every rank (exact: the same pooled set, the same subsample when it exceeds ``max_points``).
    ``kernel="polynomial"``: :func:`polynomial_mmd2`."""
    from .metrics import mmd as m

    if not is_sharded(process_group):
        return m.mmd2(x, y, kernel, bandwidth, unbiased=unbiased, backend=backend)
    if kernel == "polynomial":
        return polynomial_mmd2(x, y, unbiased=unbiased, process_group=process_group)
    if kernel not in m.RADIAL:
        raise ValueError(f"kernel={kernel!r} is unknown: expected one of {m.RADIAL + ('polynomial',)}")
    comm = _Comm(process_group, getattr(x, "device", None))
    x, y, nx, ny = _feature_shards(comm, x, y, ("x", "y"), 2 if unbiased else 1)
    N, M, D = sum(nx), sum(ny), x.shape[1]
    X, Y = comm.cat(x, nx, 0), comm.cat(y, ny, 0)
    sigmas = m._bandwidths(bandwidth, kernel, X, Y)
    be = m._backend(backend, N, M, D, x.device)
    c = torch.cat([X, Y]).mean(0)  # as metrics.kernel_means: centred on the pooled mean
    xc, yc, Xc, Yc = (x - c)[None], (y - c)[None], (X - c)[None], (Y - c)[None]
    a, b = X.new_full((1, N), 1.0 / N), X.new_full((1, M), 1.0 / M)
    z = X.new_zeros(1, 1, D)
    total = None
    for s in sigmas:
        k = Kernel(kernel, s)
        kxx, kxy, kyy, kyx = _kernel_rows(be, k, xc, yc, Xc, Yc, a, b)
        ar, br = a[:, :x.shape[0]], b[:, :y.shape[0]]
        mxx, myy, mxy = _pair_sums([scal(ar, kxx)[0], scal(br, kyy)[0], (scal(ar, kxy) + scal(br, kyx))[0]], comm)
        v = m._combine(mxx, myy, mxy, k(z, z).reshape(()), N, M, unbiased)
        total = v if total is None else total + v
    return total


def polynomial_mmd2(x, y, *, degree=3, gamma=None, coef0=1.0, unbiased=True, process_group=None):
    """:func:`otkernels.metrics.polynomial_mmd2` of sharded feature sets (KID's kernel
    ``(γ⟨x, y⟩ + c)^d``): the global 0-dim value on every rank, differentiable w.r.t. this
    rank's rows; the sets are all-gathered once, rank r's GEMM tiles are its rows against them."""
    from .metrics import mmd as m

    if not is_sharded(process_group):
        return m.polynomial_mmd2(x, y, degree=degree, gamma=gamma, coef0=coef0, unbiased=unbiased)
    comm = _Comm(process_group, getattr(x, "device", None))
    x, y, nx, ny = _feature_shards(comm, x, y, ("x", "y"), 2 if unbiased else 1)
    N, M = sum(nx), sum(ny)
    degree, gamma, coef0 = m._poly_params(degree, gamma, coef0, x.shape[1])
    X, Y = comm.cat(x, nx, 0), comm.cat(y, ny, 0)

    def ps(u, v):
        return m._PolySum.apply(u, v, degree, gamma, coef0)

    def diag(u):  # the diagonal terms, as the single-process function computes them
        return ((u * u).sum(1) * gamma + coef0).pow(degree).sum()
    sxx, syy, sxy, dx, dy = _pair_sums([ps(x, X), ps(y, Y), ps(x, Y) + ps(y, X), diag(x), diag(y)], comm)
    u = float(unbiased)  # metrics.mmd._combine with k(0) = 0: the (varying) diagonals leave the sums
    return m._combine((sxx - u * dx) / N ** 2, (syy - u * dy) / M ** 2, sxy / (N * M), 0.0, N, M, unbiased)


@torch.no_grad()
def kid(real, fake, *, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1.0, seed=0, generator=None,
        process_group=None):
    """:func:`otkernels.metrics.kid` of sharded real and fake features -> the same ``(mean,
    std)`` on every rank, with the same subsets: every rank draws the single-process index
    sequence (``seed`` or ``generator``, which must be in the same state on every rank and is
    left as the single-process call leaves it); rank r scores the contiguous range of subsets
    ``[S·r/W, S·(r+1)/W)`` with :func:`otkernels.metrics.kid` on the gathered sets, from the
    generator state at its first subset, and the ranks' (count, mean, variance) are merged
    exactly (one all-gather of 3 numbers).  Memory: the gathered sets on every rank."""
    from .metrics import mmd as m
    from .metrics._validate import check_int

    if not is_sharded(process_group):
        return m.kid(real, fake, subsets=subsets, subset_size=subset_size, degree=degree, gamma=gamma, coef0=coef0,
                     seed=seed, generator=generator)
    comm = _Comm(process_group, getattr(real, "device", None))
    x, y, nx, ny = _feature_shards(comm, real, fake, ("real", "fake"), 2)
    N, M = sum(nx), sum(ny)
    subsets, size = check_int("subsets", subsets, minimum=1), check_int("subset_size", subset_size, minimum=2)
    if size > N or size > M:  # checked here too: a rank with no subset does not call metrics.kid
        raise ValueError(f"subset_size={size} exceeds the number of samples (real {N}, fake {M})")
    m._poly_params(degree, gamma, coef0, x.shape[1])
    X, Y = comm.cat(x, nx, 0), comm.cat(y, ny, 0)
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    s0, s1 = subsets * comm.rank // comm.size, subsets * (comm.rank + 1) // comm.size
    state = g.get_state()
    for s in range(subsets):  # metrics.kid's draws: randperm(N), then randperm(M), per subset
        if s == s0:
            state = g.get_state()
        torch.randperm(N, generator=g)
        torch.randperm(M, generator=g)
    part = [0.0, 0.0, 0.0]
    if s1 > s0:
        mine = torch.Generator(device=g.device)
        mine.set_state(state)
        mean, std = m.kid(X, Y, subsets=s1 - s0, subset_size=size, degree=degree, gamma=gamma, coef0=coef0,
                          generator=mine)
        part = [float(s1 - s0), mean, std * std]
    n, mu, var = torch.stack(comm.all_gather(torch.tensor(part, dtype=torch.float64, device=x.device))).T
    mean = (n * mu).sum() / subsets
    return float(mean), float(((n * (var + (mu - mean) ** 2)).sum() / subsets).sqrt())


# ----------------------------------------------------------------------------- assignment
def argmax_inner(x, y, h=None, backend="auto", process_group=None):
    """:func:`otkernels.assign.argmax_inner` with the targets y (M_r,D) / (B,M_r,D) and h
    sharded over the ranks (the queries x the same on every rank): ``(max_j ⟨x_i, y_j⟩ + h_j,
    global argmax j)`` on every rank; ties go to the first global index, as single-process."""
    return _best(x, y, h, backend, process_group, True)


def argmin_sqdist(x, y, h=None, backend="auto", process_group=None):
    """:func:`otkernels.assign.argmin_sqdist` with the targets sharded (see :func:`argmax_inner`)."""
    return _best(x, y, h, backend, process_group, False)


@torch.no_grad()
def _best(x, y, h, backend, group, maximize):
    from . import assign

    fn = assign.argmax_inner if maximize else assign.argmin_sqdist
    if not is_sharded(group):
        return fn(x, y, h, backend)
    check_tensor("x", x)
    check_tensor("y", y)
    comm = _Comm(group, x.device)
    sizes = comm.sizes(y.shape[-2], *x.shape)
    if len({s[1:] for s in sizes}) != 1:
        raise ValueError("the queries x must have the same shape on every rank (the targets are sharded), got "
                         + ", ".join(str(s[1:]) for s in sizes))
    M_r = [s[0] for s in sizes]
    if sum(M_r) == 0:
        raise ValueError("y must have at least one point over all ranks")
    if y.shape[-2] > 0:
        v, i = fn(x, y, h, backend)
        i = i + sum(M_r[:comm.rank])
    else:
        v = torch.full(x.shape[:-1], float("-inf") if maximize else float("inf"), dtype=x.dtype, device=x.device)
        i = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    V, I = torch.stack(comm.all_gather(v)), torch.stack(comm.all_gather(i))
    r = (V.argmax(0) if maximize else V.argmin(0))[None]  # the first rank with the best value
    return V.gather(0, r)[0], I.gather(0, r)[0]


# ----------------------------------------------------------------------------- metrics
def feature_stats(features, process_group=None):
    """:class:`otkernels.metrics.FeatureStats` of the features of all ranks (each rank's
    (n_r, D) shard, n_r ≥ 0), merged in rank order: the same on every rank."""
    from .metrics import FeatureStats

    stats = FeatureStats()
    if features.shape[0]:
        stats.update(features)
    if not is_sharded(process_group):
        return stats
    comm = _Comm(process_group, features.device)
    D = features.shape[1]
    if len({s[0] for s in comm.sizes(D)}) != 1:
        raise ValueError("features must have the same dimension D on every rank")
    mean = stats._mean if stats.count else features.new_zeros(D, dtype=torch.float64)
    m2 = stats._m2 if stats.count else features.new_zeros(D, D, dtype=torch.float64)
    counts = [s[0] for s in comm.sizes(stats.count)]
    out = FeatureStats(dim=D, device=mean.device)
    for n, mu, s2 in zip(counts, comm.all_gather(mean), comm.all_gather(m2)):
        part = FeatureStats(dim=D, device=mean.device)
        part.count, part._mean, part._m2 = n, mu, s2
        out.merge(part)
    return out


def fid(real, fake, *, method="eigh", process_group=None):
    """:func:`otkernels.metrics.fid` of sharded real and fake features (each rank's rows)."""
    from .metrics import fid as fid_

    return fid_(feature_stats(real, process_group), feature_stats(fake, process_group), method=method)


@torch.no_grad()
def prdc(real, fake, k=None, *, k_pr=3, k_dc=5, dtype=None, process_group=None):
    """:func:`otkernels.metrics.prdc` with both feature sets sharded (each rank's rows; the sets
    are the rank-ordered concatenations) -> the same dict on every rank.

    Each rank gathers the two sets, computes the k-NN radii of its own rows and one pass of its
    real rows against all fake points; the ball counts of the fake points are all-reduced.
    Work per rank: 1/W of the single-process passes; memory: the gathered sets."""
    from .metrics import neighbours as nb
    from .metrics._validate import check_int, compute_dtype

    if not is_sharded(process_group):
        return nb.prdc(real, fake, k, k_pr=k_pr, k_dc=k_dc, dtype=dtype)
    if k is not None:
        k_pr = k_dc = k
    k_pr, k_dc = check_int("k_pr", k_pr), check_int("k_dc", k_dc)
    for name, t in (("real", real), ("fake", fake)):
        check_tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be a (n, D) shard of features, got shape {tuple(t.shape)}")
        check_finite(name, t.detach())
    comm = _Comm(process_group, real.device)
    sizes = comm.sizes(real.shape[0], fake.shape[0], real.shape[1], fake.shape[1])
    if len({s[2:] for s in sizes}) != 1 or sizes[0][2] != sizes[0][3]:
        raise ValueError("real and fake must have the same feature dimension on every rank")
    n_real, n_fake = [s[0] for s in sizes], [s[1] for s in sizes]
    for name, n, kk in (("real", sum(n_real), max(k_pr, k_dc)), ("fake", sum(n_fake), k_pr)):
        if n < kk + 1:
            raise ValueError(f"{name} has {n} samples over all ranks: k-NN radii with k = {kk} need at least {kk + 1}")
    dt = torch.promote_types(real.dtype, fake.dtype)
    if dt in (torch.float16, torch.bfloat16):
        dt = torch.float32
    dt = compute_dtype(dtype, real.new_empty(0, dtype=dt))
    xs, ys = nb._prepare(comm.cat(real.to(dt), n_real, 0), comm.cat(fake.to(dt), n_fake, 0), dt)
    r0, f0 = sum(n_real[:comm.rank]), sum(n_fake[:comm.rank])
    xr, yr = xs[r0:r0 + n_real[comm.rank]], ys[f0:f0 + n_fake[comm.rank]]
    kr = max(k_pr, k_dc)
    d2_real = nb._knn_sq(xr, xs, kr, True, row_offset=r0)[0] if len(xr) else xr.new_zeros(0, kr)
    xx, yy = (xr * xr).sum(1), (ys * ys).sum(1)
    t_pr, t_dc = d2_real[:, k_pr - 1] - xx, d2_real[:, k_dc - 1] - xx
    rf2_r = nb._knn_sq(yr, ys, k_pr, True, row_offset=f0)[0][:, -1] if len(yr) else yr.new_zeros(0)
    rf2 = comm.cat(rf2_r, n_fake, 0)
    same_k = k_pr == k_dc
    count, hit, covered, recalled = nb._ball_pass(xr, ys, xx, yy, t_dc, None if same_k else t_pr, rf2)
    count = comm.reduce(count)
    hit = count > 0 if same_k else comm.reduce(hit.to(torch.int64)) > 0
    covered_n, recalled_n = comm.reduce(torch.stack([covered.sum(), recalled.sum()]).to(torch.int64)).tolist()
    N = sum(n_real)
    return {"precision": float(hit.double().mean()), "recall": recalled_n / N,
            "density": float(count.double().mean()) / k_dc, "coverage": covered_n / N}
