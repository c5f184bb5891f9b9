// Cost matrices and the Sinkhorn "softmin" reductions, f_i = −ε log Σ_j exp(h_j − C_ij/ε),
// returned as the log-sum-exp lse_i = log Σ_j exp(h_j − C_ij/ε) (f = −ε·lse):
//
// * over the rows of a cached C: one streaming pass per row, in chunks that stay in L1
//   (chunk max, then Σ exp relative to the running max: one exp per element);
// * over the columns of a cached C (the transposed problem, no transpose copy): threads own
//   column ranges, walk blocks of rows and keep a running max / sum per column;
// * with C computed on the fly: GEMM tiles (D > 8) or direct distances (D ≤ 8), reduced
//   while in cache.
#include "tiles.h"

namespace otk {

// Updates the running (m, s) of one row with the tile columns [0, W):
// m = max_j t_j, s = Σ_j exp(t_j − m), t_j = h_j − c_j/ε.  scratch: W values.
template <typename T, typename L>
inline void lse_update(const L& ld, i64 W, const T* h, T inv_eps, T& m, T& s, T* scratch) {
  constexpr int n = VT<T>::N;
  const vec<T> ie = vset(-inv_eps);
  vec<T> mx0 = vset(neg_inf<T>()), mx1 = mx0;
  i64 j = 0;
  for (; j + 2 * n <= W; j += 2 * n) {
    vec<T> t0 = vfma(ld.at(j), ie, vload(h + j));
    vec<T> t1 = vfma(ld.at(j + n), ie, vload(h + j + n));
    vstore(scratch + j, t0);
    vstore(scratch + j + n, t1);
    mx0 = vmax(mx0, t0);
    mx1 = vmax(mx1, t1);
  }
  for (; j + n <= W; j += n) {
    vec<T> t0 = vfma(ld.at(j), ie, vload(h + j));
    vstore(scratch + j, t0);
    mx0 = vmax(mx0, t0);
  }
  const int rem = int(W - j);
  veci<T> mask = lanes_below<T>(rem);
  if (rem) {
    vec<T> t0 = vfma(ld.tail(j, rem), ie, vload_part(h + j, rem, T(0)));
    t0 = select(mask, t0, vset(neg_inf<T>()));
    vstore(scratch + j, t0);
    mx0 = vmax(mx0, t0);
  }
  const T cm = hmax(vmax(mx0, mx1));
  if (!(cm > neg_inf<T>())) return;
  if (cm > m) {
    s = (m > neg_inf<T>()) ? s * sexp(m - cm) : T(0);
    m = cm;
  }
  const vec<T> mv = vset(m);
  vec<T> a0 = vset(T(0)), a1 = a0;
  i64 k = 0;
  for (; k + 2 * n <= j; k += 2 * n) {
    a0 += vexp(vload(scratch + k) - mv);
    a1 += vexp(vload(scratch + k + n) - mv);
  }
  for (; k < j; k += n) a0 += vexp(vload(scratch + k) - mv);
  if (rem) a1 += select(mask, vexp(vload(scratch + j) - mv), vset(T(0)));
  s += hsum(a0 + a1);
}

// The kernels return the log-sum-exp m + log s; the caller scales it by −ε.  Keeping it
// unscaled lets the gradient pass reuse it exactly: t_ij − lse_i ≤ 0 with the same rounding
// as the forward pass, so P_ij ≤ 1 even when C/ε is far beyond float precision.
template <typename T> inline T lse_out(T m, T s) { return T(double(m) + std::log(double(s))); }

// ----------------------------------------------------------------------------- cost matrix
template <typename T, typename S, int P>
static void cost_matrix_p(const T* x, const T* y, S* C, i64 B, i64 N, i64 M, i64 D, T sinv, int nt) {
  const bool direct = D <= DIRECT_MAX_D;
  const T half = P == 2 ? T(0.5) : T(1);
  ColumnTerms<T> ct(y, B, M, D, direct, !direct, half);
  const i64 R = rows_per_task(B, N, nt, ROWS), nblk = ceil_div(N, R);
  constexpr bool scale_it = std::is_same<S, f16_t>::value;
  constexpr int n = VT<T>::N;
  auto store_row = [&](auto& ld, S* out) {
    i64 j = 0;
    for (; j + n <= M; j += n) {
      vec<T> v = ld.at(j);
      if constexpr (scale_it) v *= sinv;
      sstore(out + j, v);
    }
    if (j < M) {
      vec<T> v = ld.tail(j, int(M - j));
      if constexpr (scale_it) v *= sinv;
      sstore_part<T>(out + j, v, int(M - j));
    }
  };
  parallel_tasks(B * nblk, nt, [&] { return std::vector<T>(direct ? 0 : size_t(R * COLS)); },
                 [&](i64 task, std::vector<T>& G) {
    const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R);
    const T* xq = x + q * N * D;
    S* Cq = C + q * N * M;
    if (direct) {
      const T* bT = ct.bT.data() + q * M * D;
      for (i64 i = i0; i < i1; ++i) {
        CostRow<T, P, DirectRow<T>, true> ld{DirectRow<T>(xq + i * D, bT, M, int(D))};
        store_row(ld, Cq + i * M);
      }
      return;
    }
    const T* hb = ct.hb.data() + q * M;
    T ha[ROWS];
    sqnorms(xq + i0 * D, i1 - i0, D, half, ha);
    for (i64 j0 = 0; j0 < M; j0 += COLS) {
      const i64 W = std::min<i64>(COLS, M - j0);
      gemm(false, true, i1 - i0, W, D, T(P == 2 ? 1 : 2), xq + i0 * D, D, y + (q * M + j0) * D, D, T(0),
           G.data(), W);
      for (i64 i = i0; i < i1; ++i) {
        CostRow<T, P, GemmRow<T>, false> ld{GemmRow<T>{G.data() + (i - i0) * W, hb + j0, ha[i - i0]}};
        // store W columns of row i
        S* out = Cq + i * M + j0;
        i64 j = 0;
        for (; j + n <= W; j += n) {
          vec<T> v = ld.at(j);
          if constexpr (scale_it) v *= sinv;
          sstore(out + j, v);
        }
        if (j < W) {
          vec<T> v = ld.tail(j, int(W - j));
          if constexpr (scale_it) v *= sinv;
          sstore_part<T>(out + j, v, int(W - j));
        }
      }
    }
  });
}

template <typename T, typename S>
void cost_matrix(const T* x, const T* y, S* C, i64 B, i64 N, i64 M, i64 D, int p, T sinv, int nt) {
  if (p == 1) cost_matrix_p<T, S, 1>(x, y, C, B, N, M, D, sinv, nt);
  else cost_matrix_p<T, S, 2>(x, y, C, B, N, M, D, sinv, nt);
}

// ----------------------------------------------------------------------------- cached
constexpr i64 ROW_CHUNK = 2048;  // columns per L1 chunk of a cached row
constexpr i64 COL_BLOCK = 16;    // rows per block of a column reduction
constexpr i64 COL_SUB = 256;     // columns per sub-chunk of a column reduction

template <typename T, typename S>
static void softmin_rows_cached(const S* C, T cscale, const T* h, T* out, i64 B, i64 N, i64 M, double eps,
                                int nt) {
  const T inv = T(1.0 / eps);
  const i64 R = rows_per_task(B, N, nt, 32), nblk = ceil_div(N, R);
  parallel_tasks(B * nblk, nt, [&] { return std::vector<T>(size_t(ROW_CHUNK)); },
                 [&](i64 task, std::vector<T>& scratch) {
    const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R);
    const T* hq = h + q * M;
    for (i64 i = i0; i < i1; ++i) {
      const S* row = C + (q * N + i) * M;
      T m = neg_inf<T>(), s = 0;
      for (i64 j0 = 0; j0 < M; j0 += ROW_CHUNK) {
        CachedRow<T, S> ld{row + j0, cscale};
        lse_update(ld, std::min(ROW_CHUNK, M - j0), hq + j0, inv, m, s, scratch.data());
      }
      out[q * N + i] = lse_out(m, s);
    }
  });
}

// out_j = −ε log Σ_i exp(h_i − C_ij/ε) for the columns j of C (B,N,M); h (B,N), out (B,M).
template <typename T, typename S>
static void softmin_cols_cached(const S* C, T cscale, const T* h, T* out, i64 B, i64 N, i64 M, double eps,
                                int nt) {
  constexpr int n = VT<T>::N;
  const T inv = T(1.0 / eps);
  // column ranges: multiples of COL_SUB when there is enough work, ≥ 4 ranges per thread
  i64 width = std::max<i64>(n, ceil_div(ceil_div(B * M, 4 * i64(num_threads_or(nt))), n) * n);
  width = std::min<i64>(width, ceil_div(M, n) * n);
  const i64 nrng = ceil_div(M, width);
  struct Ctx {
    std::vector<T> m, s, t, cm;
  };
  parallel_tasks(B * nrng, nt,
                 [&] {
                   return Ctx{std::vector<T>(size_t(width)), std::vector<T>(size_t(width)),
                              std::vector<T>(size_t(COL_BLOCK * COL_SUB)), std::vector<T>(size_t(COL_SUB))};
                 },
                 [&](i64 task, Ctx& c) {
    const i64 q = task / nrng, c0 = (task % nrng) * width, c1 = std::min(M, c0 + width);
    const i64 w = c1 - c0;
    const S* Cq = C + q * N * M;
    const T* hq = h + q * N;
    std::fill(c.m.begin(), c.m.begin() + w, neg_inf<T>());
    std::fill(c.s.begin(), c.s.begin() + w, T(0));
    const vec<T> ie = vset(-inv);
    for (i64 r0 = 0; r0 < N; r0 += COL_BLOCK) {
      const i64 R = std::min(COL_BLOCK, N - r0);
      for (i64 s0 = 0; s0 < w; s0 += COL_SUB) {
        const i64 SW = std::min(COL_SUB, w - s0);
        const i64 full = SW / n * n;
        const int rem = int(SW - full);
        const veci<T> mask = lanes_below<T>(rem);
        T* cm = c.cm.data();
        // pass 1: t = h_i − C_ij/ε into scratch, column max
        for (i64 r = 0; r < R; ++r) {
          CachedRow<T, S> ld{Cq + (r0 + r) * M + c0 + s0, cscale};
          const vec<T> hv = vset(hq[r0 + r]);
          T* tr = c.t.data() + r * COL_SUB;
          for (i64 j = 0; j < full; j += n) {
            vec<T> t = vfma(ld.at(j), ie, hv);
            vstore(tr + j, t);
            vec<T> prev = r == 0 ? vset(neg_inf<T>()) : vload(cm + j);
            vstore(cm + j, vmax(prev, t));
          }
          if (rem) {
            vec<T> t = select(mask, vfma(ld.tail(full, rem), ie, hv), vset(neg_inf<T>()));
            vstore(tr + full, t);
            vec<T> prev = r == 0 ? vset(neg_inf<T>()) : vload(cm + full);
            vstore(cm + full, vmax(prev, t));
          }
        }
        // rescale the running sums where the max grew; pass 2: add the exps
        T* mm = c.m.data() + s0;
        T* ss = c.s.data() + s0;
        const i64 span = rem ? full + n : full;
        for (i64 j = 0; j < span; j += n) {
          const int lim = int(std::min<i64>(n, SW - j));
          vec<T> mo = vload_part(mm + j, lim, neg_inf<T>()), so = vload_part(ss + j, lim, T(0));
          vec<T> mn = vmax(mo, vload(cm + j));
          // exp(−inf − finite) → exp(lo)·0 = 0 since so = 0 where mo = −inf
          so *= vexp(select(mo > vset(neg_inf<T>()), mo - mn, vset(neg_inf<T>())));
          vec<T> acc = vset(T(0));
          for (i64 r = 0; r < R; ++r) acc += vexp(vload(c.t.data() + r * COL_SUB + j) - mn);
          // lanes whose max is −inf (h = −inf everywhere) stay at s = 0
          acc = select(mn > vset(neg_inf<T>()), acc, vset(T(0)));
          so += acc;
          if (lim == n) {
            vstore(mm + j, mn);
            vstore(ss + j, so);
          } else {
            vstore_part(mm + j, mn, lim);
            vstore_part(ss + j, so, lim);
          }
        }
      }
    }
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
template <typename T, int P>
static void softmin_online_p(const T* x, const T* y, const T* h, T* out, i64 B, i64 N, i64 M, i64 D,
                             double eps, int nt) {
  const bool direct = D <= DIRECT_MAX_D;
  const T half = P == 2 ? T(0.5) : T(1);
  const T inv = T(1.0 / eps);
  ColumnTerms<T> ct(y, B, M, D, direct, !direct, half);
  const i64 R = rows_per_task(B, N, nt, ROWS), nblk = ceil_div(N, R);
  struct Ctx {
    std::vector<T> G, t;
  };
  parallel_tasks(B * nblk, nt,
                 [&] { return Ctx{std::vector<T>(direct ? 0 : size_t(R * COLS)), std::vector<T>(size_t(COLS))}; },
                 [&](i64 task, Ctx& c) {
    const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R);
    const T* xq = x + q * N * D;
    const T* hq = h + q * M;
    T m[ROWS], s[ROWS];
    for (i64 r = 0; r < i1 - i0; ++r) { m[r] = neg_inf<T>(); s[r] = 0; }
    if (direct) {
      const T* bT = ct.bT.data() + q * M * D;
      for (i64 i = i0; i < i1; ++i) {
        for (i64 j0 = 0; j0 < M; j0 += COLS) {
          const i64 W = std::min<i64>(COLS, M - j0);
          CostRow<T, P, DirectRow<T>, true> ld{DirectRow<T>(xq + i * D, bT + j0, M, int(D))};
          lse_update(ld, W, hq + j0, inv, m[i - i0], s[i - i0], c.t.data());
        }
      }
    } else {
      const T* hb = ct.hb.data() + q * M;
      T ha[ROWS];
      sqnorms(xq + i0 * D, i1 - i0, D, half, ha);
      for (i64 j0 = 0; j0 < M; j0 += COLS) {
        const i64 W = std::min<i64>(COLS, M - j0);
        gemm(false, true, i1 - i0, W, D, T(P == 2 ? 1 : 2), xq + i0 * D, D, y + (q * M + j0) * D, D, T(0),
             c.G.data(), W);
        for (i64 i = i0; i < i1; ++i) {
          CostRow<T, P, GemmRow<T>, false> ld{GemmRow<T>{c.G.data() + (i - i0) * W, hb + j0, ha[i - i0]}};
          lse_update(ld, W, hq + j0, inv, m[i - i0], s[i - i0], c.t.data());
        }
      }
    }
    for (i64 i = i0; i < i1; ++i) out[q * N + i] = lse_out(m[i - i0], s[i - i0]);
  });
}

template <typename T>
void softmin_online(const T* x, const T* y, const T* h, T* out, i64 B, i64 N, i64 M, i64 D, int p, double eps,
                    int nt) {
  if (p == 1) softmin_online_p<T, 1>(x, y, h, out, B, N, M, D, eps, nt);
  else softmin_online_p<T, 2>(x, y, h, out, B, N, M, D, eps, nt);
}

// ----------------------------------------------------------------------------- instances
#define OTK_SOFTMIN_CACHED(T, S)                                                                        \
  template void cost_matrix<T, S>(const T*, const T*, S*, i64, i64, i64, i64, int, T, int);            \
  template void softmin_cached<T, S>(const S*, T, bool, const T*, T*, i64, i64, i64, double, int);
OTK_SOFTMIN_CACHED(float, float)
OTK_SOFTMIN_CACHED(float, bf16_t)
OTK_SOFTMIN_CACHED(float, f16_t)
OTK_SOFTMIN_CACHED(double, double)
template void softmin_online<float>(const float*, const float*, const float*, float*, i64, i64, i64, i64, int,
                                    double, int);
template void softmin_online<double>(const double*, const double*, const double*, double*, i64, i64, i64, i64,
                                     int, double, int);

}  // namespace otk
