"""Helpers shared by the benchmarks, their conftest and the memory child script
(a plain module: ``conftest`` is not importable by name next to the root conftest)."""
from __future__ import annotations

import functools
import os
import time

# KeOps compiles each new formula (~10 s on CPU); keep the binaries between runs.
os.environ.setdefault("KEOPS_CACHE_FOLDER",
                      os.path.join(os.path.expanduser("~"), ".cache", "keops-otkernels"))

import torch  # noqa: E402

THREADS = 2


def set_threads(n: int = THREADS) -> None:
    torch.set_num_threads(n)


def make_data(N: int, M: int, D: int, dtype=torch.float32, seed: int = 0):
    """``x ~ randn(N, D)``, ``y ~ randn(M, D) + 0.5`` from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(M, D, generator=g, dtype=torch.float64) + 0.5
    return x.to(dtype), y.to(dtype)


@functools.lru_cache(maxsize=None)
def keops_status():
    """``(usable, reason)``: pykeops imports *and* compiles a small reduction on this machine."""
    try:
        import pykeops  # noqa: F401
        from pykeops.torch import LazyTensor
    except Exception as e:  # ImportError, or a broken install
        return False, f"pykeops does not import: {e!r}"
    try:
        x = LazyTensor(torch.randn(8, 1, 3))
        y = LazyTensor(torch.randn(1, 9, 3))
        s = ((x - y) ** 2).sum(-1).exp().sum(1)
        if not torch.isfinite(s).all():
            return False, "pykeops compiled but returned non-finite values"
    except Exception as e:
        return False, f"pykeops does not compile here: {type(e).__name__}: {str(e)[:200]}"
    return True, f"pykeops {pykeops.__version__}"


def cpu_timed(fn, log):
    """``fn`` wrapped to append ``(wall_s, cpu_s)`` of each call to ``log``."""

    def wrapped():
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        log.append((time.perf_counter() - t, time.process_time() - c))
        return out

    return wrapped
