"""Minibatch OT couplings between two point clouds, for OT-coupled flow matching.

x (N, D) and y (M, D) are two minibatches (e.g. noise and flattened images).  A coupling
says which ``y_j`` goes with each ``x_i``:

* :func:`exact_pairs`: the optimal assignment for the cost |x−y|² (N = M, uniform weights:
  a permutation, from scipy's ``linear_sum_assignment``); for N ≠ M one ``j`` per row drawn
  from POT's exact plan (``ot.emd``);
* :func:`sinkhorn_plan`: the entropic plan of ``otkernels.SamplesLoss`` (geomloss
  conventions: cost ½|x−y|² for p = 2, |x−y| for p = 1, ε = blur^p);
* :func:`sample_pairs`: N index pairs (i, j) from either, or from the independent coupling.

``exact_pairs`` and ``sinkhorn_plan`` build a dense N×M cost or plan on the CPU (minibatches,
N·M up to a few million; ``sinkhorn_plan`` is the float64 reference of the plan operators).
``sample_pairs(method="sinkhorn")`` draws from :mod:`otkernels.plan` instead: on the points'
device (GPU included), in their dtype, with no N×M matrix.  No gradient flows through a coupling.
"""
from __future__ import annotations

import torch

from ._checks import check_float_param, check_point_pair, check_tensor, check_weights

METHODS = ("exact", "sinkhorn", "independent")


def _check_clouds(x, y):
    for name, t in (("x", x), ("y", y)):
        check_tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be a (N, D) matrix of points (flatten images with "
                             f"{name}.flatten(1)), got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty: it needs at least one point")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has dimension D = 0")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension D, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    check_point_pair(x, y)
    return x.detach(), y.detach()


def _check_weight(name, w, n, like):
    """Weights (n,) of ``like``'s dtype and device, normalised to sum 1 (uniform if None)."""
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    check_tensor(name, w)
    if tuple(w.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), one weight per point, got {tuple(w.shape)}")
    if w.dtype != like.dtype or w.device != like.device:
        raise TypeError(f"{name} must have the points' dtype and device ({like.dtype}, {like.device}), "
                        f"got {w.dtype}, {w.device}")
    w = w.detach()
    check_weights(name, w)
    return w / w.sum()


def _sq_dists(x, y):
    """|x_i − y_j|² (N, M) in float64 on the CPU, from centred points (exact differences)."""
    xd, yd = x.double().cpu(), y.double().cpu()
    c = torch.cat([xd, yd]).mean(0)
    return torch.cdist(xd - c, yd - c, compute_mode="donot_use_mm_for_euclid_dist").square_()


def _cost(x, y, p):
    """The geomloss cost (N, M) in float64 on the CPU: ½|x−y|² (p = 2) or |x−y| (p = 1)."""
    d2 = _sq_dists(x, y)
    return 0.5 * d2 if p == 2 else d2.sqrt_()


def _rows(plan, generator, log=False):
    """One column index per row of a nonnegative (N, M) plan (or of its log with ``log``),
    drawn ∝ the row, on the CPU."""
    rows = plan.detach().double().cpu()
    rows = rows.softmax(1) if log else rows / rows.sum(1, keepdim=True)
    return torch.multinomial(rows, 1, generator=generator)[:, 0]


@torch.no_grad()
def exact_pairs(x, y, generator: torch.Generator | None = None) -> torch.Tensor:
    """Optimal pairs for the cost |x−y|²: j (N,) long on x's device, x_i matched with y_{j_i}.

    N = M (uniform weights): an optimal permutation (scipy ``linear_sum_assignment`` on the
    float64 cost).  N ≠ M: the exact plan of POT (``ot.emd``, uniform weights) and, for each
    i, j drawn from row i of it with ``generator`` (rows with one nonzero entry are
    deterministic).  Needs scipy; N ≠ M needs POT.
    """
    x, y = _check_clouds(x, y)
    N, M = x.shape[0], y.shape[0]
    C = _sq_dists(x, y)
    if N == M:
        from scipy.optimize import linear_sum_assignment

        _, col = linear_sum_assignment(C.numpy())
        return torch.as_tensor(col, dtype=torch.long).to(x.device)
    try:
        import ot
    except ImportError as e:
        raise ImportError(f"exact_pairs with N != M (got N = {N}, M = {M}) needs POT (pip install pot); "
                          "or use sinkhorn_plan / sample_pairs(method='sinkhorn')") from e
    a = torch.full((N,), 1.0 / N, dtype=torch.float64)
    b = torch.full((M,), 1.0 / M, dtype=torch.float64)
    plan = torch.as_tensor(ot.emd(a.numpy(), b.numpy(), C.numpy(), numItermax=max(100_000, 50 * (N + M) ** 2)))
    return _rows(plan, generator).to(x.device)


@torch.no_grad()
def sinkhorn_plan(x, y, blur: float = 0.05, p: int = 2, scaling: float = 0.9, a=None, b=None,
                  tol: float | None = 1e-6, max_iter: int = 2000, backend: str = "auto") -> torch.Tensor:
    """The entropic OT plan π (N, M) between Σ a_i δ_{x_i} and Σ b_j δ_{y_j}, in x's dtype.

    π_ij = a_i b_j exp((f_i + g_j − C_ij)/ε), the minimiser of ⟨π, C⟩ + ε KL(π | a⊗b) with
    marginals a and b, with geomloss's conventions: C = ½|x−y|² (p = 2) or |x−y| (p = 1),
    ε = blur^p.  a (N,), b (M,): weights (default uniform), normalised to sum 1.

    (f, g) start as the potentials of ``SamplesLoss("sinkhorn", p, blur, scaling,
    debias=False, potentials=True)``.  Its loop anneals ε with no convergence test: its value
    is accurate, but the plan built from its potentials is not (row/column sums off by ~20%
    at blur 0.5 on unit-scale data, even with scaling 0.9).  So, unless ``tol`` is None, plain
    Sinkhorn updates at the final ε follow on the dense float64 cost (f, then g: the column
    sums are then exact) until the row sums are within ``tol`` of a, relative to a, or
    ``max_iter`` updates (small blurs converge slowly: check ``π.sum(1)`` if it matters).
    Dense N×M, computed in float64 on the CPU: for minibatches.
    """
    x, y = _check_clouds(x, y)
    return _log_plan(x, y, blur, p, scaling, a, b, tol, max_iter, backend).exp_().to(dtype=x.dtype, device=x.device)


def _log_plan(x, y, blur, p, scaling, a, b, tol, max_iter, backend):
    """log π (N, M), float64 on the CPU, for checked x and y."""
    blur = check_float_param("blur", blur)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if tol is not None:
        tol = check_float_param("tol", tol)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    a = _check_weight("a", a, x.shape[0], x)
    b = _check_weight("b", b, y.shape[0], x)
    from .samples_loss import SamplesLoss

    loss = SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, debias=False, potentials=True, backend=backend)
    f, g = loss(a, x, b, y)
    eps = blur ** p
    C = _cost(x, y, p) / eps                                  # C/ε
    a64, b64 = a.double().cpu(), b.double().cpu()
    la, lb = (a64 / a64.sum()).log(), (b64 / b64.sum()).log()  # equal masses in float64
    f, g = f.double().cpu() / eps, g.double().cpu() / eps     # f/ε, g/ε
    if tol is not None:
        for _ in range(max_iter):
            f = -torch.logsumexp(lb[None, :] + g[None, :] - C, 1)
            g = -torch.logsumexp(la[:, None] + f[:, None] - C, 0)
            rows = torch.logsumexp(lb[None, :] + g[None, :] - C, 1) + f   # log(row sum / a)
            if rows.abs().max().item() <= tol:  # |log(r/a)| ≈ |r − a|/a
                break
    return la[:, None] + lb[None, :] + f[:, None] + g[None, :] - C


def _on_device(generator, device):
    """``generator`` if it lives on ``device``, else a generator there seeded from it."""
    if generator is None or generator.device == torch.device(device):
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def sample_pairs(x, y, method: str = "exact", generator: torch.Generator | None = None, **kw):
    """N index pairs (i (N,), j (N,)) long on x's device: x_{i_k} goes with y_{j_k}; i = 0..N−1.

    ``method``: ``"exact"`` — :func:`exact_pairs` (a permutation when N = M); ``"sinkhorn"`` —
    for each i, j drawn from row i of the entropic plan (``kw``: blur, p, scaling, a, b, tol,
    max_iter, backend; the defaults of :func:`sinkhorn_plan`), by
    :meth:`otkernels.plan.TransportPlan.sample` on the points' device without a dense plan,
    so some y_j may be used twice and others not at all; ``"independent"`` — a random
    permutation of y (N = M), the first N of one (N < M), or uniform draws (N > M).
    Randomness comes from ``generator`` (a CPU generator, or one on the points' device;
    None: torch's global RNG).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    allowed = {"blur", "p", "scaling", "a", "b", "tol", "max_iter", "backend"} if method == "sinkhorn" else set()
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(f"sample_pairs(method={method!r}) got unexpected keyword argument(s) {sorted(unknown)}")
    x, y = _check_clouds(x, y)
    N, M = x.shape[0], y.shape[0]
    i = torch.arange(N, device=x.device)
    if method == "exact":
        return i, exact_pairs(x, y, generator=generator)
    if method == "sinkhorn":
        kw = {"blur": 0.05, "p": 2, "scaling": 0.9, "a": None, "b": None, "tol": 1e-6, "max_iter": 2000,
              "backend": "auto", **kw}
        from .plan import transport_plan

        if kw["p"] not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {kw['p']!r}")
        a = _check_weight("a", kw.pop("a"), N, x)
        b = _check_weight("b", kw.pop("b"), M, x)
        plan = transport_plan(x, y, a, b, **kw)
        return i, plan.sample(1, generator=_on_device(generator, x.device))[:, 0]
    if N <= M:
        j = torch.randperm(M, generator=generator)[:N]
    else:
        j = torch.randint(0, M, (N,), generator=generator)
    return i, j.to(x.device)
