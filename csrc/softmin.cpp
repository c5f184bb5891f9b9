// Cost matrices and the Sinkhorn "softmin" reductions, f_i = −ε log Σ_j exp(h_j − C_ij/ε),
// returned as the log-sum-exp lse_i = log Σ_j exp(h_j − C_ij/ε) (f = −ε·lse):
//
// * over the rows of a cached C: one streaming pass per row, blocks of 256 values in
//   registers (block max, rare rescale of the running sum, one exp per element);
// * over the columns of a cached C (the transposed problem, no transpose copy): threads own
//   column ranges, walk blocks of rows and keep a running max / sum per column;
// * with C computed on the fly: GEMM tiles (D > 8) or direct distances (D ≤ 8), reduced
//   while in cache.
#include <atomic>

#include "tiles.h"

namespace otk {

// Row state of an online log-sum-exp: the running max m and Σ exp(t − m) kept as a vector
// (reduced once per row by lse_out).
template <typename T> struct RowLse {
  T m = neg_inf<T>();
  vec<T> acc = vset(T(0));
};

// Updates a row's state with the tile columns [0, W), t_j = h_j − c_j/ε.  Blocks of K
// vectors stay in registers: when their max exceeds m (rare after the first blocks) the
// sum is rescaled, then one exp per element.
template <int K, typename T, typename L>
inline void lse_block(const L& ld, i64 j, int lanes, const T* h, vec<T> ie, RowLse<T>& st) {
  constexpr int n = VT<T>::N;
  vec<T> t[K];
  vec<T> mx = vset(neg_inf<T>());
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) {
    if (K == 1 && lanes < n) {
      t[k] = vfma(ld.tail(j, lanes), ie, vload_part(h + j, lanes, T(0)));
      t[k] = select(lanes_below<T>(lanes), t[k], vset(neg_inf<T>()));
    } else {
      t[k] = vfma(ld.at(j + k * n), ie, vload(h + j + k * n));
    }
    mx = vmax(mx, t[k]);
  }
  vec<T> mv = vset(st.m);
  if (any_gt(mx, mv)) {
    const T cm = hmax(mx);
    if (st.m > neg_inf<T>()) st.acc *= sexp(st.m - cm);
    st.m = cm;
    mv = vset(cm);
  } else if (!(st.m > neg_inf<T>())) {
    return;  // every t = −inf so far
  }
  vec<T> a0 = vset(T(0)), a1 = a0;
#pragma GCC unroll 16
  for (int k = 0; k < K; k += 2) {
    a0 += vexp_le0(t[k] - mv);
    if (k + 1 < K) a1 += vexp_le0(t[k + 1] - mv);
  }
  if (K == 1 && lanes < n) a0 = select(lanes_below<T>(lanes), a0, vset(T(0)));
  st.acc += a0 + a1;
}

template <typename T, typename L>
inline void lse_update(const L& ld, i64 W, const T* h, T inv_eps, RowLse<T>& st) {
  constexpr int n = VT<T>::N, K = 16;
  const vec<T> ie = vset(-inv_eps);
  i64 j = 0;
  for (; j + K * n <= W; j += K * n) lse_block<K>(ld, j, n, h, ie, st);
  for (; j + 4 * n <= W; j += 4 * n) lse_block<4>(ld, j, n, h, ie, st);
  for (; j < W; j += n) lse_block<1>(ld, j, int(std::min<i64>(n, W - j)), h, ie, st);
}

// The kernels return the log-sum-exp m + log s; the caller scales it by −ε.  Keeping it
// unscaled lets the gradient pass reuse it exactly: t_ij − lse_i ≤ 0 with the same rounding
// as the forward pass, so P_ij ≤ 1 even when C/ε is far beyond float precision.
template <typename T> inline T lse_out(T m, T s) { return T(double(m) + std::log(double(s))); }
template <typename T> inline T lse_out(const RowLse<T>& st) { return lse_out(st.m, hsum(st.acc)); }

// ----------------------------------------------------------------------------- cost matrix
// A full (B,N,M) matrix, or with pk the packed triangle of C(x, x) (y = x, tasks = its row
// blocks, each row written from its block's first column; the diagonal set exactly: 0, or
// geomloss's clamp 1e-4 for p = 1).
template <typename T, typename S, int P>
static void cost_matrix_p(const T* x, const T* y, S* C, i64 B, i64 N, i64 M, i64 D, T sinv, const Packed* pk,
                          int nt) {
  const bool direct = D <= DIRECT_MAX_D;
  const T half = P == 2 ? T(0.5) : T(1);
  ColumnTerms<T> ct(y, B, M, D, direct, !direct, half);
  const i64 R = pk ? pk->PB : rows_per_task(B, N, nt, ROWS), nblk = ceil_div(N, R);
  const i64 per = pk ? pk->numel() : N * M;  // stored elements a batch
  constexpr bool scale_it = std::is_same<S, f16_t>::value;
  constexpr int n = VT<T>::N;
  auto store_row = [&](auto& ld, S* out, i64 W) {
    // up to the first 64-byte boundary with ordinary stores, then streaming ones (sstore_nt)
    i64 j = 0;
    if constexpr (std::is_same<S, T>::value) j = std::min<i64>(W, i64((64 - (reinterpret_cast<uintptr_t>(out) & 63)) & 63) / i64(sizeof(S)));
    if (j > 0) {
      vec<T> v = ld.tail(0, int(j));
      if constexpr (scale_it) v *= sinv;
      sstore_part<T>(out, v, int(j));
    }
    for (; j + n <= W; j += n) {
      vec<T> v = ld.at(j);
      if constexpr (scale_it) v *= sinv;
      sstore_nt(out + j, v);
    }
    if (j < W) {
      vec<T> v = ld.tail(j, int(W - j));
      if constexpr (scale_it) v *= sinv;
      sstore_part<T>(out + j, v, int(W - j));
    }
  };
  parallel_tasks(B * nblk, nt, [&] { return std::vector<T>(direct ? 0 : size_t(R * COLS)); },
                 [&](i64 task, std::vector<T>& G) {
    const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R);
    const i64 jb = pk ? i0 : 0;  // the first stored column of these rows
    const T* xq = x + q * N * D;
    S* Cq = C + q * per;
    auto row = [&](i64 i) { return Cq + (pk ? pk->at(i, jb) : i * M); };  // row i at column jb
    if (direct) {
      const T* bT = ct.bT.data() + q * M * D + jb;
      for (i64 i = i0; i < i1; ++i) {
        CostRow<T, P, DirectRow<T>, true> ld{DirectRow<T>(xq + i * D, bT, M, int(D))};
        store_row(ld, row(i), M - jb);
      }
      stream_fence();
      return;
    }
    const T* hb = ct.hb.data() + q * M;
    T ha[ROWS];
    sqnorms(xq + i0 * D, i1 - i0, D, half, ha);
    for (i64 j0 = jb; j0 < M; j0 += COLS) {
      const i64 W = std::min<i64>(COLS, M - j0);
      gemm(false, true, i1 - i0, W, D, T(P == 2 ? 1 : 2), xq + i0 * D, D, y + (q * M + j0) * D, D, T(0),
           G.data(), W);
      if (pk)  // C(x_i, x_i) exactly (as softmin_online_two's tiles)
        for (i64 i = std::max(i0, j0); i < std::min(i1, j0 + W); ++i)
          G[size_t((i - i0) * W + (i - j0))] = ha[i - i0] + hb[i];
      for (i64 i = i0; i < i1; ++i) {
        CostRow<T, P, GemmRow<T>, false> ld{GemmRow<T>{G.data() + (i - i0) * W, hb + j0, ha[i - i0]}};
        store_row(ld, row(i) + (j0 - jb), W);
      }
    }
    stream_fence();
  });
}

template <typename T, typename S>
void cost_matrix(const T* x, const T* y, S* C, i64 B, i64 N, i64 M, i64 D, int p, T sinv, int nt) {
  if (p == 1) cost_matrix_p<T, S, 1>(x, y, C, B, N, M, D, sinv, nullptr, nt);
  else cost_matrix_p<T, S, 2>(x, y, C, B, N, M, D, sinv, nullptr, nt);
}

i64 packed_numel(i64 N) { return Packed(N).numel(); }

template <typename T, typename S>
void cost_packed(const T* x, S* C, i64 B, i64 N, i64 D, int p, T sinv, int nt) {
  const Packed pk(N);
  if (p == 1) cost_matrix_p<T, S, 1>(x, x, C, B, N, N, D, sinv, &pk, nt);
  else cost_matrix_p<T, S, 2>(x, x, C, B, N, N, D, sinv, &pk, nt);
}

// ----------------------------------------------------------------------------- cached
template <typename T, typename S>
static void softmin_rows_cached(const S* C, T cscale, const T* h, T* out, i64 B, i64 N, i64 M, double eps,
                                int nt) {
  const T inv = T(1.0 / eps);
  const i64 R = rows_per_task(B, N, nt, 32), nblk = ceil_div(N, R);
  parallel_tasks(B * nblk, nt, [] { return 0; }, [&](i64 task, int&) {
    const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R);
    const T* hq = h + q * M;
    for (i64 i = i0; i < i1; ++i) {
      RowLse<T> st;
      lse_update(CachedRow<T, S, true>{C + (q * N + i) * M, cscale}, M, hq, inv, st);
      out[q * N + i] = lse_out(st);
    }
  });
}

// Column reduction: lse_j = log Σ_i exp(h_i − C_ij/ε) for the columns j of C (B,N,M); h (B,N),
// out (B,M).  Threads own column ranges; for each block of R rows and each column vector the
// R values t_i = h_i − C_ij/ε stay in registers: one max over them, one rescale of the
// running sum, then R exps — one exp per element, C read once, no scratch.
// Column update of RB tile rows (loaders ld[r], row terms hc[r]) over w columns.
template <int RB, typename T, typename L>
inline void cols_tile(const L* ld, const T* hc, i64 w, T inv, T* mm, T* ss) {
  constexpr int n = VT<T>::N;
  const vec<T> ie = vset(-inv), ninf = vset(neg_inf<T>());
  for (i64 j = 0; j < w; j += n) {
    const int lanes = int(std::min<i64>(n, w - j));
    vec<T> t[RB];
    vec<T> mx = ninf;
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      t[r] = vfma(lanes == n ? ld[r].at(j) : ld[r].tail(j, lanes), ie, vset(hc[r]));
      mx = vmax(mx, t[r]);
    }
    vec<T> mo = lanes == n ? vload(mm + j) : vload_part(mm + j, lanes, neg_inf<T>());
    vec<T> so = lanes == n ? vload(ss + j) : vload_part(ss + j, lanes, T(0));
    const vec<T> mn = vmax(mo, mx);
    // so = 0 where mo = −inf, so the clamped exp(−inf) is harmless; lanes with mn = −inf
    // (every h = −inf so far) must not add exp(−inf − (−inf)) = exp(nan)
    // exp(0) must be exactly 1 where the max holds: the float polynomial gives 1 + 2^-23, a
    // drift of one ulp per row block that reached 2e-6 in a 37-row column sum (issue 23)
    so *= select(mo == mn, vset(T(1)), vexp_le0(select(mo > ninf, mo - mn, ninf)));
    vec<T> acc = vset(T(0));
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) acc += vexp_le0(t[r] - mn);
    so += select(mn > ninf, acc, vset(T(0)));
    if (lanes == n) {
      vstore(mm + j, mn);
      vstore(ss + j, so);
    } else {
      vstore_part(mm + j, mn, lanes);
      vstore_part(ss + j, so, lanes);
    }
  }
}

template <int R, typename T, typename S>
inline void cols_block(const S* Cq, i64 M, i64 r0, i64 c0, i64 w, const T* hq, T inv, T cscale, T* mm, T* ss) {
  CachedRow<T, S> ld[R];
  for (int r = 0; r < R; ++r) ld[r] = CachedRow<T, S>{Cq + (r0 + r) * M + c0, cscale};
  cols_tile<R>(ld, hq + r0, w, inv, mm, ss);
}

template <typename T, typename S>
static void softmin_cols_cached(const S* C, T cscale, const T* h, T* out, i64 B, i64 N, i64 M, double eps,
                                int nt) {
  constexpr int n = VT<T>::N;
  constexpr int R = 16;
  const T inv = T(1.0 / eps);
  // column ranges: ≥ 4 per thread when there is enough work
  i64 width = std::max<i64>(n, ceil_div(ceil_div(B * M, 4 * i64(num_threads_or(nt))), n) * n);
  width = std::min<i64>(width, ceil_div(M, n) * n);
  const i64 nrng = ceil_div(M, width);
  struct Ctx {
    std::vector<T> m, s;
  };
  parallel_tasks(B * nrng, nt, [&] { return Ctx{std::vector<T>(size_t(width)), std::vector<T>(size_t(width))}; },
                 [&](i64 task, Ctx& c) {
    const i64 q = task / nrng, c0 = (task % nrng) * width, c1 = std::min(M, c0 + width);
    const i64 w = c1 - c0;
    const S* Cq = C + q * N * M;
    const T* hq = h + q * N;
    std::fill(c.m.begin(), c.m.begin() + w, neg_inf<T>());
    std::fill(c.s.begin(), c.s.begin() + w, T(0));
    i64 r0 = 0;
    for (; r0 + R <= N; r0 += R) cols_block<R>(Cq, M, r0, c0, w, hq, inv, cscale, c.m.data(), c.s.data());
    for (; r0 < N; ++r0) cols_block<1>(Cq, M, r0, c0, w, hq, inv, cscale, c.m.data(), c.s.data());
    for (i64 j = 0; j < w; ++j) out[q * M + c0 + j] = lse_out(c.m[j], c.s[j]);
  });
}

template <typename T, typename S>
void softmin_cached(const S* C, T cscale, bool transpose, const T* h, T* out, i64 B, i64 N, i64 M, double eps,
                    int nt) {
  if (transpose) softmin_cols_cached<T, S>(C, cscale, h, out, B, N, M, eps, nt);
  else softmin_rows_cached<T, S>(C, cscale, h, out, B, N, M, eps, nt);
}

// ----------------------------------------------------------------------------- online
// Over segments (a dense batch is the uniform case): tasks of R rows of one segment, its
// columns in tiles of COLS; y's column terms (norms, or the transpose for D ≤ 8) once for
// all segments.
template <typename T, int P>
static void softmin_online_p(const T* x, const T* y, const T* h, T* out, const Segs& sg, i64 D, int nt) {
  const bool direct = D <= DIRECT_MAX_D;
  const T half = P == 2 ? T(0.5) : T(1);
  const i64 Ny = sg.yo.back();
  ColumnTerms<T> ct(y, 1, Ny, D, direct, !direct, half);
  const SegTasks tk(sg, rows_per_task(1, sg.xo.back(), nt, ROWS));
  struct Ctx {
    std::vector<T> G;
  };
  parallel_tasks(tk.count(), nt, [&] { return Ctx{std::vector<T>(direct ? 0 : size_t(tk.R * COLS))}; },
                 [&](i64 task, Ctx& c) {
    i64 q, i0, i1;
    tk.locate(sg, task, q, i0, i1);
    const i64 M = sg.m(q), y0 = sg.yo[size_t(q)];
    const T inv = T(1.0 / sg.eps[size_t(q)]);
    const T* xq = x + sg.xo[size_t(q)] * D;
    const T* hq = h + q * sg.mmax;
    RowLse<T> st[ROWS];
    if (direct) {
      const T* bT = ct.bT.data() + y0;
      for (i64 i = i0; i < i1; ++i) {
        for (i64 j0 = 0; j0 < M; j0 += COLS) {
          const i64 W = std::min<i64>(COLS, M - j0);
          CostRow<T, P, DirectRow<T>, true> ld{DirectRow<T>(xq + i * D, bT + j0, Ny, int(D))};
          lse_update(ld, W, hq + j0, inv, st[i - i0]);
        }
      }
    } else {
      const T* hb = ct.hb.data() + y0;
      T ha[ROWS];
      sqnorms(xq + i0 * D, i1 - i0, D, half, ha);
      for (i64 j0 = 0; j0 < M; j0 += COLS) {
        const i64 W = std::min<i64>(COLS, M - j0);
        gemm(false, true, i1 - i0, W, D, T(P == 2 ? 1 : 2), xq + i0 * D, D, y + (y0 + j0) * D, D, T(0),
             c.G.data(), W);
        for (i64 i = i0; i < i1; ++i) {
          CostRow<T, P, GemmRow<T>, false> ld{GemmRow<T>{c.G.data() + (i - i0) * W, hb + j0, ha[i - i0]}};
          lse_update(ld, W, hq + j0, inv, st[i - i0]);
        }
      }
    }
    for (i64 i = i0; i < i1; ++i) out[q * sg.nmax + i] = lse_out(st[i - i0]);
  });
}

template <typename T>
void softmin_online(const T* x, const T* y, const T* h, T* out, const Segs& sg, i64 D, int p, int nt) {
  if (p == 1) softmin_online_p<T, 1>(x, y, h, out, sg, D, nt);
  else softmin_online_p<T, 2>(x, y, h, out, sg, D, nt);
}

// ----------------------------------------------------------------------------- online, two ways
// One GEMM tile of C(x, y) feeds both reductions of a Sinkhorn iteration (they use the same
// old potentials): the rows, out_r (B,N) = log Σ_j exp(hr_j − C_ij/ε), and the columns,
// out_c (B,M) = log Σ_i exp(hc_i − C_ij/ε) — half the GEMM work of two passes.  sym (y = x,
// hc = hr, out_c unused): only the tiles on and above the diagonal are computed; a tile
// right of the diagonal block gives its rows' sums and, through its columns, the sums of the
// rows it mirrors.  Column states are kept per thread (B·M running max / sum each) and merged
// at the end with the row results.  GEMM tiles only (D > DIRECT_MAX_D).

// log(exp(a) + Σ_t s_t exp(m_t)) over the per-thread states (m, s) at offset k (stride len).
template <typename T>
inline T merge_lse(T a, const std::vector<T>& m, const std::vector<T>& s, size_t k, size_t len, int threads) {
  double top = double(a);
  for (int t = 0; t < threads; ++t)
    if (s[t * len + k] > T(0)) top = std::max(top, double(m[t * len + k]));
  if (!(top > -std::numeric_limits<double>::infinity())) return neg_inf<T>();
  double sum = a > neg_inf<T>() ? std::exp(double(a) - top) : 0.0;
  for (int t = 0; t < threads; ++t)
    if (s[t * len + k] > T(0)) sum += double(s[t * len + k]) * std::exp(double(m[t * len + k]) - top);
  return T(top + std::log(sum));
}

template <typename T, int P>
static void softmin_online_two_p(const T* x, const T* y, const T* hr, const T* hc, T* out_r, T* out_c, i64 B,
                                 i64 N, i64 M, i64 D, double eps, bool sym, int nt) {
  const T half = P == 2 ? T(0.5) : T(1);
  const T inv = T(1.0 / eps);
  ColumnTerms<T> ct(y, B, M, D, false, true, half);
  const i64 R = rows_per_task(B, N, nt, ROWS), nblk = ceil_div(N, R), ntask = B * nblk;
  const int threads = int(std::max<i64>(1, std::min<i64>(num_threads_or(nt), ntask)));
  const size_t len = size_t(B * M);
  std::vector<T> cm(size_t(threads) * len, neg_inf<T>()), cs(size_t(threads) * len, T(0));
  typedef CostRow<T, P, GemmRow<T>, false> Ld;
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals fd;
    BlasOneThread bo;
    const int tid = omp_get_thread_num();
    T* mt = cm.data() + size_t(tid) * len;
    T* st_ = cs.data() + size_t(tid) * len;
    std::vector<T> G(size_t(R * COLS));
#pragma omp for schedule(static, 1)  // fixed task -> thread map: the per-thread column sums, so the result, do not depend on timing
    for (i64 task = 0; task < ntask; ++task) {
      const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R);
      const T* xq = x + q * N * D;
      const T* yq = y + q * M * D;
      const T* hrq = hr + q * M;
      const T* hcq = hc + q * N;
      const T* hb = ct.hb.data() + q * M;
      RowLse<T> st[ROWS];
      T ha[ROWS];
      sqnorms(xq + i0 * D, i1 - i0, D, half, ha);
      for (i64 j0 = sym ? i0 : 0; j0 < M; j0 += COLS) {
        const i64 W = std::min<i64>(COLS, M - j0);
        gemm(false, true, i1 - i0, W, D, T(P == 2 ? 1 : 2), xq + i0 * D, D, yq + j0 * D, D, T(0), G.data(), W);
        if (sym)  // C(x_i, x_i) exactly: |x|² + |x|² − 2⟨x, x⟩ from a GEMM leaves ~ulp·|x|² (√ of it for p=1)
          for (i64 i = std::max(i0, j0); i < std::min(i1, j0 + W); ++i)
            G[size_t((i - i0) * W + (i - j0))] = ha[i - i0] + hb[i];
        for (i64 i = i0; i < i1; ++i) {
          Ld ld{GemmRow<T>{G.data() + (i - i0) * W, hb + j0, ha[i - i0]}};
          lse_update(ld, W, hrq + j0, inv, st[i - i0]);
        }
        const i64 c0 = sym ? std::max<i64>(0, i1 - j0) : 0;  // sym: the diagonal block is rows only
        if (c0 >= W) continue;
        T* mq = mt + q * M + j0 + c0;
        T* sq = st_ + q * M + j0 + c0;
        i64 r = i0;
        for (; r + 16 <= i1; r += 16) {
          Ld lds[16];
          for (int k = 0; k < 16; ++k)
            lds[k] = Ld{GemmRow<T>{G.data() + (r + k - i0) * W + c0, hb + j0 + c0, ha[r + k - i0]}};
          cols_tile<16>(lds, hcq + r, W - c0, inv, mq, sq);
        }
        for (; r < i1; ++r) {
          Ld l1{GemmRow<T>{G.data() + (r - i0) * W + c0, hb + j0 + c0, ha[r - i0]}};
          cols_tile<1>(&l1, hcq + r, W - c0, inv, mq, sq);
        }
      }
      for (i64 i = i0; i < i1; ++i) out_r[q * N + i] = lse_out(st[i - i0]);
    }
  }
  if (sym) {
    for (i64 k = 0; k < B * N; ++k) out_r[k] = merge_lse(out_r[k], cm, cs, size_t(k), len, threads);
  } else {
    for (i64 k = 0; k < B * M; ++k) out_c[k] = merge_lse(neg_inf<T>(), cm, cs, size_t(k), len, threads);
  }
}

template <typename T>
void softmin_online_two(const T* x, const T* y, const T* hr, const T* hc, T* out_r, T* out_c, i64 B, i64 N,
                        i64 M, i64 D, int p, double eps, bool sym, int nt) {
  if (p == 1) softmin_online_two_p<T, 1>(x, y, hr, hc, out_r, out_c, B, N, M, D, eps, sym, nt);
  else softmin_online_two_p<T, 2>(x, y, hr, hc, out_r, out_c, B, N, M, D, eps, sym, nt);
}

// ----------------------------------------------------------------------------- cached, two ways
// Both reductions of a Sinkhorn iteration from one read of a cached C (B,N,M): out_r (B,N) =
// log Σ_j exp(hr_j − C_ij/ε) and out_c (B,M) = log Σ_i exp(hc_i − C_ij/ε).  A task owns a
// block of rows; it walks the block's row segments in chunks of CW columns: each row's running
// log-sum-exp takes the chunk from memory, then the chunk (now in L2) updates the thread's
// column states.  sym (C = C(x, x), hc = hr, out_c unused): only the chunks on and right of
// the diagonal block are read — half the bytes — and the mirrored half reaches the rows
// through the column states, merged at the end (as softmin_online_two).  pk: C is the packed
// triangle (tasks are its row blocks, whose rows start at the block's first column).
template <typename T, typename S>
static void cached_two(const S* C, T cscale, const T* hr, const T* hc, T* out_r, T* out_c, i64 B, i64 N, i64 M,
                       double eps, bool sym, const Packed* pk, int nt) {
  constexpr int CW = 1024;
  const T inv = T(1.0 / eps);
  const i64 R = pk ? pk->PB : rows_per_task(B, N, nt, 64), nblk = ceil_div(N, R), ntask = B * nblk;
  const i64 per = pk ? pk->numel() : N * M;
  const int threads = int(std::max<i64>(1, std::min<i64>(num_threads_or(nt), ntask)));
  const size_t len = size_t(B * M);
  std::vector<T> cm(size_t(threads) * len, neg_inf<T>()), cs(size_t(threads) * len, T(0));
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals fd;
    const int tid = omp_get_thread_num();
    T* mt = cm.data() + size_t(tid) * len;
    T* st_ = cs.data() + size_t(tid) * len;
    std::vector<RowLse<T>> st(static_cast<size_t>(R));
#pragma omp for schedule(static, 1)  // fixed task -> thread map: the per-thread column sums, so the result, do not depend on timing
    for (i64 task = 0; task < ntask; ++task) {
      const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R);
      // row i, column j at Cb + (i − i0)·ld + (j − jb)
      const i64 jb = pk ? i0 : 0, ld = pk ? N - i0 : M;
      const S* Cb = C + q * per + (pk ? pk->at(i0, i0) : i0 * M);
      const T* hrq = hr + q * M;
      const T* hcq = hc + q * N;
      for (i64 i = i0; i < i1; ++i) st[size_t(i - i0)] = RowLse<T>();
      for (i64 j0 = sym ? i0 : 0; j0 < M; j0 += CW) {
        const i64 W = std::min<i64>(CW, M - j0);
        for (i64 i = i0; i < i1; ++i)
          lse_update(CachedRow<T, S, true>{Cb + (i - i0) * ld + (j0 - jb), cscale}, W, hrq + j0, inv,
                     st[size_t(i - i0)]);
        const i64 c0 = sym ? std::max<i64>(0, i1 - j0) : 0;  // sym: the diagonal block is rows only
        if (c0 >= W) continue;
        T* mq = mt + q * M + j0 + c0;
        T* sq = st_ + q * M + j0 + c0;
        const i64 cb = j0 + c0 - jb;
        i64 r = i0;
        for (; r + 16 <= i1; r += 16) cols_block<16>(Cb, ld, r - i0, cb, W - c0, hcq + i0, inv, cscale, mq, sq);
        for (; r < i1; ++r) cols_block<1>(Cb, ld, r - i0, cb, W - c0, hcq + i0, inv, cscale, mq, sq);
      }
      for (i64 i = i0; i < i1; ++i) out_r[q * N + i] = lse_out(st[size_t(i - i0)]);
    }
  }
  if (sym) {
    for (i64 k = 0; k < B * N; ++k) out_r[k] = merge_lse(out_r[k], cm, cs, size_t(k), len, threads);
  } else {
    for (i64 k = 0; k < B * M; ++k) out_c[k] = merge_lse(neg_inf<T>(), cm, cs, size_t(k), len, threads);
  }
}

// ----------------------------------------------------------------------------- cached, plan form
// Both reductions of an iteration with one exp per entry (issue 23).  At Sinkhorn's iterates
// P_ij = exp(hc_i + hr_j − C_ij/ε) is the current transport plan (hc = log a + f/ε, hr = log b
// + g/ε), so its row sums R_i and column sums S_j give out_r_i = log R_i − hc_i and out_c_j =
// log S_j − hr_j: no running maxima, and one exp serves both directions, where the
// log-sum-exp passes above take one per entry and direction (the triangle of a symmetric C
// the same: an entry adds to its row and, mirrored, to its column's row).  No maximum is
// subtracted, so a sum of n terms is kept only when it lies in [n·lo, hi] (PlanRange): no term
// reached exp's upper clamp (e^88, double e^709), and the terms its lower clamp may have
// raised (to e^−86 ≈ 2^−124, double e^−700) weigh < 2^−28 (double 2^−110·n) of the sum, below
// the dtype's rounding.  Rows and columns outside (zero weights, log a = −1e5; potentials far
// from a plan, e.g. after the last ε-steps of the annealing) are recomputed by the log-sum-exp
// passes.
template <typename T> struct PlanRange;
template <> struct PlanRange<float> { static constexpr double lo = 0x1p-96, hi = 0x1p100; };
template <> struct PlanRange<double> { static constexpr double lo = 0x1p-900, hi = 0x1p900; };
// What the plan form did since the last plan_counts(true): passes, rows and columns it handed
// to the log-sum-exp passes, column recomputations that read the whole cache.
static std::atomic<i64> plan_n[4];
void plan_counts(i64* out, bool reset) {
  for (int k = 0; k < 4; ++k) out[k] = reset ? plan_n[k].exchange(0) : plan_n[k].load();
}

template <typename T> inline bool plan_kept(double s, i64 terms) {
  return s >= double(std::is_same<T, float>::value ? terms : 1) * PlanRange<T>::lo && s <= PlanRange<T>::hi;
}

// RB rows (loaders ld[r], row terms hc[r]) × w columns (column terms hr): ra[r] += P_rj
// (vectors, reduced once per row), with Cols cs[j] += Σ_r P_rj.
template <int RB, bool Cols, typename T, typename L>
inline void plan_tile(const L* ld, const T* hc, const T* hr, i64 w, T inv, vec<T>* ra, T* cs) {
  constexpr int n = VT<T>::N;
  const vec<T> ie = vset(-inv);
  vec<T> rs[RB], hv[RB];
  for (int r = 0; r < RB; ++r) rs[r] = ra[r], hv[r] = vset(hc[r]);
  i64 j = 0;
  for (; j + n <= w; j += n) {
    const vec<T> cv = vload(hr + j);
    vec<T> ca = vset(T(0));
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      const vec<T> e = vexp(vfma(ld[r].at(j), ie, cv) + hv[r]);
      rs[r] += e;
      if (Cols) ca += e;
    }
    if (Cols) vstore(cs + j, vload(cs + j) + ca);
  }
  if (j < w) {
    const int lanes = int(w - j);
    const auto keep = lanes_below<T>(lanes);
    const vec<T> cv = vload_part(hr + j, lanes, T(0));
    vec<T> ca = vset(T(0));
    for (int r = 0; r < RB; ++r) {
      const vec<T> e = select(keep, vexp(vfma(ld[r].tail(j, lanes), ie, cv) + hv[r]), vset(T(0)));
      rs[r] += e;
      if (Cols) ca += e;
    }
    if (Cols) vstore_part(cs + j, vload_part(cs + j, lanes, T(0)) + ca, lanes);
  }
  for (int r = 0; r < RB; ++r) ra[r] = rs[r];
}

template <int RB, typename T, typename S>
inline void plan_block(const S* Cb, i64 ld, i64 r0, i64 cb, i64 c0, i64 W, const T* hc, const T* hr, T inv,
                       T cscale, vec<T>* ra, T* cs) {
  CachedRow<T, S> l[RB];
  for (int r = 0; r < RB; ++r) l[r] = CachedRow<T, S>{Cb + (r0 + r) * ld + cb, cscale};
  if (c0 > 0) plan_tile<RB, false>(l, hc, hr, std::min(c0, W), inv, ra, cs);
  if (c0 >= W) return;
  for (int r = 0; r < RB; ++r) l[r].p += c0;
  plan_tile<RB, true>(l, hc, hr + c0, W - c0, inv, ra, cs + c0);
}

// Row entries at the columns idx[0, …) (the log-sum-exp recomputation of a few columns).
template <typename T, typename S> struct PickRow {
  const S* p;
  const i64* idx;
  T scale;
  vec<T> tail(i64 j, int rem) const {
    constexpr int n = VT<T>::N;
    S v[n];
    for (int l = 0; l < n; ++l) v[l] = p[idx[j + std::min(l, rem - 1)]];
    return CachedRow<T, S>{v, scale}.at(0);
  }
  vec<T> at(i64 j) const { return tail(j, VT<T>::N); }
};

// Log-sum-exp recomputation of the rows (rows) and columns (cols, not sym) that the plan form
// did not keep.  Up to M/32 columns are gathered (≈ a cache line each per row), more take
// the whole column pass.
template <typename T, typename S>
static void plan_redo(const S* C, T cscale, const T* hr, const T* hc, T* out_r, T* out_c, i64 N, i64 M, i64 q,
                      double eps, bool sym, const Packed* pk, const std::vector<i64>& rows,
                      const std::vector<i64>& cols, int nt) {
  const T inv = T(1.0 / eps);
  const i64 per = pk ? pk->numel() : N * M;
  const S* Cq = C + q * per;
  const T* hrq = hr + q * M;
  parallel_tasks(i64(rows.size()), nt, [] { return 0; }, [&](i64 k, int&) {
    const i64 i = rows[size_t(k)];
    RowLse<T> st;
    if (pk) lse_update(PackedRow<T, S>(Cq, pk, i, 0, cscale), M, hrq, inv, st);
    else lse_update(CachedRow<T, S, true>{Cq + i * M, cscale}, M, hrq, inv, st);
    out_r[q * N + i] = lse_out(st);
  });
  if (cols.empty()) return;
  if (i64(cols.size()) * 32 > M) {
    ++plan_n[3];
    std::vector<T> all(static_cast<size_t>(M));
    softmin_cols_cached<T, S>(Cq, cscale, hc + q * N, all.data(), 1, N, M, eps, nt);
    for (i64 j : cols) out_c[q * M + j] = all[size_t(j)];
    return;
  }
  const i64 w = i64(cols.size());
  std::vector<T> mm(size_t(w), neg_inf<T>()), ss(size_t(w), T(0));
  const T* hcq = hc + q * N;
  for (i64 i = 0; i < N; ++i) {
    PickRow<T, S> l{Cq + i * M, cols.data(), cscale};
    cols_tile<1>(&l, hcq + i, w, inv, mm.data(), ss.data());
  }
  for (i64 k = 0; k < w; ++k) out_c[q * M + cols[size_t(k)]] = lse_out(mm[size_t(k)], ss[size_t(k)]);
}

// Returns the rows and columns it recomputed.
template <typename T, typename S>
static i64 plan_two(const S* C, T cscale, const T* hr, const T* hc, T* out_r, T* out_c, i64 B, i64 N, i64 M,
                    double eps, bool sym, const Packed* pk, int nt) {
  // 16 rows at a time over 8,192-column chunks (16 streams of 32 KB): 27 GB/s at 10k on the
  // 2-core Sapphire Rapids VM, its read rate; 1,024-column chunks read at 21 GB/s, 512 at 17
  constexpr int CW = 8192, RB = 16;
  const T inv = T(1.0 / eps);
  const i64 R = pk ? pk->PB : rows_per_task(B, N, nt, 64), nblk = ceil_div(N, R), ntask = B * nblk;
  const i64 per = pk ? pk->numel() : N * M;
  const int threads = int(std::max<i64>(1, std::min<i64>(num_threads_or(nt), ntask)));
  const size_t len = size_t(B * M);
  std::vector<T> cs(size_t(threads) * len, T(0));
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals fd;
    T* ct = cs.data() + size_t(omp_get_thread_num()) * len;
    std::vector<vec<T>> ra(static_cast<size_t>(R));
#pragma omp for schedule(static, 1)  // fixed task -> thread map: the per-thread column sums, so the result, do not depend on timing
    for (i64 task = 0; task < ntask; ++task) {
      const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R);
      const i64 jb = pk ? i0 : 0, ld = pk ? N - i0 : M;  // row i, column j at Cb + (i − i0)·ld + (j − jb)
      const S* Cb = C + q * per + (pk ? pk->at(i0, i0) : i0 * M);
      const T* hrq = hr + q * M;
      const T* hcq = hc + q * N;
      std::fill(ra.begin(), ra.begin() + (i1 - i0), vset(T(0)));
      for (i64 j0 = sym ? i0 : 0; j0 < M; j0 += CW) {
        const i64 W = std::min<i64>(CW, M - j0);
        const i64 c0 = sym ? std::max<i64>(0, std::min(W, i1 - j0)) : 0;  // sym: the diagonal block is rows only
        T* cq = ct + q * M + j0;
        i64 r = i0;
        for (; r + RB <= i1; r += RB)
          plan_block<RB>(Cb, ld, r - i0, j0 - jb, c0, W, hcq + r, hrq + j0, inv, cscale, ra.data() + (r - i0), cq);
        for (; r < i1; ++r)
          plan_block<1>(Cb, ld, r - i0, j0 - jb, c0, W, hcq + r, hrq + j0, inv, cscale, ra.data() + (r - i0), cq);
      }
      for (i64 i = i0; i < i1; ++i) out_r[q * N + i] = hsum(ra[size_t(i - i0)]);
    }
  }
  i64 redone = 0;
  for (i64 q = 0; q < B; ++q) {
    std::vector<i64> rows, cols;
    for (i64 i = 0; i < N; ++i) {
      double s = double(out_r[q * N + i]);
      if (sym)
        for (int t = 0; t < threads; ++t) s += double(cs[size_t(t) * len + size_t(q * M + i)]);
      if (plan_kept<T>(s, M)) out_r[q * N + i] = T(std::log(s) - double(hc[q * N + i]));
      else rows.push_back(i);
    }
    if (!sym)
      for (i64 j = 0; j < M; ++j) {
        double s = 0;
        for (int t = 0; t < threads; ++t) s += double(cs[size_t(t) * len + size_t(q * M + j)]);
        if (plan_kept<T>(s, N)) out_c[q * M + j] = T(std::log(s) - double(hr[q * M + j]));
        else cols.push_back(j);
      }
    ++plan_n[0], plan_n[1] += i64(rows.size()), plan_n[2] += i64(cols.size());
    redone += i64(rows.size() + cols.size());
    if (!rows.empty() || !cols.empty())
      plan_redo<T, S>(C, cscale, hr, hc, out_r, out_c, N, M, q, eps, sym, pk, rows, cols, nt);
  }
  return redone;
}

template <typename T, typename S>
i64 softmin_cached_two(const S* C, T cscale, const T* hr, const T* hc, T* out_r, T* out_c, i64 B, i64 N, i64 M,
                       double eps, bool sym, bool plan, int nt) {
  if (plan) return plan_two<T, S>(C, cscale, hr, hc, out_r, out_c, B, N, M, eps, sym, nullptr, nt);
  cached_two<T, S>(C, cscale, hr, hc, out_r, out_c, B, N, M, eps, sym, nullptr, nt);
  return 0;
}

template <typename T, typename S>
i64 softmin_packed(const S* C, T cscale, const T* h, T* out, i64 B, i64 N, double eps, bool plan, int nt) {
  const Packed pk(N);
  if (plan) return plan_two<T, S>(C, cscale, h, h, out, nullptr, B, N, N, eps, true, &pk, nt);
  cached_two<T, S>(C, cscale, h, h, out, nullptr, B, N, N, eps, true, &pk, nt);
  return 0;
}

// ----------------------------------------------------------------------------- instances
#define OTK_SOFTMIN_CACHED(T, S)                                                                        \
  template void cost_matrix<T, S>(const T*, const T*, S*, i64, i64, i64, i64, int, T, int);            \
  template void softmin_cached<T, S>(const S*, T, bool, const T*, T*, i64, i64, i64, double, int);            \
  template i64 softmin_cached_two<T, S>(const S*, T, const T*, const T*, T*, T*, i64, i64, i64, double, bool, bool, int); \
  template void cost_packed<T, S>(const T*, S*, i64, i64, i64, int, T, int);                            \
  template i64 softmin_packed<T, S>(const S*, T, const T*, T*, i64, i64, double, bool, int);
OTK_SOFTMIN_CACHED(float, float)
OTK_SOFTMIN_CACHED(float, bf16_t)
OTK_SOFTMIN_CACHED(float, f16_t)
OTK_SOFTMIN_CACHED(double, double)
template void softmin_online<float>(const float*, const float*, const float*, float*, const Segs&, i64, int, int);
template void softmin_online<double>(const double*, const double*, const double*, double*, const Segs&, i64, int,
                                     int);

template void softmin_online_two<float>(const float*, const float*, const float*, const float*, float*, float*,
                                        i64, i64, i64, i64, int, double, bool, int);
template void softmin_online_two<double>(const double*, const double*, const double*, const double*, double*,
                                         double*, i64, i64, i64, i64, int, double, bool, int);

}  // namespace otk
