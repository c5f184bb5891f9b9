"""The Triton kernels of the ``triton`` backend (every ``@triton.jit`` function lives here).

Order (Triton's fused-attention tutorial): small ``@triton.jit`` helpers that carry the tile
state → ``@triton.autotune`` kernels.  The ``torch.autograd.Function``s that launch them are
in ``ops.py``; this split exists because ``ops.py`` loads a second copy of this file with
Triton's interpreter switched on, to run the same kernels on CPU tensors (tests, machines
without a GPU) next to the compiled copy used for CUDA tensors.

FlashAttention structure: a program owns ``BLOCK_N`` rows of one batch element (grid
``(cdiv(N, BLOCK_N), B[, cdiv(D, BLOCK_DV)])``), walks the columns by ``BLOCK_M`` blocks,
builds the cost tile from ``tl.dot`` (``‖x‖²/2 + ‖y‖²/2 − x·yᵀ``, or ``sqrt(max(d², 1e-8))``
for p=1), and folds it into row accumulators: an online log-sum-exp (running max and sum, in
base 2: ``exp2`` with ``log2(e)`` folded into the scale), a weighted kernel sum, a
softmax-weighted ``P·Y`` (attention's P·V), or a running arg-min/max.  Column reductions are
the same kernels with x and y swapped by the caller (no transposed copies).

**D.**  ``D_PAD`` is a multiple of the dot's chunk ``BLOCK_D`` (:func:`d_layout`): small or
power-of-two D up to 256 is one chunk (the x tile is loaded once per program), any other D is
walked by chunks of 16–128 inside the column loop, so D = 129 does 160 columns of work, not 256.
The gradient kernel tiles its output coordinates by ``BLOCK_DV`` (a grid axis): each program
keeps a (BLOCK_N, BLOCK_DV) accumulator, recomputes the cost tile over all of D, and runs its
own online softmax; at D ≤ 256 one chunk usually covers D and the y tile serves both dots.

**D ≤ 8** (``DIRECT``): the tiles come from coordinate differences instead of ``tl.dot``: the
dot's K would be padded to 16 anyway, and ``‖x‖² + ‖y‖² − 2⟨x,y⟩`` cancels near coincident
points, which the square roots of p=1 and of the laplacian/energy kernels amplify.

**Precision** (``PRECISION``, float32 points): ``"ieee"`` (float32 FMA, no tensor cores),
``"tf32x3"`` (default: three TF32 products, ≈ float32), ``"tf32"`` (operands rounded to the
nearest TF32), ``"bf16"`` (operands rounded to bfloat16); float32 accumulation.  The
caller computes the squared norms from the same rounded points, so ``C(x_i, x_i)`` is zero to
float32 rounding.  float16/bfloat16 points use their own dtype, float64 stays float64.

**Exact small gradients** (``DIFF``, float64): ``Σ_j W_ij (x_i − y_j)`` is summed from the
differences inside the tile (CUDA cores), not as ``x_i Σ_j W_ij − W·Y``, which cancels when
one ``W_ij`` dominates (a nearly diagonal kernel: gradients 1e-98 came out 1e-19).

**Robustness.**  Row offsets are int64 before they meet a stride (N·D ≥ 2³¹ elements);
a column tile whose scores are all −inf leaves the running max at −inf without NaN (the
shift is 0 then); float16 ``P·Y`` operands are scaled per row by a power of two before the
cast, so small plans times small upstream gradients do not underflow.

**Tuning.**  ``@triton.autotune`` over tile shapes × warps × stages (× ``BLOCK_DV``), keyed on
the power-of-two buckets of N and M and on *every* constexpr that changes the code (mode,
precision, dtype), so a config tuned for one variant is never launched for another.
``_prune_for`` keeps the configs whose registers (:func:`register_words`, calibrated with
``ptxas -v``) and shared memory (:func:`shared_bytes`, checked against the compiled kernels'
own figure for sm_80, sm_86 and sm_90) fit the device's limits; on sm_90 the configs measured
fastest on an H200 (:data:`HOPPER_FIRST`, one-stage pipelines included) come first.

Conventions: pointers capitalised, strides explicit for the (B, N, D) point clouds, vectors
(B, N) contiguous in the accumulator dtype ``ACC`` (float64 for float64 points, float32
otherwise); scalars (ε, 1/σ²) come through a one-element tensor ``Par`` of dtype ``ACC``.
"""
from __future__ import annotations

import contextvars

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(t) = exp2(t·log2 e)
_CLAMP = tl.constexpr(1e-8)  # geomloss clamps squared distances before a square root

# MODE (constexpr) of the weighted-gradient kernel and of the kernel sums
SOFTMIN_P2 = 0
SOFTMIN_P1 = 1
GAUSSIAN = 2
LAPLACIAN = 3
ENERGY = 4

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")

# Shared memory per block (opt-in maximum, bytes) by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DEFAULT_CC = 80  # the pruner's target when no device is known (the smallest limits of sm_80/90)

# The target the pruner sizes configs for: ``None`` = the device of the launch's tensors.
# ``otkernels.backends.triton.resources`` sets it to compile for a given architecture offline.
TARGET_CC: contextvars.ContextVar = contextvars.ContextVar("otkernels_triton_target_cc", default=None)


# ----------------------------------------------------------------------------- layout of D
WHOLE_MAX = 256  # x tile held whole up to this padded D


def d_layout(D: int, direct: int = 0, whole_max: int = WHOLE_MAX):
    """``(D_PAD, BLOCK_D)`` for the cost dot: one chunk (``BLOCK_D == D_PAD``, a power of two)
    when D ≤ 64 or D rounded to 16 is a power of two ≤ ``whole_max`` (256; 128 for the float32
    dots that keep hi/lo copies or run on FMA units); else chunks of the largest
    ``BLOCK_D`` ∈ {128, 64, 32, 16} that pads D by at most 1/8 beyond its multiple of 16."""
    if direct:
        return 16, 16
    d16 = -(-D // 16) * 16
    p2 = max(16, 1 << (D - 1).bit_length())
    if p2 <= 64 or (p2 == d16 and p2 <= whole_max):
        return p2, p2
    for b in (128, 64, 32, 16):
        padded = -(-D // b) * b
        if padded * 8 <= d16 * 9:
            return padded, b
    return d16, 16


# ----------------------------------------------------------------------------- configs
# (BLOCK_N, BLOCK_M, num_warps) candidates; num_stages 2 or 3 for each.
_TILES = [(16, 32, 4), (32, 32, 4), (32, 64, 4), (32, 64, 8), (64, 32, 4), (64, 32, 8), (64, 64, 4),
          (64, 64, 8), (64, 128, 8), (128, 64, 4), (128, 64, 8), (128, 128, 8)]
_DV = (16, 32, 64, 128, 256)


def _configs(grad=False):
    """Autotuning space: tile shapes × warps × pipeline depth (× output chunk ``BLOCK_DV`` for
    the gradient), trimmed per problem by :func:`_prune_for`."""
    return [triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, **({"BLOCK_DV": dv} if grad else {})),
                          num_warps=w, num_stages=s)
            for bn, bm, w in _TILES for s in (2, 3) for dv in (_DV if grad else (0,))]


def _elt(dtype_bits: int) -> int:
    return dtype_bits // 8


# Per-precision factors calibrated with the compiled kernels (resources.py, sm_80 and sm_90,
# D = 128): tf32x3 keeps hi/lo copies of its operands (shared memory ×2 for staged tiles,
# ×3 for the whole x tile) and ~2× the registers; float32 "ieee" dots run on FMA units
# with ~2× the registers of a TF32 dot.
_SMEM_OPERAND = {"tf32x3": 2}
_SMEM_X = {"tf32x3": 3, "tf32": 2}
_REGS = {"tf32x3": 2.0, "ieee": 2.0}


def register_words(kernel, bn, bm, w, d_pad, block_d=None, direct=0, dv=None, diff=False, elt=4, precision="tf32"):
    """Rough 32-bit registers per thread that a kernel's tiles need (calibrated with ``ptxas
    -v`` on sm_80 and sm_90): the score tile (bn, bm) and its temporaries; the gradient also
    its (bn, BLOCK_DV) accumulator and, when its x tile is whole, that tile; float64 counts
    double, float32 tf32x3/ieee dots about double."""
    block_d = d_pad if block_d is None else block_d
    k = 2 if elt == 8 else (_REGS.get(precision, 1.0) if elt == 4 else 1.0)
    if kernel in GRAD_LIKE:  # also the plan product: its (bn, BLOCK_DV) accumulator
        dv = d_pad if dv is None else dv
        if diff:  # the (bn, bm, dv) difference product lives in registers
            return k * (bn * bm * dv + 2 * bn * dv + 3 * bn * bm) / (32 * w)
        x_whole = bn * d_pad if block_d == d_pad else 2 * bn * block_d
        return k * (x_whole + bn * dv + (4 if direct else 3) * bn * bm) / (32 * w)
    two = bn * bm if kernel == "_softmin_two" else 0  # the second score tile
    if direct:
        return k * (3 * bn * bm + two) / (32 * w)
    if block_d != d_pad:  # D walked by chunks inside the column loop
        return k * 2 * (2 * bn * block_d + bn * bm + two) / (32 * w)
    return k * (bn * d_pad + bn * bm + two) / (32 * w)


def shared_bytes(kernel, bn, bm, stages, d_pad, block_d=None, direct=0, dv=None, elt=4, precision="tf32"):
    """Shared memory (bytes) a config is expected to need: the pipelined operand buffers
    (``stages`` copies of each tile the column loop loads, in the points' dtype), the x tile
    when it is held whole, the plan tile of the gradient's ``P·Y`` dot, with the per-precision
    factors above.  Calibrated on the compiled kernels (``resources.py``) to over-estimate
    Triton's own figure; tests/backends/test_triton_compile.py checks every kept config
    against the device limit."""
    block_d = d_pad if block_d is None else block_d
    fo = _SMEM_OPERAND.get(precision, 1) if elt == 4 else 1
    fx = _SMEM_X.get(precision, 1) if elt == 4 else 1
    if direct:
        body, x = 0, 0
    elif block_d == d_pad:
        body, x = fo * bm * d_pad * elt, fx * bn * d_pad * elt
    else:
        body, x = fo * (bn + bm) * block_d * elt, 0
    extra = 0
    if kernel in GRAD_LIKE:  # the plan product stages its own (bm, BLOCK_DV) V tile
        dv = d_pad if dv is None else dv
        if kernel == "_plan_apply" or not (block_d == d_pad and dv >= d_pad and not direct):
            body += fo * bm * dv * elt
        extra = bn * bm * max(elt, 4)  # the plan tile, converted for the P·Y dot
    return stages * body + x + extra + 1024


# words/thread above which ptxas spilled (sm_80, sm_90; D = 128, 256, 512; float32, bfloat16)
BUDGET = {"_weighted_grad": 120, "_softmin_grad_ragged": 120, "_plan_apply": 120, "fwd": 160}
MAX_KEPT = 4  # configs the autotuner times per problem (the largest tiles that fit)


def _cc_of(named_args):
    cc = TARGET_CC.get()
    if cc is not None:
        return cc
    x = named_args.get("X")
    try:
        import torch
        if x is not None and x.is_cuda:
            major, minor = torch.cuda.get_device_capability(x.device)
            return 10 * major + minor
    except Exception:  # noqa: BLE001 - no CUDA runtime: size for the default target
        pass
    return DEFAULT_CC


def shared_limit(cc: int) -> int:
    return SHARED_LIMIT.get(cc, SHARED_LIMIT[DEFAULT_CC] if cc >= 80 else 49152)


# Hopper (sm_90): the configs measured fastest on an H200 (benchmarks/gpu_tune.py, N = M = 50k,
# D = 128, float32 points at each precision; benchmarks/results/gpu-tune-nvidia-h200.json), by
# kernel family and dot precision, as (BLOCK_N, BLOCK_M, BLOCK_DV, warps, stages).  Single-stage
# pipelines and 128×64 / 64×128 tiles, which the estimates below rejected (tf32x3 shared memory)
# or never generated (one stage); the gradient's tf32x3 winner spills 134 B there and still runs
# in half the time of the fastest config that does not spill.  Kept first for D ≤ 128 (whole x
# tile, no direct mode), then the estimated choice; the autotuner times them all.
HOPPER_FAMILY = {"_softmin_fwd": "softmin", "_softmin_two": "softmin", "_softmin_ragged": "softmin",
                 "_weighted_grad": "grad", "_softmin_grad_ragged": "grad"}
HOPPER_FIRST = {
    ("softmin", "tf32x3"): [(128, 64, None, 8, 1), (64, 64, None, 8, 3)],
    ("softmin", "tf32"): [(64, 128, None, 4, 1), (128, 64, None, 4, 1)],
    ("softmin", "bf16"): [(64, 128, None, 4, 1), (128, 32, None, 4, 1)],
    ("grad", "tf32x3"): [(128, 64, 128, 8, 1), (128, 32, 128, 8, 1)],
    ("grad", "tf32"): [(128, 64, 128, 8, 1), (128, 64, 128, 8, 2)],
    ("grad", "bf16"): [(64, 64, 128, 4, 1), (128, 64, 128, 8, 2)],
}


def _dv_max(D, D_PAD):
    """The widest useful gradient chunk ``BLOCK_DV``: D (else D_PAD) rounded up to a power of two, ≥ 16."""
    return max(16, 1 << ((D if D is not None else D_PAD) - 1).bit_length())


def hopper_first(kernel, cc, D_PAD, BLOCK_D, DIRECT, ELT, D, DIFF, PRECISION):
    """The measured configs of :data:`HOPPER_FIRST` for this launch (empty off sm_90 or outside
    the measured layout); ``BLOCK_DV`` is capped at D rounded up to a power of two."""
    family = HOPPER_FAMILY.get(kernel)
    prec = "bf16" if ELT == 2 else PRECISION if ELT == 4 else None
    if cc != 90 or family is None or DIRECT or DIFF or BLOCK_D != D_PAD or D_PAD > 128 or (family, prec) not in HOPPER_FIRST:
        return []
    dv_max = _dv_max(D, D_PAD)
    return [triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, **({"BLOCK_DV": min(dv, dv_max)} if dv else {})),
                          num_warps=w, num_stages=st) for bn, bm, dv, w, st in HOPPER_FIRST[(family, prec)]]


def keep_configs(kernel, configs, cc, D_PAD, BLOCK_D=None, DIRECT=0, ELT=4, D=None, DIFF=False, PRECISION="tf32",
                 variant=(), twin=None):
    """The configs the autotuner may launch for one problem on ``sm_<cc>``: on sm_90 the
    measured :data:`HOPPER_FIRST` configs first; then (up to :data:`MAX_KEPT` in all) those
    chosen by :func:`estimated_configs`."""
    BLOCK_D = D_PAD if BLOCK_D is None else BLOCK_D
    first = hopper_first(kernel, cc, D_PAD, BLOCK_D, DIRECT, ELT, D, DIFF, PRECISION)
    rest = estimated_configs(kernel, configs, cc, D_PAD, BLOCK_D, DIRECT, ELT, D, DIFF, PRECISION, variant, twin)
    seen = {config_key(c) for c in first}
    return (first + [c for c in rest if config_key(c) not in seen])[:max(MAX_KEPT, len(first))]


def estimated_configs(kernel, configs, cc, D_PAD, BLOCK_D=None, DIRECT=0, ELT=4, D=None, DIFF=False, PRECISION="tf32",
                      variant=(), twin=None):
    """The configs the autotuner may launch for one problem on ``sm_<cc>``: those whose
    registers (:data:`BUDGET`) and shared memory (:func:`shared_bytes` ≤ the device's
    limit) fit, without duplicates; small tiles are dropped when large ones fit.  Never
    empty: if nothing fits the register budget, the smallest config that fits shared memory.
    The gradient's ``BLOCK_DV`` ranges over the powers of two from 64 (or D) up to D.
    ``twin``: ``(kernel, variant)`` whose measured spills also apply (the same loop body)."""
    BLOCK_D = D_PAD if BLOCK_D is None else BLOCK_D
    limit = shared_limit(cc)
    budget = BUDGET.get(kernel, BUDGET["fwd"])
    grad = kernel in GRAD_LIKE  # (the plan product passes its K as D: BLOCK_DV tiles K)
    dv_max = _dv_max(D, D_PAD)
    if grad:
        if DIFF:
            dvs = {16}
        else:
            dvs = {dv for dv in _DV if min(dv_max, 32 if ELT == 4 and PRECISION in ("tf32x3", "ieee") else 64)
                   <= dv <= min(dv_max, 256)}
    # sm_80/86 (mma.sync holds its operands in registers): the float32 split and FMA dots
    # spilled kilobytes at BLOCK_N = 64 in every shape tried (ptxas -v, D = 128); 32 did not
    narrow = cc < 90 and ELT == 4 and PRECISION in ("tf32x3", "ieee")
    out, seen = [], set()
    for c in configs:
        bn, bm = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]
        dv = c.kwargs.get("BLOCK_DV")
        if grad and dv not in dvs:
            continue
        if narrow and (bn > 32 or (grad and dv > 64)):
            continue
        if DIRECT and ELT == 2 and (DIRECT > 4 or kernel == "_softmin_two") and bn * bm > 64 * 64:
            continue  # half-precision direct tiles of 64×128 spilled 0.3–1.7 KB (sm_80, sm_90)
        if DIFF and bn * bm > 32 * 32:
            continue
        key = (bn, bm, dv, c.num_warps, c.num_stages)
        if key in seen:
            continue
        seen.add(key)
        words = register_words(kernel, bn, bm, c.num_warps, D_PAD, BLOCK_D, DIRECT, dv, DIFF, ELT, PRECISION)
        smem = shared_bytes(kernel, bn, bm, c.num_stages, D_PAD, BLOCK_D, DIRECT, dv, ELT, PRECISION)
        if smem <= limit:
            out.append((words, smem, c))
    fits = [(words, c) for words, _, c in out if words <= budget]
    big = [t for t in fits if t[1].kwargs["BLOCK_N"] * t[1].kwargs["BLOCK_M"] >= 64 * 64]
    chosen = big or fits
    if chosen:  # largest tiles, then the larger output chunk, then fewer registers
        chosen.sort(key=lambda t: (-t[1].kwargs["BLOCK_N"] * t[1].kwargs["BLOCK_M"],
                                   -(t[1].kwargs.get("BLOCK_DV") or 0), t[0], t[1].num_stages))
        top = [c for _, c in chosen[:MAX_KEPT]]
        # configs that ptxas measured to spill for this very variant and architecture
        # (_measured.py, from benchmarks/results/triton-resources.json) go when others remain
        known = [(kernel, variant)] + ([twin] if twin else [])
        clean = [c for c in top if not any((cc, k, v, config_key(c)) in SPILLED for k, v in known)]
        return clean or top
    if out:
        return [min(out, key=lambda t: (t[0], t[1]))[2]]
    # nothing fits the (conservative) estimate: the two smallest, so that the autotuner can
    # skip one that does not compile (it catches OutOfResources only when it has a choice)
    small = sorted((c for c in configs if (not grad or c.kwargs.get("BLOCK_DV") in dvs)),
                   key=lambda c: shared_bytes(kernel, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_stages, D_PAD,
                                              BLOCK_D, DIRECT, c.kwargs.get("BLOCK_DV"), ELT, PRECISION))
    return small[:2]


# the constexprs that select a kernel's code variant (besides the D layout and precision)
VARIANT_KEYS = ("P", "MODE", "HAS_CW", "WRITE_RS", "NORMALIZED", "DIFF", "SYM", "SQDIST", "MAXIMIZE")


def variant_key(a):
    """Hashable description of a launch's code variant: mode constexprs, D layout, precision."""
    return tuple((k, bool(a[k]) if isinstance(a[k], bool) else a[k]) for k in VARIANT_KEYS if k in a) + (
        ("D_PAD", a["D_PAD"]), ("BLOCK_D", a.get("BLOCK_D")), ("DIRECT", a.get("DIRECT", 0)),
        ("PRECISION", a.get("PRECISION")))


def config_key(c):
    return (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_DV"), c.num_warps, c.num_stages)


try:
    from ._measured import SPILLED
except ImportError:  # pragma: no cover - the table is optional
    SPILLED = frozenset()


# kernels whose loop body is another kernel's variant: (that kernel, the constexprs of the variant)
TWINS = {"_softmin_ragged": ("_softmin_fwd", {}),
         "_softmin_grad_ragged": ("_weighted_grad", dict(HAS_CW=False, WRITE_RS=False, NORMALIZED=True))}


def _prune_for(kernel):
    def prune(configs, named_args, **kwargs):
        """Configs that fit the target's registers and shared memory (:func:`keep_configs`)."""
        a = {**named_args, **kwargs}
        x = a.get("X")
        bits = x.dtype.itemsize * 8 if hasattr(x, "dtype") and hasattr(x.dtype, "itemsize") else 32
        twin = None
        if kernel in TWINS:
            name, extra = TWINS[kernel]
            twin = (name, (_elt(bits),) + variant_key({**a, **extra}))
        return keep_configs(kernel, configs, _cc_of(a), a["D_PAD"], a.get("BLOCK_D"), a.get("DIRECT", 0),
                            _elt(bits), a.get("D"), a.get("DIFF", False), a.get("PRECISION", "tf32"),
                            (_elt(bits),) + variant_key(a), twin)
    return prune


# Autotuning keys: N_KEY = N.bit_length() retunes per power of two, not per N (a training loop
# with varying sizes would retune at every step); every constexpr that changes the code is in
# the key, and triton adds the dtypes of the tensors, which fix ACC (float64 points: float64,
# else float32).  ACC itself (a tl.dtype) must not be in the key: with cache_results=True
# triton writes the key to its disk cache as JSON, and a dtype object made every first launch
# raise "Object of type dtype is not JSON serializable" (triton 3.6, H200, gpu_check).
_KEY = ["N_KEY", "M_KEY", "D_PAD", "BLOCK_D", "DIRECT", "PRECISION"]


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _load_rows(Base, offs, mask, offs_d, D, stride_n, stride_d):
    """Rows ``offs`` (masked) × coordinates ``offs_d`` (< D) of a (N, D) cloud; zeros outside.
    The row offsets are int64 before they meet the stride (no wrap once N·D ≥ 2³¹)."""
    ptrs = Base + offs.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=mask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _operand(t, PRECISION: tl.constexpr):
    """A float32 tile as the dot reads it: rounded to the nearest TF32 for ``"tf32"`` (the
    tensor cores truncate the 13 low mantissa bits, a bias of ~2^-11 per product), to
    bfloat16 for ``"bf16"``; other dtypes and precisions unchanged."""
    if t.dtype == tl.float32:
        if PRECISION == "tf32":
            bits = t.to(tl.uint32, bitcast=True) + 0x1000
            t = (bits & 0xFFFFE000).to(tl.float32, bitcast=True)
        elif PRECISION == "bf16":
            t = t.to(tl.bfloat16)
    return t


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """``acc + a·b`` with the precision's ``input_precision`` (bf16 operands need none)."""
    if PRECISION == "bf16":
        out = tl.dot(a, b, acc, out_dtype=ACC)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    return out


@triton.jit
def _direct_xy(Xb, Yb, offs_n, mask_n, offs_m, mask_m, sxn, sxd, sym, syd,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DIRECT: tl.constexpr, ACC: tl.constexpr):
    """``−½‖x_i − y_j‖²`` from coordinate differences (D = DIRECT ≤ 8): no cancellation near
    coincident points, where ``‖x‖² + ‖y‖² − 2⟨x,y⟩`` loses ~1e-7·‖x‖² in float32, which
    ``sqrt`` (p=1, laplacian, energy) turns into ~3e-4·‖x‖."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), ACC)
    rn = offs_n.to(tl.int64) * sxn
    rm = offs_m.to(tl.int64) * sym
    for d in tl.static_range(DIRECT):
        xc = tl.load(Xb + rn + d * sxd, mask=mask_n, other=0.0).to(ACC)
        yc = tl.load(Yb + rm + d * syd, mask=mask_m, other=0.0).to(ACC)
        diff = xc[:, None] - yc[None, :]
        acc += diff * diff
    return -0.5 * acc


@triton.jit
def _norms(Ptr, offs, mask, BLOCK: tl.constexpr, DIRECT: tl.constexpr, ACC: tl.constexpr):
    """Squared norms of a block of points; zeros in direct mode, where the tiles hold
    ``−½‖x − y‖²`` in place of ``⟨x, y⟩`` (so that ``‖x‖² + ‖y‖² − 2·tile = ‖x − y‖²``)."""
    if DIRECT > 0:
        v = tl.zeros((BLOCK,), ACC)
    else:
        v = tl.load(Ptr + offs, mask=mask, other=0.0)
    return v


@triton.jit
def _xy_tile(x, Xb, Yb, offs_n, mask_n, offs_m, mask_m, D, sxn, sxd, sym, syd,
             BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
             PRECISION: tl.constexpr, ACC: tl.constexpr, DIRECT: tl.constexpr):
    """``⟨x_i, y_j⟩`` on a (BLOCK_N, BLOCK_M) tile in ``ACC`` (``−½‖x_i − y_j‖²`` in direct mode,
    ``DIRECT`` = D ≤ 8).  With ``BLOCK_D == D_PAD`` ``x`` is the program's x tile (loaded once
    by the caller); else the dot walks D by chunks of ``BLOCK_D``."""
    if DIRECT > 0:
        xy = _direct_xy(Xb, Yb, offs_n, mask_n, offs_m, mask_m, sxn, sxd, sym, syd, BLOCK_N, BLOCK_M, DIRECT, ACC)
    elif BLOCK_D == D_PAD:
        y = _operand(_load_rows(Yb, offs_m, mask_m, tl.arange(0, D_PAD), D, sym, syd), PRECISION)
        xy = _dot(x, tl.trans(y), tl.zeros((BLOCK_N, BLOCK_M), ACC), PRECISION, ACC)
    else:
        xy = tl.zeros((BLOCK_N, BLOCK_M), ACC)
        for d0 in range(0, D_PAD, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            xk = _operand(_load_rows(Xb, offs_n, mask_n, offs_d, D, sxn, sxd), PRECISION)
            yk = _operand(_load_rows(Yb, offs_m, mask_m, offs_d, D, sym, syd), PRECISION)
            xy = _dot(xk, tl.trans(yk), xy, PRECISION, ACC)
    return xy


@triton.jit
def _x_tile(Xb, offs_n, mask_n, D, sxn, sxd,
            BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT: tl.constexpr,
            PRECISION: tl.constexpr):
    """The program's x tile (BLOCK_N, D_PAD) as the dot reads it, when it is used whole, else a
    small placeholder."""
    if BLOCK_D == D_PAD and DIRECT == 0:
        x = _operand(_load_rows(Xb, offs_n, mask_n, tl.arange(0, D_PAD), D, sxn, sxd), PRECISION)
    else:
        x = tl.zeros((BLOCK_N, 16), Xb.dtype.element_ty)
    return x


@triton.jit
def _softmin_scores(xy, xx, yy, h, k, P: tl.constexpr):
    """``(h_j − C_ij/ε)·log2 e`` with ``k = log2(e)/ε``; for p=2 without the row term
    ``−‖x_i‖²/2ε`` (constant along the row: the caller adds it back after the reduction)."""
    if P == 2:
        s = xy * k + (h * _LOG2E - yy * (k * 0.5))[None, :]
    else:
        d2 = tl.maximum(xx[:, None] + yy[None, :] - 2.0 * xy, _CLAMP)
        s = (h * _LOG2E)[None, :] - tl.sqrt(d2) * k
    return s


@triton.jit
def _lse_update(m_i, l_i, s):
    """Online log-sum-exp (base 2) of a score tile ``s`` into the running max ``m_i`` and sum
    ``l_i``; returns ``(m_new, alpha, p, l_new)``.  A row whose scores are all −inf so far keeps
    ``m = −inf`` and shifts by 0 (no ``−inf − (−inf)``)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - shift)
    p = tl.exp2(s - shift[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _kernel_values(xy, xx, yy, inv_s2, MODE: tl.constexpr, GRAD: tl.constexpr):
    """Radial kernel tile from ``d² = ‖x‖² + ‖y‖² − 2⟨x,y⟩``: ``k(d²)``, or with ``GRAD``
    ``2·∂k/∂d²`` (the factor 2 of ``∇_x d² = 2(x − y)``).  gaussian ``exp(−d²/2σ²)``, laplacian
    ``exp(−sqrt(max(d²/σ², 1e-8)))``, energy ``−sqrt(max(d², 1e-8))`` (``inv_s2`` = 1/σ²)."""
    d2 = (xx[:, None] + yy[None, :] - 2.0 * xy) * inv_s2
    if MODE == 2:  # gaussian
        v = tl.exp2(d2 * (-0.5 * _LOG2E))
        if GRAD:
            v = v * (-inv_s2)
    else:
        d = tl.sqrt(tl.maximum(d2, _CLAMP))
        if MODE == 3:  # laplacian
            v = tl.exp2(-d * _LOG2E)
            if GRAD:
                v = tl.where(d2 >= _CLAMP, -v * inv_s2 / d, 0.0)
        else:  # energy
            if GRAD:
                v = tl.where(d2 >= _CLAMP, -1.0 / d, 0.0)
            else:
                v = -d
    return v


# ----------------------------------------------------------------------------- softmin
@triton.jit
def _softmin_block(Xb, Yb, XXb, YYb, Hb, eps, offs_n, mask_n, M_END, M, D, sxn, sxd, sym, syd,
                   P: tl.constexpr, ACC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                   DIRECT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The inner loop of a softmin: ``−ε log Σ_{j<M} exp(h_j − C(x_i, y_j)/ε)`` of the rows
    ``offs_n`` of the cloud at ``Xb`` against the M points at ``Yb`` (norms ``XXb``/``YYb``,
    potential ``Hb``), walking the columns by ``BLOCK_M`` up to ``M_END`` (M, or 0 for a
    program with no rows: a ragged segment shorter than the grid)."""
    k = _LOG2E / eps
    xx = _norms(XXb, offs_n, mask_n, BLOCK_N, DIRECT, ACC)
    x = _x_tile(Xb, offs_n, mask_n, D, sxn, sxd, BLOCK_N, D_PAD, BLOCK_D, DIRECT, PRECISION)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_N,), ACC)
    for j0 in range(0, M_END, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        xy = _xy_tile(x, Xb, Yb, offs_n, mask_n, offs_m, mask_m, D, sxn, sxd, sym, syd,
                      BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION, ACC, DIRECT)
        yy = _norms(YYb, offs_m, mask_m, BLOCK_M, DIRECT, ACC)
        h = tl.load(Hb + offs_m, mask=mask_m, other=0.0)
        s = _softmin_scores(xy, xx, yy, h, k, P)
        s = tl.where(mask_m[None, :], s, float("-inf"))
        m_i, _alpha, _p, l_i = _lse_update(m_i, l_i, s)
    out = (m_i + tl.log2(l_i)) * (-eps / _LOG2E)
    if P == 2:
        out += 0.5 * xx
    return out


@triton.autotune(configs=_configs(), key=_KEY + ["P"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_for("_softmin_fwd")})
@triton.jit
def _softmin_fwd(X, Y, XX, YY, H, Par, Out,
                 N, M, D, stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
                 N_KEY, M_KEY,
                 P: tl.constexpr, ACC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                 DIRECT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """``Out_i = −ε log Σ_j exp(h_j − C(x_i, y_j)/ε)`` (online log-sum-exp over column blocks)."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    Xb = X + pid_b * stride_xb
    Yb = Y + pid_b * stride_yb
    eps = tl.load(Par)
    out = _softmin_block(Xb, Yb, XX + pid_b * N, YY + pid_b * M, H + pid_b * M, eps, offs_n, mask_n, M, M, D,
                         stride_xn, stride_xd, stride_ym, stride_yd,
                         P, ACC, D_PAD, BLOCK_D, DIRECT, PRECISION, BLOCK_N, BLOCK_M)
    tl.store(Out + pid_b * N + offs_n, out, mask=mask_n)


# ----------------------------------------------------------------------------- both directions
@triton.autotune(configs=_configs(), key=_KEY + ["P", "SYM"], cache_results=True,
                 restore_value=["PartM", "PartS"],  # timing runs must not accumulate into the partials
                 prune_configs_by={"early_config_prune": _prune_for("_softmin_two")})
@triton.jit
def _softmin_two(X, Y, XX, YY, Hr, Hc, Par, OutR, PartM, PartS,
                 N, M, D, stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
                 N_KEY, M_KEY, R, stride_pr, stride_pb,
                 P: tl.constexpr, SYM: tl.constexpr, ACC: tl.constexpr, D_PAD: tl.constexpr,
                 BLOCK_D: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Both updates of a Sinkhorn iteration from one cost tile: the rows' log-sum-exp
    ``log2 Σ_j exp2(s_ij)`` with ``s_ij = (Hr_j − C_ij/ε)·log2 e`` into ``OutR`` (B,N), and per
    column ``j`` partial log-sum-exps of ``(Hc_i − C_ij/ε)·log2 e`` over this program's rows,
    merged into row ``pid`` of ``PartM``/``PartS`` (R, B, M): max and sum of exp2 below it.
    A program walks the row blocks ``pid, pid + R, …`` (R programs per batch element bound
    the partial buffers to R·M entries); the caller reduces the R partials.

    ``SYM`` (y is x, Hc = Hr): only the column tiles at or after the row block (the upper
    triangle of the symmetric cost); their column partials stand for the rows of the mirrored
    tiles, the diagonal tile's only once (through its rows).  The rows' result then holds the
    upper-triangle part and the partials the rest."""
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    Xb = X + pid_b * stride_xb
    Yb = Y + pid_b * stride_yb
    eps = tl.load(Par)
    k = _LOG2E / eps
    Pm = PartM + pid * stride_pr + pid_b * stride_pb
    Ps = PartS + pid * stride_pr + pid_b * stride_pb
    for n0 in range(pid * BLOCK_N, N, R * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        xx = _norms(XX + pid_b * N, offs_n, mask_n, BLOCK_N, DIRECT, ACC)
        hc = tl.load(Hc + pid_b * N + offs_n, mask=mask_n, other=0.0)
        bc = hc * _LOG2E - xx * (k * 0.5) if P == 2 else hc * _LOG2E
        x = _x_tile(Xb, offs_n, mask_n, D, stride_xn, stride_xd, BLOCK_N, D_PAD, BLOCK_D, DIRECT, PRECISION)
        m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
        l_i = tl.zeros((BLOCK_N,), ACC)
        j_start = n0 if SYM else 0
        for j0 in range(j_start, M, BLOCK_M):
            offs_m = j0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            xy = _xy_tile(x, Xb, Yb, offs_n, mask_n, offs_m, mask_m, D, stride_xn, stride_xd,
                          stride_ym, stride_yd, BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION, ACC, DIRECT)
            yy = _norms(YY + pid_b * M, offs_m, mask_m, BLOCK_M, DIRECT, ACC)
            hr = tl.load(Hr + pid_b * M + offs_m, mask=mask_m, other=0.0)
            if P == 2:  # t = ⟨x_i, y_j⟩/ε; rows add Hr_j − ‖y_j‖²/2ε, columns Hc_i − ‖x_i‖²/2ε
                t = xy * k
                sr = t + (hr * _LOG2E - yy * (k * 0.5))[None, :]
                sc = t + bc[:, None]
            else:
                dist = tl.sqrt(tl.maximum(xx[:, None] + yy[None, :] - 2.0 * xy, _CLAMP)) * k
                sr = (hr * _LOG2E)[None, :] - dist
                sc = bc[:, None] - dist
            both = mask_n[:, None] & mask_m[None, :]
            if SYM:  # the tiles after the row block see each pair once: i ≤ j in the diagonal tile
                sr = tl.where(both & (offs_m[None, :] >= offs_n[:, None]), sr, float("-inf"))
                sc = tl.where(both & (offs_m[None, :] > offs_n[:, None]), sc, float("-inf"))
            else:
                sr = tl.where(both, sr, float("-inf"))
                sc = tl.where(both, sc, float("-inf"))
            m_i, _alpha, _p, l_i = _lse_update(m_i, l_i, sr)
            mc = tl.max(sc, 0)
            mc_safe = tl.where(mc == float("-inf"), 0.0, mc)
            lc = tl.sum(tl.exp2(sc - mc_safe[None, :]), 0)
            m_old = tl.load(Pm + offs_m, mask=mask_m, other=float("-inf"))
            s_old = tl.load(Ps + offs_m, mask=mask_m, other=0.0)
            m_new = tl.maximum(m_old, mc)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_new = s_old * tl.exp2(m_old - shift) + lc * tl.exp2(mc - shift)
            tl.store(Pm + offs_m, m_new, mask=mask_m)
            tl.store(Ps + offs_m, s_new, mask=mask_m)
        row = m_i + tl.log2(l_i)
        if P == 2:
            row -= xx * (k * 0.5)
        tl.store(OutR + pid_b * N + offs_n, row, mask=mask_n)


# ----------------------------------------------------------------------------- P·Y gradients
@triton.jit
def _pv_update(acc, sw, W, y, x_dv, y_dv, PRECISION: tl.constexpr, ACC: tl.constexpr, DIFF: tl.constexpr,
               HALF_SCALE: tl.constexpr, SUM: tl.constexpr):
    """``acc += W·Y`` (or, with ``DIFF``, ``acc += Σ_j W_ij (x_i − y_j)`` summed from the
    differences).  float16 operands (``HALF_SCALE``): each row of W is scaled by a power of two
    that brings its largest entry to 1 before the cast, and the product is scaled back.
    ``SUM`` (the expanded ``x_i Σ_j W_ij − W·Y``): also ``sw += Σ_j W_ij`` of the weights *as the
    dot reads them* (rounded to bfloat16/float16/TF32), so that the two terms cancel exactly where
    y_j ≈ x_i; the row sum of the unrounded weights left errors of 2⁻⁹·‖x_i‖·Σ_j W_ij in bfloat16
    (p = 1 near coincident points: 10 % of the gradient, H200, gpu_check)."""
    if DIFF:
        acc += tl.sum(W[:, :, None] * (x_dv[:, None, :] - y_dv[None, :, :]), 1)
    elif HALF_SCALE:
        big = tl.max(tl.abs(W), 1)
        e = tl.where(big > 0, tl.ceil(tl.log2(tl.where(big > 0, big, 1.0))), 0.0)
        e = tl.minimum(tl.maximum(e, -120.0), 120.0)  # 2^±e stays finite in float32
        scale = tl.exp2(e)
        Wn = (W * tl.exp2(-e)[:, None]).to(y.dtype)
        acc += scale[:, None] * tl.dot(Wn, y, out_dtype=ACC)
        if SUM:
            sw += scale * tl.sum(Wn.to(ACC), 1)
    else:
        Wq = _operand(W.to(y.dtype), PRECISION)
        acc = _dot(Wq, y, acc, PRECISION, ACC)
        if SUM:
            sw += tl.sum(Wq.to(ACC), 1)
    return acc, sw


@triton.autotune(configs=_configs(grad=True), key=_KEY + ["MODE", "HAS_CW", "WRITE_RS", "NORMALIZED", "DIFF"],
                 cache_results=True, prune_configs_by={"early_config_prune": _prune_for("_weighted_grad")})
@triton.jit(do_not_specialize=["SKIP_DIAG"])
def _weighted_grad(X, Y, XX, YY, Hc, Rr, Cw, Par, Out, RowSum, Fout,
                   N, M, D, stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
                   N_KEY, M_KEY, SKIP_DIAG,
                   MODE: tl.constexpr, HAS_CW: tl.constexpr, WRITE_RS: tl.constexpr, NORMALIZED: tl.constexpr,
                   ACC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT: tl.constexpr,
                   PRECISION: tl.constexpr, DIFF: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``Out_i = Σ_j W_ij (x_i − y_j)`` on the coordinates ``[pid_dv·BLOCK_DV, +BLOCK_DV)`` with:
    * softmin (MODE 0, 1): ``W_ij = E_ij · w_ij``, ``E_ij = exp(Hc_j − C_ij/ε + Rr_i/ε) Cw_j`` (the plan),
      ``w = 1`` for p=2 (∇_x C = x − y) and ``1/‖x_i − y_j‖`` for p=1 (0 inside the clamp);
      ``WRITE_RS`` also stores the plan's row sums ``RowSum_i = Σ_j E_ij``;
    * softmin, ``NORMALIZED``: ``E_ij = softmax_j(Hc_j − C_ij/ε)`` normalised in this pass (the online
      max and sum of :func:`_softmin_fwd`, attention's forward with V = y), so the rows sum to 1 to
      rounding even where ``C/ε`` exceeds float32's precision; ``Fout`` receives the softmin
      ``−ε log Σ_j exp(Hc_j − C_ij/ε)`` of the same pass (``Rr`` is not read);
    * kernels (MODE 2, 3, 4): ``W_ij = 2 ∂k/∂d²(x_i, y_j) · Cw_j`` (``Par`` = 1/σ²).
    Computed as ``x_i Σ_j W_ij − W·Y`` (tensor cores), or from the differences with ``DIFF``.
    ``SKIP_DIAG`` ≠ 0 (Y is X; a runtime flag, not specialised): the pairs i = j are left out of the
    sum, exact since x_i − x_i = 0 (the expanded form would leave ``W_ii·x_i``'s rounding); not of RowSum.
    When one chunk covers D the (BLOCK_M, D_PAD) y tile serves both the cost and the ``W·Y`` dot."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_dv = tl.program_id(2)
    SHARE_Y: tl.constexpr = (BLOCK_D == D_PAD) and (BLOCK_DV == D_PAD) and (DIRECT == 0) and (not DIFF)
    HALF_SCALE: tl.constexpr = X.dtype.element_ty == tl.float16
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    Xb = X + pid_b * stride_xb
    Yb = Y + pid_b * stride_yb
    par = tl.load(Par)
    x = _x_tile(Xb, offs_n, mask_n, D, stride_xn, stride_xd, BLOCK_N, D_PAD, BLOCK_D, DIRECT, PRECISION)
    x_dv = _load_rows(Xb, offs_n, mask_n, offs_dv, D, stride_xn, stride_xd).to(ACC)
    xx = _norms(XX + pid_b * N, offs_n, mask_n, BLOCK_N, DIRECT, ACC)
    if MODE < 2:
        k = _LOG2E / par
        if not NORMALIZED:
            r = tl.load(Rr + pid_b * N + offs_n, mask=mask_n, other=0.0) * k
            if MODE == 0:
                r -= xx * (0.5 * k)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    sw = tl.zeros((BLOCK_N,), ACC)
    rs = tl.zeros((BLOCK_N,), ACC)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    for j0 in range(0, M, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        if SHARE_Y:
            y = _operand(_load_rows(Yb, offs_m, mask_m, tl.arange(0, D_PAD), D, stride_ym, stride_yd), PRECISION)
            xy = _dot(x, tl.trans(y), tl.zeros((BLOCK_N, BLOCK_M), ACC), PRECISION, ACC)
            y_dv = y
        else:
            xy = _xy_tile(x, Xb, Yb, offs_n, mask_n, offs_m, mask_m, D, stride_xn, stride_xd,
                          stride_ym, stride_yd, BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION, ACC, DIRECT)
            y_dv = _load_rows(Yb, offs_m, mask_m, offs_dv, D, stride_ym, stride_yd)
            if DIFF:
                y_dv = y_dv.to(ACC)
            else:
                y_dv = _operand(y_dv, PRECISION)
        yy = _norms(YY + pid_b * M, offs_m, mask_m, BLOCK_M, DIRECT, ACC)
        if MODE < 2:
            h = tl.load(Hc + pid_b * M + offs_m, mask=mask_m, other=0.0)
            e = _softmin_scores(xy, xx, yy, h, k, 2 - MODE)
            if NORMALIZED:  # online softmax: rescale what was accumulated to the new row max
                e = tl.where(mask_m[None, :], e, float("-inf"))
                m_i, alpha, W, rs = _lse_update(m_i, rs, e)
                sw = sw * alpha
                acc = acc * alpha[:, None]
            else:
                W = tl.exp2(tl.where(mask_n[:, None] & mask_m[None, :], e + r[:, None], float("-inf")))
        else:
            W = _kernel_values(xy, xx, yy, par, MODE, True)
        if HAS_CW:
            W = W * tl.load(Cw + pid_b * M + offs_m, mask=mask_m, other=0.0)[None, :]
        W = tl.where(mask_m[None, :], W, 0.0)
        if WRITE_RS and not NORMALIZED:
            rs += tl.sum(W, 1)
        if MODE == 1:  # ∇_x ‖x − y‖ = (x − y)/‖x − y‖, zero where the clamp is active
            d2 = xx[:, None] + yy[None, :] - 2.0 * xy
            W = tl.where(d2 > _CLAMP, W / tl.sqrt(tl.maximum(d2, _CLAMP)), 0.0)
        W = tl.where((offs_n[:, None] == offs_m[None, :]) & (SKIP_DIAG != 0), 0.0, W)
        acc, sw = _pv_update(acc, sw, W, y_dv, x_dv, y_dv, PRECISION, ACC, DIFF, HALF_SCALE, not DIFF)
    if DIFF:
        out = acc
    else:
        out = x_dv * sw[:, None] - acc
    row = pid_b * N + offs_n
    if NORMALIZED:
        out = out / rs[:, None]
        if pid_dv == 0:
            f = (m_i + tl.log2(rs)) * (-par / _LOG2E)
            if MODE == 0:
                f += 0.5 * xx
            tl.store(Fout + row, f, mask=mask_n)
    tl.store(Out + row[:, None] * D + offs_dv[None, :], out, mask=mask_n[:, None] & (offs_dv[None, :] < D))
    if WRITE_RS and not NORMALIZED:
        if pid_dv == 0:
            tl.store(RowSum + row, rs, mask=mask_n)


# ----------------------------------------------------------------------------- kernel sums
@triton.autotune(configs=_configs(), key=_KEY + ["MODE"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_for("_kernel_sum_fwd")})
@triton.jit
def _kernel_sum_fwd(X, Y, XX, YY, Bw, Par, Out,
                    N, M, D, stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
                    N_KEY, M_KEY,
                    MODE: tl.constexpr, ACC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                    DIRECT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """``Out_i = Σ_j k(x_i, y_j) b_j`` for the radial kernel ``MODE`` (``Par`` = 1/σ²)."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    Xb = X + pid_b * stride_xb
    Yb = Y + pid_b * stride_yb
    inv_s2 = tl.load(Par)
    xx = _norms(XX + pid_b * N, offs_n, mask_n, BLOCK_N, DIRECT, ACC)
    x = _x_tile(Xb, offs_n, mask_n, D, stride_xn, stride_xd, BLOCK_N, D_PAD, BLOCK_D, DIRECT, PRECISION)
    acc = tl.zeros((BLOCK_N,), ACC)
    for j0 in range(0, M, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        xy = _xy_tile(x, Xb, Yb, offs_n, mask_n, offs_m, mask_m, D, stride_xn, stride_xd,
                      stride_ym, stride_yd, BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION, ACC, DIRECT)
        yy = _norms(YY + pid_b * M, offs_m, mask_m, BLOCK_M, DIRECT, ACC)
        b = tl.load(Bw + pid_b * M + offs_m, mask=mask_m, other=0.0)
        kv = _kernel_values(xy, xx, yy, inv_s2, MODE, False)
        acc += tl.sum(kv * b[None, :], 1)
    tl.store(Out + pid_b * N + offs_n, acc, mask=mask_n)


# ----------------------------------------------------------------------------- arg-min / max
@triton.autotune(configs=_configs(), key=_KEY + ["SQDIST", "MAXIMIZE"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_for("_argminmax")})
@triton.jit
def _argminmax(X, Y, XX, YY, H, Val, Idx,
               N, M, D, stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
               N_KEY, M_KEY,
               SQDIST: tl.constexpr, MAXIMIZE: tl.constexpr,
               ACC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT: tl.constexpr,
               PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Best ``j`` of ``s_ij = ⟨x_i, y_j⟩ + h_j`` (or ``‖x_i − y_j‖² + h_j`` with ``SQDIST``),
    largest with ``MAXIMIZE`` else smallest; ties go to the first index."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    Xb = X + pid_b * stride_xb
    Yb = Y + pid_b * stride_yb
    xx = _norms(XX + pid_b * N, offs_n, mask_n, BLOCK_N, DIRECT, ACC)
    x = _x_tile(Xb, offs_n, mask_n, D, stride_xn, stride_xd, BLOCK_N, D_PAD, BLOCK_D, DIRECT, PRECISION)
    best = tl.full((BLOCK_N,), float("-inf"), ACC)  # of t = s (max) or −s (min)
    arg = tl.zeros((BLOCK_N,), tl.int32)
    for j0 in range(0, M, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        xy = _xy_tile(x, Xb, Yb, offs_n, mask_n, offs_m, mask_m, D, stride_xn, stride_xd,
                      stride_ym, stride_yd, BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION, ACC, DIRECT)
        h = tl.load(H + pid_b * M + offs_m, mask=mask_m, other=0.0)
        if SQDIST:
            yy = _norms(YY + pid_b * M, offs_m, mask_m, BLOCK_M, DIRECT, ACC)
            s = xx[:, None] + (yy + h)[None, :] - 2.0 * xy
        else:
            s = xy + h[None, :]
        if not MAXIMIZE:
            s = -s
        s = tl.where(mask_m[None, :], s, float("-inf"))
        tile_best = tl.max(s, 1)
        tile_arg = tl.argmax(s, 1, tie_break_left=True).to(tl.int32) + j0
        better = tile_best > best
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_best, best)
    if not MAXIMIZE:
        best = -best
    tl.store(Val + pid_b * N + offs_n, best, mask=mask_n)
    tl.store(Idx + pid_b * N + offs_n, arg.to(tl.int64), mask=mask_n)


# ----------------------------------------------------------------------------- transport plans
# (issue 19) Written below the other kernels on purpose: Triton's cache key of a kernel holds its
# starting line number and its helpers', and benchmarks/results/triton-resources.json is checked
# against those keys, so code added above them would mark every measured row stale.  For the
# same reason the pruner's functions above take the plan through ``GRAD_LIKE`` without moving a line.
GRAD_LIKE = ("_weighted_grad", "_plan_apply", "_softmin_grad_ragged")  # kernels with a (BLOCK_N, BLOCK_DV) accumulator


def _prune_plan(configs, named_args, **kwargs):
    """:func:`keep_configs` for :func:`_plan_apply`: ``BLOCK_DV`` tiles the output columns K
    (K is passed where the gradient passes D); the (BLOCK_N, BLOCK_DV) accumulator is counted in
    :func:`register_words`, the staged (BLOCK_M, BLOCK_DV) V tile and the plan tile in
    :func:`shared_bytes`."""
    a = {**named_args, **kwargs}
    x = a.get("X")
    bits = x.dtype.itemsize * 8 if hasattr(x, "dtype") and hasattr(x.dtype, "itemsize") else 32
    # measured (ptxas -v, float32 tf32x3, D = 64/128/512, sm_80/86/90): BLOCK_DV = 16 spilled
    # 184–2384 B in every shape at D = 128 (even 16×32, 4 warps) and 8 warps with BLOCK_DV ≤ 32
    # spilled 340–2788 B; so at least 32 output columns (K = 1 pads to 32) and 8 warps only
    # with BLOCK_DV ≥ 64; and the register estimate applies before the fallback of
    # keep_configs too (sm_86, where no config fits the shared-memory estimate at D ≥ 128,
    # took 32×32 tiles that spilled 368–1576 B)
    configs = [c for c in configs if c.kwargs["BLOCK_DV"] >= (64 if c.num_warps >= 8 else 32)]
    elt, d_pad, block_d = _elt(bits), a["D_PAD"], a.get("BLOCK_D")
    fit = [c for c in configs if register_words("_plan_apply", c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps,
                                                d_pad, block_d, a.get("DIRECT", 0), c.kwargs["BLOCK_DV"], False, elt,
                                                a.get("PRECISION", "tf32")) <= BUDGET["_plan_apply"]]
    configs = fit or configs
    return keep_configs("_plan_apply", configs, _cc_of(a), a["D_PAD"], a.get("BLOCK_D"), a.get("DIRECT", 0),
                        _elt(bits), max(a["K"], 32), False, a.get("PRECISION", "tf32"),
                        (_elt(bits),) + variant_key(a))


@triton.autotune(configs=_configs(grad=True), key=_KEY + ["P", "K_KEY"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_plan})
@triton.jit
def _plan_apply(X, Y, XX, YY, U, Hv, Vm, Par, Out,
                N, M, D, K, stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
                stride_vb, stride_vm, stride_vk, N_KEY, M_KEY, K_KEY,
                P: tl.constexpr, ACC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The transport plan applied to a matrix, without the plan:
    ``Out_ik = Σ_j exp(U_i + Hv_j − C(x_i, y_j)/ε) Vm_jk`` on the columns
    ``[pid_k·BLOCK_DV, +BLOCK_DV)`` of K (a grid axis, like the gradient's D chunks).

    Attention's forward with an unnormalised output: the running row max ``m_i`` of the scores
    ``(Hv_j − C_ij/ε)·log2 e`` (:func:`_lse_update`), the (BLOCK_N, BLOCK_DV) accumulator
    rescaled when it grows, ``acc += exp2(s − m)·V`` (:func:`_pv_update`: the precision's dot,
    float16 rows scaled by a power of two), and at the end ``exp2(U_i·log2 e + m_i)·acc`` applied
    as two factors ``2^⌊t/2⌋ · 2^(t − ⌊t/2⌋)``, so that a large U or Hv overflows only when the
    result itself does.  A row whose scores (or ``U_i``) are all −inf gives 0."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    HALF_SCALE: tl.constexpr = Vm.dtype.element_ty == tl.float16
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = pid_k * BLOCK_DV + tl.arange(0, BLOCK_DV)
    Xb = X + pid_b * stride_xb
    Yb = Y + pid_b * stride_yb
    Vb = Vm + pid_b * stride_vb
    eps = tl.load(Par)
    k = _LOG2E / eps
    xx = _norms(XX + pid_b * N, offs_n, mask_n, BLOCK_N, DIRECT, ACC)
    x = _x_tile(Xb, offs_n, mask_n, D, stride_xn, stride_xd, BLOCK_N, D_PAD, BLOCK_D, DIRECT, PRECISION)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_N,), ACC)  # unused (the plan is not normalised)
    for j0 in range(0, M, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        xy = _xy_tile(x, Xb, Yb, offs_n, mask_n, offs_m, mask_m, D, stride_xn, stride_xd,
                      stride_ym, stride_yd, BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION, ACC, DIRECT)
        yy = _norms(YY + pid_b * M, offs_m, mask_m, BLOCK_M, DIRECT, ACC)
        h = tl.load(Hv + pid_b * M + offs_m, mask=mask_m, other=0.0)
        s = _softmin_scores(xy, xx, yy, h, k, P)
        s = tl.where(mask_m[None, :], s, float("-inf"))
        m_i, alpha, W, l_i = _lse_update(m_i, l_i, s)
        acc = acc * alpha[:, None]
        vt = _operand(_load_rows(Vb, offs_m, mask_m, offs_k, K, stride_vm, stride_vk), PRECISION)
        acc, l_i = _pv_update(acc, l_i, W, vt, vt, vt, PRECISION, ACC, False, HALF_SCALE, False)
    t = m_i + tl.load(U + pid_b * N + offs_n, mask=mask_n, other=float("-inf")) * _LOG2E
    if P == 2:  # the row term −‖x_i‖²/2ε left out of the scores
        t -= xx * (k * 0.5)
    live = t > float("-inf")  # false for −inf (and NaN: u = +inf on an empty row)
    t1 = tl.where(live, tl.floor(t * 0.5), 0.0)
    t2 = tl.where(live, t - t1, float("-inf"))
    out = acc * tl.exp2(t1)[:, None] * tl.exp2(t2)[:, None]
    row = pid_b * N + offs_n
    tl.store(Out + row[:, None] * K + offs_k[None, :], out, mask=mask_n[:, None] & (offs_k[None, :] < K))


# ----------------------------------------------------------------------------- ragged batches
@triton.jit
def _segment(Off, q):
    """Segment ``q`` of a ragged batch from its offsets ``Off`` (S+1,) int64: (first row, rows)."""
    r0 = tl.load(Off + q)
    return r0, (tl.load(Off + q + 1) - r0).to(tl.int32)


@triton.autotune(configs=_configs(), key=_KEY + ["P"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_for("_softmin_ragged")})
@triton.jit
def _softmin_ragged(X, Y, XX, YY, XO, YO, H, Eps, Out,
                    N, M, D, stride_xn, stride_xd, stride_ym, stride_yd, N_KEY, M_KEY,
                    P: tl.constexpr, ACC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                    DIRECT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The softmin of every segment of a ragged batch in one launch (issue 21): program
    ``(pid_n, q)`` reduces the rows ``XO[q] + pid_n·BLOCK_N + [0, BLOCK_N)`` of X (Nx,D) over
    the rows ``YO[q]:YO[q+1]`` of Y (Ny,D) at ``ε = Eps[q]``.  H (S, M) and Out (S, N) are
    padded to the largest segments (N = n_max, M = m_max); padded rows are not written, padded
    columns not read; a program past its segment's end runs no column loop."""
    pid_n = tl.program_id(0)
    q = tl.program_id(1).to(tl.int64)
    x0, n = _segment(XO, q)
    y0, m = _segment(YO, q)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    m_end = tl.where(pid_n * BLOCK_N < n, m, 0)
    out = _softmin_block(X + x0 * stride_xn, Y + y0 * stride_ym, XX + x0, YY + y0, H + q * M, tl.load(Eps + q),
                         offs_n, mask_n, m_end, m, D, stride_xn, stride_xd, stride_ym, stride_yd,
                         P, ACC, D_PAD, BLOCK_D, DIRECT, PRECISION, BLOCK_N, BLOCK_M)
    tl.store(Out + q * N + offs_n, out, mask=mask_n)


@triton.autotune(configs=_configs(grad=True), key=_KEY + ["MODE", "DIFF"], cache_results=True,
                 prune_configs_by={"early_config_prune": _prune_for("_softmin_grad_ragged")})
@triton.jit(do_not_specialize=["SKIP_DIAG"])
def _softmin_grad_ragged(X, Y, XX, YY, XO, YO, H, Eps, Out, Fout,
                         N, M, D, stride_xn, stride_xd, stride_ym, stride_yd, N_KEY, M_KEY, SKIP_DIAG,
                         MODE: tl.constexpr, ACC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                         DIRECT: tl.constexpr, PRECISION: tl.constexpr, DIFF: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The softmin and its gradient of every segment of a ragged batch in one launch: the
    normalised softmin mode of :func:`_weighted_grad` (``Out_i = Σ_j P_ij ∇_x C(x_i, y_j)``,
    P the row softmax of ``h_j − C_ij/ε`` normalised in the pass, and ``Fout_i`` the softmin)
    over the segments of :func:`_softmin_ragged`.  Out (Nx, D) is stacked like X; Fout (S, N)
    padded.  ``SKIP_DIAG`` ≠ 0 (Y is X, same offsets): the pairs i = j leave the gradient.
    (Its column loop repeats that of :func:`_weighted_grad`'s normalised mode rather than
    sharing a helper: a change to the dense kernel voids its 549 measured resource rows.)"""
    pid_n = tl.program_id(0)
    q = tl.program_id(1).to(tl.int64)
    pid_dv = tl.program_id(2)
    SHARE_Y: tl.constexpr = (BLOCK_D == D_PAD) and (BLOCK_DV == D_PAD) and (DIRECT == 0) and (not DIFF)
    x0, n = _segment(XO, q)
    y0, m = _segment(YO, q)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    m_end = tl.where(pid_n * BLOCK_N < n, m, 0)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    Xb = X + x0 * stride_xn
    Yb = Y + y0 * stride_ym
    eps = tl.load(Eps + q)
    k = _LOG2E / eps
    x = _x_tile(Xb, offs_n, mask_n, D, stride_xn, stride_xd, BLOCK_N, D_PAD, BLOCK_D, DIRECT, PRECISION)
    x_dv = _load_rows(Xb, offs_n, mask_n, offs_dv, D, stride_xn, stride_xd).to(ACC)
    xx = _norms(XX + x0, offs_n, mask_n, BLOCK_N, DIRECT, ACC)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), ACC)
    sw = tl.zeros((BLOCK_N,), ACC)
    rs = tl.zeros((BLOCK_N,), ACC)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    for j0 in range(0, m_end, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m
        if SHARE_Y:
            y = _operand(_load_rows(Yb, offs_m, mask_m, tl.arange(0, D_PAD), D, stride_ym, stride_yd), PRECISION)
            xy = _dot(x, tl.trans(y), tl.zeros((BLOCK_N, BLOCK_M), ACC), PRECISION, ACC)
            y_dv = y
        else:
            xy = _xy_tile(x, Xb, Yb, offs_n, mask_n, offs_m, mask_m, D, stride_xn, stride_xd,
                          stride_ym, stride_yd, BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION, ACC, DIRECT)
            y_dv = _load_rows(Yb, offs_m, mask_m, offs_dv, D, stride_ym, stride_yd)
            if DIFF:
                y_dv = y_dv.to(ACC)
            else:
                y_dv = _operand(y_dv, PRECISION)
        yy = _norms(YY + y0, offs_m, mask_m, BLOCK_M, DIRECT, ACC)
        h = tl.load(H + q * M + offs_m, mask=mask_m, other=0.0)
        e = tl.where(mask_m[None, :], _softmin_scores(xy, xx, yy, h, k, 2 - MODE), float("-inf"))
        m_i, alpha, W, rs = _lse_update(m_i, rs, e)  # online softmax: rescale what was accumulated
        sw = sw * alpha
        acc = acc * alpha[:, None]
        if MODE == 1:  # ∇_x ‖x − y‖ = (x − y)/‖x − y‖, zero where the clamp is active
            d2 = xx[:, None] + yy[None, :] - 2.0 * xy
            W = tl.where(d2 > _CLAMP, W / tl.sqrt(tl.maximum(d2, _CLAMP)), 0.0)
        W = tl.where((offs_n[:, None] == offs_m[None, :]) & (SKIP_DIAG != 0), 0.0, W)
        acc, sw = _pv_update(acc, sw, W, y_dv, x_dv, y_dv, PRECISION, ACC, DIFF, False, not DIFF)
    out = acc if DIFF else x_dv * sw[:, None] - acc
    out = out / rs[:, None]
    row = x0 + offs_n
    tl.store(Out + row[:, None] * D + offs_dv[None, :], out, mask=mask_n[:, None] & (offs_dv[None, :] < D))
    if pid_dv == 0:
        f = (m_i + tl.log2(rs)) * (-eps / _LOG2E)
        if MODE == 0:
            f += 0.5 * xx
        tl.store(Fout + q * N + offs_n, f, mask=mask_n)


KERNELS = {"_softmin_fwd": _softmin_fwd, "_softmin_two": _softmin_two, "_weighted_grad": _weighted_grad,
           "_kernel_sum_fwd": _kernel_sum_fwd, "_argminmax": _argminmax, "_plan_apply": _plan_apply,
           "_softmin_ragged": _softmin_ragged, "_softmin_grad_ragged": _softmin_grad_ragged}
