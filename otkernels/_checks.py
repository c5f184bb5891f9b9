"""Input validation for the fronts: clear errors that name the argument."""
from __future__ import annotations

import math

import torch


def check_float_param(name, value, *, positive=True, allow_none=False):
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number, got None")
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_tensor(name, t, *, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype} "
                        f"(convert with {name}.float() or .double())")
    return t


def capturing(t) -> bool:
    """Whether ``t`` is a CUDA tensor of a stream being captured into a CUDA graph: no value
    check can read the device then (a host read would end the capture).  The checks below are
    skipped during a capture; the eager warm-up call before it runs them."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_finite(name, t):
    if capturing(t):
        return
    if t.is_contiguous() and t.numel() > 1 << 22:  # large feature sets: no N×D mask at once
        for part in t.reshape(-1).split(1 << 22):
            check_finite(name, part)
        return
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def check_weights(name, w):
    if capturing(w):
        return
    check_finite(name, w)
    if bool((w < 0).any()):
        raise ValueError(f"{name} has negative weights (min {w.min().item():.3g}); weights must be >= 0")
    if bool((w.sum(-1) <= 0).any()):
        raise ValueError(f"{name} has a measure with all-zero weights: total mass must be > 0")


def check_same_device(**tensors):
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError("all inputs must be on the same device, got "
                         + ", ".join(f"{k} on {d}" for k, d in devs.items()))


def check_point_pair(x, y):
    """Two point clouds of one dtype, on one device, with finite coordinates."""
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    check_finite("x", x.detach())
    check_finite("y", y.detach())

