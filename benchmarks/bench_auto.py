"""Small and batched problems: what ``backend="auto"`` picks, against every CPU backend and
geomloss, forward + backward w.r.t. x, float32, 2 threads.

The sizes where the ``auto`` thresholds of ``otkernels/backends/__init__.py`` sit (N = M from
10 to 1000, batches of 8–32 small clouds), for the Sinkhorn divergence and the gaussian
kernel loss.  One pytest-benchmark group per problem, ``benchmarks/summarize.py`` prints the
ratios; each value is checked against geomloss ``tensorized`` (same dtype) to 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from common import make_data

PROBLEMS = [  # (loss, B, N, D)
    ("sinkhorn", 1, 10, 3), ("sinkhorn", 1, 100, 3), ("sinkhorn", 1, 300, 128), ("sinkhorn", 1, 1000, 128),
    ("sinkhorn", 16, 100, 3), ("sinkhorn", 32, 100, 64), ("sinkhorn", 8, 500, 3),
    ("gaussian", 1, 100, 16), ("gaussian", 1, 1000, 16),
]
COMPETITORS = (("otkernels", "auto"), ("otkernels", "tensorized"), ("otkernels", "blocked"),
               ("otkernels", "native"), ("geomloss", "tensorized"))
REL_TOL = 1e-4


def _data(B, N, D):
    if B == 1:
        return make_data(N, N, D)
    pairs = [make_data(N, N, D, seed=s) for s in range(B)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _loss(lib, backend, loss):
    kw = dict(loss=loss, p=2, blur=0.05 if loss == "sinkhorn" else 0.5, backend=backend)
    if lib == "geomloss":
        import geomloss
        return geomloss.SamplesLoss(**kw)
    import otkernels
    return otkernels.SamplesLoss(**kw)


def _fwd_bwd(L, x, y):
    xg = x.detach().clone().requires_grad_()
    v = L(xg, y).sum()
    v.backward()
    return v.detach()


@pytest.mark.parametrize("loss,B,N,D", PROBLEMS, ids=[f"{p[0]}-b{p[1]}-n{p[2]}-d{p[3]}" for p in PROBLEMS])
@pytest.mark.parametrize("lib,backend", COMPETITORS, ids=[f"{a}-{b}" for a, b in COMPETITORS])
def test_auto(benchmark, loss, B, N, D, lib, backend):
    from otkernels import backends
    if lib == "otkernels" and backend != "auto" and not backends.available()[backend][0]:
        pytest.skip(f"{backend}: {backends.available()[backend][1]}")
    benchmark.group = f"auto {loss} B={B} N={N} D={D}"
    x, y = _data(B, N, D)
    L = _loss(lib, backend, loss)
    ref = _fwd_bwd(_loss("geomloss", "tensorized", loss), x, y).item()
    rounds = 20 if B * N * N <= 300 ** 2 else 5
    v = benchmark.pedantic(lambda: _fwd_bwd(L, x, y), rounds=rounds, iterations=1, warmup_rounds=2).item()
    info = benchmark.extra_info
    info.update(lib=lib, backend=backend, loss=loss, B=B, N=N, M=N, D=D, dtype="float32",
                threads=torch.get_num_threads(), value=v, ref_value=ref, ref="geomloss tensorized float32",
                rel_diff=abs(v - ref) / abs(ref))
    if backend == "auto":
        info["auto_selects"] = backends.select(B, N, N, D, x.device,
                                               kind="kernel" if loss == "gaussian" else "sinkhorn")
    assert abs(v - ref) <= REL_TOL * abs(ref), f"{lib} {backend}: {v} vs geomloss {ref}"
