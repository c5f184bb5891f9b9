"""Ragged batches (issue 21): many clouds of different sizes in one call.

    python -m pytest benchmarks/bench_ragged.py --benchmark-only -q        # ~2 min on 2 cores

Group ``ragged-256``: 256 pairs of clouds with 50–2,000 points each (sizes uniform, seed 0),
D = 3, float32, Sinkhorn divergence (blur 0.05), value only, backend ``auto``, one fixed
``diameter=8`` for every competitor so that all three compute the same numbers (one
ε-schedule):

* ``otkernels-ragged``: ``L(x, y, x_batch=, y_batch=)`` on the stacked clouds;
* ``python-loop``: ``torch.stack([L(x_s, y_s) for s])``;
* ``padded-zero-weights``: every cloud padded to the largest (2,000 points) with zero
  weights, one batched ``L(a, x, b, y)`` on (256, 2000, 3): the padding way, 4× the pairs.

Each result is checked against the loop's (ragged: equal to 1e-6; padded: 1e-4 relative).
"""
from __future__ import annotations

import pytest
import torch

from common import Rounds, measure

from otkernels import SamplesLoss

S, LO, HI, D, BLUR, DIAMETER = 256, 50, 2000, 3, 0.05, 8.0
RULE = Rounds(warmup=0, rounds=1)
_DATA: dict = {}


def data():
    if not _DATA:
        g = torch.Generator().manual_seed(0)
        n = torch.randint(LO, HI + 1, (S,), generator=g)
        m = torch.randint(LO, HI + 1, (S,), generator=g)
        xs = [torch.randn(int(k), D, generator=g) for k in n]
        ys = [torch.randn(int(k), D, generator=g) + 0.5 for k in m]
        _DATA.update(n=n, m=m, xs=xs, ys=ys)
    return _DATA


def _loss():
    return SamplesLoss("sinkhorn", blur=BLUR, diameter=DIAMETER)


def _loop(d):
    L = _loss()
    return torch.stack([L(x, y) for x, y in zip(d["xs"], d["ys"])])


def _padded_inputs(d):
    N, M = int(d["n"].max()), int(d["m"].max())
    x, y = torch.zeros(S, N, D), torch.zeros(S, M, D)
    a, b = torch.zeros(S, N), torch.zeros(S, M)
    for s, (xs, ys) in enumerate(zip(d["xs"], d["ys"])):
        x[s, :len(xs)], y[s, :len(ys)] = xs, ys
        a[s, :len(xs)], b[s, :len(ys)] = 1.0 / len(xs), 1.0 / len(ys)
    return a, x, b, y


@pytest.mark.benchmark(group="ragged-256")
@pytest.mark.parametrize("what", ["otkernels-ragged", "python-loop", "padded-zero-weights"])
def test_ragged(benchmark, what):
    d = data()
    ref = _DATA.get("ref")
    if ref is None:
        ref = _DATA["ref"] = _loop(d)
    if what == "otkernels-ragged":
        x, y = torch.cat(d["xs"]), torch.cat(d["ys"])
        xb = torch.repeat_interleave(torch.arange(S), d["n"])
        yb = torch.repeat_interleave(torch.arange(S), d["m"])
        out, _ = measure(benchmark, lambda: _loss()(x, y, x_batch=xb, y_batch=yb), RULE)
        tol = 1e-6
    elif what == "python-loop":
        out, _ = measure(benchmark, lambda: _loop(d), RULE)
        tol = 1e-6
    else:
        args = _padded_inputs(d)
        out, _ = measure(benchmark, lambda: _loss()(*args), RULE)
        tol = 1e-4
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    benchmark.extra_info.update(rel_err_vs_loop=err, pairs=int((d["n"] * d["m"]).sum()),
                                padded_pairs=S * int(d["n"].max()) * int(d["m"].max()))
    assert err <= tol, err
