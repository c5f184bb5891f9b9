"""Evaluation metrics for generative models on feature sets (N × D, N up to 10⁵–10⁶).

    from otkernels import metrics
    scores = metrics.evaluate(real_feats, fake_feats)   # {"sinkhorn", "mmd2", "fid", "precision", ...}

Every pairwise computation is blocked or runs on the otkernels backends: no N×M matrix is
stored (except :func:`exact_ot`, a small-set reference).  Each metric matches its reference
implementation (tests: prdc, scipy / pytorch-fid, torchmetrics, geomloss, POT).

* OT: :func:`sinkhorn` (``SamplesLoss``), :func:`exact_ot` (POT / scipy);
* MMD: :func:`mmd2` (gaussian / laplacian / energy on the backends, differentiable),
  :func:`polynomial_mmd2`, :func:`kid`, :func:`median_bandwidth`;
* FID: :class:`FeatureStats` (streaming float64 mean/covariance), :func:`frechet_distance`,
  :func:`fid`;
* k-NN: :func:`knn`, :func:`knn_radii`, :func:`prdc`, :func:`precision_recall`,
  :func:`density_coverage`;
* mode mixture: :func:`mode_mixture`, :func:`classify`;
* :func:`evaluate`: all of them as one flat dict of floats.
"""
from .suite import DEFAULT_METRICS, evaluate
from .frechet import FeatureStats, fid, frechet_distance
from .neighbours import density_coverage, knn, knn_radii, prdc, precision_recall
from .mmd import kernel_means, kid, median_bandwidth, mmd2, polynomial_mmd2
from .mmr import class_probabilities, classify, mode_mixture
from .ot import exact_ot, l2_normalize, sinkhorn

__all__ = [
    "evaluate", "DEFAULT_METRICS",
    "FeatureStats", "fid", "frechet_distance",
    "knn", "knn_radii", "prdc", "precision_recall", "density_coverage",
    "mmd2", "polynomial_mmd2", "kid", "median_bandwidth", "kernel_means",
    "mode_mixture", "classify", "class_probabilities",
    "sinkhorn", "exact_ot", "l2_normalize",
]
