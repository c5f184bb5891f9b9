"""``evaluate(real, fake)``: every metric of the package in one call, as a flat dict of floats."""
from __future__ import annotations

import time

import torch

from ._validate import as_pair, check_int
from .frechet import fid as _fid
from .neighbours import _prdc
from .mmd import _bandwidths, _combine, kernel_means, kid
from .mmr import class_probabilities, mode_mixture
from .ot import exact_ot, sinkhorn

DEFAULT_METRICS = ("sinkhorn", "mmd", "fid", "prdc", "kid")
KNOWN = DEFAULT_METRICS + ("mmr", "exact_ot")


@torch.no_grad()
def evaluate(real, fake, *, metrics=None, classifier_probs=None, classifier_logits=None,
             blur=0.05, p=2, scaling=0.5, normalize=False,
             mmd_kernel="gaussian", mmd_bandwidth="median",
             k_pr=3, k_dc=5, kid_subsets=100, kid_subset_size=1000, mmr_threshold=0.8,
             seed=0, dtype=None, backend="auto", progress=False, timings=False):
    """Compare generated features ``fake`` (M, D) with ``real`` (N, D) -> dict of floats.

    metrics (default: "sinkhorn", "mmd", "fid", "prdc", "kid", plus "mmr" when classifier
    outputs are given; also "exact_ot"):

    * "sinkhorn": Sinkhorn divergence (:func:`~otkernels.metrics.sinkhorn`: ``blur``, ``p``,
      ``scaling``, ``normalize`` = features on the unit sphere);
    * "mmd": "mmd2" (unbiased), "mmd2_biased" and "mmd_bandwidth" for ``mmd_kernel`` with
      ``mmd_bandwidth`` (σ, sequence, or "median" of the pooled distances);
    * "fid": Fréchet distance of the Gaussian fits;
    * "prdc": "precision", "recall" (k = ``k_pr``), "density", "coverage" (k = ``k_dc``);
    * "kid": "kid_mean", "kid_std" (``kid_subsets`` subsets of min(``kid_subset_size``, N, M));
    * "mmr": "mmr" and "missing_classes" from ``classifier_probs`` or ``classifier_logits``
      (M, C), threshold ``mmr_threshold``;
    * "exact_ot": f"w{p}", the exact W_p (POT / scipy; small sets only).

    Pairwise work runs blocked (k-NN, KID) or on the backend picked by ``backend`` (Sinkhorn,
    MMD): no N×M matrix unless a backend caches costs within
    :func:`otkernels.backends.cache_budget`.  ``progress`` shows a tqdm bar over the metrics;
    ``timings`` adds "time_<metric>" entries (seconds).
    """
    x, y = as_pair(real, fake, min_samples=2, allow_grad=False)
    has_clf = classifier_probs is not None or classifier_logits is not None
    names = list(DEFAULT_METRICS + (("mmr",) if has_clf else ())) if metrics is None else list(metrics)
    if isinstance(metrics, str):
        names = [metrics]
    unknown = [m for m in names if m not in KNOWN]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: expected names from {KNOWN}")
    N, M = x.shape[0], y.shape[0]
    # every check before any computation
    if "prdc" in names:
        k_pr = check_int("k_pr", k_pr, minimum=1)
        k_dc = check_int("k_dc", k_dc, minimum=1)
        for name, n, k, kname in (("real", N, max(k_pr, k_dc), "max(k_pr, k_dc)"),
                                  ("fake", M, k_pr, "k_pr")):
            if n < k + 1:
                raise ValueError(f"{name} has {n} samples: precision/recall/density/coverage "
                                 f"with {kname} = {k} need at least {k + 1}")
    if "mmr" in names:
        if not has_clf:
            raise ValueError("metric 'mmr' needs classifier_probs= or classifier_logits= "
                             "(the classifier's outputs on the fake samples)")
        probs = class_probabilities(classifier_probs, logits=classifier_logits,
                                    name="classifier_probs" if classifier_probs is not None else "classifier_logits")
        if probs.shape[0] != M:
            raise ValueError(f"the classifier outputs have {probs.shape[0]} rows but fake has "
                             f"{M} samples: give one row per fake sample")
    elif has_clf:
        raise ValueError("classifier outputs were given but 'mmr' is not in metrics")
    if "mmd" in names:
        bandwidths = _bandwidths(mmd_bandwidth, mmd_kernel, x, y)
    if "kid" in names:
        kid_subsets = check_int("kid_subsets", kid_subsets, minimum=1)
        m = min(check_int("kid_subset_size", kid_subset_size, minimum=2), N, M)

    out = {}
    try:
        from tqdm.auto import tqdm
        bar = tqdm(names, desc="metrics", disable=not progress)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = names
    for name in bar:
        if progress and hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)
        t0 = time.perf_counter()
        if name == "sinkhorn":
            out["sinkhorn"] = float(sinkhorn(x, y, blur=blur, p=p, scaling=scaling,
                                             normalize=normalize, backend=backend))
        elif name == "mmd":
            unb = biased = 0.0
            for s in bandwidths:
                terms = kernel_means(x, y, mmd_kernel, s, backend=backend)
                unb += float(_combine(*terms, N, M, True))
                biased += float(_combine(*terms, N, M, False))
            out.update(mmd2=unb, mmd2_biased=biased)
            if len(bandwidths) == 1 and mmd_kernel != "energy":
                out["mmd_bandwidth"] = bandwidths[0]
        elif name == "fid":
            out["fid"] = _fid(x, y)
        elif name == "prdc":
            out.update(_prdc(x, y, None, k_pr, k_dc, dtype,
                             ("precision", "recall", "density", "coverage")))
        elif name == "kid":
            out["kid_mean"], out["kid_std"] = kid(x, y, subsets=kid_subsets, subset_size=m, seed=seed)
        elif name == "mmr":
            r = mode_mixture(probs, threshold=mmr_threshold)
            out.update(mmr=r["mmr"], missing_classes=float(r["missing_classes"]))
        elif name == "exact_ot":
            out[f"w{p}"] = exact_ot(x, y, p=p)
        if timings:
            out[f"time_{name}"] = time.perf_counter() - t0
    return out
