"""Transport-plan operators (issue 19): P@V, the barycentric map, coupling minibatches.

    python -m pytest benchmarks/bench_plan.py --benchmark-only -q        # ~5 min on 2 cores

One pytest-benchmark group per question, every competitor under the same timing rule
(``common.Rounds``); float32, 2 threads, ``x ~ randn``, ``y ~ randn + 0.5`` (seed 0).

* ``plan-apply-50k``: ``π @ V`` at N = M = 50,000, D = 64, K = 64 from given potentials
  (f = g = 0, blur 3: the operator's work does not depend on the potentials' values):
  ``native`` (the fused C++ reduction after its fused log-sum-exp pass) and the barycentric
  map (the same two passes with V = y); a chunked plain-torch loop
  (``exp(u + v − ½|x−y|²/ε) @ V`` over 1,024-row chunks, the plain way to write it without
  the dense plan: ``cdist``, ``exp``, a GEMM per chunk).  The dense plan (50k² float32 =
  10 GB, float64 20 GB) does not fit this machine.  Each result is checked against the
  chunked loop in float64 on 200 rows.
* ``plan-apply-10k``: the same at N = M = 10,000, where the dense plan fits: ``native``
  against the dense way of POT/torchcfm users (``ot.dist`` → ``exp`` → ``@ V``, float32).
* ``plan-memory-50k``: peak RSS of a fresh process running the 50k ``π @ V`` and
  barycentric map (``native``); the growth over the process's RSS before the call must stay
  under 1 GiB.
* ``coupling-4096``: a flow-matching minibatch of 4,096 noise/data pairs, D = 64:
  ``otkernels.coupling.sample_pairs("sinkhorn", blur=1)`` (a refined entropic plan, one
  draw per row, no dense plan) against torchcfm's way (``OTPlanSampler``: dense squared
  distances, ``ot.sinkhorn(reg=2ε)`` on them — the same entropic problem — or ``ot.emd``,
  then 4,096 pairs drawn from the flattened plan with numpy).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import Rounds, make_data, measure

from otkernels.plan import TransportPlan

BLUR = 3.0
RULE = Rounds(warmup=0, rounds=1)
CHUNK = 1024
_DATA: dict = {}


def data(N, D=64, K=64):
    if (N, D, K) not in _DATA:
        x, y = make_data(N, N, D)
        V = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
        _DATA[N, D, K] = (x.contiguous(), y.contiguous(), V)
    return _DATA[N, D, K]


def chunked_apply(x, y, V, eps, rows=None, dtype=None):
    """``Σ_j exp(log(1/N) + log(1/M) − ½|x_i − y_j|²/ε) V_j`` over chunks of rows, plain torch."""
    dtype = dtype or x.dtype
    x, y, V = x.to(dtype), y.to(dtype), V.to(dtype)
    idx = torch.arange(x.shape[0]) if rows is None else rows
    uv = -np.log(x.shape[0]) - np.log(y.shape[0])
    out = []
    for k in range(0, len(idx), CHUNK):
        xc = x[idx[k:k + CHUNK]]
        C = torch.cdist(xc, y).square_().mul_(-0.5 / eps).add_(uv)
        out.append(C.exp_() @ V)
    return torch.cat(out)


def _check(out, x, y, V, eps, rel=1e-4):
    rows = torch.linspace(0, x.shape[0] - 1, 200).long()
    ref = chunked_apply(x, y, V, eps, rows=rows, dtype=torch.float64)
    err = ((out[rows].double() - ref).abs().max() / ref.abs().max()).item()
    assert err < rel, err
    return err


def _plan(x, y, backend="native"):
    z = torch.zeros(x.shape[0])
    return TransportPlan(x, y, z, z, blur=BLUR, backend=backend)


@pytest.mark.benchmark(group="plan-apply-50k")
@pytest.mark.parametrize("what", ["native-apply", "native-barycentric", "torch-chunked"])
def test_plan_apply_50k(benchmark, what):
    x, y, V = data(50_000)
    eps = BLUR ** 2
    if what == "native-apply":
        out, _ = measure(benchmark, lambda: _plan(x, y) @ V, RULE)
        benchmark.extra_info["rel_err_vs_float64"] = _check(out, x, y, V, eps)
    elif what == "native-barycentric":
        T, _ = measure(benchmark, lambda: _plan(x, y).barycentric_map(), RULE)
        P1 = chunked_apply(x, y, torch.ones(len(y), 1), eps, rows=torch.arange(0, 50_000, 250), dtype=torch.float64)
        Py = chunked_apply(x, y, y, eps, rows=torch.arange(0, 50_000, 250), dtype=torch.float64)
        err = ((T[::250].double() - Py / P1).abs().max()).item()
        assert err < 1e-4, err
        benchmark.extra_info["abs_err_vs_float64"] = err
    else:
        out, _ = measure(benchmark, lambda: chunked_apply(x, y, V, eps), RULE)
        benchmark.extra_info["rel_err_vs_float64"] = _check(out, x, y, V, eps)


@pytest.mark.benchmark(group="plan-apply-10k")
@pytest.mark.parametrize("what", ["native-apply", "dense-pot"])
def test_plan_apply_10k(benchmark, what):
    import ot

    x, y, V = data(10_000)
    eps = BLUR ** 2
    if what == "native-apply":
        out, _ = measure(benchmark, lambda: _plan(x, y) @ V, RULE)
    else:
        def dense():
            P = torch.exp(-0.5 * ot.dist(x, y) / eps - np.log(1e8))     # a_i b_j = 1/N² = 1e-8
            return P @ V
        out, _ = measure(benchmark, dense, RULE)
    benchmark.extra_info["rel_err_vs_float64"] = _check(out, x, y, V, eps)


_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {bench!r})
from common import make_data, set_threads
import torch
from otkernels.plan import TransportPlan
from otkernels import backends
set_threads(); backends.available()
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
x, y = make_data(50000, 50000, 64)
V = torch.randn(50000, 64, generator=torch.Generator().manual_seed(1))
z = torch.zeros(50000)
before = kb("VmRSS"); t = time.perf_counter()
P = TransportPlan(x, y, z, z, blur={blur}, backend="native")
out = P @ V; T = P.barycentric_map()
print(json.dumps(dict(seconds=time.perf_counter() - t, rss_before_kb=before, peak_kb=kb("VmHWM"),
                      finite=bool(torch.isfinite(out).all() and torch.isfinite(T).all()))))
"""


@pytest.mark.benchmark(group="plan-memory-50k")
def test_plan_memory_50k(benchmark):
    code = _CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)), blur=BLUR)

    def run():
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    out, _ = measure(benchmark, run, RULE)
    growth = out["peak_kb"] - out["rss_before_kb"]
    benchmark.extra_info.update(out, growth_kb=growth)
    assert out["finite"]
    assert growth < 1024 * 1024, f"the 50k plan operators grew the RSS by {growth / 1024:.0f} MiB"


def torchcfm_pairs(x0, x1, method, eps, rng):
    """torchcfm's OTPlanSampler.sample_plan, written here: dense |x0 − x1|², POT's plan
    (``ot.sinkhorn(reg=2ε)`` on |x|² = the entropic problem of ½|x|² at ε; or ``ot.emd``),
    then len(x0) pairs drawn from the flattened plan."""
    import ot

    a, b = ot.unif(x0.shape[0]), ot.unif(x1.shape[0])
    M = torch.cdist(x0, x1) ** 2
    if method == "exact":
        P = ot.emd(a, b, M.double().numpy(), numItermax=1_000_000)
    else:
        P = ot.sinkhorn(a, b, M.double().numpy(), reg=2 * eps, method="sinkhorn_log", numItermax=1000)
    p = P.flatten() / P.sum()
    k = rng.choice(p.shape[0], p=p, size=x0.shape[0])
    return np.divmod(k, P.shape[1])


@pytest.mark.benchmark(group="coupling-4096")
@pytest.mark.parametrize("what", ["otkernels-sinkhorn", "torchcfm-sinkhorn", "torchcfm-exact"])
def test_coupling_4096(benchmark, what):
    from otkernels.coupling import sample_pairs

    x1, x0 = make_data(4096, 4096, 64)
    x0 = x0 - 0.5                     # noise ~ N(0, I), data ~ the shifted cloud
    if what == "otkernels-sinkhorn":
        gen = torch.Generator().manual_seed(0)
        (i, j), _ = measure(benchmark, lambda: sample_pairs(x0, x1, "sinkhorn", blur=1.0, generator=gen), RULE)
    else:
        rng = np.random.default_rng(0)
        (i, j), _ = measure(benchmark, lambda: torchcfm_pairs(x0, x1, what.split("-")[1], 1.0, rng), RULE)
        i, j = torch.as_tensor(i), torch.as_tensor(j)
    cost = 0.5 * (x0[i] - x1[j]).square().sum(1).mean().item()
    indep = 0.5 * (x0 - x1[torch.randperm(4096, generator=torch.Generator().manual_seed(0))]).square().sum(1).mean()
    benchmark.extra_info.update(pair_cost=cost, independent_cost=indep.item(),
                                distinct_x0=int(torch.unique(i).numel()), distinct_x1=int(torch.unique(j).numel()))
    assert cost < indep.item()
