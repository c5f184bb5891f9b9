"""Fréchet distance between Gaussian fits of feature sets (FID when the features are Inception's).

``FID = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½``, with the sample mean and the
unbiased (N − 1) covariance, all in float64.

* :class:`FeatureStats` accumulates count, mean and the centred sum of outer products over
  batches (Chan et al.'s pairwise update: no ``Σ x xᵀ − N μ μᵀ`` cancellation), so 10⁶
  features take O(D²) memory;
* :func:`frechet_distance` takes the trace of the square root from the eigenvalues of the
  symmetric PSD matrix ``Σ₁^½ Σ₂ Σ₁^½`` (``torch.linalg.eigh``; the same eigenvalues as
  ``Σ₁ Σ₂``, real and ≥ 0 up to round-off, which is clipped): no complex numbers, and exact
  for singular covariances.  ``method="sqrtm"`` is the scipy ``sqrtm(Σ₁ Σ₂)`` formula
  (pytorch-fid's), with its ε-offset when the product is singular.
"""
from __future__ import annotations

import warnings

import torch

from ._validate import as_features

_CHUNK_ELEMS = 1 << 23  # rows converted to float64 at a time: chunk × D ≤ 8M elements


class FeatureStats:
    """Streaming mean and covariance of (N, D) features, in float64, O(D²) memory.

    ``stats.update(x)`` for each batch x (n, D); ``merge`` combines two accumulators;
    ``mean`` (D,), ``cov`` (D, D) (unbiased, N − 1), ``count``.
    """

    def __init__(self, dim=None, device=None):
        self.dim, self.device = dim, device
        self.count = 0
        self._mean = None  # (D,) float64
        self._m2 = None  # (D, D) float64: Σ (x − mean)(x − mean)ᵀ

    def update(self, x, name="features"):
        """Add a batch x (n, D) (tensor or numpy array); returns self."""
        x = as_features(name, x, allow_grad=False)
        if self.dim is None:
            self.dim = x.shape[1]
        elif x.shape[1] != self.dim:
            raise ValueError(f"{name} has dimension {x.shape[1]}, the statistics have {self.dim}")
        if self.device is None:
            self.device = x.device
        step = max(1, _CHUNK_ELEMS // self.dim)
        for i in range(0, x.shape[0], step):
            xb = x[i:i + step].to(device=self.device, dtype=torch.float64)
            n = xb.shape[0]
            mb = xb.mean(0)
            xc = xb - mb
            self._merge(n, mb, xc.T @ xc)
        return self

    def _merge(self, n, mean, m2):
        if n == 0:
            return
        if self.count == 0:
            self.count, self._mean, self._m2 = n, mean.clone(), m2.clone()
            return
        tot = self.count + n
        delta = mean - self._mean
        self._m2 += m2 + torch.outer(delta, delta) * (self.count * n / tot)
        self._mean += delta * (n / tot)
        self.count = tot

    def merge(self, other: "FeatureStats"):
        """Add another accumulator's samples (e.g. from another process); returns self."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"other must be a FeatureStats, got {type(other).__name__}")
        if other.count == 0:
            return self
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.dim = other.dim
        if self.device is None:
            self.device = other.device
        self._merge(other.count, other._mean.to(self.device), other._m2.to(self.device))
        return self

    @property
    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("FeatureStats is empty: call update() with some features first")
        return self._mean

    @property
    def cov(self) -> torch.Tensor:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, FeatureStats has {self.count}")
        return self._m2 / (self.count - 1)

    @classmethod
    def of(cls, features, name="features"):
        """Statistics of a (N, D) tensor/array, an iterable of batches, or a FeatureStats."""
        if isinstance(features, FeatureStats):
            return features
        stats = cls()
        if isinstance(features, torch.Tensor) or hasattr(features, "__array__"):
            return stats.update(features, name)
        for i, batch in enumerate(features):
            stats.update(batch, f"{name} batch {i}")
        if stats.count == 0:
            raise ValueError(f"{name} is empty")
        return stats

    def __repr__(self):
        return f"FeatureStats(count={self.count}, dim={self.dim})"


def _as_stat(name, v, ndim, D=None):
    v = torch.as_tensor(v).detach().to(torch.float64)
    want = (D,) * ndim if D is not None else None
    if v.dim() != ndim or (want is not None and tuple(v.shape) != want) or (ndim == 2 and v.shape[0] != v.shape[1]):
        shape = "(D,)" if ndim == 1 else "(D, D)"
        raise ValueError(f"{name} must have shape {shape}" + (f" with D = {D}" if D else "")
                         + f", got {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return v


def _rank_deficient(w, D):
    """numpy.linalg.matrix_rank's tolerance on the eigenvalues w of a PSD matrix."""
    tol = w.abs().max() * D * torch.finfo(torch.float64).eps
    return int((w > tol).sum()), bool((w <= tol).any())


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method="eigh", eps=1e-6):
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂): mu (D,), sigma (D, D) -> float.

    ``method="eigh"`` (default): ``tr (Σ₁Σ₂)^½ = Σ √λᵢ(Σ₁^½ Σ₂ Σ₁^½)``, symmetric eigensolvers
    only.  ``"sqrtm"``: scipy ``sqrtm(Σ₁Σ₂)``; if that is not finite, ε·I is added to both
    covariances (pytorch-fid's fallback).  A singular covariance (numerical rank < D, e.g.
    fewer samples than dimensions) gives a warning: the value is well defined, but a poor
    estimate of the distance between the underlying distributions.
    """
    mu1 = _as_stat("mu1", mu1, 1)
    D = mu1.shape[0]
    sigma1, mu2, sigma2 = (_as_stat("sigma1", sigma1, 2, D), _as_stat("mu2", mu2, 1, D),
                           _as_stat("sigma2", sigma2, 2, D))
    sigma2 = sigma2.to(sigma1.device)
    mu2 = mu2.to(mu1.device)
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    w1, V1 = torch.linalg.eigh(sigma1)
    w2 = torch.linalg.eigvalsh(sigma2)
    for name, w in (("sigma1", w1), ("sigma2", w2)):
        rank, singular = _rank_deficient(w, D)
        if singular:
            warnings.warn(f"{name} is singular (numerical rank {rank} < D = {D}; fewer samples "
                          f"than feature dimensions?): the Fréchet distance is computed exactly "
                          f"for these matrices but is an unreliable estimate", RuntimeWarning,
                          stacklevel=3)
    diff = float(((mu1 - mu2) ** 2).sum())
    traces = float(sigma1.trace() + sigma2.trace())
    if method == "eigh":
        s1 = (V1 * w1.clamp(min=0).sqrt()) @ V1.T
        m = s1 @ sigma2 @ s1
        lam = torch.linalg.eigvalsh((m + m.T) / 2)
        tr_covmean = float(lam.clamp(min=0).sqrt().sum())
    elif method == "sqrtm":
        tr_covmean = _trace_sqrtm_scipy(sigma1.cpu().numpy(), sigma2.cpu().numpy(), eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    return diff + traces - 2 * tr_covmean


def _trace_sqrtm_scipy(s1, s2, eps):
    import numpy as np
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if isinstance(covmean, tuple):  # scipy < 1.10 with disp=False semantics
        covmean = covmean[0]
    if not np.isfinite(covmean).all():
        warnings.warn(f"sqrtm(sigma1 @ sigma2) is not finite (singular product): adding "
                      f"{eps}·I to both covariances", RuntimeWarning, stacklevel=4)
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g}): use method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean))


def fid(real, fake, *, method="eigh"):
    """Fréchet distance between the Gaussian fits of two feature sets -> float.

    real, fake: (N, D) tensors or arrays, iterables of (n, D) batches, or :class:`FeatureStats`.
    """
    s1 = FeatureStats.of(real, "real")
    s2 = FeatureStats.of(fake, "fake")
    for name, s in (("real", s1), ("fake", s2)):
        if s.count < 2:
            raise ValueError(f"{name} has {s.count} samples: a covariance needs at least 2")
    if s1.dim != s2.dim:
        raise ValueError(f"real and fake must have the same feature dimension, got {s1.dim} and {s2.dim}")
    return frechet_distance(s1.mean, s1.cov, s2.mean, s2.cov.to(s1.cov.device), method=method)
