"""Helpers shared by the benchmarks, their conftest and the memory child script
(a plain module: ``conftest`` is not importable by name next to the root conftest)."""
from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass

# KeOps compiles each new formula (~10 s on CPU); keep the binaries between runs.
os.environ.setdefault("KEOPS_CACHE_FOLDER",
                      os.path.join(os.path.expanduser("~"), ".cache", "keops-otkernels"))

import torch  # noqa: E402

THREADS = int(os.environ.get("OTKERNELS_BENCH_THREADS", "2"))  # 1: a run that leaves the other core alone


def set_threads(n: int = THREADS) -> None:
    torch.set_num_threads(n)


def make_data(N: int, M: int, D: int, dtype=torch.float32, seed: int = 0):
    """``x ~ randn(N, D)``, ``y ~ randn(M, D) + 0.5`` from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(M, D, generator=g, dtype=torch.float64) + 0.5
    return x.to(dtype), y.to(dtype)


@functools.lru_cache(maxsize=None)
def keops_status(device="cpu"):
    """``(usable, reason)``: pykeops imports *and* compiles a small reduction on ``device``."""
    try:
        import pykeops  # noqa: F401
        from pykeops.torch import LazyTensor
    except Exception as e:  # ImportError, or a broken install
        return False, f"pykeops does not import: {e!r}"
    try:
        x = LazyTensor(torch.randn(8, 1, 3, device=device))
        y = LazyTensor(torch.randn(1, 9, 3, device=device))
        s = ((x - y) ** 2).sum(-1).exp().sum(1)
        if not torch.isfinite(s).all():
            return False, "pykeops compiled but returned non-finite values"
    except Exception as e:
        return False, f"pykeops does not compile here: {type(e).__name__}: {str(e)[:200]}"
    return True, f"pykeops {pykeops.__version__}"


def cpu_timed(fn, log):
    """``fn`` wrapped to append ``(wall_s, cpu_s)`` of each call to ``log``."""

    def wrapped():
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        log.append((time.perf_counter() - t, time.process_time() - c))
        return out

    return wrapped


# ----------------------------------------------------------------------------- timing rule
@dataclass(frozen=True)
class Rounds:
    """The timing rule of one benchmark group: ``warmup`` untimed calls of the timed function
    at full size, then ``rounds`` timed calls; the group's figure is the **median** of the
    rounds.  Every competitor of a group runs under the same ``Rounds`` (no competitor gets a
    warm-up or a best-of-n that another does not)."""

    warmup: int
    rounds: int

    def __str__(self):
        return f"warm-up {self.warmup}, median of {self.rounds}"


def measure(benchmark, fn, rule: Rounds):
    """Time ``fn`` with pytest-benchmark under ``rule`` (see :class:`Rounds`) and record the
    rule in ``extra_info``; returns ``(output of the last timed call, median seconds)``."""
    out = benchmark.pedantic(fn, warmup_rounds=rule.warmup, rounds=rule.rounds, iterations=1)
    benchmark.extra_info.update(warmup_rounds=rule.warmup, rounds=rule.rounds, statistic="median")
    return out, benchmark.stats.stats.median


def measure_plain(fn, rule: Rounds):
    """:func:`measure` without pytest-benchmark (for the child processes): ``(output of the
    last timed call, median seconds, every round's seconds)``."""
    for _ in range(rule.warmup):
        fn()
    times, out = [], None
    for _ in range(rule.rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times), times


def rel(a, b) -> float:
    """max |a − b| / max |b| (float64)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------- references
def geomloss_sinkhorn64(x, y, blur=0.05, scaling=0.5, p=2, rows=1000):
    """The debiased Sinkhorn divergence of uniform measures on ``x``, ``y`` in float64, by
    geomloss: its own ``scaling_parameters``, ``sinkhorn_loop`` and ``sinkhorn_cost``, with
    its ``softmin_tensorized`` applied to blocks of ``rows`` rows of the cost (the value of
    ``geomloss.SamplesLoss("sinkhorn", backend="tensorized")`` in float64, in O(rows·M)
    memory instead of four N×M matrices; checked against it by
    :func:`check_geomloss_sinkhorn64`).  No gradient; nothing from otkernels."""
    from geomloss._legacy import sinkhorn_divergence as gd
    from geomloss._legacy import sinkhorn_samples as gs

    cost = gs.cost_routines[p]
    x, y = x.detach().double().contiguous()[None], y.detach().double().contiguous()[None]

    def softmin(eps, pair, h):
        u, v = pair
        return torch.cat([gs.softmin_tensorized(eps, cost(u[:, i:i + rows], v), h)
                          for i in range(0, u.shape[1], rows)], 1)

    N, M = x.shape[1], y.shape[1]
    a = torch.full((1, N), 1.0 / N, dtype=torch.float64)
    b = torch.full((1, M), 1.0 / M, dtype=torch.float64)
    with torch.no_grad():
        _, eps, eps_list, rho = gd.scaling_parameters(x, y, p, blur, None, None, scaling)
        f_aa, g_bb, g_ab, f_ba = gd.sinkhorn_loop(softmin, gd.log_weights(a), gd.log_weights(b),
                                                  (x, x), (y, y), (x, y), (y, x), eps_list, rho, debias=True)
        return gd.sinkhorn_cost(eps, rho, a, b, f_aa, g_bb, g_ab, f_ba, batch=True, debias=True).item()


@functools.lru_cache(maxsize=None)
def check_geomloss_sinkhorn64(N: int = 300, D: int = 3, blur: float = 0.05, scaling: float = 0.5) -> float:
    """Relative difference of :func:`geomloss_sinkhorn64` (blocks of 64 rows) and
    ``geomloss.SamplesLoss(backend="tensorized")`` in float64 on an (N, D) problem; raises
    when it exceeds 1e-12."""
    import geomloss

    x, y = make_data(N, N, D, dtype=torch.float64)
    want = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=True,
                                backend="tensorized")(x, y).item()
    got = geomloss_sinkhorn64(x, y, blur, scaling, rows=64)
    err = abs(got - want) / abs(want)
    if err > 1e-12:
        raise AssertionError(f"blocked geomloss reference {got!r} vs geomloss tensorized {want!r}: {err:.2e}")
    return err
