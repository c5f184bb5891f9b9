"""Native backend: the fused CPU kernels of ``csrc/`` (C++17, OpenMP, SIMD), module ``otkernels._C``.

Same interface as ``blocked.py`` (cost handles with ``softmin``, ``softmin_grad``, ``grad_x``;
``kernel_sum``), plus the assignment reductions used by :mod:`otkernels.assign`.

* **Loading.**  ``setup.py`` builds ``otkernels._C`` when torch and a compiler are present at
  build time.  Otherwise the first :func:`available` call compiles the same sources just in
  time with ``torch.utils.cpp_extension.load`` (once per version of the sources, into
  :func:`jit_build_dir` under ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``;
  start, progress and end on stderr, and only when it compiles); ``python -m otkernels
  build`` (:func:`build`) does it ahead of time.  Any failure leaves the backend unavailable with the
  reason, never an exception at import.  ``OTKERNELS_NO_EXT=1`` disables the extension,
  ``OTKERNELS_NO_JIT=1`` only the just-in-time build.
* **Kernels.**  Softmin ``−ε log Σ_j exp(h_j − C_ij/ε)`` over rows or columns (no transpose
  copy) of a cached cost, or with the cost computed on the fly (GEMM tiles for D > 8, direct
  distances for D ≤ 8), fused in one pass with an online max; the Sinkhorn gradient
  ``Σ_j g_i P_ij s_j ∇_x C(x_i, y_j)`` in one pass (never builds P); kernel sums and their
  gradients; argmax ⟨x, y⟩ + h / argmin |x − y|² + h.  float32 and float64; exp arguments are
  clamped (−86 / −700) and every thread flushes denormals, so no denormal slow path.
* **Cached strategy.**  The cost matrices that fit :func:`otkernels.backends.cache_budget`
  (greedily: ``C_xy`` first, which serves two of the four reductions per iteration, then
  ``C_xx``, ``C_yy``; :func:`otkernels.backends.cache_plan`) are computed once (one GEMM) and
  each of the ~60 passes of the Sinkhorn loop reads them; the others recompute tiles.  When
  ``C_xy`` does not fit, the budget caches as many of its rows as it can (:class:`PartialCost`).  C_xy and C_yx share one matrix (column reductions
  read it in place).  **What the caches take** (issue 23): C_xy is stored whole, B·N·M
  elements; the symmetric C_xx, C_yy as their packed upper triangle (:func:`cost_packed`;
  layout ``Packed`` in csrc/tiles.h: row blocks of 16–64 rows, each stored from its block's
  first column), B·(N² + N·PB)/2 elements — at N = M = 10k float32, 381.5 MiB for C_xy and
  192 MiB (not 381.5) for each self-cost, 765 MiB in all instead of 1.12 GiB — and the budget
  counts these sizes, so at a given budget more problems get their self-costs cached.  The
  sym pass reads each stored row block and reaches the mirrored half through column sums
  (the same entries as the full layout's triangle pass, so the same bytes per pass); the
  gradient (:func:`grad_packed`) reads the stored row and, left of the row's block, the
  mirrored entries one lane at a time: the same numbers as the forward pass read (results
  equal to the full cache's to the bit) and faster than recomputing tiles with
  :func:`grad_online` (10k, D = 128, 1 thread: 0.85–0.93 s vs 0.67–0.72 s from a full cache,
  1.0–1.1 s recomputed); a self-cost's build computes half of the GEMM tiles (0.5×), so a
  whole divergence takes the same time with half the self-cost memory (docs/benchmarks.md,
  "Self-costs stored as triangles").  ``OTKERNELS_NATIVE_PACKED=0`` (``PACKED_SELF``) stores
  them whole (benchmarks).  **The plan form** (issue 23): the cached passes of an iteration
  sum ``P_ij = exp(hc_i + hr_j − C_ij/ε)`` — at Sinkhorn's iterates the current transport
  plan — over rows and columns, one exp per entry for both directions and no running maxima
  (the log-sum-exp form takes an exp per entry and direction); a row or column whose sum
  leaves the float range that keeps it exact (zero weights, potentials far from a plan after
  the last ε-steps) is recomputed by the log-sum-exp passes (:func:`plan_counts` says how
  many), and a handle that recomputed much in one pass keeps the log-sum-exp form after it
  (``PLAN_GIVE_UP``: zero weights from padding).  At 10k, D = 128 the two-way and triangle
  passes take 0.44× the log-sum-exp form's time, at the machine's read rate.  The gradient passes skip a plan's underflowing weights
  (exact zeros: a tile with at most a third nonzero is summed pair by pair,
  :func:`grad_counts`), and the caches are written with streaming stores: the divergence at
  10k, D = 128 takes 0.89 s, 0.47× the code before issue 23, on a 2-core Sapphire Rapids VM
  (docs/benchmarks.md, "The time target, met").  ``OTKERNELS_NATIVE_PLAN=0`` (``PLAN_FORM``)
  keeps the log-sum-exp form (benchmarks).  Cache memory is 2 MiB aligned (transparent huge pages) and recycled
  through a pool (:func:`set_pool_limit`, :func:`empty_cache`): page faults on 1.2 GB of
  fresh memory cost more than the GEMMs that fill it.  The pool keeps at most the cache
  budget (unless :func:`set_pool_limit` or ``OTKERNELS_NATIVE_POOL_BYTES`` says otherwise),
  so a process holds at most twice the budget in caches, during or between loss calls.
* **Cache precision** (measured, then decided: float32).  ``CACHE_DTYPE`` (env
  ``OTKERNELS_NATIVE_CACHE_DTYPE``) may store a float32 problem's cache as ``bfloat16`` or
  ``float16`` (scaled by a power of 2 against overflow), read with float32 arithmetic.  The
  pass is memory-bound once the kernels are fused (≈ the machine's read bandwidth), so a
  16-bit cache makes it faster, but on the Sinkhorn divergence (N = 2k–5k, D = 3, 16, 128,
  blur 0.05) against float64: values move by 1e-6–5e-6 (float16) and 1e-5–8e-5 (bfloat16),
  while the gradients are off by 2e-2–0.8 (float16) and 0.16–0.9 (bfloat16): the backward
  pass needs C/ε to a precision 16 bits cannot give (C/ε ~ 1e5).  So float32 stays the
  default; 16-bit caches are an opt-in for value-only evaluations.

Inputs are (B,N,D) float32/float64 CPU tensors (made contiguous here); anything else — a
callable cost, a GPU tensor, another dtype, a custom kernel — is delegated to ``blocked``.
"""
from __future__ import annotations

import glob
import os
import sys
import threading
import time

import torch

from . import _double, cache_budget, cache_plan

NAME = "native"
DIRECT_MAX_D = 8  # csrc/otk.h: D ≤ this computes distances directly (no GEMM tiles)
FLAGS = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"]
LDFLAGS = ["-fopenmp"]
KERNELS = {"gaussian": 0, "laplacian": 1, "energy": 2}
CACHE_DTYPE = os.environ.get("OTKERNELS_NATIVE_CACHE_DTYPE", "float32")
POOL_BYTES = os.environ.get("OTKERNELS_NATIVE_POOL_BYTES")

_lock = threading.Lock()
_state = {"ext": None, "why": None, "how": None, "tried": False, "pool": None}


def _sources():
    """csrc/*.cpp: inside the package (installed wheels), or next to it (repository, editable)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../otkernels
    for d in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        files = sorted(glob.glob(os.path.join(d, "*.cpp")))
        if files:
            return files
    return []


def _headers(sources):
    return sorted(glob.glob(os.path.join(os.path.dirname(sources[0]), "*.h"))) if sources else []


def jit_build_dir(sources=None):
    """Where the just-in-time build of these sources lives: ``TORCH_EXTENSIONS_DIR`` (or
    ``~/.cache/torch_extensions``) / ``otkernels_C-<hash>``, the hash of the sources, headers,
    flags, torch and Python versions: a directory holds one build, so whether a process must
    compile is whether its ``otkernels_C.so`` exists."""
    import hashlib

    from torch.utils import cpp_extension

    sources = _sources() if sources is None else sources
    h = hashlib.sha1()
    for f in sources + _headers(sources):
        with open(f, "rb") as fh:
            h.update(os.path.basename(f).encode() + b"\0" + fh.read())
    h.update(repr((FLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], sys.platform)).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return os.path.join(root, f"otkernels_C-{h.hexdigest()[:16]}")


def _say(msg):
    print(f"otkernels: {msg}", file=sys.stderr, flush=True)


def _import_built(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("otkernels_C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jit(force=False):
    """Load the just-in-time build of csrc/, compiling it first when this version of the
    sources has not been built on this machine (messages and progress on stderr only then)."""
    if os.environ.get("OTKERNELS_NO_JIT"):
        raise RuntimeError("otkernels._C is not built and OTKERNELS_NO_JIT is set")
    sources = _sources()
    if not sources:
        raise RuntimeError("otkernels._C is not built and the csrc/ sources are not found")
    build_dir = jit_build_dir(sources)
    built = os.path.join(build_dir, "otkernels_C.so")
    if os.path.exists(built) and not force:
        try:
            return _import_built(built)
        except ImportError:  # half-written by a concurrent build: let cpp_extension wait for it
            pass
    from torch.utils import cpp_extension

    os.makedirs(build_dir, exist_ok=True)
    if force and os.path.exists(built):
        os.remove(built)
    _say(f"compiling the native CPU kernels ({len(sources)} C++ files) just in time, once for this "
         f"version of the sources: a few minutes on 2 cores; later processes load the build from "
         f"{build_dir}.  (To compile ahead of time: python -m otkernels build)")
    t0, done = time.perf_counter(), threading.Event()

    def ticker():  # progress: elapsed time and compiled object files
        tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        while not done.wait(1.0 if tty else 30.0):
            n = len(glob.glob(os.path.join(build_dir, "*.o")))
            line = f"otkernels: compiling ... {time.perf_counter() - t0:4.0f} s, {n}/{len(sources)} files"
            print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        if tty:
            print(file=sys.stderr)

    th = threading.Thread(target=ticker, daemon=True)
    th.start()
    try:
        ext = cpp_extension.load(name="otkernels_C", sources=sources, extra_cflags=FLAGS,
                                 extra_ldflags=LDFLAGS, build_directory=build_dir, verbose=False)
    except Exception:
        done.set()
        th.join()
        _say(f"native kernel build failed after {time.perf_counter() - t0:.0f} s (the torch backends are used)")
        raise
    done.set()
    th.join()
    _say(f"native CPU kernels compiled in {time.perf_counter() - t0:.0f} s")
    return ext


def build(force=False):
    """Compile the native kernels now (``python -m otkernels build``) rather than on first use.
    Returns a one-line status.  With ``otkernels._C`` already built by ``setup.py`` (a
    ``pip install --no-build-isolation`` install) there is nothing to compile unless ``force``."""
    if os.environ.get("OTKERNELS_NO_EXT"):
        return "native kernels disabled by OTKERNELS_NO_EXT"
    if not force:
        ext = _load()
        if ext is None:
            return f"native kernels unavailable: {_state['why']}"
        return f"native kernels ready ({_state['how']}; {ext.info()['simd']})"
    with _lock:
        ext = _jit(force=True)
        ext.set_pool_limit(_pool_limit())
        _state.update(ext=ext, why=None, how="JIT-built otkernels_C", tried=True)
    return f"native kernels rebuilt in {jit_build_dir()}"


def _load():
    """The extension module, or None (reason in ``_state['why']``)."""
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if _state["tried"]:
            return _state["ext"]
        ext = why = how = None
        if os.environ.get("OTKERNELS_NO_EXT"):
            why = "disabled by OTKERNELS_NO_EXT"
        else:
            try:
                from .. import _C as ext  # built by setup.py
                how = "otkernels._C"
            except ImportError as e:
                try:
                    ext = _jit()
                    how = "JIT-built otkernels_C"
                except Exception as e2:  # no compiler, no sources, build error: unavailable
                    why = f"extension not built ({e}); JIT build failed: {str(e2).strip()[-300:]}"
            if ext is not None:
                try:
                    ext.info()
                    ext.set_pool_limit(_pool_limit())
                except Exception as e:  # a stale or foreign build
                    ext, why = None, f"extension loaded but unusable: {e}"
        _state.update(ext=ext, why=why, how=how, tried=True)
        return ext


def _pool_limit():
    """Bytes of released cost caches kept for reuse: :func:`set_pool_limit`'s, else
    ``OTKERNELS_NATIVE_POOL_BYTES``, else the current cache budget."""
    if _state.get("pool") is not None:
        return _state["pool"]
    if POOL_BYTES is not None:
        return int(float(POOL_BYTES))
    return max(0, cache_budget())


def _sync_pool(ext):
    """Follow the cache budget (it may change between calls): trims the pool above it."""
    if _state.get("pool") is None and POOL_BYTES is None:
        ext.set_pool_limit(_pool_limit())


def available():
    ext = _load()
    if ext is None:
        return False, _state["why"]
    info = ext.info()
    return True, (f"native CPU kernels ({_state['how']}; {info['simd']}, {info['blas']}, "
                  f"OpenMP {'on' if info['openmp'] else 'off'})")


def info():
    """Build information of the extension (SIMD, BLAS, threads) or the reason it is unavailable."""
    ext = _load()
    return dict(ext.info(), loaded_as=_state["how"]) if ext is not None else {"unavailable": _state["why"]}


def set_pool_limit(nbytes):
    """Bytes of released cost caches kept for reuse (0 frees them all; None: back to the
    default, the cache budget); returns the pooled bytes."""
    _state["pool"] = None if nbytes is None else int(nbytes)
    ext = _load()
    return 0 if ext is None else ext.set_pool_limit(_pool_limit())


def empty_cache():
    """Free the pooled cost-cache memory (keeps the current limit for later releases)."""
    ext = _load()
    if ext is not None:
        ext.set_pool_limit(0)
        ext.set_pool_limit(_pool_limit())


def _ext():
    ext = _load()
    if ext is None:
        raise RuntimeError(f"otkernels: the native backend is unavailable: {_state['why']}")
    return ext


# ----------------------------------------------------------------------------- validation
_DTYPES = (torch.float32, torch.float64)


def supports(*tensors) -> bool:
    """True when the native kernels can take these tensors (CPU, float32/float64, one dtype)."""
    ts = [t for t in tensors if t is not None]
    return (all(t.device.type == "cpu" for t in ts) and ts[0].dtype in _DTYPES
            and all(t.dtype == ts[0].dtype for t in ts))


def _points(name, t, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be (B,N,D), got shape {tuple(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the native backend, got {t.device}")
    if t.dtype not in _DTYPES or (dtype is not None and t.dtype != dtype):
        want = dtype if dtype is not None else "float32 or float64"
        raise TypeError(f"{name} has dtype {t.dtype}, the native kernels need {want}")
    return t.detach().contiguous()


def _pair(x, y):
    x = _points("x", x)
    y = _points("y", y, x.dtype)
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same batch size and dimension")
    return x, y


def _vec(name, t, B, n, dtype):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (B, n):
        raise ValueError(f"{name} must have shape ({B}, {n}), got {tuple(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the native backend, got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    return t.detach().contiguous()


# ----------------------------------------------------------------------------- raw ops
def _cache_format(x, y, p, dtype):
    """The storage dtype of a cache (default: x's) and its scale (cost = stored × scale)."""
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    dtype = x.dtype if dtype is None else dtype
    if x.dtype == torch.float64 and dtype != torch.float64:
        raise TypeError("a float64 problem needs a float64 cost cache")
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"cache dtype must be float32, float64, bfloat16 or float16, got {dtype}")
    scale = 1.0
    if dtype == torch.float16:  # keep max C well inside the float16 range (65504)
        with torch.no_grad():
            r = float(x.norm(dim=2).max() + y.norm(dim=2).max()) if x.numel() and y.numel() else 0.0
        bound = 0.5 * r * r if p == 2 else r
        while bound / scale > 16384.0:
            scale *= 2.0
    return dtype, scale


def cost_matrix(x, y, p, dtype=None):
    """Dense cost ``C(x_i, y_j)`` (B,N,M) for p = 1, 2, stored as ``dtype`` (default: x's dtype;
    bfloat16/float16 for a float32 problem).  Returns ``(C, scale)``: cost = stored × scale.
    ``y is x``: C(x_i, x_i) is set exactly (0, or the clamped 1e-4 for p = 1; a float32 GEMM
    leaves ~√ulp·|x| there for p = 1)."""
    sym = y is x
    x, y = _pair(x, y)
    dtype, scale = _cache_format(x, y, p, dtype)
    ext = _ext()
    C = ext.alloc_cache(x.shape[0], x.shape[1], y.shape[1], dtype)
    ext.cost_matrix(x, y, p, C, 1.0 / scale)
    if sym and x.shape[-1] > DIRECT_MAX_D:  # the direct (D ≤ 8) distances are exact already
        C.diagonal(dim1=1, dim2=2).fill_((1e-4 if p == 1 else 0.0) / scale)  # p=1: geomloss's clamp √1e-8
    return C, scale


def packed_supported():
    """Whether the extension has the packed-triangle kernels (an older build has not)."""
    ext = _load()
    return ext is not None and hasattr(ext, "packed_numel")


def packed_numel(N):
    """Elements a batch of the packed triangle of a symmetric N × N cost: row blocks of PB rows
    (16, 32 or 64, from N) each stored from their block's first column, ≈ N²/2 + N·PB/2."""
    return int(_ext().packed_numel(int(N)))


def cost_packed(x, p, dtype=None):
    """The symmetric ``C(x_i, x_j)`` as its packed upper triangle (B, :func:`packed_numel` (N))
    (layout: ``Packed`` in csrc/tiles.h), diagonal exact as :func:`cost_matrix`'s.  Returns
    ``(C, scale)``: cost = stored × scale."""
    x = _points("x", x)
    dtype, scale = _cache_format(x, x, p, dtype)
    ext = _ext()
    B, N = x.shape[0], x.shape[1]
    P = ext.packed_numel(N)
    C = ext.alloc_cache(B, 1, P, dtype).view(B, P)
    ext.cost_matrix(x, x, p, C, 1.0 / scale)
    return C, scale


def lse_packed(C, scale, h, eps, plan=None, handle=None):
    """``log Σ_j exp(h_j − C_ij/ε)`` (B,N) over the rows of a packed symmetric C (B, packed
    numel) from :func:`cost_packed`: each row block reads its stored rows, the mirrored half
    reaches the rows through column sums (``softmin_cached_two``'s sym pass)."""
    dtype = torch.float64 if C.dtype == torch.float64 else torch.float32
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ValueError(f"h must be a (B,N) tensor, got {getattr(h, 'shape', type(h).__name__)}")
    h = _vec("h", h, C.shape[0], h.shape[1], dtype)
    if C.dim() != 2 or C.shape[1] != packed_numel(h.shape[1]):
        raise ValueError(f"C {tuple(C.shape)} is not a packed cache of N = {h.shape[1]} points")
    return _run_two(C, scale, h, h, eps, True, plan, handle, h.shape[1])[0]


PLAN_GIVE_UP = 16  # a handle keeps the plan form while a pass recomputes ≤ 1/16 of its rows and columns


def _run_two(C, scale, hr, hc, eps, sym, plan, handle, n):
    """The extension's two-way / sym pass in the form ``plan`` (None: ``PLAN_FORM``), or with
    ``handle`` in the handle's form, which it then keeps or drops for its next passes: a pass
    that recomputed more than 1/PLAN_GIVE_UP of its n rows and columns by log-sum-exp (zero
    weights from padding: every pass; 4 % at the last ε-steps of the 10k divergence) sends the
    handle back to the log-sum-exp form for the rest of its loss call, which costs less there
    than a plan pass plus its recomputation (2.4× the time at N = 6k with a third and a half of
    the weights zero; 1.06× with this rule: docs/benchmarks.md)."""
    if handle is not None:
        plan = handle.plan
    out_r, out_c, redone = _ext().softmin_cached_two(C, float(scale), hr, hc, float(eps), bool(sym), _plan(plan))
    if handle is not None and handle.plan and int(redone) * PLAN_GIVE_UP > n:
        handle.plan = False
    return out_r, out_c


def lse_cached(C, scale, transpose, h, eps):
    """``log Σ exp(h − C/ε)`` over the rows of C (B,N,M) (h (B,M) -> (B,N)), or over its
    columns with ``transpose`` (h (B,N) -> (B,M)).  The softmin is ``−ε ×`` this."""
    B, N, M = C.shape
    dtype = torch.float64 if C.dtype == torch.float64 else torch.float32
    h = _vec("h", h, B, N if transpose else M, dtype)
    return _ext().softmin_cached(C, float(scale), bool(transpose), h, float(eps))


CACHED_TWO = os.environ.get("OTKERNELS_NATIVE_CACHED_TWO", "1") != "0"  # 0: the two-pass reads (benchmarks)
PACKED_SELF = os.environ.get("OTKERNELS_NATIVE_PACKED", "1") != "0"  # 0: C(x, x), C(y, y) stored whole (benchmarks)
PLAN_FORM = os.environ.get("OTKERNELS_NATIVE_PLAN", "1") != "0"  # 0: the log-sum-exp form of the cached passes (benchmarks)


def _plan(plan):
    return PLAN_FORM if plan is None else bool(plan)


def plan_counts(reset=False):
    """What the plan form of the cached passes did (since the last ``reset``): ``{"passes",
    "rows", "columns"}`` — rows and columns recomputed by the log-sum-exp passes — and
    ``"column_passes"``, the recomputations that read the whole cache (more than M/32 columns)."""
    return _counters("plan_counts", ("passes", "rows", "columns", "column_passes"), reset)


def grad_counts(reset=False):
    """The gradient passes' tiles since the last ``reset``: ``{"sparse", "dense"}`` — summed
    pair by pair over their nonzero weights (a plan's few entries a row at small ε), or whole."""
    return _counters("grad_counts", ("sparse", "dense"), reset)


def _counters(name, keys, reset):
    return dict(zip(keys, getattr(_ext(), name)(bool(reset))))


def lse_cached_two(C, scale, hr, hc, eps, sym=False, plan=None, handle=None):
    """Both log-sum-exps of a Sinkhorn iteration from one read of a cached C (B,N,M):
    ``(log Σ_j exp(hr_j − C_ij/ε) (B,N), log Σ_i exp(hc_i − C_ij/ε) (B,M))``; ``sym`` (C
    symmetric, hc = hr): the first only, reading the upper triangle (half the bytes).  ``plan``
    (default ``PLAN_FORM``): the plan form, else the log-sum-exp form; ``handle``: a cost
    handle's own choice instead (:func:`_run_two`).  None when the extension has no such kernel
    (an older build) or ``CACHED_TWO`` is off."""
    ext = _ext()
    if not CACHED_TWO or not hasattr(ext, "softmin_cached_two"):
        return None
    B, N, M = C.shape
    dtype = torch.float64 if C.dtype == torch.float64 else torch.float32
    hr = _vec("hr", hr, B, M, dtype)
    hc = hr if sym else _vec("hc", hc, B, N, dtype)
    out_r, out_c = _run_two(C, scale, hr, hc, eps, sym, plan, handle, N + (0 if sym else M))
    return (out_r, None) if sym else (out_r, out_c)


def lse_online(x, y, h, eps, p):
    """``log Σ_j exp(h_j − C(x_i, y_j)/ε)`` with the cost computed on the fly: (B,N)."""
    x, y = _pair(x, y)
    h = _vec("h", h, x.shape[0], y.shape[1], x.dtype)
    return _ext().softmin_online(x, y, h, float(eps), int(p))


def lse_online_two(x, y, hr, hc, eps, p, sym=False):
    """Both log-sum-exps of a Sinkhorn iteration from shared GEMM tiles (D > 8):
    ``(log Σ_j exp(hr_j − C_ij/ε) (B,N), log Σ_i exp(hc_i − C_ij/ε) (B,M))``; ``sym`` (y is x,
    hc = hr): the first only, from the tiles on and above the diagonal (half the GEMM work).
    None when the extension has no such kernel (an older build) or D ≤ 8."""
    ext = _ext()
    if not hasattr(ext, "softmin_online_two") or x.shape[-1] <= DIRECT_MAX_D:
        return None
    x, y = _pair(x, y)
    hr = _vec("hr", hr, x.shape[0], y.shape[1], x.dtype)
    hc = hr if sym else _vec("hc", hc, x.shape[0], x.shape[1], x.dtype)
    out_r, out_c = ext.softmin_online_two(x, x if sym else y, hr, hc, float(eps), int(p), bool(sym))
    return (out_r, None) if sym else (out_r, out_c)


def softmin_cached(C, scale, transpose, h, eps):
    """``−ε log Σ exp(h − C/ε)``: see :func:`lse_cached`."""
    return lse_cached(C, scale, transpose, h, eps).mul_(-float(eps))


def softmin_online(x, y, h, eps, p):
    """``−ε log Σ_j exp(h_j − C(x_i, y_j)/ε)`` with the cost computed on the fly: (B,N)."""
    return lse_online(x, y, h, eps, p).mul_(-float(eps))


def _grad_args(a, b, h, f, g, s):
    a, b = _pair(a, b)
    B, Na, Nb = a.shape[0], a.shape[1], b.shape[1]
    h = _vec("h", h, B, Nb, a.dtype)
    f = _vec("f", f, B, Na, a.dtype)
    g = _vec("g", g, B, Na, a.dtype)
    s = None if s is None else _vec("s", s, B, Nb, a.dtype)
    return a, b, h, f, g, s


def grad_cached(C, scale, transpose, a, b, h, f, g, s, eps, p, fscale=None):
    """``Σ_j g_i s_j exp(h_j − C_ij/ε + f_i/ε) ∇_1 C(a_i, b_j)`` (B,Na,D) from a cache
    C (B,Na,Nb), or (B,Nb,Na) read transposed.  ``fscale`` replaces 1/ε as the factor of f
    (−1 with f the log-sum-exp of the forward pass)."""
    a, b, h, f, g, s = _grad_args(a, b, h, f, g, s)
    fs = 1.0 / float(eps) if fscale is None else float(fscale)
    return _ext().grad_cached(C, float(scale), bool(transpose), a, b, h, f, g, s, float(eps), int(p), fs)


def grad_packed(C, scale, a, h, f, g, s, eps, p, fscale=None):
    """:func:`grad_cached` for ``C(a, a)`` stored packed (:func:`cost_packed`): each row reads
    its stored part, and left of its block the mirrored entries (one pass, no recomputed tile)."""
    a, _, h, f, g, s = _grad_args(a, a, h, f, g, s)
    fs = 1.0 / float(eps) if fscale is None else float(fscale)
    return _ext().grad_cached(C, float(scale), False, a, a, h, f, g, s, float(eps), int(p), fs)


def grad_online(a, b, h, f, g, s, eps, p, fscale=None):
    """Same as :func:`grad_cached` with the cost computed on the fly."""
    a, b, h, f, g, s = _grad_args(a, b, h, f, g, s)
    fs = 1.0 / float(eps) if fscale is None else float(fscale)
    return _ext().grad_online(a, b, h, f, g, s, float(eps), int(p), fs)


def kernel_sum_raw(x, y, w, kernel, blur, g=None, value=True, grad=False):
    """``(Σ_j k_ij w_j (B,N), 2 g_i Σ_j w_j k'_ij (x_i − y_j) (B,N,D))``, k' = ∂k/∂|x−y|²."""
    x, y = _pair(x, y)
    w = _vec("b", w, x.shape[0], y.shape[1], x.dtype)
    g = None if g is None else _vec("g", g, x.shape[0], x.shape[1], x.dtype)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {tuple(KERNELS)}")
    return _ext().kernel_sum(x, y, w, g, KERNELS[kernel], float(blur), bool(value), bool(grad))


def plan_apply_lse(x, y, v, V, eps, p=2, precision=None):
    """One pass over tiles of the cost computed on the fly: ``(S (B,N,K), lse (B,N))`` with
    ``lse_i = log Σ_j exp(v_j − C(x_i, y_j)/ε)`` and ``S_i = Σ_j exp(v_j − C_ij/ε − lse_i) V_j``
    (the row-stochastic plan times V): x (B,N,D), y (B,M,D), v (B,M), V (B,M,K).  A running
    row maximum rescales the accumulator (every exponential ≤ 1); one GEMM per tile for the
    weights times V; never an N×M matrix.  ``precision`` is ignored (the input dtype)."""
    x, y = _pair(x, y)
    v = _vec("v", v, x.shape[0], y.shape[1], x.dtype)
    V = _points("V", V, x.dtype)
    return tuple(_ext().plan_apply(x, y, v, V, float(eps), int(p)))


def _assign(x, y, h, mode):
    x, y = _pair(x, y)
    if y.shape[1] == 0:
        raise ValueError("y must have at least one point")
    h = None if h is None else _vec("h", h, x.shape[0], y.shape[1], x.dtype)
    return _ext().argminmax(x, y, h, mode)


def argmax_inner(x, y, h=None):
    """``max_j ⟨x_i, y_j⟩ + h_j`` and its first argmax: x (B,N,D), y (B,M,D), h (B,M) -> (B,N), (B,N)."""
    return _assign(x, y, h, 0)


def argmin_sqdist(x, y, h=None):
    """``min_j |x_i − y_j|² + h_j`` and its first argmin (distances from a GEMM are clamped at 0)."""
    return _assign(x, y, h, 1)


# ----------------------------------------------------------------------------- cost handles
class NativeCost:
    """Cost handle ``C(x_i, y_j)``, x (B,N,D) first argument (gets gradients), y (B,M,D).

    ``cache``: a (B,N,M) matrix of ``C(x, y)`` (stored × ``scale``), or with ``transpose``
    a (B,M,N) matrix of ``C(y, x)`` read by columns, or with ``packed`` (y is x) the packed
    upper triangle of ``C(x, x)`` (:func:`cost_packed`); None computes tiles on the fly.
    """

    def __init__(self, x, y, cost, cache=None, scale=1.0, transpose=False, packed=False):
        self.x, self.cost, self.p = x, cost, cost.p
        self.xd, self.y = _pair(x, y)
        self.cache, self.scale, self.transpose = cache, scale, transpose
        self.sym = x is y  # C(x, x): symmetric, the online pass computes half of the tiles
        self.packed = packed and cache is not None
        self.plan = PLAN_FORM  # the cached passes' form, dropped after a pass that recomputed much (_run_two)
        if self.packed and not self.sym:
            raise ValueError("a packed cache holds a symmetric C(x, x): y must be x")

    def lse(self, eps, h):
        """log Σ_j exp(h_j − C_ij/ε): h (B,M) -> (B,N)."""
        if self.packed:
            return lse_packed(self.cache, self.scale, h, eps, handle=self)
        if self.cache is None:
            if self.sym:
                two = lse_online_two(self.xd, self.xd, h, None, eps, self.p, sym=True)
                if two is not None:
                    return two[0]
            return lse_online(self.xd, self.y, h, eps, self.p)
        if self.sym:  # C(x, x): the upper triangle of the cache, half the bytes
            two = lse_cached_two(self.cache, self.scale, h, None, eps, sym=True, handle=self)
            if two is not None:
                return two[0]
        return lse_cached(self.cache, self.scale, self.transpose, h, eps)

    def softmin(self, eps, h):
        """−ε log Σ_j exp(h_j − C_ij/ε): h (B,M) -> (B,N), no gradient."""
        return self.lse(eps, h).mul_(-float(eps))

    def softmin_two(self, eps, h, h_t):
        """This softmin (h (B,M) -> (B,N)) and its transpose's (h_t (B,N) -> (B,M)) from one
        set of GEMM tiles or one read of the cache, or None (D ≤ 8 uncached): Sinkhorn's two
        updates of an iteration."""
        if self.sym or self.transpose:
            return None
        if self.cache is not None:
            two = lse_cached_two(self.cache, self.scale, h, h_t, eps, handle=self)
        else:
            two = lse_online_two(self.xd, self.y, h, h_t, eps, self.p)
        if two is None:
            return None
        return two[0].mul_(-float(eps)), two[1].mul_(-float(eps))

    def softmin_grad(self, eps, h):
        """Same value; backward ``Σ_j P_ij ∇_x C(x_i, y_j)`` in one fused pass."""
        if not self.x.requires_grad:
            return self.softmin(eps, h)
        return _SoftminGrad.apply(self.x, self, eps, h.detach())

    @torch.no_grad()
    def grad_x(self, eps, h, f, g, s=None, fscale=None):
        """``Σ_j g_i P_ij s_j ∇_x C(x_i, y_j)``, ``P_ij = exp(h_j − C_ij/ε + f_i/ε)``: (B,N,D).

        ``fscale`` replaces 1/ε as the factor of f: the backward of :meth:`softmin_grad`
        passes the forward's log-sum-exp with ``fscale=−1``, which keeps P ≤ 1 exactly even
        when C/ε is beyond float precision (where f/ε would not round-trip)."""
        if self.cache is None:
            return grad_online(self.xd, self.y, h, f, g, s, eps, self.p, fscale)
        if self.packed:
            return grad_packed(self.cache, self.scale, self.xd, h, f, g, s, eps, self.p, fscale)
        return grad_cached(self.cache, self.scale, self.transpose, self.xd, self.y, h, f, g, s, eps, self.p,
                           fscale)


class RaggedCost:
    """Cost handle of a ragged batch (issue 21): segment q pairs the rows ``xo[q]:xo[q+1]`` of
    x (Nx,D) (first argument, gets gradients) with ``yo[q]:yo[q+1]`` of y (Ny,D), costs
    computed on the fly by one launch over every segment.  Potentials are padded: h (S,mmax) ->
    (S,nmax), rows past a segment's end are 0.  ``eps``: a float, or one ε per segment (S,1)
    (the segments' own schedules)."""

    def __init__(self, x, xo, y, yo, nmax, cost):
        self.x, self.cost, self.p, self.nmax = x, cost, cost.p, nmax
        self.xd, self.y = x.detach().contiguous(), y.detach().contiguous()
        self.xo, self.yo = xo, yo

    def _eps(self, eps):
        S = len(self.xo) - 1
        if isinstance(eps, torch.Tensor):
            return eps.detach().reshape(S).to(torch.float64).contiguous()
        return torch.full((S,), float(eps), dtype=torch.float64)

    def lse(self, eps, h):
        return _ext().softmin_ragged(self.xd, self.y, self.xo, self.yo, h.contiguous(), self._eps(eps), self.nmax,
                                     int(self.p))

    def softmin(self, eps, h):
        return self.lse(eps, h).mul_(-eps)

    softmin_grad = NativeCost.softmin_grad

    @torch.no_grad()
    def grad_x(self, eps, h, f, g, s=None, fscale=None):
        if s is not None or fscale is None:
            raise NotImplementedError("ragged handles: only the softmin's own backward (fscale=-1, no s)")
        return _ext().grad_ragged(self.xd, self.y, self.xo, self.yo, h.contiguous(), f.contiguous(), g.contiguous(),
                                  self._eps(eps), int(self.p), float(fscale))


def ragged_supported(x, y, cost):
    """Whether :func:`ragged_handles` applies: CPU float32/64, p = 1, 2, a build with the ragged kernels."""
    ext = _load()
    return cost.builtin and cost.p in (1, 2) and supports(x, y) and ext is not None and hasattr(ext, "softmin_ragged")


def ragged_handles(x, xo, y, yo, cost, debias=True):
    """``(C_xy, C_yx, C_xx, C_yy)`` of a ragged batch, x (Nx,D), y (Ny,D) stacked segments,
    ``xo`` / ``yo`` (S+1,) offsets; None where the fused ragged kernels do not apply (not CPU
    float32/64, a cost other than p = 1, 2, an extension built without them)."""
    if not ragged_supported(x, y, cost):
        return None
    xo = torch.as_tensor(xo, dtype=torch.int64)
    yo = torch.as_tensor(yo, dtype=torch.int64)
    nmax, mmax = int((xo[1:] - xo[:-1]).max()), int((yo[1:] - yo[:-1]).max())
    C_xy, C_yx = RaggedCost(x, xo, y, yo, nmax, cost), RaggedCost(y, yo, x, xo, mmax, cost)
    if not debias:
        return C_xy, C_yx, None, None
    return C_xy, C_yx, RaggedCost(x, xo, x, xo, nmax, cost), RaggedCost(y, yo, y, yo, mmax, cost)


class _SoftminGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle, eps, h):
        lse = handle.lse(eps, h)
        ctx.handle, ctx.eps = handle, eps
        ctx.save_for_backward(h, lse)
        return lse * (-float(eps))

    @staticmethod
    def backward(ctx, g):
        h, lse = ctx.saved_tensors
        if _double.create_graph():
            H = ctx.handle
            if isinstance(H, RaggedCost):
                return _double.ragged_softmin_backward(H.x, H.y, H.xo, H.yo, h, ctx.eps, H.cost, g), None, None, None
            return _double.softmin_backward(H.x, H.y, h, ctx.eps, H.cost, g)[0], None, None, None
        gx = ctx.handle.grad_x(ctx.eps, h, lse, g.contiguous(), fscale=-1.0)
        return gx.to(ctx.handle.x.dtype), None, None, None


class PartialCost(NativeCost):
    """``C(x, y)`` with the rows ``i < R`` of ``C(x, y)`` cached (``cache`` (B,R,M)) and the
    rest computed on the fly: what a budget smaller than the whole matrix buys (each cached
    row saves its share of both Sinkhorn reductions' GEMM work).  ``transpose``: the handle of
    ``C(y, x)`` (rows y_j), whose reductions over x split into the cached columns ``i < R``
    and the recomputed ones, merged by log-sum-exp.  Same results as :class:`NativeCost`
    (tests/backends/test_native.py)."""

    def __init__(self, x, y, cost, cache, scale, rows, transpose=False):
        super().__init__(x, y, cost, cache=cache, scale=scale, transpose=transpose)
        src = self.y if transpose else self.xd  # the cloud whose points index the cached rows
        self.rows = rows
        self.head, self.tail = src[:, :rows].contiguous(), src[:, rows:].contiguous()

    def lse(self, eps, h):
        R, K, s = self.rows, self.cache, self.scale
        if self.transpose:  # h (B,N) over x: cached columns + recomputed ones
            a = lse_cached(K, s, True, h[:, :R], eps)
            b = lse_online(self.xd, self.tail, h[:, R:].contiguous(), eps, self.p)
            return torch.logaddexp(a, b)
        return torch.cat([lse_cached(K, s, False, h, eps), lse_online(self.tail, self.y, h, eps, self.p)], 1)

    def softmin_two(self, eps, h, h_t):
        if self.transpose:
            return None
        R, K, s = self.rows, self.cache, self.scale
        two = lse_cached_two(K, s, h, h_t[:, :R], eps)
        r1, c1 = two if two is not None else (lse_cached(K, s, False, h, eps), lse_cached(K, s, True, h_t[:, :R], eps))
        ht = h_t[:, R:].contiguous()
        two = lse_online_two(self.tail, self.y, h, ht, eps, self.p)
        r2, c2 = two if two is not None else (lse_online(self.tail, self.y, h, eps, self.p),
                                              lse_online(self.y, self.tail, ht, eps, self.p))
        e = -float(eps)
        return torch.cat([r1, r2], 1).mul_(e), torch.logaddexp(c1, c2).mul_(e)

    @torch.no_grad()
    def grad_x(self, eps, h, f, g, s=None, fscale=None):
        R, K, sc, p = self.rows, self.cache, self.scale, self.p
        if self.transpose:  # gradient w.r.t. y: the sum over x splits into the two parts
            s1, s2 = (None, None) if s is None else (s[:, :R], s[:, R:].contiguous())
            return (grad_cached(K, sc, True, self.xd, self.head, h[:, :R], f, g, s1, eps, p, fscale)
                    + grad_online(self.xd, self.tail, h[:, R:].contiguous(), f, g, s2, eps, p, fscale))
        f1, f2, g1, g2 = f[:, :R], f[:, R:].contiguous(), g[:, :R], g[:, R:].contiguous()
        return torch.cat([grad_cached(K, sc, False, self.head, self.y, h, f1, g1, s, eps, p, fscale),
                          grad_online(self.tail, self.y, h, f2, g2, s, eps, p, fscale)], 1)


def _cache_dtype(dtype):
    if dtype == torch.float64:
        return torch.float64
    name = CACHE_DTYPE.replace("torch.", "")
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"OTKERNELS_NATIVE_CACHE_DTYPE={CACHE_DTYPE!r}: expected float32, bfloat16 or float16")
    return table[name]


def _handled(x, y, cost):
    return cost.builtin and cost.p in (1, 2) and supports(x, y) and x.dim() == 3 and _load() is not None


def cost_handles(x, y, cost, debias=True, cache=None):
    """``(C_xy, C_yx, C_xx, C_yy)``; ``cache`` None = decide by the memory budget.
    Callable costs, p ∉ {1, 2}, non-CPU tensors and other dtypes go to the ``blocked`` backend."""
    if not _handled(x, y, cost):
        from . import blocked
        return blocked.cost_handles(x, y, cost, debias=debias, cache=cache)
    _sync_pool(_ext())
    cdt = _cache_dtype(x.dtype)
    item = torch.empty((), dtype=cdt).element_size()
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    packed = packed_supported() and PACKED_SELF
    self_numel = packed_numel if packed else (lambda n: n * n)  # C(x, x), C(y, y): their triangles
    sizes = [B * N * M * item] + ([B * self_numel(N) * item, B * self_numel(M) * item] if debias else [])
    plan = cache_plan(sizes, cache)
    # C_xy does not fit: the budget caches as many of its rows as it holds, C_xx and C_yy
    # none (a byte of C_xy saves twice the work of a byte of C_xx: two reductions per
    # iteration, while the self passes already compute only half of their tiles)
    rows = 0
    if cache is None and not plan[0] and N * M:
        rows = min(N, cache_budget() // (B * M * item))
        plan = [False] * len(plan) if rows else plan

    def handle(a, cached):  # C(a, a)
        if not cached:
            return NativeCost(a, a, cost)
        if packed:
            return NativeCost(a, a, cost, *cost_packed(a, cost.p, cdt), packed=True)
        return NativeCost(a, a, cost, *cost_matrix(a, a, cost.p, cdt))

    if plan[0]:  # C_yx reads C_xy transposed
        K, s = cost_matrix(x, y, cost.p, cdt)
        C_xy = NativeCost(x, y, cost, cache=K, scale=s)
        C_yx = NativeCost(y, x, cost, cache=K, scale=s, transpose=True)
    elif rows:
        K, s = cost_matrix(x[:, :rows], y, cost.p, cdt)
        C_xy = PartialCost(x, y, cost, K, s, rows)
        C_yx = PartialCost(y, x, cost, K, s, rows, transpose=True)
    else:
        C_xy, C_yx = NativeCost(x, y, cost), NativeCost(y, x, cost)
    C_xx, C_yy = (handle(x, plan[1]), handle(y, plan[2])) if debias else (None, None)
    return C_xy, C_yx, C_xx, C_yy


# ----------------------------------------------------------------------------- kernel sums
def kernel_sum(x, y, b, kernel):
    """``Σ_j k(x_i, y_j) b_j``: x (B,N,D), y (B,M,D), b (B,M) -> (B,N), gradients for x, y, b."""
    from ..costs import Kernel

    if not (isinstance(kernel, Kernel) and supports(x, y, b) and _load() is not None):
        from . import blocked
        return blocked.kernel_sum(x, y, b, kernel)
    return _KernelSum.apply(x, y, b, kernel)


class _KernelSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, b, kernel):
        val, _ = kernel_sum_raw(x, y, b, kernel.name, kernel.blur)
        ctx.kernel = kernel
        ctx.save_for_backward(x, y, b)
        return val

    @staticmethod
    def backward(ctx, g):
        x, y, b = ctx.saved_tensors
        nx, ny, nb = ctx.needs_input_grad[:3]
        k = ctx.kernel
        if _double.create_graph():
            return (*_double.kernel_sum_backward(x, y, b, k, g, (nx, ny, nb)), None)
        g = g.contiguous()
        gx = gy = gb = None
        if nx:
            gx = kernel_sum_raw(x, y, b, k.name, k.blur, g=g, value=False, grad=True)[1]
        if ny or nb:  # the kernel is symmetric: the same sums with the roles of x and y swapped
            gb, gy = kernel_sum_raw(y, x, g, k.name, k.blur, g=b, value=nb, grad=ny)
        return gx, gy, gb, None
