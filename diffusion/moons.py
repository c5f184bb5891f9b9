"""OT-coupled flow matching on two moons: the 2-D study where the coupling's effect on 1–2-step
sampling is visible and measurable exactly (Tong et al. 2023, "Improving and generalizing
flow-based generative models with minibatch optimal transport", Fig. 1 / Table 1 setting).

Data: ``sklearn.datasets.make_moons`` (noise 0.05), standardised with the training set's mean
and standard deviation; labels kept.  Model: an MLP (3 hidden layers of 128, SiLU) on
(x, time features, optional one-hot class); the time enters by concatenation (``"concat"``: s
itself) or as sinusoidal features (``"sinusoidal"``).  Training: straight paths
x_s = (1 − s)·x0 + s·x1 from noise x0 ~ N(0, I) (s = 0) to data x1 (s = 1), velocity target
u = x1 − x0, s ~ U(0, 1), AdamW (lr 2e-3, weight decay 0.01, cosine decay to 0), batch 256.

Couplings (which noise goes with which data point), all through otkernels' public API:

* ``"independent"``: x0 and x1 drawn independently (I-CFM);
* ``"exact"``: the optimal permutation of each minibatch (:func:`otkernels.coupling.exact_pairs`);
* ``"sinkhorn"``: one draw per noise point from its row of the minibatch's entropic plan
  (ε = blur², blur 0.2), :func:`otkernels.plan.transport_plan` on many minibatches at once (a
  batched ``(P, B, 2)`` problem) refined until its marginals are within ``sinkhorn_tol`` (data
  columns exact), then ``plan.sample(1)``;
* ``"large_batch"``: a pool of K noise points and K data points (K = 4,096) coupled by the
  entropic plan of :func:`otkernels.plan.transport_plan` at blur 0.1 refined to ``pool_tol`` (the
  native kernels: no K×K matrix), each noise point drawing its data point from its row
  (``plan.sample(1)``); minibatches are rows of the pool, refreshed every ``pool_refresh`` steps;
* ``"semidiscrete"``: the semi-discrete OT map from N(0, I) to the fixed training set
  (:class:`otkernels.SemiDiscreteOT`, warm-started from the Sinkhorn potential of a pool and
  refined by its stochastic ascent); every batch is fresh noise and its Laguerre-cell target.

Conditional models (one-hot class, label dropout ``p_uncond``) are coupled within each class
(noise to that class's data), and globally for the label-dropped part of the batch, so the
conditional field transports N(0, I) to one moon and the unconditional one to both: sampling
with a label then starts from N(0, I) as it must.  CFG: v = v_∅ + w (v_y − v_∅), w = 1 is the
conditional model.

Sampling: Euler, midpoint, Heun on a uniform grid of 1, 2, 5, 10, 50 steps.  Metrics on 2,000
fresh moons against 2,000 generated points (standardised units): exact W2 = sqrt(ot.emd2) with
the squared Euclidean cost (W2, not W2²), the Sinkhorn divergence (blur 0.05, cost ½|x−y|²),
MMD² (Gaussian kernel σ = 0.5), density/coverage (k = 5); the two-sample floor (two independent
draws of 2,000 real moons) beside them; path straightness |x1 − x0|²/∫|v|² ds and curvature
∫|v(x_s, s) − (x1 − x0)|² ds of the learned flow (100 Euler steps).

    python -m diffusion.moons --quick                # the full table (2 worker processes) -> reports/moons/
    python -m diffusion.moons --couplings exact,semidiscrete --iters 10000
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flow import straightness

COUPLINGS = ("independent", "exact", "sinkhorn", "large_batch", "semidiscrete")
EMBEDDINGS = ("concat", "sinusoidal")
SOLVERS = ("euler", "midpoint", "heun")
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2}
STEPS = (1, 2, 5, 10, 50)
GUIDANCE = (1.0, 3.0)


# ---------------------------------------------------------------------- configuration
@dataclass
class MoonsConfig:
    """Every knob of the study; ``quick()`` is the ≤ 10-minute CPU table."""

    noise: float = 0.05                 # make_moons noise (before standardising)
    n_train: int = 16384                # fixed training set (the semi-discrete targets)
    iters: int = 10000
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.01
    hidden: int = 128
    depth: int = 3
    freqs: int = 8                      # sinusoidal embedding: 2·freqs features
    p_uncond: float = 0.2               # label dropout of the conditional models (a fixed share per batch)
    sinkhorn_blur: float = 0.2          # minibatch entropic coupling: ε = blur² (standardised units)
    sinkhorn_prefetch: int = 32         # minibatches per batched Sinkhorn solve
    sinkhorn_tol: float = 1e-2          # transport_plan's marginal tolerance for the minibatch plans
    pool_size: int = 4096               # large-batch coupling: K noise + K data points per pool
    pool_blur: float = 0.1
    pool_refresh: int = 2500            # steps between two pools
    pool_tol: float = 1e-2              # transport_plan's marginal tolerance for a pool's plan
    pool_max_iter: int = 300            # at most this many refinement updates per pool
    sd_blur: float = 0.01               # the semi-discrete map's warm start (Sinkhorn potential)
    sd_time: float = 60.0               # seconds of SemiDiscreteOT.fit refinement per map
    sd_tol: float = 0.05
    n_eval: int = 2000
    couplings: tuple = COUPLINGS
    embeddings: tuple = EMBEDDINGS
    steps: tuple = STEPS
    solvers: tuple = SOLVERS
    cfg_solvers: tuple = SOLVERS        # solvers for the conditional (CFG) rows
    conditional: bool = True
    seed: int = 0
    threads: int = 0                    # 0: leave torch's default
    workers: int = 1                    # processes, one coupling each at a time (each with ``threads``)
    progress: bool = True
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("n_train", "iters", "batch", "hidden", "depth", "freqs", "pool_size", "pool_refresh", "n_eval",
                     "sinkhorn_prefetch", "pool_max_iter", "workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("noise", "lr", "sinkhorn_blur", "pool_blur", "sd_tol", "sinkhorn_tol", "pool_tol", "sd_blur"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond!r}")
        for name, allowed in (("couplings", COUPLINGS), ("embeddings", EMBEDDINGS), ("solvers", SOLVERS),
                              ("cfg_solvers", SOLVERS)):
            vals = tuple(getattr(self, name))
            bad = [v for v in vals if v not in allowed]
            if bad or not vals and name != "cfg_solvers":
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {vals!r}")
            setattr(self, name, vals)
        self.steps = tuple(self.steps)
        if not self.steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.steps):
            raise ValueError(f"steps must be ints >= 1, got {self.steps!r}")
        if self.n_eval % 2:
            raise ValueError(f"n_eval must be even (half per class), got {self.n_eval}")

    @classmethod
    def quick_config(cls, **kw):
        """The --quick table: fewer steps, a 4k training set and 4k pools, 10 s of map refinement,
        two worker processes (one coupling each, 1 thread: the two cores of a small CPU)."""
        base = dict(n_train=4096, iters=3000, pool_size=4096, pool_refresh=1000, sd_time=10.0,
                    cfg_solvers=("euler",), quick=True, workers=2, threads=1)
        base.update(kw)
        return cls(**base)


# ---------------------------------------------------------------------- data
def make_data(n: int, noise: float = 0.05, seed: int = 0, stats=None):
    """``n`` two-moons points (x (n, 2) float32, labels (n,) long, stats): standardised by
    ``stats`` = (mean (2,), std (2,)), or by their own mean and std when ``stats`` is None."""
    from sklearn.datasets import make_moons

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    x, y = make_moons(n, noise=noise, random_state=seed)
    x = torch.as_tensor(x, dtype=torch.float64)
    if stats is None:
        stats = (x.mean(0), x.std(0))
    x = (x - stats[0]) / stats[1]
    return x.float(), torch.as_tensor(y, dtype=torch.long), stats


# ---------------------------------------------------------------------- model
class MoonsMLP(nn.Module):
    """v̂(x, s, y): x (B, 2), s flow time (float or (B,)), y (B,) long class or −1 (no label),
    or None (all unlabelled) → (B, 2).

    ``embedding``: ``"concat"`` (s appended to x) or ``"sinusoidal"`` (sin/cos of s at
    ``freqs`` frequencies from 1 to 31.6 rad); ``num_classes`` > 0 adds a one-hot class input
    (zeros for −1: the classifier-free "null" label).  ``depth`` hidden layers of ``hidden``
    units with SiLU."""

    def __init__(self, embedding: str = "concat", num_classes: int = 0, hidden: int = 128, depth: int = 3,
                 freqs: int = 8, dim: int = 2):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.embedding, self.num_classes, self.dim = embedding, num_classes, dim
        t_dim = 1 if embedding == "concat" else 2 * freqs
        self.register_buffer("omega", torch.logspace(0, 1.5, freqs), persistent=False)
        layers, d = [], dim + t_dim + num_classes
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, dim))
        self.net = nn.Sequential(*layers)

    def time_features(self, s: torch.Tensor) -> torch.Tensor:
        """(B,) flow times → (B, 1) or (B, 2·freqs)."""
        if self.embedding == "concat":
            return s[:, None]
        a = s[:, None] * self.omega
        return torch.cat([a.sin(), a.cos()], 1)

    def forward(self, x, s, y=None):
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
        s = s.expand(x.shape[0]) if s.dim() == 0 else s
        if tuple(s.shape) != (x.shape[0],):
            raise ValueError(f"s must be a float or have shape ({x.shape[0]},), got {tuple(s.shape)}")
        parts = [x, self.time_features(s)]
        if self.num_classes:
            onehot = torch.zeros(x.shape[0], self.num_classes, dtype=x.dtype, device=x.device)
            if y is not None:
                if tuple(y.shape) != (x.shape[0],) or y.dtype != torch.long:
                    raise ValueError(f"y must be a ({x.shape[0]},) long tensor, got {tuple(y.shape)} {y.dtype}")
                if bool(((y < -1) | (y >= self.num_classes)).any()):
                    raise ValueError(f"labels must be in [-1, {self.num_classes}) (-1: no label)")
                keep = y >= 0
                onehot[keep, y[keep]] = 1.0
            parts.append(onehot)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes = 0): pass y=None")
        return self.net(torch.cat(parts, 1))


def guided(model, y=None, scale: float = 1.0):
    """The sampling field (x, s) ↦ v: the model with label ``y`` and classifier-free guidance
    v_∅ + scale·(v_y − v_∅); scale 1 (or y None) is the plain (conditional) model, one call."""
    if y is None or scale == 1.0:
        return lambda x, s: model(x, s, y)

    def field(x, s):
        return model(x, s, None) + scale * (model(x, s, y) - model(x, s, None))
    return field


# ---------------------------------------------------------------------- ODE solvers
@torch.no_grad()
def integrate(field, x0: torch.Tensor, steps: int = 1, method: str = "euler", path: bool = False):
    """Solve dx/ds = field(x, s) from s = 0 to 1 on ``steps`` uniform steps: ``"euler"``
    (first order, one call per step), ``"midpoint"`` or ``"heun"`` (second order, two).
    Returns (x(1), kinetic energy Σ_k |Δx_k|²/h per sample (B,)) and, with ``path``, the
    (steps + 1, B, D) states."""
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    x, h = x0.clone(), 1.0 / steps
    energy = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    states = [x.clone()] if path else None
    for k in range(steps):
        s = k * h
        v = field(x, s)
        if method == "midpoint":
            v = field(x + 0.5 * h * v, s + 0.5 * h)
        elif method == "heun":
            v = 0.5 * (v + field(x + h * v, s + h))
        dx = h * v
        energy += dx.double().square().sum(1) / h
        x = x + dx
        if path:
            states.append(x.clone())
    return (x, energy, torch.stack(states)) if path else (x, energy)


@torch.no_grad()
def path_diagnostics(field, x0: torch.Tensor, steps: int = 100) -> dict:
    """Straightness E[|x1 − x0|²]/E[∫|v|² ds]-style per-sample mean ratio (1 = straight; from
    :func:`diffusion.flow.straightness`) and curvature E ∫|v(x_s, s) − (x1 − x0)|² ds (0 =
    straight, Liu et al.'s S(Z)), on ``steps`` Euler steps."""
    x1, energy, states = integrate(field, x0, steps, "euler", path=True)
    chord = (x1 - x0).double()
    vel = (states[1:] - states[:-1]).double() * steps        # (steps, B, 2)
    curv = (vel - chord).square().sum(-1).mean(0)             # (B,)
    return {"straightness": straightness(x0, x1, energy).mean().item(), "curvature": curv.mean().item(),
            "kinetic_energy": energy.mean().item(), "steps": steps}


# ---------------------------------------------------------------------- couplings
class Coupler:
    """``coupler(n) -> (x0 (n, 2), x1 (n, 2))``: noise paired with points of ``data`` (N, 2).
    The randomness is ``generator``'s (a CPU torch.Generator).  ``info``: diagnostics."""

    kind = "independent"

    def __init__(self, data: torch.Tensor, generator: torch.Generator):
        if data.dim() != 2 or data.shape[0] < 2:
            raise ValueError(f"data must be (N, D) with N >= 2, got {tuple(data.shape)}")
        self.data, self.gen, self.info = data.float(), generator, {}

    def _draw(self, n):
        x1 = self.data[torch.randint(0, self.data.shape[0], (n,), generator=self.gen)]
        return torch.randn(n, self.data.shape[1], generator=self.gen), x1

    def __call__(self, n: int):
        return self._draw(n)


class ExactCoupler(Coupler):
    """The optimal permutation of each minibatch for |x0 − x1|² (scipy, via otkernels)."""

    kind = "exact"

    def __call__(self, n):
        from otkernels.coupling import exact_pairs

        x0, x1 = self._draw(n)
        return x0[exact_pairs(x1, x0)], x1


def data_marginal(plan) -> torch.Tensor:
    """The data marginal of "each noise point (row) draws one data point from its row of
    ``plan``": (1/N) Σ_i π_ij / Σ_j' π_ij' per column j (M,) [(B, M)], sums to 1 per problem
    (two passes over the cost, no N×M matrix)."""
    rows, _ = plan.marginals()
    return plan.T @ (1.0 / (rows.shape[-1] * rows))


def _marginal_error(m: torch.Tensor) -> dict:
    """Relative error of a data marginal m (…, M) against uniform 1/M: mean and max of |M·m − 1|."""
    e = (m.double() * m.shape[-1] - 1).abs()
    return {"mean": e.mean().item(), "max": e.max().item()}


class SinkhornCoupler(Coupler):
    """One data point per noise point, drawn from its row of its minibatch's entropic plan, ε = blur²
    (cost ½|x−y|²): :func:`otkernels.plan.transport_plan` on ``prefetch`` minibatches at once (a
    batched (P, n, 2) problem) refined until the plan's marginals are within ``tol`` (data
    columns exact), then ``plan.sample(1)`` (Gumbel-max, the coupler's generator)."""

    kind = "sinkhorn"

    def __init__(self, data, generator, blur=0.2, prefetch=32, tol=1e-2, max_iter=1000):
        super().__init__(data, generator)
        self.blur, self.prefetch, self.tol, self.max_iter, self.cache = float(blur), int(prefetch), tol, max_iter, {}
        self.info = {"solves": 0, "solve_s": 0.0, "plan_error": [], "iterations": [], "data_marginal_error": []}

    def _solve(self, n):
        from otkernels.plan import transport_plan

        t0 = time.perf_counter()
        pairs = [self._draw(n) for _ in range(self.prefetch)]
        x0 = torch.stack([p[0] for p in pairs])
        x1 = torch.stack([p[1] for p in pairs])                      # (P, n, 2)
        plan = transport_plan(x0, x1, blur=self.blur, scaling=0.8, tol=self.tol, max_iter=self.max_iter)
        # rows are the noise points: each is used once, so the noise marginal stays exactly
        # N(0, I) (rows = data points instead gave a noise covariance ≈ 1.35·I, measured);
        # the data marginal is the plan's columns (exact) up to its rows' error (≤ tol)
        j = plan.sample(1, generator=self.gen)[..., 0]               # (P, n)
        self.info["solves"] += 1
        self.info["solve_s"] += time.perf_counter() - t0
        self.info["plan_error"].append(plan.marginal_error)
        self.info["iterations"].append(plan.iterations)
        if self.info["solves"] <= 2:   # two passes per problem: measured on the first solves only
            self.info["data_marginal_error"].append(_marginal_error(data_marginal(plan)))
        return list(zip(x0.unbind(0), torch.gather(x1, 1, j[..., None].expand_as(x1)).unbind(0)))

    def __call__(self, n):
        queue = self.cache.setdefault(n, [])
        if not queue:
            queue.extend(self._solve(n))
        return queue.pop()


def _pool_potential(noise, data, blur):
    """Sinkhorn potential g on ``data`` (M,) of the OT problem noise (K, 2) → data (M, 2),
    cost ½|x−y|², ε = blur² (SamplesLoss: blocked / native kernels, no K×M matrix): the
    semi-discrete map's warm start."""
    from otkernels import SamplesLoss

    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=0.9, debias=False, potentials=True)
    _, g = loss(noise, data)
    return g


class PoolCoupler(Coupler):
    """Large-batch OT: K noise points and K data points (all of ``data`` when it has ≤ K), the
    entropic plan at ``blur`` from :func:`otkernels.plan.transport_plan` refined to ``tol``
    (data columns exact; at most ``max_iter`` updates; no K×K matrix), every noise point
    drawing its data point from its row (``plan.sample(1)``).  Minibatches are random rows of
    the pool; a new pool is solved every ``refresh`` calls."""

    kind = "large_batch"

    def __init__(self, data, generator, pool_size=4096, blur=0.1, refresh=2500, tol=1e-2, max_iter=300):
        super().__init__(data, generator)
        self.K, self.blur, self.refresh, self.calls = int(pool_size), float(blur), int(refresh), 0
        self.tol, self.max_iter = tol, max_iter
        self.pool, self.info = None, {"pools": 0, "solve_s": 0.0, "plan_error": [], "iterations": [],
                                      "data_marginal_error": [], "used_fraction": [], "max_use": []}

    def _new_pool(self):
        from otkernels.plan import transport_plan

        t0 = time.perf_counter()
        N = self.data.shape[0]
        idx = torch.randperm(N, generator=self.gen)[:self.K] if N > self.K else torch.arange(N)
        y = self.data[idx].contiguous()
        z = torch.randn(self.K, self.data.shape[1], generator=self.gen)
        plan = transport_plan(z, y, blur=self.blur, scaling=0.9, tol=self.tol, max_iter=self.max_iter)
        j = plan.sample(1, generator=self.gen)[:, 0]
        use = torch.bincount(j, minlength=y.shape[0])
        self.info["pools"] += 1
        self.info["solve_s"] += time.perf_counter() - t0
        self.info["plan_error"].append(plan.marginal_error)
        self.info["iterations"].append(plan.iterations)
        self.info["data_marginal_error"].append(_marginal_error(data_marginal(plan)))
        # one draw per row: an unbiased sample of the data marginal, so ~1 − 1/e of the points
        # are drawn (as K i.i.d. uniform draws would be), not a permutation
        self.info["used_fraction"].append((use > 0).float().mean().item())
        self.info["max_use"].append(int(use.max()))
        self.pool = (z, y[j])

    def __call__(self, n):
        if self.pool is None or self.calls % self.refresh == 0:
            self._new_pool()
        self.calls += 1
        rows = torch.randint(0, self.pool[0].shape[0], (n,), generator=self.gen)
        return self.pool[0][rows], self.pool[1][rows]


class SemiDiscreteCoupler(Coupler):
    """The semi-discrete OT map from N(0, I) to the (fixed) ``data``: SemiDiscreteOT,
    warm-started from the Sinkhorn potential of N noise points → data at ``blur`` and refined by
    ``fit`` for ``seconds``; the better of the two potentials (relative cell-mass error on fresh
    points) is kept.  Each call: fresh noise and its cell's data point."""

    kind = "semidiscrete"

    def __init__(self, data, generator, blur=0.01, seconds=60.0, tol=0.05, seed=0):
        super().__init__(data, generator)
        from otkernels import SemiDiscreteOT

        t0 = time.perf_counter()
        self.sd = SemiDiscreteOT(self.data, seed=seed)
        z = torch.randn(self.data.shape[0], self.data.shape[1], generator=self.gen)
        g = _pool_potential(z, self.data, blur).double()
        self.sd.h = g - g.mean()
        warm = self.sd.mass_error(1 << 18)
        h_warm = self.sd.h.clone()
        if seconds > 0:
            self.sd.fit(tol=tol, time_limit=seconds, progress=False)
        fitted = self.sd.mass_error(1 << 18)
        if fitted > warm:
            self.sd.h = h_warm
        rel = (self.sd.cell_masses(1 << 18) - self.sd.weights).abs() / self.sd.weights
        self.info = {"mass_error_warm_start": warm, "mass_error_fitted": fitted,
                     "mass_error": min(warm, fitted),
                     "mean_mass_error": rel.mean().item(), "fit_steps": self.sd.n_steps,
                     "solve_s": time.perf_counter() - t0, "N": self.data.shape[0]}

    def __call__(self, n):
        x0 = torch.randn(n, self.data.shape[1], generator=self.gen)
        return x0, self.sd.map(x0)[0]


def make_coupler(kind: str, data: torch.Tensor, cfg: MoonsConfig, generator: torch.Generator) -> Coupler:
    """The coupler named ``kind`` (one of COUPLINGS) on ``data`` with ``cfg``'s settings."""
    if kind == "independent":
        return Coupler(data, generator)
    if kind == "exact":
        return ExactCoupler(data, generator)
    if kind == "sinkhorn":
        return SinkhornCoupler(data, generator, cfg.sinkhorn_blur, cfg.sinkhorn_prefetch, cfg.sinkhorn_tol)
    if kind == "large_batch":
        return PoolCoupler(data, generator, cfg.pool_size, cfg.pool_blur, cfg.pool_refresh, cfg.pool_tol,
                           cfg.pool_max_iter)
    if kind == "semidiscrete":
        return SemiDiscreteCoupler(data, generator, cfg.sd_blur, cfg.sd_time, cfg.sd_tol, cfg.seed)
    raise ValueError(f"coupling must be one of {COUPLINGS}, got {kind!r}")


def batch_cost(x0, x1) -> float:
    """Mean ½|x0 − x1|² of paired rows (the batch transport cost)."""
    return 0.5 * (x0 - x1).double().square().sum(1).mean().item()


# ---------------------------------------------------------------------- training
def _composition(cfg: MoonsConfig, counts):
    """Rows per batch of the conditional stream: (label-dropped rows, [rows of class c])."""
    n_drop = int(round(cfg.p_uncond * cfg.batch))
    rest = cfg.batch - n_drop
    total = sum(counts)
    per = [int(rest * c // total) for c in counts]
    per[0] += rest - sum(per)
    return n_drop, per


def train_models(models, stream, cfg: MoonsConfig, generator, desc="train"):
    """Train every model of ``models`` on the same batches (x0, x1, y) = ``stream()``:
    AdamW with cosine decay, MSE to u = x1 − x0 at x_s, s ~ U(0, 1).  Returns the mean loss of
    each model over the last 10 % of the steps."""
    from tqdm.auto import tqdm

    opts = [torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for m in models]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.iters) for o in opts]
    tail = [0.0] * len(models)
    n_tail = max(1, cfg.iters // 10)
    for m in models:
        m.train()
    for it in tqdm(range(cfg.iters), desc=desc, disable=not cfg.progress, leave=False, mininterval=2.0):
        x0, x1, y = stream()
        s = torch.rand(x0.shape[0], generator=generator)
        xs = (1 - s[:, None]) * x0 + s[:, None] * x1
        u = x1 - x0
        for k, (m, o, sc) in enumerate(zip(models, opts, scheds)):
            loss = F.mse_loss(m(xs, s, y), u)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            sc.step()
            if it >= cfg.iters - n_tail:
                tail[k] += loss.item() / n_tail
    for m in models:
        m.eval()
    return tail


def build_streams(kind, x_train, y_train, cfg, generator):
    """(unconditional stream, conditional stream or None, couplers): each stream() returns a
    batch (x0, x1, y); the conditional one couples within each class and globally for the
    label-dropped rows (y = −1)."""
    glob = make_coupler(kind, x_train, cfg, generator)

    def uncond():
        x0, x1 = glob(cfg.batch)
        return x0, x1, None

    couplers = {"all": glob}
    if not cfg.conditional:
        return uncond, None, couplers
    classes = sorted(int(c) for c in y_train.unique())
    for c in classes:
        couplers[f"class{c}"] = make_coupler(kind, x_train[y_train == c], cfg, generator)
    n_drop, per = _composition(cfg, [int((y_train == c).sum()) for c in classes])

    def cond():
        parts = [glob(n_drop) + (torch.full((n_drop,), -1, dtype=torch.long),)] if n_drop else []
        for c, n in zip(classes, per):
            if n:
                parts.append(couplers[f"class{c}"](n) + (torch.full((n,), c, dtype=torch.long),))
        return tuple(torch.cat(t) for t in zip(*parts))

    return uncond, cond, couplers


# ---------------------------------------------------------------------- metrics
def w2(a, b, method="emd") -> float:
    """Exact W2 = sqrt(min_π Σ π_ij |a_i − b_j|²) between uniform point sets (W2, not W2²):
    ``"emd"``: POT ``ot.emd2``; ``"assignment"``: scipy's optimal permutation (the same LP
    value for two uniform sets of equal size, Birkhoff), via otkernels.metrics.exact_ot."""
    from otkernels import metrics

    return metrics.exact_ot(a, b, p=2, method=method)


def sample_metrics(real, fake, w2_method="emd", sinkhorn=True) -> dict:
    """W2 (exact), Sinkhorn divergence (blur 0.05; None without ``sinkhorn``), MMD² (Gaussian
    σ = 0.5), density and coverage (k = 5) of ``fake`` against ``real``, standardised units."""
    from otkernels import metrics

    out = {"w2": w2(real, fake, w2_method), "w2_method": w2_method,
           "sinkhorn": metrics.sinkhorn(real, fake, blur=0.05).item() if sinkhorn else None,
           "mmd2": metrics.mmd2(real, fake, "gaussian", 0.5).item()}
    out.update(metrics.density_coverage(real, fake, k=5))
    return out


# ---------------------------------------------------------------------- the study
def _cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _eval_data(cfg: MoonsConfig):
    """(x_train, y_train, real, real2, z_eval, y_eval): the fixed training set, two fresh draws
    of moons (another seed each, the training set's scaling), the evaluation noises and labels."""
    x_train, y_train, stats = make_data(cfg.n_train, cfg.noise, seed=cfg.seed)
    real, _, _ = make_data(cfg.n_eval, cfg.noise, seed=cfg.seed + 1, stats=stats)
    real2, _, _ = make_data(cfg.n_eval, cfg.noise, seed=cfg.seed + 2, stats=stats)
    g_eval = torch.Generator().manual_seed(cfg.seed + 3)
    z_eval = torch.randn(cfg.n_eval, 2, generator=g_eval)
    y_eval = torch.arange(cfg.n_eval) * 2 // cfg.n_eval                # half class 0, half class 1
    return x_train, y_train, real, real2, z_eval, y_eval


def run_coupling(kind: str, cfg: MoonsConfig) -> dict:
    """Train and evaluate every model of one coupling (the unit of work of a worker process):
    {"rows", "models", "coupling", "plots", "wall_s", "process_cpu_s"}.  Deterministic given
    ``cfg`` (its own seeds), whichever process runs it."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    w_start, c_start = time.perf_counter(), time.process_time()
    x_train, y_train, real, _, z_eval, y_eval = _eval_data(cfg)
    rows, models_out, plots = [], {}, {}
    ncls = int(y_train.max()) + 1
    gen = torch.Generator().manual_seed(cfg.seed + 1000 + COUPLINGS.index(kind))
    torch.manual_seed(cfg.seed + 2000 + COUPLINGS.index(kind))
    t0 = time.perf_counter()
    uncond, cond, couplers = build_streams(kind, x_train, y_train, cfg, gen)
    # batch transport cost of this coupling against the identity pairing of the same points
    x0, x1, _ = uncond()
    coupling_out = {"batch_cost": batch_cost(x0, x1),
                    "identity_cost": batch_cost(x0, x1[torch.randperm(x1.shape[0], generator=gen)]),
                    "setup_s": time.perf_counter() - t0}
    trained = {}
    for mode, stream in (("uncond", uncond), ("cond", cond)):
        if stream is None:
            continue
        ms = [MoonsMLP(e, ncls if mode == "cond" else 0, cfg.hidden, cfg.depth, cfg.freqs) for e in cfg.embeddings]
        t1 = time.perf_counter()
        losses = train_models(ms, stream, cfg, gen, desc=f"{kind}/{mode}")
        dt = time.perf_counter() - t1
        for e, m, l in zip(cfg.embeddings, ms, losses):
            trained[(mode, e)] = m
            models_out[f"{kind}/{mode}/{e}"] = {"final_loss": l, "train_s": dt}
    coupling_out["train_s"] = time.perf_counter() - t0
    coupling_out["info"] = {k: c.info for k, c in couplers.items() if c.info}
    t2 = time.perf_counter()
    jobs = []
    for (mode, e), m in trained.items():
        settings = [("none", None, 1.0)] if mode == "uncond" else [(str(w), y_eval, w) for w in GUIDANCE]
        for guide, y, w in settings:
            solvers = cfg.solvers if mode == "uncond" else cfg.cfg_solvers
            jobs += [(mode, e, m, guide, y, w, sv, st) for sv in solvers for st in cfg.steps]
    for mode, e, m, guide, y, w, sv, st in tqdm(jobs, desc=f"{kind}/eval", disable=not cfg.progress, leave=False):
        with torch.no_grad():
            fake, _ = integrate(guided(m, y, w), z_eval, st, sv)
        headline = sv == "euler" and st <= 2
        # --quick: POT for the 1–2-step Euler rows, scipy's assignment (the same LP value) for
        # the others, and the Sinkhorn divergence (1.4 s a row) only where the report shows
        # it (unconditional, 1–2 Euler steps), to fit the 10-minute budget
        met = sample_metrics(real, fake, "emd" if headline or not cfg.quick else "assignment",
                             sinkhorn=(headline and mode == "uncond") or not cfg.quick)
        rows.append({"coupling": kind, "embedding": e, "model": mode, "cfg": guide, "solver": sv, "steps": st,
                     "nfe": st * EVALS_PER_STEP[sv], **met})
        if mode == "uncond" and sv == "euler" and st in (1, 2):
            plots[(kind, e, st)] = fake
    for (mode, e), m in trained.items():
        key = f"{kind}/{mode}/{e}"
        sel = torch.arange(0, cfg.n_eval, max(1, cfg.n_eval // 500))     # 500 paths, both classes
        models_out[key].update(path_diagnostics(guided(m, None if mode == "uncond" else y_eval[sel]), z_eval[sel]))
        if mode == "uncond":
            plots[(kind, e, "path")] = integrate(guided(m), z_eval[:300], 50, "euler", path=True)[2]
        else:
            for w in GUIDANCE:
                plots[(kind, e, f"cfg{w}")] = integrate(guided(m, y_eval, w), z_eval, 50, "heun")[0]
    coupling_out["eval_s"] = time.perf_counter() - t2
    return {"rows": rows, "models": models_out, "coupling": coupling_out, "plots": plots,
            "wall_s": time.perf_counter() - w_start, "process_cpu_s": time.process_time() - c_start}


def run(cfg: MoonsConfig, out_dir: str | None = "reports/moons", plot: bool = True) -> dict:
    """Train every (coupling × embedding × {unconditional, conditional}) model, sample each at
    every (solver, steps) and guidance scale, and write moons.json, moons.csv, moons.png
    (and moons_cfg.png) into ``out_dir`` (None: write nothing).  Returns the JSON dict.

    ``cfg.workers`` > 1: the couplings run in that many worker processes (spawned, each with
    ``cfg.threads`` torch threads), the most expensive first; the results do not depend on it."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    _, _, real, real2, _, _ = _eval_data(cfg)
    floor = sample_metrics(real, real2, "emd")
    floor["w2_assignment"] = w2(real, real2, "assignment")
    rows, models_out, couplings_out, plots, workers_out = [], {}, {}, {}, {}
    parallel = cfg.workers > 1 and len(cfg.couplings) > 1
    if parallel:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        cost = {"sinkhorn": 0, "semidiscrete": 1, "large_batch": 2, "exact": 3, "independent": 4}
        order = sorted(cfg.couplings, key=cost.get)
        with ProcessPoolExecutor(min(cfg.workers, len(order)), mp_context=mp.get_context("spawn")) as ex:
            futs = {k: ex.submit(run_coupling, k, cfg) for k in order}
            results = {k: f.result() for k, f in futs.items()}
    else:
        results = {k: run_coupling(k, cfg) for k in cfg.couplings}
    for kind in cfg.couplings:                                       # rows in the configured order
        r = results[kind]
        rows += r["rows"]
        models_out.update(r["models"])
        couplings_out[kind] = r["coupling"]
        plots.update(r["plots"])
        workers_out[kind] = {"wall_s": r["wall_s"], "process_cpu_s": r["process_cpu_s"]}
    wall = time.perf_counter() - t_start
    result = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
              "floor": floor, "rows": rows, "models": models_out, "couplings": couplings_out,
              "targets": targets(rows, floor), "wall_s": wall,
              # CPU seconds of this process and of the worker processes (whose CPU is not this one's)
              "process_cpu_s": time.process_time() - cpu_start + (sum(w["process_cpu_s"] for w in workers_out.values())
                                                                  if parallel else 0.0),
              "workers": cfg.workers if parallel else 1, "per_coupling": workers_out, "cpu": _cpu_model(),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "moons.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out_dir, "moons.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        if plot:
            _plot(plots, real, cfg, result, out_dir)
    return result


def best_w2(rows, coupling, steps, solver="euler", model="uncond", cfg_="none"):
    """The lowest W2 over the embeddings for (coupling, steps, solver, model, guidance), or None."""
    v = [r["w2"] for r in rows if r["coupling"] == coupling and r["steps"] == steps and r["solver"] == solver
         and r["model"] == model and r["cfg"] == cfg_]
    return min(v) if v else None


def targets(rows, floor) -> dict:
    """The issue's targets (unconditional model, Euler, best embedding): W2 ≤ 0.10 at 1 step,
    ≤ 0.07 at 2 steps (best OT coupling), OT couplings ≤ 0.6 × the independent coupling's W2."""
    out = {"floor_w2": floor["w2"]}
    kinds = sorted({r["coupling"] for r in rows})
    ot_kinds = [k for k in kinds if k != "independent"]
    for st, bound in ((1, 0.10), (2, 0.07)):
        vals = {k: best_w2(rows, k, st) for k in kinds}
        vals = {k: v for k, v in vals.items() if v is not None}
        best = min(((v, k) for k, v in vals.items() if k in ot_kinds), default=(None, None))
        out[f"w2_{st}step"] = vals
        out[f"best_{st}step"] = {"coupling": best[1], "w2": best[0], "bound": bound,
                                 "met": best[0] is not None and best[0] <= bound}
        ind = vals.get("independent")
        if ind is not None:
            out[f"ratio_{st}step"] = {k: vals[k] / ind for k in ot_kinds if k in vals}
            out[f"ratio_{st}step_met"] = {k: vals[k] <= 0.6 * ind for k in ot_kinds if k in vals}
    return out


def _plot(plots, real, cfg, result, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in cfg.couplings]
    emb = {}
    for k in kinds:   # the embedding with the lower 1-step W2 for each coupling
        cand = [(r["w2"], r["embedding"]) for r in result["rows"] if r["coupling"] == k and r["model"] == "uncond"
                and r["solver"] == "euler" and r["steps"] == 1]
        emb[k] = min(cand)[1] if cand else cfg.embeddings[0]
    fig, axes = plt.subplots(len(kinds), 3, figsize=(7.5, 2.4 * len(kinds)), squeeze=False)
    r = real.numpy()
    for i, k in enumerate(kinds):
        for jcol, st in enumerate((1, 2)):
            ax = axes[i, jcol]
            ax.scatter(r[:, 0], r[:, 1], s=1, c="0.8", lw=0)
            f = plots[(k, emb[k], st)].numpy()
            ax.scatter(f[:, 0], f[:, 1], s=1, c="C0" if st == 1 else "C1", lw=0)
            w = best_row(result["rows"], k, emb[k], st)
            ax.set_title(f"{k} ({emb[k]}), {st} Euler step{'s' if st > 1 else ''}\nW2 = {w:.3f}", fontsize=7)
        ax = axes[i, 2]
        p = plots[(k, emb[k], "path")].numpy()
        for t in range(0, p.shape[1]):
            ax.plot(p[:, t, 0], p[:, t, 1], lw=0.3, c="C2", alpha=0.5)
        ax.scatter(p[0, :, 0], p[0, :, 1], s=1, c="k", lw=0)
        ax.scatter(p[-1, :, 0], p[-1, :, 1], s=1, c="C3", lw=0)
        ax.set_title(f"{k}: 50-step paths, straightness "
                     f"{result['models'][f'{k}/uncond/{emb[k]}']['straightness']:.3f}", fontsize=7)
        for ax in axes[i]:
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
    fig.suptitle(f"two moons, flow matching: {cfg.iters} steps, floor W2 = {result['floor']['w2']:.3f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "moons.png"), dpi=90)
    plt.close(fig)
    if not cfg.conditional:
        return
    fig, axes = plt.subplots(len(GUIDANCE), len(kinds), figsize=(2.2 * len(kinds), 2.3 * len(GUIDANCE)),
                             squeeze=False)
    for j, k in enumerate(kinds):
        for i, w in enumerate(GUIDANCE):
            ax = axes[i, j]
            f = plots[(k, emb[k], f"cfg{w}")].numpy()
            half = f.shape[0] // 2
            ax.scatter(r[:, 0], r[:, 1], s=1, c="0.85", lw=0)
            ax.scatter(f[:half, 0], f[:half, 1], s=1, c="C0", lw=0)
            ax.scatter(f[half:, 0], f[half:, 1], s=1, c="C3", lw=0)
            ax.set_title(f"{k}, CFG {w:g}, 50 Heun", fontsize=7)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "moons_cfg.png"), dpi=80)
    plt.close(fig)


def best_row(rows, kind, emb, steps, solver="euler"):
    for r in rows:
        if (r["coupling"], r["embedding"], r["model"], r["solver"], r["steps"]) == (kind, emb, "uncond", solver, steps):
            return r["w2"]
    return float("nan")


def format_table(result) -> str:
    """A markdown table: unconditional Euler W2 per coupling × embedding at each step count."""
    rows = result["rows"]
    steps = sorted({r["steps"] for r in rows})
    head = "| coupling | time | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in steps) + " |"
    lines = [head, "|---|---|" + "---:|" * len(steps)]
    for kind in dict.fromkeys(r["coupling"] for r in rows):
        for emb in dict.fromkeys(r["embedding"] for r in rows):
            vals = []
            for s in steps:
                v = [r["w2"] for r in rows if (r["coupling"], r["embedding"], r["model"], r["solver"], r["steps"])
                     == (kind, emb, "uncond", "euler", s)]
                vals.append(f"{v[0]:.3f}" if v else "–")
            lines.append(f"| {kind} | {emb} | " + " | ".join(vals) + " |")
    lines.append(f"| two-sample floor | | {result['floor']['w2']:.3f} |" + " |" * (len(steps) - 1))
    return "\n".join(lines)


def _fmt(v, spec=".3f"):
    return "–" if v is None else format(v, spec)


def markdown_report(result) -> str:
    """The tables of docs/moons.md from a result dict: W2 of every (coupling × time embedding ×
    guidance × steps) with Euler, the solvers at equal steps, the other metrics at 1 and 2 Euler
    steps, path straightness and the couplings' diagnostics."""
    rows, out = result["rows"], []
    steps = sorted({r["steps"] for r in rows})
    pick = lambda **k: [r for r in rows if all(r[a] == b for a, b in k.items())]  # noqa: E731
    kinds = list(dict.fromkeys(r["coupling"] for r in rows))
    embs = list(dict.fromkeys(r["embedding"] for r in rows))
    guides = list(dict.fromkeys(r["cfg"] for r in rows))
    out.append("Exact W2 (sqrt of POT's emd2, squared Euclidean cost), Euler, 2,000 vs 2,000 points:\n")
    out.append("| coupling | time | model / CFG | " + " | ".join(f"{s}" for s in steps) + " |")
    out.append("|---|---|---|" + "---:|" * len(steps))
    for k in kinds:
        for e in embs:
            for g in guides:
                vals = []
                for s in steps:
                    v = pick(coupling=k, embedding=e, cfg=g, solver="euler", steps=s)
                    vals.append(_fmt(v[0]["w2"]) if v else "–")
                label = "unconditional" if g == "none" else f"conditional, CFG {float(g):g}"
                out.append(f"| {k} | {e} | {label} | " + " | ".join(vals) + " |")
    out.append(f"| two-sample floor | | | {result['floor']['w2']:.3f} |" + " |" * (len(steps) - 1))
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    if len(solvers) > 1:
        out.append("\nSolvers, unconditional models (W2 at each step count; NFE = steps × 1 for Euler, × 2 for "
                   "midpoint and Heun):\n")
        out.append("| coupling | time | solver | " + " | ".join(f"{s}" for s in steps) + " |")
        out.append("|---|---|---|" + "---:|" * len(steps))
        for k in kinds:
            for e in embs:
                for sv in solvers:
                    vals = [pick(coupling=k, embedding=e, cfg="none", solver=sv, steps=s) for s in steps]
                    out.append(f"| {k} | {e} | {sv} | " + " | ".join(_fmt(v[0]["w2"]) if v else "–" for v in vals)
                               + " |")
    out.append("\nAll metrics, unconditional models, Euler (Sinkhorn divergence at blur 0.05; MMD² with a Gaussian "
               "kernel σ = 0.5; density / coverage k = 5):\n")
    out.append("| coupling | time | steps | W2 | Sinkhorn | MMD² | density | coverage |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for k in kinds:
        for e in embs:
            for s in (1, 2):
                for r in pick(coupling=k, embedding=e, cfg="none", solver="euler", steps=s):
                    out.append(f"| {k} | {e} | {s} | {r['w2']:.3f} | {_fmt(r['sinkhorn'], '.2e')} | "
                               f"{r['mmd2']:.2e} | {r['density']:.3f} | {r['coverage']:.3f} |")
    f = result["floor"]
    out.append(f"| floor (real vs real) | | | {f['w2']:.3f} | {f['sinkhorn']:.2e} | {f['mmd2']:.2e} | "
               f"{f['density']:.3f} | {f['coverage']:.3f} |")
    out.append("\nLearned paths (100 Euler steps from 500 eval noises; conditional models at CFG 1) and the "
               "couplings' batch cost ½|x0 − x1|² (a 256 batch; identity: the same points randomly paired):\n")
    out.append("| coupling | batch cost | identity | time | model | straightness | curvature | final loss |")
    out.append("|---|---:|---:|---|---|---:|---:|---:|")
    for k in kinds:
        c = result["couplings"][k]
        for key, m in result["models"].items():
            kk, mode, e = key.split("/")
            if kk == k:
                out.append(f"| {k} | {c['batch_cost']:.3f} | {c['identity_cost']:.3f} | {e} | {mode} | "
                           f"{m['straightness']:.4f} | {m['curvature']:.4f} | {m['final_loss']:.4f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffusion.moons", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ≤ 10-minute CPU table (3k steps, 4k train set and pools)")
    p.add_argument("--out", default="reports/moons", help="output folder (JSON, CSV, PNG)")
    p.add_argument("--couplings", default=None, help=f"comma list of {COUPLINGS}")
    p.add_argument("--embeddings", default=None, help=f"comma list of {EMBEDDINGS}")
    p.add_argument("--solvers", default=None, help=f"comma list of {SOLVERS}")
    p.add_argument("--steps", default=None, help="comma list of step counts (default 1,2,5,10,50)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--pool-size", type=int, default=None)
    p.add_argument("--sd-time", type=float, default=None, help="seconds of semi-discrete refinement per map")
    p.add_argument("--noise", type=float, default=None)
    p.add_argument("--no-cond", action="store_true", help="skip the conditional (CFG) models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes, one coupling each at a time (default 2 with --quick, else 1)")
    p.add_argument("--pool-blur", type=float, default=None, help="large-batch coupling: the plan's blur")
    p.add_argument("--sinkhorn-blur", type=float, default=None, help="minibatch entropic coupling's blur")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    kw = {"seed": a.seed, "threads": a.threads, "progress": not a.no_progress, "conditional": not a.no_cond}
    for name, conv in (("couplings", str), ("embeddings", str), ("solvers", str), ("steps", int)):
        v = getattr(a, name)
        if v is not None:
            kw[name] = tuple(conv(s) for s in v.split(",") if s)
    for name in ("iters", "n_train", "pool_size", "sd_time", "noise", "workers", "pool_blur", "sinkhorn_blur"):
        v = getattr(a, name)
        if v is not None:
            kw[name] = v
    if "solvers" in kw and a.quick:
        kw.setdefault("cfg_solvers", tuple(s for s in kw["solvers"] if s == "euler") or kw["solvers"][:1])
    try:
        cfg = MoonsConfig.quick_config(**kw) if a.quick else MoonsConfig(**kw)
    except ValueError as e:
        p.error(str(e))
    res = run(cfg, a.out, plot=not a.no_plot)
    print(format_table(res))
    t = res["targets"]
    for st in (1, 2):
        b = t.get(f"best_{st}step", {})
        if b.get("coupling"):
            print(f"{st} step: best OT coupling {b['coupling']} W2 = {b['w2']:.3f} (target <= {b['bound']}: "
                  f"{'met' if b['met'] else 'MISSED'}); ratios to independent: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in t.get(f"ratio_{st}step", {}).items()))
    print(f"floor W2 = {res['floor']['w2']:.3f}; wall {res['wall_s']:.0f} s (process CPU "
          f"{res['process_cpu_s']:.0f} s) on {res['cpu']} "
          f"({res['threads']} thread(s)); written to {a.out}")
    return res


if __name__ == "__main__":
    main()
