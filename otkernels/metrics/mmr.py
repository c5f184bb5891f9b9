"""Mode mixture: generated samples that a classifier cannot put in one class (mode).

For class probabilities p (N, C) of the generated samples (a classifier trained on the real
data), the mode-mixture ratio is the fraction of samples whose top probability is below
``threshold``: samples that sit between modes (e.g. a digit blended from two).  The class
histogram counts the arg-max class of every sample; a class that no sample lands in is a
missing mode.

``threshold`` defaults to 0.8: a confidently classified sample puts at least 80 % of the mass
on one class.  The literature has no fixed value; report the threshold with the number.
"""
from __future__ import annotations

import math

import torch

from ._validate import check_int

PROB_TOL = 1e-3  # rows of ``probs`` must sum to 1 within this


def class_probabilities(probs=None, *, logits=None, num_classes=None, name=None):
    """Checked (N, C) probabilities from exactly one of ``probs`` or ``logits`` (softmax)."""
    if (probs is None) == (logits is None):
        raise ValueError("give exactly one of probs= (class probabilities) or logits=")
    given = "probs" if probs is not None else "logits"
    label = name or given
    t = probs if probs is not None else logits
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{label} must be a tensor or array of shape (N, C), got {type(t).__name__}") from e
    if not t.is_floating_point():
        raise TypeError(f"{label} must be floating point (N, C) classifier outputs, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{label} must have shape (N, C) (samples × classes), got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{label} has no samples")
    if t.shape[1] < 2:
        raise ValueError(f"{label} must have at least 2 classes (columns), got {t.shape[1]}")
    if num_classes is not None and t.shape[1] != num_classes:
        raise ValueError(f"{label} has {t.shape[1]} classes (columns), expected num_classes = {num_classes}")
    t = t.detach().double()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{label} contains NaN or Inf values")
    if logits is not None:
        return torch.softmax(t, dim=1)
    if bool((t < -PROB_TOL).any()) or bool((t > 1 + PROB_TOL).any()) or \
            not bool(((t.sum(1) - 1).abs() <= PROB_TOL).all()):
        raise ValueError(f"{label} are not probabilities (entries in [0, 1], rows summing to 1): "
                         f"pass raw classifier outputs as logits= instead")
    return t


@torch.no_grad()
def classify(classifier, samples, *, batch_size=1024, output="logits"):
    """Run ``classifier`` on ``samples`` (N, ...) in batches -> probabilities (N, C), float64.

    output: "logits" (softmax is applied) or "probs" (the classifier returns probabilities).
    """
    if not callable(classifier):
        raise TypeError(f"classifier must be callable, got {type(classifier).__name__}")
    if output not in ("logits", "probs"):
        raise ValueError(f"output must be 'logits' or 'probs', got {output!r}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    outs = []
    for i in range(0, samples.shape[0], batch_size):
        batch = samples[i:i + batch_size]
        o = classifier(batch)
        if not isinstance(o, torch.Tensor) or o.dim() != 2 or o.shape[0] != batch.shape[0]:
            shape = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
            raise ValueError(f"classifier must return a ({batch.shape[0]}, C) tensor for a batch "
                             f"of {batch.shape[0]} samples, got {shape}")
        outs.append(o.detach())
    out = torch.cat(outs)
    return class_probabilities(**{output: out}, name="classifier output")


def mode_mixture(probs=None, *, logits=None, threshold=0.8, num_classes=None):
    """Mode-mixture ratio of generated samples from their class probabilities (N, C) or logits.

    Returns ``{"mmr": fraction with max probability < threshold, "histogram": (C,) int64 counts
    of the arg-max class, "missing_classes": classes with no sample, "num_classes": C}``.
    """
    p = class_probabilities(probs, logits=logits, num_classes=num_classes)
    threshold = float(threshold)
    if not (math.isfinite(threshold) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    conf, cls = p.max(1)
    hist = torch.bincount(cls.cpu(), minlength=p.shape[1])
    return {"mmr": float((conf < threshold).double().mean()), "histogram": hist,
            "missing_classes": int((hist == 0).sum()), "num_classes": int(p.shape[1])}
