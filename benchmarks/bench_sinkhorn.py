"""Sinkhorn divergence, forward + backward w.r.t. x: otkernels vs geomloss.

``SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True)`` on float32
``x ~ randn(N, D)``, ``y ~ randn(N, D) + 0.5``, 2 torch threads.  All competitors of one
(N, D) share the pytest-benchmark group ``"sinkhorn N=... D=..."`` so their ratios come
from one run (``benchmarks/summarize.py`` prints them).

otkernels runs with an explicit cost-cache budget, ``CACHE_BUDGET`` = 2 GiB (the default cap;
recorded as ``cache_budget``): every float32 cost of N ≤ 10k (3 × 400 MB) is cached, on any
machine, so rows measured before and after the default budget changed (issue 15) compare.

Every benchmark checks its value against geomloss ``tensorized`` (float64 for N ≤ 1000,
else float32: the value of the geomloss tensorized benchmark of the same group, computed
on demand if that one did not run) to ``REL_TOL`` relative: a fast wrong answer fails.
"""
from __future__ import annotations

import os

import pytest
import torch

from common import cpu_timed, keops_status, make_data

SIZES = (1000, 5000, 10000)
DIMS = (3, 128)
COMPETITORS = (("geomloss", "tensorized"), ("geomloss", "online"),
               ("otkernels", "tensorized"), ("otkernels", "blocked"), ("otkernels", "auto"))
PARAMS = dict(loss="sinkhorn", p=2, blur=0.05, scaling=0.5, debias=True)
REL_TOL = 1e-4
CACHE_BUDGET = 2 << 30  # bytes: all three float32 costs up to N = 10k (see the docstring)
GRAD_REL_TOL = 1e-3

# Competitor configurations that take many minutes (or GBs) on the 2-core reference CPU:
# only with --large.  Times are forward+backward measured on that machine.
LARGE_ONLY = {
    ("geomloss", "online", 5000, 128): "geomloss online (KeOps CPU) takes ~145 s at N=5k D=128",
    ("geomloss", "online", 10000, 128): "geomloss online (KeOps CPU) takes ~10 min at N=10k D=128",
    ("geomloss", "online", 10000, 3): "geomloss online (KeOps CPU) takes minutes at N=10k",
    ("otkernels", "tensorized", 10000, 3): "dense tensorized at N=10k: GBs of temporaries, "
                                           "as slow as geomloss tensorized",
    ("otkernels", "tensorized", 10000, 128): "dense tensorized at N=10k: GBs of temporaries, "
                                             "as slow as geomloss tensorized",
}

_REF: dict = {}  # (N, D) -> (value, grad, description)


def _cases():
    for N in SIZES:
        for D in DIMS:
            for lib, backend in COMPETITORS:
                yield pytest.param(N, D, lib, backend, id=f"n{N}-d{D}-{lib}-{backend}")


def make_loss(lib, backend):
    if lib == "geomloss":
        import geomloss
        return geomloss.SamplesLoss(**PARAMS, backend=backend)
    import otkernels
    return otkernels.SamplesLoss(**PARAMS, backend=backend)


def fwd_bwd(loss, x, y):
    xg = x.detach().clone().requires_grad_()
    v = loss(xg, y)
    v.backward()
    return v.detach(), xg.grad


def reference(N, D):
    """geomloss tensorized value and gradient for the (N, D) data (computed once)."""
    if (N, D) not in _REF:
        import geomloss
        dtype = torch.float64 if N <= 1000 else torch.float32
        x, y = make_data(N, N, D, dtype=dtype)
        v, g = fwd_bwd(geomloss.SamplesLoss(**PARAMS, backend="tensorized"), x, y)
        _REF[N, D] = (v.item(), g.float(), f"geomloss tensorized {str(dtype)[6:]}")
    return _REF[N, D]


def skip_reason(N, D, lib, backend, large):
    if lib == "geomloss" and backend == "online":
        ok, why = keops_status()
        if not ok:
            return f"geomloss online needs KeOps: {why}"
    why = LARGE_ONLY.get((lib, backend, N, D))
    if why and not large:
        return f"{why}: run with --large"
    return None


@pytest.mark.parametrize("N,D,lib,backend", list(_cases()))
def test_sinkhorn(benchmark, large, N, D, lib, backend):
    why = skip_reason(N, D, lib, backend, large)
    if why:
        pytest.skip(why)
    benchmark.group = f"sinkhorn N={N} D={D}"
    x, y = make_data(N, N, D)
    loss = make_loss(lib, backend)
    from otkernels import backends
    if lib == "otkernels":
        backends.available()  # a just-in-time extension build happens here, not in the timing
    fwd_bwd(loss, *make_data(64, 64, D))  # KeOps compiles here, not in the timed call

    small = N <= 1000
    log = []
    load = os.getloadavg()[0]
    backends.set_cache_budget(CACHE_BUDGET)
    try:
        v, g = benchmark.pedantic(cpu_timed(lambda: fwd_bwd(loss, x, y), log),
                                  rounds=3 if small else 1, iterations=1,
                                  warmup_rounds=1 if small else 0)
    finally:
        backends.set_cache_budget(None)
    value = v.item()
    info = benchmark.extra_info
    info.update(lib=lib, backend=backend, N=N, M=N, D=D, dtype="float32", cache_budget=CACHE_BUDGET,
                threads=torch.get_num_threads(), value=value,
                cpu_s=min(c for _, c in log[-(3 if small else 1):]), loadavg_1min=round(load, 2))
    if lib == "otkernels" and backend == "auto":
        info["auto_selects"] = backends.select(1, N, N, D, x.device)
    if (lib, backend) == ("geomloss", "tensorized") and N > 1000:
        _REF.setdefault((N, D), (value, g, "geomloss tensorized float32"))
    ref, gref, kind = reference(N, D)
    rel = abs(value - ref) / abs(ref)
    grel = ((g - gref).norm() / gref.norm()).item()
    info.update(ref_value=ref, ref=kind, rel_diff=rel, grad_rel_diff=grel)
    assert torch.isfinite(g).all(), "non-finite gradient"
    assert rel <= REL_TOL, f"{lib} {backend}: value {value} vs {kind} {ref} (rel {rel:.2e})"
    assert grel <= GRAD_REL_TOL, f"{lib} {backend}: gradient rel diff {grel:.2e} vs {kind}"
