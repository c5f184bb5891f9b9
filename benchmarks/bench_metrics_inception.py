"""Metrics at Inception scale (issue 23): ``evaluate`` on D = 2048 features, FID, KID,
precision/recall (k=3), density/coverage (k=5), against prdc + scipy + torchmetrics.

    OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_metrics_inception.py --benchmark-only          # 5k, ~1 min
    OMP_WAIT_POLICY=PASSIVE python -m pytest benchmarks/bench_metrics_inception.py --benchmark-only --large  # + 50k, ~8 min

Each competitor runs in a fresh process (``metrics_child.py MODE N 2048``): float32 features
made in float32 (real ~ N(0, I), fake ~ 1.1·N(0, I) + 0.05), 2 threads, one untimed 300-point
evaluation, then one timed full-size evaluation (``Rounds(0, 1)`` for every competitor); peak
RSS = ``VmHWM`` of the process, which holds the features (2 × N × 2048 × 4 bytes: 0.82 GB at
50k) and torch.

* ``reference-5k``: scipy FID (pytorch-fid's formula), torchmetrics' ``poly_mmd`` KID, prdc's
  distance matrices (computed once for both k) at N = M = 5,000;
* ``otkernels-5k``: ``metrics.evaluate(metrics=("fid", "kid", "prdc"))`` at 5,000 — checked
  against the reference (k-NN fractions to 3 points, FID to 1e-4 relative, KID within 3 of its
  std: the subsets differ);
* ``otkernels-50k`` (``--large``): the same at N = M = 50,000: target ≤ 10 minutes, < 2 GB
  *added* to the features' RSS.  The reference does not fit here at 50k: prdc holds three
  50k × 50k distance matrices (3 × 10 GB in float32); its row records the extrapolation of
  its 5k times (prdc × 100 for N², FID and KID measured).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common import THREADS, Rounds

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics_child.py")
D = 2048
RULE = Rounds(warmup=0, rounds=1)
_RESULTS: dict = {}


def _run(mode, N):
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    out = subprocess.run([sys.executable, CHILD, mode, str(N), str(D), "1.0", str(RULE.warmup), str(RULE.rounds)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark(group="evaluate-inception-d2048")
@pytest.mark.parametrize("who,N", [("reference", 5000), ("otkernels", 5000), ("otkernels", 50000)],
                         ids=["reference-5k", "otkernels-5k", "otkernels-50k"])
def test_evaluate_inception(benchmark, large, who, N):
    if N > 5000 and not large:
        pytest.skip("50k with --large")
    res = benchmark.pedantic(lambda: _run(f"{who}-inception", N), rounds=1, iterations=1)
    _RESULTS[who, N] = res
    added_gb = (res["rss_peak_kb"] - res["rss_before_kb"]) * 1024 / 1e9
    benchmark.extra_info.update(evaluation_seconds=res["seconds"], metric_seconds=res["metric_seconds"],
                                values=res["values"], rss_peak_gb=res["rss_peak_kb"] * 1024 / 1e9,
                                rss_added_gb=added_gb, loadavg=res["loadavg"])
    if who == "reference":
        t = res["metric_seconds"]
        benchmark.extra_info["extrapolated_50k_seconds"] = dict(prdc=100 * t["prdc"], note="prdc O(N^2 D); FID/KID: "
                                                                "see the otkernels-50k row; memory 3 x 10 GB")
    ref = _RESULTS.get(("reference", 5000))
    if who == "otkernels" and N == 5000 and ref is not None:
        v, r = res["values"], ref["values"]
        for k in ("precision", "recall", "density", "coverage"):
            assert abs(v[k] - r[k]) <= 3 / N + 1e-12, (k, v[k], r[k])
        assert abs(v["fid"] - r["fid"]) <= 1e-4 * abs(r["fid"]), (v["fid"], r["fid"])
        assert abs(v["kid_mean"] - r["kid_mean"]) <= 3 * max(v["kid_std"], r["kid_std"]), (v, r)
        benchmark.extra_info["speedup_vs_reference"] = ref["seconds"] / res["seconds"]
    if N == 50000:
        assert res["seconds"] <= 600, res["seconds"]
        assert added_gb < 2.0, added_gb
