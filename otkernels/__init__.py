"""otkernels: fused optimal-transport kernels for PyTorch, exact to geomloss.

    from otkernels import SamplesLoss            # drop-in for geomloss.SamplesLoss
    loss = SamplesLoss("sinkhorn", p=2, blur=0.05)
    value = loss(x, y)

``otkernels.backends.available()`` lists the backends usable on this machine and why not.
"""
from . import backends
from .samples_loss import SamplesLoss

__version__ = "0.1.0"
__all__ = ["SamplesLoss", "backends", "__version__"]
