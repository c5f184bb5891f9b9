"""Atomic checkpoints and the RNG state they carry.

``save_checkpoint`` writes to a temporary file in the target's directory, fsyncs it and
``os.replace``s it over the target: a crash (or an exception) during the write leaves the
previous checkpoint intact.  Checkpoints hold only tensors and plain Python values, so
``load_checkpoint`` uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from otkernels._io import atomic_torch_save


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + os.replace)."""
    atomic_torch_save(state, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state(*generators: torch.Generator) -> dict:
    """torch (CPU and CUDA), numpy and Python ``random`` states, and those of ``generators``,
    as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    """Restore what :func:`rng_state` returned (generators in the same order)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
