"""The method registry: the names of the generative methods, flow couplings and ODE solvers.

One home for these names, below every other module of the package: ``config`` validates a
run's fields against them, ``flow`` implements them, ``train`` builds the process a config
names, the experiments compare them.  This module imports nothing from the package, so the
imports between the layers go one way::

    methods  <-  process, model, data  <-  flow  <-  config  <-  train  <-  experiments, flow_compare, cli

(tests/diffusion/test_imports.py checks that the package's import graph has no cycle.)
"""
from __future__ import annotations

METHODS = ("diffusion", "flow")                      # DiffusionConfig.method
COUPLINGS = ("exact", "sinkhorn", "independent")     # flow matching: minibatch noise–image pairing
SOLVERS = ("euler", "midpoint", "heun")              # flow matching: ODE solvers
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2}  # network calls per solver step
