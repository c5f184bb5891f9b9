// Kernel sums Σ_j k(|x_i − y_j|²) w_j and their gradient w.r.t. x in one pass over tiles:
//
//   val_i  = Σ_j k_ij w_j
//   grad_i = 2 g_i Σ_j w_j k'_ij (x_i − y_j)
//
// with k' = ∂k/∂(d²) (unscaled), the differences x_i − y_j formed inside the tile (acc_diff in
// tiles.h, or vector accumulators for D ≤ 8): the expanded x_i Σ_j w_j k'_ij − Σ_j w_j k'_ij y_j
// cancels when the kernel is nearly diagonal (the self terms k(x, x) at small σ: a gradient
// 3e-19 where the exact one is 4e-98).  The gradients w.r.t. y and w are the same two sums on the
// swapped problem (the kernel is symmetric): grad_y = kernel_sum(y, x, g, w), val = ∂/∂w.
// Kernels (geomloss's formulas, σ = blur): gaussian exp(−d²/2σ²), laplacian
// exp(−sqrt(max(d²/σ², 1e-8))), energy −sqrt(max(d², 1e-8)).
#include "tiles.h"

namespace otk {

template <typename T, int K> struct KernelFn {
  T c1, c2;  // gaussian: c1 = −1/2σ²; laplacian: c1 = 1/σ², c2 = −1/(2σ²)
  // k and k' for a vector of squared distances
  inline void operator()(vec<T> d2, vec<T>& k, vec<T>& dk) const {
    const vec<T> clampv = vset(T(1e-8));
    if constexpr (K == 0) {
      k = vexp(d2 * c1);
      dk = k * c1;
    } else if constexpr (K == 1) {
      vec<T> r = d2 * c1;
      vec<T> d = vsqrt(vmax(r, clampv));
      k = vexp(-d);
      dk = select(r >= clampv, k * c2 / d, vset(T(0)));
    } else {
      vec<T> d = vsqrt(vmax(d2, clampv));
      k = -d;
      dk = select(d2 >= clampv, vset(T(-0.5)) / d, vset(T(0)));
    }
  }
};

template <typename T, int K>
static void kernel_sum_k(const T* x, const T* y, const T* w, const T* g, T* val, T* grad, i64 B, i64 N, i64 M,
                         i64 D, double sigma, int nt) {
  constexpr int n = VT<T>::N;
  const bool direct = D <= DIRECT_MAX_D;
  KernelFn<T, K> kf{};
  if (K == 0) kf.c1 = T(-0.5 / (sigma * sigma));
  if (K == 1) { kf.c1 = T(1.0 / (sigma * sigma)); kf.c2 = T(-0.5 / (sigma * sigma)); }
  ColumnTerms<T> ct(y, B, M, D, direct, !direct, T(1));
  const i64 R = rows_per_task(B, N, nt, ROWS), nblk = ceil_div(N, R);
  const bool want_grad = grad != nullptr, want_val = val != nullptr;
  struct Ctx {
    std::vector<T> G, Wb, acc;
  };
  parallel_tasks(B * nblk, nt,
                 [&] {
                   return Ctx{std::vector<T>(direct ? 0 : size_t(R * COLS)),
                              std::vector<T>(direct || !want_grad ? 0 : size_t(R * COLS)),
                              std::vector<T>(size_t(R * D))};
                 },
                 [&](i64 task, Ctx& c) {
    const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R), nr = i1 - i0;
    const T* xq = x + q * N * D;
    const T* yq = y + q * M * D;
    const T* wq = w + q * M;
    T vsum[ROWS], ha[ROWS];
    for (i64 r = 0; r < nr; ++r) vsum[r] = 0;
    std::fill(c.acc.begin(), c.acc.begin() + nr * D, T(0));
    // one row of a tile: loader ld, W columns from j0; sink(j, wk, lanes) for the gradient weights
    auto row = [&](auto& ld, i64 r, i64 j0, i64 W, auto&& sink) {
      vec<T> va = vset(T(0));
      for (i64 j = 0; j < W; j += n) {
        const int lanes = int(std::min<i64>(n, W - j));
        vec<T> d2 = lanes == n ? ld.at(j) : ld.tail(j, lanes);
        vec<T> wv = lanes == n ? vload(wq + j0 + j) : vload_part(wq + j0 + j, lanes, T(0));
        vec<T> k, dk;
        kf(d2, k, dk);
        va = vfma(k, wv, va);
        if (want_grad) {
          sink(j, dk * wv, lanes);  // wv is zero beyond `lanes`
        }
      }
      vsum[r] += hsum(va);
    };
    if (direct) {
      const T* yT = ct.bT.data() + q * M * D;
      for (i64 i = i0; i < i1; ++i) {
        struct Acc {  // a[k] += Σ_j wk_j (x_ik − y_jk)
          vec<T> a[DIRECT_MAX_D], xv[DIRECT_MAX_D];
          const T* yT;
          i64 ld;
          int D;
          void operator()(i64 j, vec<T> wk, int lanes) {
            for (int k = 0; k < D; ++k)
              a[k] = vfma(wk, xv[k] - (lanes == VT<T>::N ? vload(yT + k * ld + j) : vload_part(yT + k * ld + j, lanes, T(0))),
                          a[k]);
          }
        } acc{{}, {}, yT, M, int(D)};
        for (int k = 0; k < D; ++k) acc.a[k] = vset(T(0)), acc.xv[k] = vset(xq[i * D + k]);
        for (i64 j0 = 0; j0 < M; j0 += COLS) {
          const i64 W = std::min<i64>(COLS, M - j0);
          DirectRow<T> ld(xq + i * D, yT + j0, M, int(D));
          acc.yT = yT + j0;
          row(ld, i - i0, j0, W, acc);
        }
        if (want_grad)
          for (int k = 0; k < D; ++k) c.acc[(i - i0) * D + k] = hsum(acc.a[k]);
      }
    } else {
      const T* hb = ct.hb.data() + q * M;
      sqnorms(xq + i0 * D, nr, D, T(1), ha);
      for (i64 j0 = 0; j0 < M; j0 += COLS) {
        const i64 W = std::min<i64>(COLS, M - j0);
        gemm(false, true, nr, W, D, T(2), xq + i0 * D, D, yq + j0 * D, D, T(0), c.G.data(), W);
        for (i64 i = i0; i < i1; ++i) {
          GemmRow<T> ld{c.G.data() + (i - i0) * W, hb + j0, ha[i - i0]};
          T* wrow = want_grad ? c.Wb.data() + (i - i0) * W : nullptr;
          row(ld, i - i0, j0, W, [&](i64 j, vec<T> wk, int lanes) {
            if (lanes == n) vstore(wrow + j, wk);
            else vstore_part(wrow + j, wk, lanes);
          });
        }
        if (want_grad) acc_diff(c.Wb.data(), W, nr, W, xq + i0 * D, yq + j0 * D, D, c.acc.data());
      }
    }
    for (i64 i = i0; i < i1; ++i) {
      if (want_val) val[q * N + i] = vsum[i - i0];
      if (want_grad) {
        const T gi = T(2) * (g ? g[q * N + i] : T(1));
        const T* ac = c.acc.data() + (i - i0) * D;
        T* o = grad + (q * N + i) * D;
        for (i64 k = 0; k < D; ++k) o[k] = gi * ac[k];
      }
    }
  });
}

template <typename T>
void kernel_sum(const T* x, const T* y, const T* w, const T* g, T* val, T* grad, i64 B, i64 N, i64 M, i64 D,
                int kernel, double sigma, int nt) {
  if (kernel == 0) kernel_sum_k<T, 0>(x, y, w, g, val, grad, B, N, M, D, sigma, nt);
  else if (kernel == 1) kernel_sum_k<T, 1>(x, y, w, g, val, grad, B, N, M, D, sigma, nt);
  else kernel_sum_k<T, 2>(x, y, w, g, val, grad, B, N, M, D, sigma, nt);
}

template void kernel_sum<float>(const float*, const float*, const float*, const float*, float*, float*, i64, i64,
                                i64, i64, int, double, int);
template void kernel_sum<double>(const double*, const double*, const double*, const double*, double*, double*, i64,
                                 i64, i64, i64, int, double, int);

}  // namespace otk
