"""Bounded memory: the default cache budget, the budget enforced on the cost handles,
``backend="online"`` / ``"multiscale"`` without any N×M matrix, ``verbose`` reporting what was
cached, and a fresh process whose peak RSS stays within the budget."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import otkernels
from otkernels import backends
from otkernels.costs import Cost
from otk_testing import require_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def budget(monkeypatch):
    """``budget(n)`` sets the cache budget for this test (restored afterwards)."""
    monkeypatch.delenv("OTKERNELS_CACHE_BYTES", raising=False)
    monkeypatch.setattr(backends, "_budget", None)
    return lambda n: monkeypatch.setattr(backends, "_budget", n)


def _available(name):
    require_backend(name)


def test_default_budget_is_bounded(budget, monkeypatch):
    assert backends.cache_budget() == min(backends.DEFAULT_CACHE_CAP,
                                          backends._ram_bytes() // backends.DEFAULT_CACHE_FRACTION)
    assert backends.cache_budget() <= 2 << 30
    monkeypatch.setattr(backends, "_ram_bytes", lambda: 4 << 30)  # a 4 GiB machine: 512 MiB
    assert backends.cache_budget() == 512 << 20
    monkeypatch.setattr(backends, "_ram_bytes", lambda: 256 << 30)  # a large one: the 2 GiB cap
    assert backends.cache_budget() == 2 << 30
    monkeypatch.setenv("OTKERNELS_CACHE_BYTES", "8e9")  # raised by the environment ...
    assert backends.cache_budget() == 8 * 10 ** 9
    backends.set_cache_budget(123)  # ... and by the call, which wins
    try:
        assert backends.cache_budget() == 123
    finally:
        backends.set_cache_budget(None)
    assert backends.cache_budget() == 8 * 10 ** 9


def _stored(handles):
    """Bytes of distinct N×M matrices the handles keep (shared caches counted once)."""
    seen = {}
    for h in handles:
        m = getattr(h, "cache", None) if h is not None else None
        if m is not None:
            seen[(m.data_ptr(), m.numel())] = m.numel() * m.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("name", ["native", "blocked"])
@pytest.mark.parametrize("nbytes", [0, 300_000, 1_500_000, 10 ** 9])
def test_handles_respect_the_budget(budget, name, nbytes):
    """Whatever the budget, the cost handles store at most that many bytes; a budget below
    C(x, y) buys native the first rows of it, blocked nothing; native stores C(x, x), C(y, y)
    as packed triangles (issue 23)."""
    _available(name)
    budget(nbytes)
    mod = backends.get(name)
    N, M, D = 700, 500, 3
    x, y = torch.randn(1, N, D), torch.randn(1, M, D)
    handles = mod.cost_handles(x, y, Cost(2), debias=True)
    stored = _stored(handles)
    assert stored <= nbytes, f"{name}: {stored} bytes cached with a budget of {nbytes}"
    tri = mod.packed_numel if name == "native" and mod.packed_supported() else (lambda n: n * n)
    full = 4 * (N * M + tri(N) + tri(M))
    if nbytes >= full:
        assert stored == full
    if name == "native" and 0 < nbytes < 4 * N * M:
        assert getattr(handles[0], "rows", 0) == nbytes // (4 * M)  # partial C(x, y)
    if nbytes == 0:
        assert stored == 0


@pytest.mark.parametrize("name", ["online", "multiscale"])
def test_online_never_stores_a_cost_matrix(budget, name):
    budget(10 ** 12)  # even with room for everything
    mod = backends.get(name)
    assert mod.NAME == "online"
    x, y = torch.randn(1, 300, 3), torch.randn(1, 200, 3)
    handles = mod.cost_handles(x, y, Cost(2), debias=True)
    assert _stored(handles) == 0
    assert all(getattr(h, "cache", None) is None for h in handles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multiscale's "no kernel truncation" warning
        L = otkernels.SamplesLoss("sinkhorn", blur=0.1, backend=name)
        ref = otkernels.SamplesLoss("sinkhorn", blur=0.1, backend="tensorized")
        xd, yd = x[0].double(), y[0].double()
        assert abs(float(L(xd, yd)) - float(ref(xd, yd))) < 1e-10


def test_verbose_reports_the_cache(budget, capsys):
    _available("native")
    budget(1_000_000)
    x, y = torch.randn(700, 3), torch.randn(500, 3)
    otkernels.SamplesLoss("sinkhorn", backend="native", verbose=True)(x, y)
    out = capsys.readouterr().out
    assert "C(x,y) cached" in out and "first 500 of 700 rows" in out
    assert "C(x,x) recomputed" in out
    assert "cache budget" in out and "OTKERNELS_CACHE_BYTES" in out
    otkernels.SamplesLoss("sinkhorn", backend="online", verbose=True)(x, y)
    assert "no N×M matrix stored" in capsys.readouterr().out


def _child(N, backend, env):
    env = {**os.environ, "PYTHONPATH": ROOT, **env}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "memory_child.py"), str(N), "3", backend],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend,nbytes", [("auto", 32 << 20), ("online", None)])
def test_peak_rss_within_the_budget(backend, nbytes):
    """A fresh process: N = M = 5000, D = 3 (all three costs would take 300 MB).  The solve's
    peak RSS above the process before it stays within the budget + 40 MB (points, potentials,
    tiles, thread stacks), and within 40 MB with backend="online" and no budget set."""
    _available("native")
    env = {"OTKERNELS_CACHE_BYTES": str(nbytes)} if nbytes is not None else {}
    res = _child(5000, backend, env)
    growth = (res["rss_peak_kb"] - res["rss_before_kb"]) * 1024
    allowed = (nbytes or 0) + (40 << 20)
    assert growth <= allowed, f"{backend}: the solve grew the RSS by {growth / 2**20:.0f} MiB (allowed {allowed / 2**20:.0f})"
    assert res["grad_finite"]
