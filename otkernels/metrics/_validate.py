"""Argument checks shared by the metrics: clear errors that name the argument."""
from __future__ import annotations

import numbers

import torch

from .._checks import check_finite


def as_features(name, x, *, min_samples=1, allow_grad=True):
    """``x`` as a floating (N, D) tensor: numpy arrays are converted, half precisions go to
    float32; ValueError/TypeError naming ``name`` for a wrong rank, too few rows or NaN/Inf."""
    if not isinstance(x, torch.Tensor):
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy is a dependency
            np = None
        if np is not None and isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        else:
            raise TypeError(f"{name} must be a torch.Tensor or a numpy array of shape (N, D), "
                            f"got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floating-point features, got dtype {x.dtype} "
                        f"(convert with {name}.float())")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a (N, D) matrix of features, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension D = 0")
    if x.shape[0] < min_samples:
        raise ValueError(f"{name} has {x.shape[0]} samples, this metric needs at least {min_samples}")
    check_finite(name, x.detach())
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x if allow_grad else x.detach()


def as_pair(real, fake, *, min_samples=1, names=("real", "fake"), allow_grad=True):
    """Both feature sets checked, with the same D, device and (promoted) dtype."""
    x = as_features(names[0], real, min_samples=min_samples, allow_grad=allow_grad)
    y = as_features(names[1], fake, min_samples=min_samples, allow_grad=allow_grad)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same feature dimension, got "
                         f"{names[0]} {tuple(x.shape)} and {names[1]} {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on the same device, got "
                         f"{x.device} and {y.device}")
    dt = torch.promote_types(x.dtype, y.dtype)
    return x.to(dt), y.to(dt)


def check_int(name, v, *, minimum=1):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def compute_dtype(dtype, x):
    """The dtype of the pairwise computations: ``dtype`` if given, else that of ``x``."""
    if dtype is None:
        return x.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be None, torch.float32 or torch.float64, got {dtype}")
    return dtype
