"""The Triton kernels of the ``triton`` backend (every ``@triton.jit`` function lives here).

Order (Triton's fused-attention tutorial): small ``@triton.jit`` helpers that carry the tile
state → ``@triton.autotune`` kernels.  The ``torch.autograd.Function``s that launch them are
in ``ops.py``; this split exists because ``ops.py`` loads a second copy of this file with
Triton's interpreter switched on, to run the same kernels on CPU tensors (tests, machines
without a GPU) next to the compiled copy used for CUDA tensors.

FlashAttention structure: a program owns ``BLOCK_N`` rows of one batch element (grid
``(cdiv(N, BLOCK_N), B)``), keeps its x tile, walks the columns by ``BLOCK_M`` blocks, builds
the cost tile from ``tl.dot`` (``‖x‖²/2 + ‖y‖²/2 − x·yᵀ``, or ``sqrt(max(d², 1e-8))`` for
p=1), and folds it into row accumulators: an online log-sum-exp (running max and sum, in
base 2: ``exp2`` with ``log2(e)`` folded into the scale), a weighted kernel sum, a
softmax-weighted ``P·Y`` (attention's P·V), or a running arg-min/max.  Column reductions are
the same kernels with x and y swapped by the caller (no transposed copies).

For D ≤ 8 (``DIRECT``) the tiles come from coordinate differences instead of ``tl.dot``: the
dot's K would be padded to 16 anyway, and ``‖x‖² + ‖y‖² − 2⟨x,y⟩`` cancels near coincident
points, which the square roots of p=1 and of the laplacian/energy kernels amplify.

Tuning: ``@triton.autotune`` over tile shapes × warps × stages, keyed on the power-of-two
buckets of N and M and on ``D_PAD``; ``_prune_for`` drops the shapes whose registers would
spill at that D (a per-thread estimate calibrated with ``ptxas -v``, see
tests/backends/test_triton_compile.py).  The forward kernels hold the whole padded D up to
256 and walk D by chunks of 128 above (``block_d``); the gradient keeps a (BLOCK_N, D)
accumulator and shrinks its tiles with D instead.

Conventions: pointers capitalised, strides explicit for the (B, N, D) point clouds, vectors
(B, N) contiguous in the accumulator dtype ``ACC`` (float64 for float64 points, float32
otherwise: float16/bfloat16 points feed the tensor cores, everything else is float32);
scalars (ε, 1/σ²) come through a one-element tensor ``Par`` of dtype ``ACC`` so float64
problems keep float64 scales.  D is padded to ``D_PAD`` (a power of two ≥ 16) with masked
loads; masks handle any N, M, D.
"""
from __future__ import annotations

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


# ----------------------------------------------------------------------------- configs
# (BLOCK_N, BLOCK_M, num_warps) candidates; num_stages 2 or 3 for each.
# The small tiles are there for large D, where the bigger ones would spill.
_TILES = [(16, 32, 4), (32, 32, 8), (32, 64, 4), (32, 64, 8), (64, 32, 8), (64, 64, 4), (64, 64, 8),
          (64, 128, 8), (128, 64, 4), (128, 64, 8), (128, 128, 8)]


def _configs():
    """Autotuning space: tile shapes × warps × pipeline depth, trimmed per problem by :func:`_prune_for`."""
    return [triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm), num_warps=w, num_stages=s)
            for bn, bm, w in _TILES for s in (2, 3)]


def register_words(kernel, bn, bm, w, d_pad, direct=0):
    """Rough 32-bit registers per thread that a kernel's tiles need (calibrated with ``ptxas -v``
    on sm_80 and sm_90, see tests/backends/test_triton_compile.py): the forward kernels hold the
    (bn, bm) score tile (their x tile feeds the tensor cores from shared memory); the gradient
    also holds the x tile and the (bn, D) accumulator."""
    if kernel == "_weighted_grad":
        return (2 * bn * d_pad + (4 if direct else 3) * bn * bm) / (32 * w)
    if direct:  # no x tile, but the difference, distance and score tiles are live together
        return 3 * bn * bm / (32 * w)
    if d_pad > 256:  # D walked by chunks inside the column loop: ptxas spilled far more
        return 2 * (2 * bn * block_d(d_pad) + bn * bm) / (32 * w)
    return (bn * d_pad + bn * bm) / (32 * w)


# words/thread above which ptxas spilled (sm_80, sm_90; D = 128, 256, 512; float32, bfloat16)
BUDGET = {"_weighted_grad": 120, "fwd": 160}


def _prune_for(kernel):
    def prune(configs, named_args, **kwargs):
        """Drop the tile shapes whose registers would spill at this ``D_PAD``, and the tiles
        under 64×64 when larger ones fit; keep at least one."""
        d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
        direct = kwargs.get("DIRECT", named_args.get("DIRECT", 0))
        budget = BUDGET.get(kernel, BUDGET["fwd"])

        def words(c):
            return register_words(kernel, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, d_pad, direct)
        kept = [c for c in configs if words(c) <= budget
                and (kernel == "_weighted_grad" or d_pad <= 256 or c.num_stages == 2)]  # D chunks: 2 stages
        big = [c for c in kept if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] >= 64 * 64]
        return big or kept or [min(configs, key=words)]
    return prune


def block_d(d_pad: int) -> int:
    """D chunk of the forward kernels: the whole padded D up to 256 (the x tile is loaded once
    per program; chunking D = 128 by 64 made ptxas spill), chunks of 128 above."""
    return d_pad if d_pad <= 256 else 128


# Autotuning keys: N_KEY = N.bit_length() retunes per power of two, not per N (a training loop
# with varying sizes would retune at every step); the dtypes of the tensors are added by triton.
_KEY = ["N_KEY", "M_KEY", "D_PAD", "DIRECT"]


# ----------------------------------------------------------------------------- tile helpers
@triton.jit
def _load_rows(Base, offs, mask, offs_d, D, stride_n, stride_d):
    """Rows ``offs`` (masked) × coordinates ``offs_d`` (< D) of a (N, D) cloud; zeros outside."""
    ptrs = Base + offs[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=mask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _tf32(t, PRECISION: tl.constexpr):
    """Round a float32 tile to the nearest TF32 for ``tl.dot(..., "tf32")``: the tensor cores
    truncate the 13 low mantissa bits, which biases every product by ~2^-11 (a Sinkhorn
    divergence at D = 128 came out 7e-4 off; rounded: 5e-7, measured with torch emulation)."""
    if PRECISION == "tf32":
        if t.dtype == tl.float32:
            bits = t.to(tl.uint32, bitcast=True) + 0x1000
            t = (bits & 0xFFFFE000).to(tl.float32, bitcast=True)
    return t


@triton.jit
def _direct_xy(Xb, Yb, offs_n, mask_n, offs_m, mask_m, sxn, sxd, sym, syd,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DIRECT: tl.constexpr, ACC: tl.constexpr):
    """``−½‖x_i − y_j‖²`` from coordinate differences (D = DIRECT ≤ 8): no cancellation near
    coincident points, where ``‖x‖² + ‖y‖² − 2⟨x,y⟩`` loses ~1e-7·‖x‖² in float32, which
    ``sqrt`` (p=1, laplacian, energy) turns into ~3e-4·‖x‖."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), ACC)
    for d in tl.static_range(DIRECT):
        xc = tl.load(Xb + offs_n * sxn + d * sxd, mask=mask_n, other=0.0).to(ACC)
        yc = tl.load(Yb + offs_m * sym + d * syd, mask=mask_m, other=0.0).to(ACC)
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
    by the caller); else the dot walks D by chunks."""
    if DIRECT > 0:
        xy = _direct_xy(Xb, Yb, offs_n, mask_n, offs_m, mask_m, sxn, sxd, sym, syd, BLOCK_N, BLOCK_M, DIRECT, ACC)
    elif BLOCK_D == D_PAD:
        y = _tf32(_load_rows(Yb, offs_m, mask_m, tl.arange(0, D_PAD), D, sym, syd), PRECISION)
        xy = tl.dot(x, tl.trans(y), input_precision=PRECISION, out_dtype=ACC)
    else:
        xy = tl.zeros((BLOCK_N, BLOCK_M), ACC)
        for d0 in range(0, D_PAD, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            xk = _tf32(_load_rows(Xb, offs_n, mask_n, offs_d, D, sxn, sxd), PRECISION)
            yk = _tf32(_load_rows(Yb, offs_m, mask_m, offs_d, D, sym, syd), PRECISION)
            xy = tl.dot(xk, tl.trans(yk), xy, input_precision=PRECISION, out_dtype=ACC)
    return xy


@triton.jit
def _x_tile(Xb, offs_n, mask_n, D, sxn, sxd,
            BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT: tl.constexpr,
            PRECISION: tl.constexpr):
    """The program's x tile (BLOCK_N, D_PAD) as the dot reads it, when it is used whole, else a
    small placeholder."""
    if BLOCK_D == D_PAD and DIRECT == 0:
        x = _tf32(_load_rows(Xb, offs_n, mask_n, tl.arange(0, D_PAD), D, sxn, sxd), PRECISION)
    else:
        x = tl.zeros((BLOCK_N, BLOCK_D), Xb.dtype.element_ty)
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
@triton.autotune(configs=_configs(), key=_KEY + ["P"],
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
    k = _LOG2E / eps
    xx = _norms(XX + pid_b * N, offs_n, mask_n, BLOCK_N, DIRECT, ACC)
    x = _x_tile(Xb, offs_n, mask_n, D, stride_xn, stride_xd, BLOCK_N, D_PAD, BLOCK_D, DIRECT, PRECISION)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_N,), ACC)
    for j0 in range(0, M, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        xy = _xy_tile(x, Xb, Yb, offs_n, mask_n, offs_m, mask_m, D, stride_xn, stride_xd,
                      stride_ym, stride_yd, BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION, ACC, DIRECT)
        yy = _norms(YY + pid_b * M, offs_m, mask_m, BLOCK_M, DIRECT, ACC)
        h = tl.load(H + pid_b * M + offs_m, mask=mask_m, other=0.0)
        s = _softmin_scores(xy, xx, yy, h, k, P)
        s = tl.where(mask_m[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    out = (m_i + tl.log2(l_i)) * (-eps / _LOG2E)
    if P == 2:
        out += 0.5 * xx
    tl.store(Out + pid_b * N + offs_n, out, mask=mask_n)


# ----------------------------------------------------------------------------- P·Y gradients
@triton.autotune(configs=_configs(), key=_KEY + ["MODE"],
                 prune_configs_by={"early_config_prune": _prune_for("_weighted_grad")})
@triton.jit
def _weighted_grad(X, Y, XX, YY, Hc, Rr, Cw, Par, Out, RowSum, Fout,
                   N, M, D, stride_xb, stride_xn, stride_xd, stride_yb, stride_ym, stride_yd,
                   N_KEY, M_KEY,
                   MODE: tl.constexpr, HAS_CW: tl.constexpr, WRITE_RS: tl.constexpr, NORMALIZED: tl.constexpr,
                   ACC: tl.constexpr, D_PAD: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """``Out_i = x_i Σ_j W_ij − Σ_j W_ij y_j`` with

    * softmin (MODE 0, 1): ``W_ij = E_ij · w_ij``, ``E_ij = exp(Hc_j − C_ij/ε + Rr_i/ε) Cw_j``
      (the plan), ``w = 1`` for p=2 (∇_x C = x − y) and ``1/‖x_i − y_j‖`` for p=1 (0 inside
      the clamp); ``WRITE_RS`` also stores the plan's row sums ``RowSum_i = Σ_j E_ij``;
    * softmin, ``NORMALIZED``: ``E_ij = softmax_j(Hc_j − C_ij/ε)`` normalised in this pass (the
      online max and sum of :func:`_softmin_fwd`, attention's forward with V = y), so the rows
      sum to 1 to rounding even where ``C/ε`` exceeds float32's precision; ``Fout`` receives
      the softmin ``−ε log Σ_j exp(Hc_j − C_ij/ε)`` of the same pass (``Rr`` is not read);
    * kernels (MODE 2, 3, 4): ``W_ij = 2 ∂k/∂d²(x_i, y_j) · Cw_j`` (``Par`` = 1/σ²).

    The (BLOCK_M, D_PAD) y tile serves both the cost ``tl.dot`` and the ``W·Y`` ``tl.dot``.
    """
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, D_PAD)
    Xb = X + pid_b * stride_xb
    Yb = Y + pid_b * stride_yb
    par = tl.load(Par)
    x = _load_rows(Xb, offs_n, mask_n, offs_d, D, stride_xn, stride_xd)
    x_dot = _tf32(x, PRECISION)
    xx = _norms(XX + pid_b * N, offs_n, mask_n, BLOCK_N, DIRECT, ACC)
    if MODE < 2:
        k = _LOG2E / par
        if not NORMALIZED:
            r = tl.load(Rr + pid_b * N + offs_n, mask=mask_n, other=0.0) * k
            if MODE == 0:
                r -= xx * (0.5 * k)
    acc = tl.zeros((BLOCK_N, D_PAD), ACC)
    sw = tl.zeros((BLOCK_N,), ACC)
    rs = tl.zeros((BLOCK_N,), ACC)
    m_i = tl.full((BLOCK_N,), float("-inf"), ACC)
    for j0 in range(0, M, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        y = _tf32(_load_rows(Yb, offs_m, mask_m, offs_d, D, stride_ym, stride_yd), PRECISION)
        if DIRECT > 0:
            xy = _direct_xy(Xb, Yb, offs_n, mask_n, offs_m, mask_m, stride_xn, stride_xd, stride_ym, stride_yd,
                            BLOCK_N, BLOCK_M, DIRECT, ACC)
        else:
            xy = tl.dot(x_dot, tl.trans(y), input_precision=PRECISION, out_dtype=ACC)
        yy = _norms(YY + pid_b * M, offs_m, mask_m, BLOCK_M, DIRECT, ACC)
        if MODE < 2:
            h = tl.load(Hc + pid_b * M + offs_m, mask=mask_m, other=0.0)
            e = _softmin_scores(xy, xx, yy, h, k, 2 - MODE)
            if NORMALIZED:  # online softmax: rescale what was accumulated to the new row max
                e = tl.where(mask_m[None, :], e, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(e, 1))
                alpha = tl.exp2(m_i - m_new)
                W = tl.exp2(e - m_new[:, None])
                rs = rs * alpha + tl.sum(W, 1)
                sw = sw * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
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
        sw += tl.sum(W, 1)
        acc = tl.dot(_tf32(W.to(y.dtype), PRECISION), y, acc, input_precision=PRECISION, out_dtype=ACC)
    out = x.to(ACC) * sw[:, None] - acc
    row = pid_b * N + offs_n
    if NORMALIZED:
        out = out / rs[:, None]
        f = (m_i + tl.log2(rs)) * (-par / _LOG2E)
        if MODE == 0:
            f += 0.5 * xx
        tl.store(Fout + row, f, mask=mask_n)
    tl.store(Out + row[:, None] * D + offs_d[None, :], out, mask=mask_n[:, None] & (offs_d[None, :] < D))
    if WRITE_RS and not NORMALIZED:
        tl.store(RowSum + row, rs, mask=mask_n)


# ----------------------------------------------------------------------------- kernel sums
@triton.autotune(configs=_configs(), key=_KEY + ["MODE"],
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
@triton.autotune(configs=_configs(), key=_KEY + ["SQDIST"],
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


KERNELS = {"_softmin_fwd": _softmin_fwd, "_weighted_grad": _weighted_grad,
           "_kernel_sum_fwd": _kernel_sum_fwd, "_argminmax": _argminmax}
