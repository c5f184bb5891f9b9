"""One metric evaluation in a fresh process, for time and peak-RSS measurements.

``python benchmarks/metrics_child.py MODE N D SIGMA`` prints one JSON line: the metric values,
the seconds of the evaluation alone (after a small warm-up that loads every module), the
seconds per metric, this process's RSS before the evaluation and its peak RSS (``VmHWM``, KB).

MODE:
* ``otkernels``: ``otkernels.metrics.evaluate`` on sinkhorn, mmd, fid, prdc;
* ``reference``: the same numbers with the reference packages, as a user would call them:
  ``prdc.compute_prdc`` (k = 3 for precision/recall, k = 5 for density/coverage: two calls),
  FID from ``np.mean``/``np.cov`` and scipy ``sqrtm`` (pytorch-fid's formula), geomloss
  ``SamplesLoss`` for the Sinkhorn divergence and the gaussian MMD (``tensorized``: on this
  CPU geomloss's KeOps ``online`` backend is several times slower, see docs/benchmarks.md).
"""
import contextlib
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_data, set_threads  # noqa: E402
from memory_child import _status_kb  # noqa: E402

SINKHORN = dict(p=2, blur=0.05, scaling=0.5)
K_PR, K_DC = 3, 5


def run_otkernels(x, y, sigma):
    from otkernels import metrics

    metrics.evaluate(x[:300], y[:300], metrics=("sinkhorn", "mmd", "fid", "prdc"),
                     mmd_bandwidth=sigma)  # warm-up: imports, native extension
    t = time.perf_counter()
    out = metrics.evaluate(x, y, metrics=("sinkhorn", "mmd", "fid", "prdc"), mmd_bandwidth=sigma,
                           k_pr=K_PR, k_dc=K_DC, timings=True, **SINKHORN)
    seconds = time.perf_counter() - t
    times = {k[5:]: out.pop(k) for k in list(out) if k.startswith("time_")}
    out.pop("mmd2", None)  # the reference (geomloss) gives the biased estimate only
    return out, seconds, times


def fid_reference(xn, yn):
    import numpy as np
    from scipy import linalg

    mu1, mu2 = xn.mean(0, dtype=np.float64), yn.mean(0, dtype=np.float64)
    s1, s2 = np.cov(xn, rowvar=False), np.cov(yn, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def run_reference(x, y, sigma):
    import geomloss
    import prdc
    import torch

    xn, yn = x.numpy(), y.numpy()
    small = (x[:300], y[:300])
    with contextlib.redirect_stdout(io.StringIO()):  # warm-up; prdc prints the sample counts
        prdc.compute_prdc(small[0].numpy(), small[1].numpy(), K_DC)
    geomloss.SamplesLoss("gaussian", blur=sigma, backend="tensorized")(*small)
    out, times = {}, {}
    t0 = time.perf_counter()
    with torch.no_grad():
        t = time.perf_counter()
        out["sinkhorn"] = float(geomloss.SamplesLoss("sinkhorn", backend="tensorized", **SINKHORN)(x, y))
        times["sinkhorn"] = time.perf_counter() - t
        t = time.perf_counter()
        out["mmd2_biased"] = 2 * float(geomloss.SamplesLoss("gaussian", blur=sigma, backend="tensorized")(x, y))
        out["mmd_bandwidth"] = sigma
        times["mmd"] = time.perf_counter() - t
    t = time.perf_counter()
    out["fid"] = fid_reference(xn, yn)
    times["fid"] = time.perf_counter() - t
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        r3 = prdc.compute_prdc(xn, yn, K_PR)
        r5 = prdc.compute_prdc(xn, yn, K_DC)
    out.update(precision=float(r3["precision"]), recall=float(r3["recall"]),
               density=float(r5["density"]), coverage=float(r5["coverage"]))
    times["prdc"] = time.perf_counter() - t
    return out, time.perf_counter() - t0, times


def _budget():
    """The cost-cache budget the otkernels run used (bytes)."""
    from otkernels import backends
    return backends.cache_budget()


def main(mode, N, D, sigma):
    import torch

    set_threads()
    x, y = make_data(N, N, D)
    rss0 = _status_kb("VmRSS")
    fn = {"otkernels": run_otkernels, "reference": run_reference}[mode]
    out, seconds, times = fn(x, y, sigma)
    print(json.dumps(dict(mode=mode, N=N, D=D, values=out, seconds=seconds, metric_seconds=times,
                          rss_before_kb=rss0, rss_peak_kb=_status_kb("VmHWM"),
                          threads=torch.get_num_threads(),
                          cache_bytes=os.environ.get("OTKERNELS_CACHE_BYTES", "(default)"),
                          cache_budget=_budget(),
                          omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                          loadavg=os.getloadavg())))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
