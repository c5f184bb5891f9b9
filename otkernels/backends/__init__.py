"""Backends: each module implements the same few reductions on a pair of point clouds.

Interface of a backend module (see ``tensorized.py``, the readable reference):

* ``NAME``; ``available() -> (bool, reason)``;
* ``cost_handles(x, y, cost, debias) -> (C_xy, C_yx, C_xx, C_yy)``: cost handles with
  ``softmin(eps, h)`` (no grad) and ``softmin_grad(eps, h)`` (gradient w.r.t. the handle's
  first point cloud), used by the one Sinkhorn loop in ``otkernels/sinkhorn.py``;
* ``kernel_sum(x, y, b, kernel) -> (B,N)``: ``Σ_j k(x_i, y_j) b_j`` with gradients for x, y, b.

``backend="auto"`` (:func:`select`), measured on the 2-core reference CPU
(docs/backends.md): CUDA tensors go to ``triton`` (fused GPU kernels) when Triton
is installed, else to ``keops`` when installed, whatever the size.  CPU tensors go to
``native`` (the fused C++ kernels of ``csrc/``) when it is available — at every size: it
beat the dense backend from N = M = 10 (1.3×) to 1000 (4–5×), forward + backward — except
batched Sinkhorn problems with N·M ≤ ``AUTO_BATCHED_BLOCKED_MAX``, where ``blocked`` (one
set of torch ops for the whole batch) was up to 1.5× faster than native's per-batch passes.
Without ``native``: ``tensorized`` for B·N·M ≤ ``AUTO_DENSE_MAX_SINKHORN`` (Sinkhorn) or
``AUTO_DENSE_MAX`` (kernel losses, whose blocked passes do not cache), else ``blocked``; on
other devices ``tensorized`` up to ``AUTO_DENSE_MAX``, else ``blocked``.  ``native`` and
``blocked`` cache the cost on CPU when it fits :func:`cache_budget` and recompute tiles
otherwise.  Every backend supports double backward (see ``_double.py``).  A backend can be
disabled with ``OTKERNELS_DISABLE=name1,name2``.

Memory: ``backend="online"`` and ``"multiscale"`` (geomloss's names) run ``blocked`` without
any cost cache (:mod:`.online`): O((N+M)·D + tile), never an N×M matrix.  Every other CPU
path caches at most :func:`cache_budget` bytes of cost matrices (default: 2 GiB or 1/8 of
the RAM, whichever is smaller); ``SamplesLoss(verbose=True)`` prints what it cached.
"""
from __future__ import annotations

import importlib
import os

_MODULES = {"tensorized": "tensorized", "blocked": "blocked", "native": "native",
            "triton": "triton", "keops": "keops"}
ALIASES = {"online": "blocked", "multiscale": "blocked"}  # geomloss's names: blocked ...
LEAN = ("online", "multiscale")  # ... without a cost cache (the module .online)
AUTO_DENSE_MAX = 1500 * 1500          # kernel losses without native; non-CPU, non-CUDA devices
AUTO_DENSE_MAX_SINKHORN = 100 * 100   # Sinkhorn on CPU without native (blocked caches the cost)
AUTO_BATCHED_BLOCKED_MAX = 300 * 300  # batched Sinkhorn on CPU: blocked up to this N·M

DEFAULT_CACHE_CAP = 2 << 30   # bytes: the default cache budget is at most this ...
DEFAULT_CACHE_FRACTION = 8    # ... and at most 1/8 of the machine's RAM

_budget = None


def set_cache_budget(nbytes):
    """Largest memory (bytes) the CPU backends may spend on cached cost matrices; None
    restores the default (see :func:`cache_budget`); 0 caches nothing."""
    global _budget
    _budget = None if nbytes is None else int(nbytes)


def cache_budget() -> int:
    """Bytes the CPU backends (``native``, ``blocked``) may spend on cached cost matrices.

    The Sinkhorn loop reads each cost matrix ~60 times, so computing C(x, y) once and keeping
    it is faster than recomputing its tiles in every pass (``native``, N = M = 10k, D = 128:
    1.5× with everything cached; docs/benchmarks.md, "Memory"), but an N×M float32 matrix is
    4·N·M bytes (3.6 GB at 30k: 10.6 GB peak RSS with all three cached).  The
    budget bounds it: matrices are cached greedily while they fit (:func:`cache_plan`;
    ``native`` stores C(x, x), C(y, y) as packed triangles, about half, and caches the first
    rows of C(x, y) when all of it does not fit), the others
    recompute their tiles; ``backend="online"`` / ``"multiscale"`` never cache.

    Default: ``min(2 GiB, RAM / 8)`` (``DEFAULT_CACHE_CAP``, ``DEFAULT_CACHE_FRACTION``), so
    a loss call inside a training job stays predictable (2 GiB on a 16 GB+ machine, 1 GiB on
    8 GB).  To raise or lower it: ``otkernels.backends.set_cache_budget(nbytes)`` (this
    process; None restores the default) or the environment variable
    ``OTKERNELS_CACHE_BYTES`` (e.g. ``8e9``; ``0`` caches nothing).  ``native`` also keeps
    released cache memory for reuse, at most this budget (``native.empty_cache()`` frees it).
    ``SamplesLoss(..., verbose=True)`` prints what a call cached."""
    if _budget is not None:
        return _budget
    env = os.environ.get("OTKERNELS_CACHE_BYTES")
    if env:
        return int(float(env))
    return min(DEFAULT_CACHE_CAP, _ram_bytes() // DEFAULT_CACHE_FRACTION)


def _ram_bytes() -> int:
    """Total RAM (``MemTotal``), or 8 GiB when /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def describe_cache(handles) -> str:
    """One line saying which cost matrices the handles ``(C_xy, C_yx, C_xx, C_yy)`` store
    (cached or dense), their bytes, and the budget: what ``SamplesLoss(verbose=True)`` prints."""
    names = ("C(x,y)", "C(y,x)", "C(x,x)", "C(y,y)")
    seen, parts, total = {}, [], 0
    for name, h in zip(names, handles):
        if h is None:
            continue
        mat = getattr(h, "cache", None)
        if mat is None:
            mat = getattr(h, "C", None)  # tensorized: the dense matrix
        if not hasattr(mat, "element_size"):
            parts.append(f"{name} recomputed")
            continue
        key = (mat.data_ptr(), mat.numel())
        if key in seen:
            parts.append(f"{name} reads {seen[key]}'s")
            continue
        seen[key] = name
        nbytes = mat.numel() * mat.element_size()
        total += nbytes
        rows = getattr(h, "rows", None)
        what = f"first {rows} of {h.x.shape[1] if not getattr(h, 'transpose', False) else h.y.shape[1]} rows"
        parts.append(f"{name} {'dense' if hasattr(h, 'C') else 'cached'} {_gb(nbytes)}"
                     + (f" ({what})" if rows is not None else "")
                     + (" (upper triangle)" if getattr(h, "packed", False) else ""))
    dense = any(hasattr(h, "C") for h in handles if h is not None)
    stored = (f"{_gb(total)} stored (dense backend: not bound by the cache budget)" if dense
              else f"{_gb(total)} stored" if total else "no N×M matrix stored")
    return (f"cost matrices: {'; '.join(parts) or 'none'}; {stored}; cache budget "
            f"{_gb(cache_budget())} (otkernels.backends.set_cache_budget / OTKERNELS_CACHE_BYTES)")


def _gb(n) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def cache_plan(nbytes, cache=None):
    """Which cost matrices to cache, greedily in the given order (callers list ``C_xy`` first:
    it serves two of the four reductions of each Sinkhorn iteration, then ``C_xx``, ``C_yy``):
    a matrix is cached when it fits what the earlier ones left of :func:`cache_budget`
    (``nbytes`` are the stored sizes: ``native`` passes the packed triangles' for C_xx, C_yy).
    ``cache`` True / False forces all / none.  ``nbytes`` list of ints -> list of bools.
    (``native`` also caches the first rows of ``C_xy`` when all of it does not fit.)"""
    if cache is not None:
        return [bool(cache)] * len(nbytes)
    left, plan = cache_budget(), []
    for n in nbytes:
        plan.append(0 < n <= left)
        left -= n if plan[-1] else 0
    return plan


def _disabled():
    return {s.strip() for s in os.environ.get("OTKERNELS_DISABLE", "").split(",") if s.strip()}


def get(name: str):
    """The backend module for ``name`` (geomloss aliases accepted); ValueError if unknown/unusable.
    ``"online"`` and ``"multiscale"`` give :mod:`.online`: ``blocked`` with no cost cache."""
    lean = name in LEAN
    name = ALIASES.get(name, name)
    if name not in _MODULES:
        raise ValueError(f"backend={name!r} is unknown: expected 'auto' or one of "
                         f"{sorted(_MODULES) + sorted(ALIASES)}")
    if name in _disabled():
        raise ValueError(f"backend={name!r} is not available here: disabled by OTKERNELS_DISABLE")
    try:  # probe this backend alone (never JIT-build native for a triton call)
        ok, why = importlib.import_module(f".{_MODULES[name]}", __name__).available()
    except ImportError as e:
        ok, why = False, f"import failed: {e}"
    if not ok:
        raise ValueError(f"backend={name!r} is not available here: {why}")
    return importlib.import_module(".online" if lean else f".{_MODULES[name]}", __name__)


def available():
    """``{name: (usable, reason)}`` for every backend otkernels knows."""
    out = {}
    for name, mod in _MODULES.items():
        if name in _disabled():
            out[name] = (False, "disabled by OTKERNELS_DISABLE")
            continue
        try:
            out[name] = importlib.import_module(f".{mod}", __name__).available()
        except ImportError as e:  # optional dependency missing
            out[name] = (False, f"import failed: {e}")
    return out


def _usable(name) -> bool:
    """Whether one backend is usable, probing that backend alone."""
    if name in _disabled():
        return False
    try:
        return bool(importlib.import_module(f".{_MODULES[name]}", __name__).available()[0])
    except ImportError:
        return False


def select(B, N, M, D, device, need=None, kind="sinkhorn"):
    """The ``auto`` rule: the name of the backend for a (B,N,D) x (B,M,D) problem.

    ``kind``: ``"sinkhorn"`` (Sinkhorn and Hausdorff: softmin reductions) or ``"kernel"``
    (kernel sums); ``need="dense"``: a computation only ``tensorized`` runs (a custom kernel)."""
    if kind not in ("sinkhorn", "kernel"):
        raise ValueError(f"kind must be 'sinkhorn' or 'kernel', got {kind!r}")
    if need == "dense":
        return "tensorized"
    if _is_cuda(device):  # probe only the GPU backends: never JIT-compile native for a CUDA call
        for name in ("triton", "keops"):
            if _usable(name):
                return name
    usable = {k for k, (ok, _) in available().items() if ok}
    tiled = "blocked" if "blocked" in usable else "tensorized"
    if _is_cpu(device):
        if "native" in usable:
            if kind == "sinkhorn" and B > 1 and N * M <= AUTO_BATCHED_BLOCKED_MAX and tiled == "blocked":
                return "blocked"
            return "native"
        limit = AUTO_DENSE_MAX_SINKHORN if kind == "sinkhorn" else AUTO_DENSE_MAX
    else:
        limit = AUTO_DENSE_MAX
    if B * N * M <= limit and "tensorized" in usable:
        return "tensorized"
    return tiled


def _is_cuda(device) -> bool:
    return getattr(device, "type", None) == "cuda" or str(device).split(":")[0] == "cuda"


def _is_cpu(device) -> bool:
    try:
        return getattr(device, "type", None) == "cpu" or str(device).split(":")[0] == "cpu"
    except Exception:
        return False
