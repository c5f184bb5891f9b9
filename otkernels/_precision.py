"""Precision of the float32 dots on the GPU (the ``triton`` backend), as one context variable.

``SamplesLoss(precision=...)`` and the metrics set it for the duration of a call
(:func:`scope`); the Triton launchers read it (:func:`current`) and the cost handles and
autograd functions keep the value they saw, so a backward pass uses the forward's dots.
Kept free of any triton import so the fronts can set it on machines without triton.

* ``"tf32x3"`` (default): three TF32 tensor-core products (hi·hi + hi·lo + lo·hi, operands
  split with round-to-nearest), about float32 accuracy: geomloss parity at float32
  tolerances.  Measured in Triton's interpreter with the split emulated (tests/backends/
  test_triton.py): divergence values and gradients as close to float64 as plain float32;
* ``"tf32"``: one TF32 product, operands rounded to the nearest TF32 (the hardware alone
  truncates, a bias that put a D=128 divergence 7e-4 off) with the squared norms of the same
  rounded points, so ``C(x_i, x_i) = 0``.  Values within ~5e-6 relative of float64, but
  gradients at small blur are off by up to ~7e-2 (D=128, blur 0.05: the plan's C/ε is
  perturbed); for value-only uses or large blur;
* ``"ieee"``: float32 FMA, no tensor cores (the slow float32 reference; spills registers);
* ``"bf16"``: operands rounded to bfloat16 (~2^-8 per coordinate), twice TF32's rate: values
  within ~1e-2 relative, gradients worse — for speed-first uses only.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
DEFAULT = "tf32x3"
_default = os.environ.get("OTKERNELS_TRITON_PRECISION") or None
_scoped: contextvars.ContextVar = contextvars.ContextVar("otkernels_precision", default=None)


def check(precision, name="precision"):
    """``precision`` if it is None or one of :data:`PRECISIONS`, else a ValueError naming it."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"{name}={precision!r}: expected None or one of {PRECISIONS}")
    return precision


def set_default(precision) -> None:
    """Process-wide default (None: ``"tf32x3"``); :func:`scope` overrides it locally."""
    global _default
    _default = check(precision)


def current():
    """The precision in force here (scope, else default; None means :data:`DEFAULT`)."""
    return _scoped.get() or _default


@contextlib.contextmanager
def scope(precision):
    """Within the block, float32 dots use ``precision`` (None: keep the current one)."""
    check(precision)
    if precision is None:
        yield
        return
    token = _scoped.set(precision)
    try:
        yield
    finally:
        _scoped.reset(token)
