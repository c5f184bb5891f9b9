"""otkernels: fused optimal-transport kernels for PyTorch, exact to geomloss.

    from otkernels import SamplesLoss            # drop-in for geomloss.SamplesLoss
    loss = SamplesLoss("sinkhorn", p=2, blur=0.05)
    value = loss(x, y)

``otkernels.backends.available()`` lists the backends usable on this machine and why not.
"""
from . import backends
from .samples_loss import SamplesLoss
from .semidiscrete import SemiDiscreteOT

__version__ = "0.1.0"
__all__ = ["SamplesLoss", "backends", "metrics", "semidiscrete", "assign", "coupling", "plan", "distributed",
           "__version__"]


def __getattr__(name):
    """``otkernels.metrics``, ``otkernels.semidiscrete``, ``otkernels.assign``,
    ``otkernels.coupling``, ``otkernels.plan``, ``otkernels.distributed`` import on first use
    (metrics and coupling use scipy)."""
    if name in ("metrics", "semidiscrete", "assign", "coupling", "plan", "distributed"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'otkernels' has no attribute {name!r}")
