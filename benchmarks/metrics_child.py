"""One metric evaluation in a fresh process, for time and peak-RSS measurements.

``python benchmarks/metrics_child.py MODE N D SIGMA [WARMUP ROUNDS]`` prints one JSON line: the
metric values, the seconds of the evaluation (``common.measure_plain``: after a small untimed
run on 300 points that loads every module, ``WARMUP`` full-size warm-ups, then the median of
``ROUNDS``; default 0 and 1), the seconds per metric (last round), this process's RSS before the
evaluation and its peak RSS (``VmHWM``, KB).

MODE:
* ``otkernels``: ``otkernels.metrics.evaluate`` on sinkhorn, mmd, fid, prdc;
* ``reference``: the same numbers with the reference packages, float32 as a user would call
  them: precision/recall (k = 3) and density/coverage (k = 5) by prdc's own functions
  (``compute_pairwise_distance``, ``get_kth_value``) and formulas, with the three distance
  matrices computed **once** for both k — the work ``compute_prdc`` does in one call, and what
  otkernels does (two ``compute_prdc`` calls would compute them twice); FID from
  ``np.mean``/``np.cov`` and scipy ``sqrtm`` (pytorch-fid's formula), geomloss ``SamplesLoss``
  for the Sinkhorn divergence and the gaussian MMD (``tensorized``: on this CPU geomloss's
  KeOps ``online`` backend is several times slower, see docs/benchmarks.md);
* ``reference64``: the ``reference`` computation on the same data converted to float64 (not
  timed): the values every competitor is checked against;
* ``otkernels-inception`` / ``reference-inception`` (issue 23): FID, KID (100 subsets of 1,000)
  and precision/recall (k=3) / density/coverage (k=5) on float32 features generated in float32
  (``inception_data``), by ``evaluate`` or by scipy (FID), torchmetrics' ``poly_mmd`` (KID)
  and prdc's functions (once for both k).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Rounds, make_data, measure_plain, set_threads  # noqa: E402
from memory_child import _status_kb  # noqa: E402

SINKHORN = dict(p=2, blur=0.05, scaling=0.5)
K_PR, K_DC = 3, 5


def _evaluate(x, y, rule, names, **kw):
    """``metrics.evaluate`` timed under ``rule`` after an untimed 300-point call (modules, the
    native extension); returns (values, seconds, seconds per metric, every round)."""
    from otkernels import metrics

    metrics.evaluate(x[:300], y[:300], metrics=names, **{k: v for k, v in kw.items() if k == "mmd_bandwidth"},
                     kid_subset_size=100)
    out, seconds, rounds = measure_plain(
        lambda: metrics.evaluate(x, y, metrics=names, k_pr=K_PR, k_dc=K_DC, timings=True, **kw), rule)
    times = {k[5:]: out.pop(k) for k in list(out) if k.startswith("time_")}
    return out, seconds, times, rounds


def run_otkernels(x, y, sigma, rule):
    out, seconds, times, rounds = _evaluate(x, y, rule, ("sinkhorn", "mmd", "fid", "prdc"), mmd_bandwidth=sigma,
                                            **SINKHORN)
    out.pop("mmd2", None)  # the reference (geomloss) gives the biased estimate only
    return out, seconds, times, rounds


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


def prdc_once(xn, yn):
    """precision/recall (k = ``K_PR``) and density/coverage (k = ``K_DC``) with prdc's functions
    and formulas (``prdc.compute_prdc``), each distance matrix computed once for both k."""
    import numpy as np
    from prdc.prdc import compute_pairwise_distance, get_kth_value

    d_real = compute_pairwise_distance(xn)
    d_fake = compute_pairwise_distance(yn)
    d_real_fake = compute_pairwise_distance(xn, yn)
    real_r_pr = get_kth_value(d_real, k=K_PR + 1, axis=-1)
    real_r_dc = get_kth_value(d_real, k=K_DC + 1, axis=-1)
    fake_r_pr = get_kth_value(d_fake, k=K_PR + 1, axis=-1)
    inside_pr = d_real_fake < np.expand_dims(real_r_pr, axis=1)
    inside_dc = d_real_fake < np.expand_dims(real_r_dc, axis=1)
    return dict(precision=float(inside_pr.any(axis=0).mean()),
                recall=float((d_real_fake < np.expand_dims(fake_r_pr, axis=0)).any(axis=1).mean()),
                density=float((1.0 / K_DC) * inside_dc.sum(axis=0).mean()),
                coverage=float((d_real_fake.min(axis=1) < real_r_dc).mean()))


def reference_values(x, y, sigma):
    """The metric values by the reference packages; ``(values, seconds per metric)``."""
    import geomloss
    import torch

    xn, yn = x.numpy(), y.numpy()
    out, times = {}, {}
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
    out.update(prdc_once(xn, yn))
    times["prdc"] = time.perf_counter() - t
    return out, times


def run_reference(x, y, sigma, rule):
    reference_values(x[:300], y[:300], sigma)  # loads the modules (sklearn, scipy, geomloss)
    (out, times), seconds, rounds = measure_plain(lambda: reference_values(x, y, sigma), rule)
    return out, seconds, times, rounds


def run_reference64(x, y, sigma, rule):
    t = time.perf_counter()
    out, times = reference_values(x.double(), y.double(), sigma)
    seconds = time.perf_counter() - t
    return out, seconds, times, [seconds]


INCEPTION = ("fid", "kid", "prdc")  # issue 23's Inception-scale set (Sinkhorn optional: left out)


def inception_data(N, D):
    """float32 features generated in float32 (no float64 transient in the peak RSS): real ~
    N(0, I), fake ~ 1.1·N(0, I) + 0.05 (seed 0)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g).mul_(1.1).add_(0.05)


def run_otkernels_inception(x, y, sigma, rule):
    return _evaluate(x, y, rule, INCEPTION)


def kid_reference(x, y, subsets=100, subset_size=1000, seed=0):
    """torchmetrics' KID: poly_mmd on ``subsets`` random subsets of ``subset_size`` (its compute())."""
    import torch
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(seed)
    m = min(subset_size, x.shape[0], y.shape[0])
    vals = [poly_mmd(x[torch.randperm(x.shape[0], generator=g)[:m]].double(),
                     y[torch.randperm(y.shape[0], generator=g)[:m]].double()) for _ in range(subsets)]
    v = torch.stack(vals)
    return float(v.mean()), float(v.std(unbiased=False))


def reference_inception(x, y):
    xn, yn = x.numpy(), y.numpy()
    out, times = {}, {}
    t = time.perf_counter()
    out["fid"] = fid_reference(xn, yn)
    times["fid"] = time.perf_counter() - t
    t = time.perf_counter()
    out["kid_mean"], out["kid_std"] = kid_reference(x, y)
    times["kid"] = time.perf_counter() - t
    t = time.perf_counter()
    out.update(prdc_once(xn, yn))
    times["prdc"] = time.perf_counter() - t
    return out, times


def run_reference_inception(x, y, sigma, rule):
    reference_inception(x[:300], y[:300])
    (out, times), seconds, rounds = measure_plain(lambda: reference_inception(x, y), rule)
    return out, seconds, times, rounds


def _budget():
    """The cost-cache budget the otkernels run used (bytes)."""
    from otkernels import backends
    return backends.cache_budget()


def main(mode, N, D, sigma, warmup=0, rounds=1):
    import torch

    set_threads()
    x, y = inception_data(N, D) if mode.endswith("-inception") else make_data(N, N, D)
    rss0 = _status_kb("VmRSS")
    fn = {"otkernels": run_otkernels, "reference": run_reference, "reference64": run_reference64,
          "otkernels-inception": run_otkernels_inception, "reference-inception": run_reference_inception}[mode]
    out, seconds, times, all_rounds = fn(x, y, sigma, Rounds(warmup, rounds))
    print(json.dumps(dict(mode=mode, N=N, D=D, values=out, seconds=seconds, metric_seconds=times,
                          warmup_rounds=warmup, rounds=rounds, round_seconds=all_rounds,
                          rss_before_kb=rss0, rss_peak_kb=_status_kb("VmHWM"),
                          threads=torch.get_num_threads(),
                          cache_bytes=os.environ.get("OTKERNELS_CACHE_BYTES", "(default)"),
                          cache_budget=_budget(),
                          omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                          loadavg=os.getloadavg())))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
         *(int(a) for a in sys.argv[5:7]))
