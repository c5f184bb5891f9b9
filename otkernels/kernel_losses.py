"""Kernel norms (MMD) through the backends' kernel sums, geomloss semantics.

``L = ½⟨α, K_xx α⟩ + ½⟨β, K_yy β⟩ − ⟨α, K_xy β⟩`` (= ½·biased MMD²), gradients are the
full derivatives (both arguments of the self terms count).
"""
from __future__ import annotations

import inspect

import torch

from .sinkhorn import scal


class CallableKernel:
    """Wraps a geomloss-style ``kernel(x, y, blur=..., use_keops=..., ranges=...)`` callable."""

    def __init__(self, fn, blur):
        self.fn, self.blur = fn, blur
        params = inspect.signature(fn).parameters
        accepts_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self.kw = {"blur": blur}
        for name, val in (("use_keops", False), ("ranges", None)):
            if accepts_kw or name in params:
                self.kw[name] = val
        if not (accepts_kw or "blur" in params):
            self.kw.pop("blur")

    def __call__(self, x, y):
        return self.fn(x, y, **self.kw)


def kernel_loss(backend, a, x, b, y, kernel, potentials=False):
    """a (B,N), x (B,N,D), b (B,M), y (B,M,D) -> (B,) or potentials ((B,N), (B,M))."""
    ks = backend.kernel_sum
    a_x, b_y, b_x = ks(x, x, a, kernel), ks(y, y, b, kernel), ks(x, y, b, kernel)
    if potentials:
        a_y = ks(y, x, a, kernel)
        return a_x - b_x, b_y - a_y
    return 0.5 * scal(a, a_x) + 0.5 * scal(b, b_y) - scal(a, b_x)
