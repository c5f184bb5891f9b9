"""Launchers, ``torch.autograd.Function``s and public functions over the kernels of ``kernels.py``.

Public functions (shapes: x (B,N,D) or (N,D), y (B,M,D) or (M,D), vectors (B,·) or (·,)):

* :func:`softmin` ``(x, y, h, eps, p)`` → ``f_i = −ε log Σ_j exp(h_j − C(x_i, y_j)/ε)``,
  gradients for x, y and h: when x needs a gradient the forward pass also computes
  ``Σ_j P_ij ∇_x C`` with the plan normalised in the pass (attention's forward, V = y); the
  backward for y and h is one pass of the same kernel with x and y swapped
  (``Σ_i g_i P_ij ∇_y C`` and ``∂/∂h_j = −ε Σ_i g_i P_ij``, the plan rebuilt from the stored
  ``f``: in float32 this loses accuracy once ``C/ε`` approaches 1e5);
* :func:`kernel_sum` ``(x, y, b, kernel, blur)`` → ``Σ_j k(x_i, y_j) b_j`` for
  gaussian/laplacian/energy, gradients for x, y, b;
* :func:`argmin` / :func:`argmax` ``(x, y, h, cost)`` → values and indices of the best ``j`` for
  ``⟨x_i, y_j⟩ + h_j`` (``cost="dot"``) or ``‖x_i − y_j‖² + h_j`` (``cost="sqdist"``); the values
  are differentiable (the gradient flows through the selected pair);
* :func:`plan_apply` ``(x, y, u, v, V, eps, p)`` → ``Σ_j exp(u_i + v_j − C(x_i, y_j)/ε) V_jk``
  (B,N,K): the transport plan applied to a matrix in one pass, without the N×M plan (no
  autograd; issue 19);
* the raw row passes :func:`softmin_rows`, :func:`softmin_and_grad`, :func:`weighted_grad`,
  :func:`kernel_sum_rows`, :func:`argminmax_rows` used by the backend's cost handles (no
  autograd).

Dtypes: float32 (dots in the precision of :func:`set_precision` / :func:`precision_scope` /
the ``precision=`` argument: ``"tf32x3"`` by default, ``"ieee"``, ``"tf32"``, ``"bf16"``),
float64, and float16/bfloat16 points (tensor-core dots, float32 accumulation; the results
are float32, gradients come back in the input dtype).

Where the kernels run: CUDA tensors use the compiled kernels, autotuned per (power-of-two
bucket of N and M, ``D_PAD``, dtype); CPU tensors (or any tensor with ``TRITON_INTERPRET=1``)
run in Triton's interpreter, with one large fixed tile (:data:`INTERPRET_CONFIG`): the
interpreter's time grows with the number of program instances, and autotuning would only
measure numpy.  The interpreter runs a second copy of ``kernels.py`` loaded with the
interpret switch on, so both modes coexist in one process.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import threading

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from ... import _precision
from ..._env import flag
from ...costs import Cost, Kernel
from .. import _double
from . import kernels as _compiled

INTERPRET_CONFIG = {"BLOCK_N": 128, "BLOCK_M": 128}  # + BLOCK_DV: one chunk up to 256 (see _launch)
PRECISIONS = _precision.PRECISIONS
DEFAULT_PRECISION = _precision.DEFAULT
check_precision = _precision.check
set_precision = _precision.set_default  # see otkernels/_precision.py for the four precisions
get_precision = _precision.current
precision_scope = _precision.scope
_KERNEL_MODES = {"gaussian": _compiled.GAUSSIAN, "laplacian": _compiled.LAPLACIAN, "energy": _compiled.ENERGY}


def resolve_precision(dtype, precision=None) -> str:
    """The ``PRECISION`` constexpr for points of ``dtype``: the requested (or current) precision
    for float32, ``"ieee"`` (the dtype's own dots) for float16/bfloat16/float64."""
    if dtype != torch.float32:
        return "ieee"
    return check_precision(precision) or get_precision() or DEFAULT_PRECISION


# ----------------------------------------------------------------------------- dispatch
_interpreted_module = None


def _is_interpreted(module) -> bool:
    return isinstance(module._softmin_fwd.fn, InterpretedFunction)


def _interpreted():
    """``kernels.py`` loaded a second time with Triton's interpreter on (cached)."""
    global _interpreted_module
    if _interpreted_module is None:
        if _is_interpreted(_compiled):
            _interpreted_module = _compiled
        else:
            name = f"{__package__}._kernels_interpreted"
            spec = importlib.util.spec_from_file_location(name, _compiled.__file__)
            module = importlib.util.module_from_spec(spec)
            with _interpret_switch():
                spec.loader.exec_module(module)
            sys.modules[name] = module
            _interpreted_module = module
    return _interpreted_module


def _interpret_requested() -> bool:
    """``TRITON_INTERPRET`` as triton reads it (``triton.knobs`` since triton 3.4, else the env)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return flag("TRITON_INTERPRET")


@contextlib.contextmanager
def _interpret_switch():
    """Turn the interpreter on while ``@triton.jit`` decorates (i.e. while a module loads)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        with knobs.runtime.scope():
            knobs.runtime.interpret = True
            yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def interpreting(device) -> bool:
    """Whether tensors on ``device`` run in the interpreter (CPU, or ``TRITON_INTERPRET=1``)."""
    return torch.device(device).type != "cuda" or _interpret_requested() or _is_interpreted(_compiled)


_lock = threading.Lock()
_twins: dict = {}
_MISSING = object()


def _call_interpreted(self, *args, **kwargs):
    """``JITFunction.__call__`` during a mixed-mode interpreted launch: run the function's
    interpreted twin (Triton's own ``@jit`` helpers such as ``tl.zeros``, ``tl.sum``)."""
    twin = _twins.get(id(self))
    if twin is None:
        twin = _twins[id(self)] = InterpretedFunction(self.fn)
    return twin(*args, **kwargs)


def _tf32(a, mode):
    """float32 array → TF32 values: ``"trunc"`` (what the tensor cores read from a float32
    register) or ``"rna"`` (``cvt.rna.tf32.f32``, round to nearest, ties away)."""
    import numpy as np
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    if mode == "rna":
        bits = bits + np.uint32(0x1000)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


def _dot_fix():
    """Two fixes to Triton's interpreter ``create_dot`` (triton 3.9): it stores bfloat16 as
    raw uint16 bits and multiplies those integers — widen bfloat16 operands to float32 first
    (exact: a product of two bfloat16 numbers is exact in float32, as on the tensor cores);
    and it ignores ``input_precision`` — emulate the tensor cores for float32 operands:
    ``TF32`` truncates both operands to TF32, ``TF32x3`` splits each operand into
    ``hi = rna(a)``, ``lo = rna(a − hi)`` and sums ``hi·hi + hi·lo + lo·hi`` (as Triton's
    lowering does), so that tests measure the accuracy the GPU will have."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    original = InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(t.data).astype(np.uint32) << 16
            return TensorHandle(bits.view(np.float32), tl.float32)
        return t

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = widen(a), widen(b)
        prec = str(input_precision).upper()
        if a.dtype.scalar == tl.float32 and b.dtype.scalar == tl.float32 and "TF32" in prec:
            if "X3" in prec:
                ah, bh = _tf32(a.data, "rna"), _tf32(b.data, "rna")
                al, bl = _tf32(a.data - ah, "rna"), _tf32(b.data - bh, "rna")
                out = (np.matmul(ah, bl, dtype=np.float32) + np.matmul(al, bh, dtype=np.float32)
                       + np.matmul(ah, bh, dtype=np.float32))
            else:
                out = np.matmul(_tf32(a.data, "trunc"), _tf32(b.data, "trunc"), dtype=np.float32)
            return TensorHandle(out.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    return InterpreterBuilder, original, create_dot


def _patch_lang_once(original):
    """Triton's interpreter re-patches ``triton.language`` (``inspect.getmembers`` over its
    modules) on every device-function call, a third of an interpreted Sinkhorn's time.  Within
    one launch the modules stay patched until the launch's own scope is restored, so patch each
    module once per launch: later calls that would patch only already-patched modules get a
    no-op scope.  The launch's scope, when restored, starts the count again."""
    import inspect
    patched = set()

    class _Noop:
        def restore(self):
            pass

    def patch(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if patched and langs <= patched:
            return _Noop()
        outer = not patched
        patched.update(langs)
        scope = original(fn)
        if outer:
            restore = scope.restore

            def restore_and_reset():
                patched.clear()
                restore()
            scope.restore = restore_and_reset
        return scope

    return patch


@contextlib.contextmanager
def _interpreter_fixes():
    """Patches to Triton's interpreter for one launch (see :func:`_dot_fix`,
    :func:`_patch_lang_once`)."""
    from triton.runtime import interpreter
    cls, original, fixed = _dot_fix()
    cls.create_dot = fixed
    original_patch = getattr(interpreter, "_patch_lang", None)
    if original_patch is not None:
        interpreter._patch_lang = _patch_lang_once(original_patch)
    try:
        yield
    finally:
        cls.create_dot = original
        if original_patch is not None:
            interpreter._patch_lang = original_patch


@contextlib.contextmanager
def _interpreter_scope():
    """Let an interpreted kernel run in a process where triton was imported compiled.

    ``triton.language``'s own ``@jit`` functions were built as compiled ``JITFunction``s;
    during the launch their calls are routed to interpreted twins.  The interpreter patches
    ``triton.language`` modules while it runs and, for nested device functions, does not undo
    all of it: the module attributes are restored afterwards so that later compilations (for a
    GPU target) see the real ``triton.language``.  The caller holds ``_lock``.
    """
    modules = (tl, tl.core, tl.standard, tl.math)
    saved = [(m, dict(vars(m))) for m in modules]
    original_call = JITFunction.__call__
    JITFunction.__call__ = _call_interpreted
    try:
        yield
    finally:
        JITFunction.__call__ = original_call
        for m, attrs in saved:
            current = vars(m)
            for k, v in attrs.items():
                if current.get(k, _MISSING) is not v:
                    setattr(m, k, v)


TUNE_ROWS, TUNE_COLS = 32768, 8192  # autotuning runs on at most this many rows × columns
_tuned: set = set()
_capture = threading.local()


@contextlib.contextmanager
def capture():
    """Record the launches of the raw passes instead of running them: yields a list that
    receives ``(name, args, consts)`` for each launch (``resources.py`` compiles exactly
    what the launchers pass, with the JIT's own specialisation)."""
    _capture.log = []
    try:
        yield _capture.log
    finally:
        del _capture.log


def _grid(N, B, D):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B, triton.cdiv(D, meta.get("BLOCK_DV", D) or D))  # noqa: E731


def _launch(name, B, N, device, args, consts, grid=None, before_full=None, cols=None, shrink=True):
    """Launch kernel ``name`` on the grid ``(cdiv(N, BLOCK_N), B[, cdiv(D, BLOCK_DV)])``.

    Compiled (CUDA): on the tensors' device; the first launch of a tuning key (size buckets,
    constexprs, dtypes) with more than ``TUNE_ROWS`` rows or ``TUNE_COLS`` columns first
    launches on the leading rows and columns only (same key), so that the autotuner times
    its configs on a bounded problem — seconds, not minutes at N = 10⁶ — and the full launch
    reuses the winner (also cached on disk by triton); ``before_full`` runs between the two
    (to reset buffers the proxy wrote).  ``grid``: a fixed grid instead of the row blocks.
    ``cols``: the output width that ``BLOCK_DV`` tiles (default D; the plan product's K).
    ``shrink=False``: tune on the launch itself (the ragged kernels, whose N and M are the
    padded widths, not sizes to shrink).  Interpreted: one large fixed tile."""
    log = getattr(_capture, "log", None)
    if log is not None:
        log.append((name, args, consts))
        return
    tuner = _compiled.KERNELS[name]
    names = tuner.fn.arg_names
    D = args[names.index("D")] if cols is None else cols
    if not interpreting(device):
        iN, iM = names.index("N"), names.index("M")
        M = args[iM]
        key = (name, tuple(sorted(consts.items())), args[names.index("N_KEY")], args[names.index("M_KEY")],
               str(args[0].dtype), device, args[names.index("K_KEY")] if "K_KEY" in names else None)
        with torch.cuda.device(device):
            if key not in _tuned:
                if shrink and (N > TUNE_ROWS or M > TUNE_COLS):
                    proxy = list(args)
                    proxy[iN], proxy[iM] = min(N, TUNE_ROWS), min(M, TUNE_COLS)
                    tuner[grid or _grid(proxy[iN], B, D)](*proxy, **consts)
                    if before_full is not None:
                        before_full()
                _tuned.add(key)
            tuner[grid or _grid(N, B, D)](*args, **consts)
        return
    native = _is_interpreted(_compiled)  # TRITON_INTERPRET=1 before triton was imported
    tuner = (_compiled if native else _interpreted()).KERNELS[name]
    meta = {k: v for k, v in INTERPRET_CONFIG.items() if k in tuner.configs[0].kwargs}
    if "BLOCK_DV" in tuner.configs[0].kwargs and "BLOCK_DV" not in meta:
        meta["BLOCK_DV"] = 16 if consts.get("DIFF") else min(256, max(16, triton.next_power_of_2(D)))
    with _lock:
        with (contextlib.nullcontext() if native else _interpreter_scope()), _interpreter_fixes():
            tuner.fn[grid or _grid(N, B, D)](*args, **consts, **meta)


# ----------------------------------------------------------------------------- helpers
def acc_dtype(dtype) -> torch.dtype:
    """Accumulator / output dtype of the kernels for points of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_points(x, y):
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"triton kernels take float16, bfloat16, float32 or float64 points, got {x.dtype}")
    if y.dtype != x.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"expected x (B,N,D) and y (B,M,D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y are on different devices: {x.device} and {y.device}")


DIRECT_MAX_D = 8  # distances from coordinate differences up to this D (see kernels._direct_xy)


def _consts(x, precision=None, distances=True):
    """Constexprs shared by the kernels: the D layout (:func:`kernels.d_layout`), direct mode
    (``distances``: the tiles only enter through ‖x − y‖²) and the dot precision."""
    D = x.shape[2]
    direct = D if (distances and D <= DIRECT_MAX_D) else 0
    prec = resolve_precision(x.dtype, precision)
    whole_max = 128 if (x.dtype == torch.float32 and prec in ("tf32x3", "ieee")) else _compiled.WHOLE_MAX
    d_pad, block_d = _compiled.d_layout(D, direct, whole_max)
    return dict(ACC=_TL[acc_dtype(x.dtype)], D_PAD=d_pad, BLOCK_D=block_d, DIRECT=direct, PRECISION=prec)


def _sizes(x, y):
    B, N, D = x.shape
    M = y.shape[1]
    return (N, M, D, *x.stride(), *y.stride(), N.bit_length(), M.bit_length())


def rounded(x, precision=None):
    """The points as the dots of ``precision`` see them (float32 rounded to TF32/bfloat16)."""
    prec = resolve_precision(x.dtype, precision)
    if prec == "tf32":
        return _tf32_rna(x)
    if prec == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    return x


def _tf32_rna(x):
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def sqnorms(x, precision=None):
    """‖x_i‖² (B,N) in the accumulator dtype, as the kernels' dots see them, so that
    ``C(x_i, x_i) = 0`` to rounding: from the rounded points for ``"tf32"``/``"bf16"``, and for
    ``"tf32x3"`` the same three products ``hi² + 2·hi·lo`` (hi = TF32(x), lo = TF32(x − hi)):
    the dot omits ``lo·lo ≥ 0``, and exact norms would leave ``C(x_i, x_i) ≈ Σ lo²`` > 0 — a
    bias that ``sqrt`` turns into ~2^-11·‖x‖ on the diagonal of the energy/laplacian kernels
    (measured: energy at D=128 off by 1.3e-4 instead of 3e-6)."""
    prec = resolve_precision(x.dtype, precision)
    if prec == "tf32x3":
        hi = _tf32_rna(x)
        lo = _tf32_rna(x - hi)
        return (hi * hi + 2 * hi * lo).sum(-1).contiguous()
    return rounded(x, precision).to(acc_dtype(x.dtype)).square().sum(-1).contiguous()


def _vec(v, like):
    return v.detach().to(acc_dtype(like.dtype)).contiguous()


def _par(value, x):
    return torch.full((1,), float(value), dtype=acc_dtype(x.dtype), device=x.device)


def _batched(*ts):
    """Add a batch dimension to (N,D) points / (N,) vectors; returns (tensors, was_batched)."""
    batched = ts[0].dim() == 3
    if batched:
        return ts, True
    return tuple(None if t is None else t.unsqueeze(0) for t in ts), False


def _check_create_graph():
    if torch.is_grad_enabled():
        raise RuntimeError(
            "otkernels: double backward (create_graph=True) is not supported by the 'triton' "
            "backend; use backend='tensorized' for higher-order derivatives.")


# ----------------------------------------------------------------------------- raw row passes
@torch.no_grad()
def softmin_rows(x, y, h, eps, p=2, xx=None, yy=None, precision=None):
    """``−ε log Σ_j exp(h_j − C(x_i, y_j)/ε)``: x (B,N,D), y (B,M,D), h (B,M) -> (B,N) (acc dtype).

    ``xx``, ``yy``: the squared norms (:func:`sqnorms` with the same precision), if the
    caller keeps them."""
    _check_points(x, y)
    B, N = x.shape[:2]
    out = torch.empty(B, N, dtype=acc_dtype(x.dtype), device=x.device)
    xx = sqnorms(x, precision) if xx is None else xx
    yy = sqnorms(y, precision) if yy is None else yy
    args = (x, y, xx, yy, _vec(h, x), _par(eps, x), out, *_sizes(x, y))
    _launch("_softmin_fwd", B, N, x.device, args, dict(P=int(p), **_consts(x, precision)))
    return out


TWO_PARTIAL_BYTES = 256 << 20  # column partials of softmin_two: beyond this, two passes
TWO_PROGRAMS = 4  # row programs per SM (per batch element) for softmin_two


def _two_programs(device, N, B, M):
    """Row programs R of :func:`softmin_two`: enough to fill the GPU, at most one per 16 rows,
    and R·B·M partials (8 bytes each) within :data:`TWO_PARTIAL_BYTES`; 0 if that is not
    enough for a full GPU (the caller falls back to two passes)."""
    fit = TWO_PARTIAL_BYTES // (8 * B * M)
    if interpreting(device):
        return min(fit, max(1, min(4, triton.cdiv(N, INTERPRET_CONFIG["BLOCK_N"]))))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = min(triton.cdiv(N, 16), max(1, TWO_PROGRAMS * sms // B))
    if fit * B < sms and fit < triton.cdiv(N, 64):
        return 0
    return max(1, min(want, fit))


def merge_partials(part_m, part_s):
    """``log2 Σ_r part_s[r]·2^part_m[r]`` over the R row programs of :func:`softmin_two`'s
    column partials (max ``part_m``, sum of exp2 below it ``part_s``, (R, B, M)) → (B, M)."""
    top = part_m.max(0).values
    safe = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    return safe + torch.log2((part_s * torch.exp2(part_m - safe)).sum(0))


@torch.no_grad()
def softmin_two(x, y, hr, hc, eps, p=2, xx=None, yy=None, precision=None, sym=False):
    """Both updates of a Sinkhorn iteration from one cost tile per pair of blocks:
    ``f_i = −ε log Σ_j exp(hr_j − C_ij/ε)`` (B,N) and ``g_j = −ε log Σ_i exp(hc_i − C_ij/ε)``
    (B,M), half the ``tl.dot`` work of two passes.  ``sym`` (y is x, hc = hr): f only, from
    the tiles on and above the diagonal.  Column partials take R·B·M·8 bytes
    (:func:`_two_programs`); None when they would not fit (use two passes)."""
    _check_points(x, y)
    B, N = x.shape[:2]
    M = y.shape[1]
    R = _two_programs(x.device, N, B, M)
    if R == 0:
        return None
    acc = acc_dtype(x.dtype)
    xx = sqnorms(x, precision) if xx is None else xx
    yy = sqnorms(y, precision) if yy is None else yy
    hc = hr if sym else hc
    out = torch.empty(B, N, dtype=acc, device=x.device)
    part_m = torch.full((R, B, M), float("-inf"), dtype=acc, device=x.device)
    part_s = torch.zeros((R, B, M), dtype=acc, device=x.device)

    def reset():
        part_m.fill_(float("-inf"))
        part_s.zero_()

    args = (x, y, xx, yy, _vec(hr, x), _vec(hc, x), _par(eps, x), out, part_m, part_s, *_sizes(x, y),
            R, part_m.stride(0), part_m.stride(1))
    consts = dict(P=int(p), SYM=bool(sym), **_consts(x, precision))
    _launch("_softmin_two", B, N, x.device, args, consts, grid=(R, B), before_full=reset)
    cols = merge_partials(part_m, part_s)
    if p == 2 and not consts["DIRECT"]:  # direct tiles already hold −½‖x − y‖²
        cols = cols - yy * (math.log2(math.e) / (2 * eps))
    scale = -eps * math.log(2.0)
    if sym:  # row j = the upper part of its own row ⊕ the column partials of the tiles above
        both = torch.stack([out, cols])
        return scale * torch.logsumexp(both * math.log(2.0), 0) / math.log(2.0), None
    return scale * out, scale * cols


def _same_points(x, y) -> bool:
    """Whether x and y are the same points (same storage, shape and strides): C(x, x)."""
    return (x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
            and x.dtype == y.dtype)


def _grad_consts(x, mode, precision, has_cw, write_rs, normalized):
    return dict(MODE=int(mode), HAS_CW=bool(has_cw), WRITE_RS=bool(write_rs), NORMALIZED=bool(normalized),
                DIFF=x.dtype == torch.float64, **_consts(x, precision))


@torch.no_grad()
def softmin_and_grad(x, y, h, eps, p=2, xx=None, yy=None, precision=None):
    """One fused pass: ``f_i = −ε log Σ_j exp(h_j − C_ij/ε)`` (B,N) and ``Σ_j P_ij ∇_x C(x_i, y_j)``
    (B,N,D) with ``P = softmax_j(h_j − C_ij/ε)`` normalised in the same pass (attention's
    forward with V = y); acc dtype."""
    _check_points(x, y)
    B, N, D = x.shape
    acc = acc_dtype(x.dtype)
    out = torch.empty(B, N, D, dtype=acc, device=x.device)
    f = torch.empty(B, N, dtype=acc, device=x.device)
    xx = sqnorms(x, precision) if xx is None else xx
    yy = sqnorms(y, precision) if yy is None else yy
    mode = _compiled.SOFTMIN_P2 if p == 2 else _compiled.SOFTMIN_P1
    args = (x, y, xx, yy, _vec(h, x), xx, xx, _par(eps, x), out, f, f, *_sizes(x, y), int(_same_points(x, y)))
    _launch("_weighted_grad", B, N, x.device, args, _grad_consts(x, mode, precision, False, False, True))
    return f, out


@torch.no_grad()
def weighted_grad(x, y, mode, par, hc=None, rr=None, cw=None, xx=None, yy=None, rowsum=False, precision=None):
    """``Σ_j W_ij (x_i − y_j)`` (B,N,D) in the acc dtype.

    softmin modes (``kernels.SOFTMIN_P2``/``SOFTMIN_P1``, ``par`` = ε): ``W_ij = E_ij`` (p=2) or
    ``E_ij/‖x_i − y_j‖`` (p=1) with ``E_ij = exp(hc_j − C_ij/ε + rr_i/ε) cw_j``, so that the
    result is ``Σ_j E_ij ∇_x C(x_i, y_j)``; with ``rowsum`` also ``Σ_j E_ij`` (B,N).
    Kernel modes (``par`` = 1/σ²): ``W_ij = 2 k'(d²_ij) cw_j``.
    """
    _check_points(x, y)
    B, N, D = x.shape
    acc = acc_dtype(x.dtype)
    out = torch.empty(B, N, D, dtype=acc, device=x.device)
    rs = torch.empty(B, N, dtype=acc, device=x.device) if rowsum else out
    xx = sqnorms(x, precision) if xx is None else xx
    yy = sqnorms(y, precision) if yy is None else yy
    dummy = xx
    args = (x, y, xx, yy, dummy if hc is None else _vec(hc, x), dummy if rr is None else _vec(rr, x),
            dummy if cw is None else _vec(cw, x), _par(par, x), out, rs, dummy, *_sizes(x, y),
            int(_same_points(x, y)))
    _launch("_weighted_grad", B, N, x.device, args, _grad_consts(x, mode, precision, cw is not None, rowsum, False))
    return (out, rs) if rowsum else out



# ----------------------------------------------------------------------------- ragged batches
def _ragged_launch(x, y, xo, yo, h, eps, xx, yy, precision):
    """Checks and the shared arguments of the ragged kernels (issue 21)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"ragged kernels: expected stacked x (Nx,D) and y (Ny,D), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    _check_points(x[None], y[None])
    S = len(xo) - 1
    if len(yo) != S + 1 or h.dim() != 2 or h.shape[0] != S:
        raise ValueError(f"ragged kernels: {S + 1} x offsets, {len(yo)} y offsets and h {tuple(h.shape)} "
                         "(expected (S, m_max))")
    acc = acc_dtype(x.dtype)
    offs = [torch.as_tensor(o, dtype=torch.int64).to(x.device) for o in (xo, yo)]
    eps = (eps.detach().reshape(S) if isinstance(eps, torch.Tensor) else torch.full((S,), float(eps), dtype=acc))
    xx = sqnorms(x, precision) if xx is None else xx
    yy = sqnorms(y, precision) if yy is None else yy
    return S, (x, y, xx, yy, *offs, _vec(h, x), eps.to(dtype=acc, device=x.device).contiguous()), acc


def _ragged_sizes(x, y, nmax, mmax):
    return (nmax, mmax, x.shape[1], *x.stride(), *y.stride(), nmax.bit_length(), mmax.bit_length())


@torch.no_grad()
def softmin_ragged(x, y, xo, yo, h, eps, nmax, p=2, xx=None, yy=None, precision=None):
    """The softmins of every segment of a ragged batch in one launch: segment q pairs the rows
    ``xo[q]:xo[q+1]`` of x (Nx,D) with ``yo[q]:yo[q+1]`` of y (Ny,D); h (S, m_max) padded, eps
    a float or (S,) one ε per segment -> (S, nmax) (acc dtype, zeros past each segment)."""
    S, args, acc = _ragged_launch(x, y, xo, yo, h, eps, xx, yy, precision)
    out = torch.zeros(S, nmax, dtype=acc, device=x.device)
    _launch("_softmin_ragged", S, nmax, x.device, (*args, out, *_ragged_sizes(x, y, nmax, h.shape[1])),
            dict(P=int(p), **_consts(x[None], precision)), shrink=False)
    return out


@torch.no_grad()
def softmin_grad_ragged(x, y, xo, yo, h, eps, nmax, p=2, xx=None, yy=None, precision=None):
    """:func:`softmin_ragged` and ``Σ_j P_ij ∇_x C(x_i, y_j)`` (Nx, D) with the plan normalised in
    the same pass (:func:`softmin_and_grad` per segment), in one launch; acc dtype."""
    S, args, acc = _ragged_launch(x, y, xo, yo, h, eps, xx, yy, precision)
    f = torch.zeros(S, nmax, dtype=acc, device=x.device)
    out = torch.empty(x.shape, dtype=acc, device=x.device)
    mode = _compiled.SOFTMIN_P2 if p == 2 else _compiled.SOFTMIN_P1
    same = _same_points(x, y) and xo is yo  # C(x, x) of one ragged cloud
    consts = dict(MODE=int(mode), DIFF=x.dtype == torch.float64, **_consts(x[None], precision))
    _launch("_softmin_grad_ragged", S, nmax, x.device,
            (*args, out, f, *_ragged_sizes(x, y, nmax, h.shape[1]), int(same)), consts, shrink=False)
    return f, out


def _check_plan_args(x, y, u, v, V, eps, p):
    """The checks of :func:`plan_apply`, each error naming its argument."""
    for name, t in (("x", x), ("y", y), ("u", u), ("v", v), ("V", V)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"plan_apply: {name} must be a torch.Tensor, got {type(t).__name__}")
    _check_points(x, y)
    B, N, _ = x.shape
    M = y.shape[1]
    for name, t, shape in (("u", u, (B, N)), ("v", v, (B, M))):
        if tuple(t.shape) != shape:
            raise ValueError(f"plan_apply: {name} must be {'(B,N)' if name == 'u' else '(B,M)'} = {shape} for x "
                             f"{tuple(x.shape)} and y {tuple(y.shape)}, got {name} {tuple(t.shape)}")
    if V.dim() != 3 or V.shape[0] != B or V.shape[1] != M or V.shape[2] < 1:
        raise ValueError(f"plan_apply: V must be (B,M,K) = ({B},{M},K≥1) for y {tuple(y.shape)}, "
                         f"got V {tuple(V.shape)}")
    if V.dtype != x.dtype:
        raise TypeError(f"plan_apply: V must have the points' dtype {x.dtype}, got {V.dtype}")
    for name, t in (("u", u), ("v", v)):
        if t.dtype not in (x.dtype, acc_dtype(x.dtype)):
            raise TypeError(f"plan_apply: {name} must have the points' dtype {x.dtype} (or "
                            f"{acc_dtype(x.dtype)}), got {t.dtype}")
    for name, t in (("u", u), ("v", v), ("V", V)):
        if t.device != x.device:
            raise ValueError(f"plan_apply: {name} is on {t.device}, x on {x.device}")
    if p not in (1, 2):
        raise ValueError(f"plan_apply: p={p!r}: expected 1 or 2")
    if isinstance(eps, torch.Tensor):
        eps = eps.item()
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"plan_apply: eps must be a positive finite number, got {eps!r}")
    return float(eps)


@torch.no_grad()
def plan_apply(x, y, u, v, V, eps, p=2, precision=None):
    """The transport plan ``π_ij = exp(u_i + v_j − C(x_i, y_j)/ε)`` applied to ``V``, without
    the N×M plan: ``out_ik = Σ_j π_ij V_jk``, C = ½‖x−y‖² (p=2) or ``sqrt(max(‖x−y‖², 1e-8))``
    (p=1, the softmin's cost).

    x (B,N,D), y (B,M,D), u (B,N), v (B,M), V (B,M,K) (K ≥ 1, any size) -> (B,N,K); or the same
    without the batch axis.  x, y, V share one dtype (float16, bfloat16, float32, float64), u
    and v have it or the accumulator dtype; the result is in the accumulator dtype (float64 for
    float64 points, float32 otherwise).  ``precision``: the float32 dots, cost and ``π·V``
    (:func:`set_precision`; None = the current default, ``"tf32x3"``).  One pass (kernel
    ``_plan_apply``): an online row max rescales the (rows, K-chunk) accumulator, so a large u or
    v overflows only where the result does; rows whose terms are all −inf give 0.  No autograd
    (run under ``torch.no_grad``; the caller writes its backward)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"plan_apply: x must be (B,N,D) or (N,D), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    batched = x.dim() == 3
    if not batched:
        ts = {"y": (y, 2), "u": (u, 1), "v": (v, 1), "V": (V, 2)}
        for name, (t, d) in ts.items():
            if isinstance(t, torch.Tensor) and t.dim() != d:
                raise ValueError(f"plan_apply: with unbatched x (N,D), {name} must have {d} dimensions, "
                                 f"got {tuple(t.shape)}")
        x, y, u, v, V = (t.unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in (x, y, u, v, V))
    eps = _check_plan_args(x, y, u, v, V, eps, p)
    precision = resolve_precision(x.dtype, check_precision(precision))
    B, N, D = x.shape
    M, K = y.shape[1], V.shape[2]
    acc = acc_dtype(x.dtype)
    if N == 0 or M == 0:
        out = torch.zeros(B, N, K, dtype=acc, device=x.device)
        return out if batched else out[0]
    out = torch.empty(B, N, K, dtype=acc, device=x.device)
    xx, yy = sqnorms(x, precision), sqnorms(y, precision)
    args = (x, y, xx, yy, _vec(u, x), _vec(v, x), V, _par(eps, x), out,
            N, M, D, K, *x.stride(), *y.stride(), *V.stride(), N.bit_length(), M.bit_length(), min(K, 512).bit_length())
    _launch("_plan_apply", B, N, x.device, args, dict(P=int(p), **_consts(x, precision)), cols=K)
    return out if batched else out[0]

def _kernel_mode(kernel, blur):
    if kernel not in _KERNEL_MODES:
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {tuple(_KERNEL_MODES)}")
    return _KERNEL_MODES[kernel], (1.0 if kernel == "energy" else 1.0 / float(blur) ** 2)


@torch.no_grad()
def kernel_sum_rows(x, y, b, kernel, blur, xx=None, yy=None, precision=None):
    """``Σ_j k(x_i, y_j) b_j``: x (B,N,D), y (B,M,D), b (B,M) -> (B,N) (acc dtype), no autograd."""
    _check_points(x, y)
    mode, inv_s2 = _kernel_mode(kernel, blur)
    B, N = x.shape[:2]
    out = torch.empty(B, N, dtype=acc_dtype(x.dtype), device=x.device)
    xx = sqnorms(x, precision) if xx is None else xx
    yy = sqnorms(y, precision) if yy is None else yy
    args = (x, y, xx, yy, _vec(b, x), _par(inv_s2, x), out, *_sizes(x, y))
    _launch("_kernel_sum_fwd", B, N, x.device, args, dict(MODE=mode, **_consts(x, precision)))
    return out


@torch.no_grad()
def argminmax_rows(x, y, h=None, cost="sqdist", maximize=False, precision=None):
    """Values (B,N) (acc dtype) and indices (B,N) int64 of the best j, no autograd."""
    _check_points(x, y)
    if cost not in ("sqdist", "dot"):
        raise ValueError(f"cost={cost!r}: expected 'sqdist' (‖x−y‖² + h) or 'dot' (⟨x,y⟩ + h)")
    B, N = x.shape[:2]
    M = y.shape[1]
    acc = acc_dtype(x.dtype)
    val = torch.empty(B, N, dtype=acc, device=x.device)
    idx = torch.empty(B, N, dtype=torch.int64, device=x.device)
    h = torch.zeros(B, M, dtype=acc, device=x.device) if h is None else _vec(h, x)
    xx, yy = sqnorms(x, precision), sqnorms(y, precision)
    args = (x, y, xx, yy, h, val, idx, *_sizes(x, y))
    consts = dict(SQDIST=cost == "sqdist", MAXIMIZE=bool(maximize),
                  **_consts(x, precision, distances=cost == "sqdist"))
    _launch("_argminmax", B, N, x.device, args, consts)
    return val, idx


# ----------------------------------------------------------------------------- autograd
class _Softmin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, h, eps, p, precision):
        precision = resolve_precision(x.dtype, precision)  # the backward uses the same dots
        if ctx.needs_input_grad[0]:  # value and Σ_j P_ij ∇_x C in one pass (attention's forward)
            f, G = softmin_and_grad(x.detach(), y.detach(), h.detach(), eps, p, precision=precision)
        else:
            f, G = softmin_rows(x.detach(), y.detach(), h.detach(), eps, p, precision=precision), None
        ctx.eps, ctx.p, ctx.G, ctx.precision = eps, p, G, precision
        ctx.save_for_backward(x, y, h, f)
        return f

    @staticmethod
    def backward(ctx, g):
        x, y, h, f = ctx.saved_tensors
        eps, mode = ctx.eps, (_compiled.SOFTMIN_P2 if ctx.p == 2 else _compiled.SOFTMIN_P1)
        nx, ny, nh = ctx.needs_input_grad[:3]
        if _double.create_graph():
            return (*_double.softmin_backward(x, y, h, eps, Cost(ctx.p), g, (nx, ny, nh)), None, None, None)
        gx = gy = gh = None
        if nx:  # Σ_j g_i P_ij ∇_x C(x_i, y_j), from the forward pass
            gx = (ctx.G * g[:, :, None].to(ctx.G.dtype)).to(x.dtype)
        if ny or nh:  # swapped: rows y_j, columns x_i with log-weights f_i/ε, column weights g_i
            gyj, rs = weighted_grad(y, x, mode, eps, hc=f / eps, rr=eps * h, cw=g, rowsum=True,
                                    precision=ctx.precision)
            gy = gyj.to(y.dtype) if ny else None
            gh = (-eps * rs).to(h.dtype) if nh else None
        return gx, gy, gh, None, None, None


class _KernelSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, b, kernel, blur, precision):
        precision = resolve_precision(x.dtype, precision)
        out = kernel_sum_rows(x.detach(), y.detach(), b.detach(), kernel, blur, precision=precision)
        ctx.kernel, ctx.blur, ctx.precision = kernel, blur, precision
        ctx.save_for_backward(x, y, b)
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, b = ctx.saved_tensors
        mode, inv_s2 = _kernel_mode(ctx.kernel, ctx.blur)
        nx, ny, nb = ctx.needs_input_grad[:3]
        if _double.create_graph():
            return (*_double.kernel_sum_backward(x, y, b, Kernel(ctx.kernel, ctx.blur), g, (nx, ny, nb)),
                    None, None, None)
        gx = gy = gb = None
        if nx:  # 2 g_i Σ_j b_j k'_ij (x_i − y_j)
            gx = (weighted_grad(x, y, mode, inv_s2, cw=b, precision=ctx.precision) * g[:, :, None]).to(x.dtype)
        if ny:  # 2 b_j Σ_i g_i k'_ij (y_j − x_i)
            gy = (weighted_grad(y, x, mode, inv_s2, cw=g, precision=ctx.precision)
                  * b[:, :, None].to(g.dtype)).to(y.dtype)
        if nb:  # Σ_i g_i k(x_i, y_j): the column sum, a row sum with x and y swapped
            gb = kernel_sum_rows(y, x, g, ctx.kernel, ctx.blur, precision=ctx.precision).to(b.dtype)
        return gx, gy, gb, None, None, None


class _ArgMinMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, h, cost, maximize, precision):
        val, idx = argminmax_rows(x.detach(), y.detach(), None if h is None else h.detach(), cost, maximize,
                                  precision=precision)
        ctx.cost, ctx.has_h, ctx.M = cost, h is not None, y.shape[1]
        ctx.save_for_backward(x, y, idx)
        ctx.mark_non_differentiable(idx)
        return val, idx

    @staticmethod
    def backward(ctx, g, _gidx):
        _check_create_graph()
        x, y, idx = ctx.saved_tensors
        nx, ny, nh = ctx.needs_input_grad[:3]
        g = g.to(acc_dtype(x.dtype))
        D = x.shape[2]
        yj = torch.gather(y.to(g.dtype), 1, idx[:, :, None].expand(-1, -1, D))  # y_{j*(i)}
        xa = x.to(g.dtype)
        dx = 2 * (xa - yj) if ctx.cost == "sqdist" else yj  # ∂s/∂x_i at the selected pair
        dy = 2 * (yj - xa) if ctx.cost == "sqdist" else xa  # ∂s/∂y_j*
        gx = (g[:, :, None] * dx).to(x.dtype) if nx else None
        gy = None
        if ny:
            gy = torch.zeros(y.shape, dtype=g.dtype, device=y.device)
            gy.scatter_add_(1, idx[:, :, None].expand(-1, -1, D), g[:, :, None] * dy)
            gy = gy.to(y.dtype)
        gh = None
        if nh and ctx.has_h:
            gh = torch.zeros(y.shape[:2], dtype=g.dtype, device=y.device).scatter_add_(1, idx, g)
        return gx, gy, gh, None, None, None


# ----------------------------------------------------------------------------- public functions
def softmin(x, y, h, eps, p=2, precision=None):
    """``f_i = −ε log Σ_j exp(h_j − C(x_i, y_j)/ε)``, C = ½‖x−y‖² (p=2) or ‖x−y‖ (p=1).

    x (B,N,D)/(N,D), y (B,M,D)/(M,D), h (B,M)/(M,) -> (B,N)/(N,) in float32 (float64 for
    float64 points).  Differentiable w.r.t. x, y and h (first order).  ``precision``: the
    float32 dots (:func:`set_precision`; None = the current default, ``"tf32x3"``).
    """
    if p not in (1, 2):
        raise ValueError(f"p={p!r}: expected 1 or 2")
    (x, y, h), batched = _batched(x, y, h)
    f = _Softmin.apply(x, y, h, float(eps), int(p), check_precision(precision))
    return f if batched else f[0]


def kernel_sum(x, y, b, kernel="gaussian", blur=1.0, precision=None):
    """``Σ_j k(x_i, y_j) b_j`` with geomloss's gaussian ``exp(−‖x−y‖²/2σ²)``, laplacian
    ``exp(−‖x−y‖/σ)`` or energy ``−‖x−y‖`` kernels (σ = blur).

    x (B,N,D)/(N,D), y (B,M,D)/(M,D), b (B,M)/(M,) -> (B,N)/(N,); gradients for x, y, b.
    """
    _kernel_mode(kernel, blur)
    (x, y, b), batched = _batched(x, y, b)
    out = _KernelSum.apply(x, y, b, kernel, float(blur), check_precision(precision))
    return out if batched else out[0]


def _argbest(x, y, h, cost, maximize, precision):
    (x, y, h), batched = _batched(x, y, h)
    val, idx = _ArgMinMax.apply(x, y, h, cost, maximize, check_precision(precision))
    return (val, idx) if batched else (val[0], idx[0])


def argmin(x, y, h=None, cost="sqdist", precision=None):
    """``(min_j s_ij, argmin_j s_ij)`` with ``s_ij = ‖x_i − y_j‖² + h_j`` (``cost="sqdist"``)
    or ``⟨x_i, y_j⟩ + h_j`` (``cost="dot"``); ties go to the smallest j.

    x (B,N,D)/(N,D), y (B,M,D)/(M,D), h (B,M)/(M,) or None -> values (B,N), indices (B,N)
    int64; the values are differentiable w.r.t. x, y, h.
    """
    return _argbest(x, y, h, cost, False, precision)


def argmax(x, y, h=None, cost="dot", precision=None):
    """``(max_j s_ij, argmax_j s_ij)``, same conventions as :func:`argmin`."""
    return _argbest(x, y, h, cost, True, precision)
