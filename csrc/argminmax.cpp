// Fused argmax_j ⟨x_i, y_j⟩ + h_j (mode 0) and argmin_j |x_i − y_j|² + h_j (mode 1) with the
// value, for semi-discrete OT (Laguerre cells) and nearest neighbours: one pass over GEMM
// tiles (D > 8) or direct products (D ≤ 8), per-lane running best and index, no N×M matrix.
// Squared distances from a GEMM are |x|² + |y|² − 2⟨x, y⟩ clamped at 0.  Ties: first index.
#include "tiles.h"

namespace otk {

template <typename T> struct IdxT;
template <> struct IdxT<float> { typedef int32_t type; };
template <> struct IdxT<double> { typedef int64_t type; };

template <typename T> inline veci<T> iota_i() {
  veci<T> r;
  for (int k = 0; k < VT<T>::N; ++k) r[k] = k;
  return r;
}

template <typename T, int Mode>
static void argminmax_m(const T* x, const T* y, const T* h, T* val, i64* idx, i64 B, i64 N, i64 M, i64 D, int nt) {
  constexpr int n = VT<T>::N;
  typedef typename IdxT<T>::type I;
  const bool direct = D <= DIRECT_MAX_D;
  ColumnTerms<T> ct(y, B, M, D, direct, !direct && Mode == 1, T(1));
  const i64 R = rows_per_task(B, N, nt, ROWS), nblk = ceil_div(N, R);
  const T worst = Mode == 0 ? neg_inf<T>() : pos_inf<T>();
  parallel_tasks(B * nblk, nt, [&] { return std::vector<T>(direct ? 0 : size_t(R * COLS)); },
                 [&](i64 task, std::vector<T>& G) {
    const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(N, i0 + R), nr = i1 - i0;
    const T* xq = x + q * N * D;
    const T* yq = y + q * M * D;
    const T* hq = h ? h + q * M : nullptr;
    vec<T> bv[ROWS];
    veci<T> bi[ROWS];
    for (i64 r = 0; r < nr; ++r) { bv[r] = vset(worst); bi[r] = veci<T>{} + I(0); }
    // score vector -> running best of row r
    auto update = [&](i64 r, vec<T> sc, i64 j0, i64 j, int lanes) {
      if (hq) sc += lanes == n ? vload(hq + j0 + j) : vload_part(hq + j0 + j, lanes, T(0));
      if (lanes < n) sc = select(lanes_below<T>(lanes), sc, vset(worst));
      veci<T> better = Mode == 0 ? (sc > bv[r]) : (sc < bv[r]);
      bv[r] = select(better, sc, bv[r]);
      veci<T> jv = iota_i<T>() + I(j0 + j);
      bi[r] = better ? jv : bi[r];
    };
    if (direct) {
      const T* yT = ct.bT.data() + q * M * D;
      for (i64 i = i0; i < i1; ++i) {
        for (i64 j0 = 0; j0 < M; j0 += COLS) {
          const i64 W = std::min<i64>(COLS, M - j0);
          DirectRow<T, Mode == 0> ld(xq + i * D, yT + j0, M, int(D));
          for (i64 j = 0; j < W; j += n) {
            const int lanes = int(std::min<i64>(n, W - j));
            update(i - i0, lanes == n ? ld.at(j) : ld.tail(j, lanes), j0, j, lanes);
          }
        }
      }
    } else {
      T ha[ROWS];
      if (Mode == 1) sqnorms(xq + i0 * D, nr, D, T(1), ha);
      const T* hb = Mode == 1 ? ct.hb.data() + q * M : nullptr;
      for (i64 j0 = 0; j0 < M; j0 += COLS) {
        const i64 W = std::min<i64>(COLS, M - j0);
        gemm(false, true, nr, W, D, T(Mode == 0 ? 1 : 2), xq + i0 * D, D, yq + j0 * D, D, T(0), G.data(), W);
        for (i64 i = i0; i < i1; ++i) {
          const T* Gr = G.data() + (i - i0) * W;
          for (i64 j = 0; j < W; j += n) {
            const int lanes = int(std::min<i64>(n, W - j));
            vec<T> gv = lanes == n ? vload(Gr + j) : vload_part(Gr + j, lanes, T(0));
            vec<T> sc;
            if constexpr (Mode == 0) {
              sc = gv;
            } else {
              vec<T> hbv = lanes == n ? vload(hb + j0 + j) : vload_part(hb + j0 + j, lanes, T(0));
              sc = vmax((vset(ha[i - i0]) + hbv) - gv, vset(T(0)));
            }
            update(i - i0, sc, j0, j, lanes);
          }
        }
      }
    }
    for (i64 i = i0; i < i1; ++i) {
      const vec<T> v = bv[i - i0];
      const veci<T> id = bi[i - i0];
      T best = v[0];
      i64 bidx = id[0];
      for (int k = 1; k < n; ++k) {
        const bool b = Mode == 0 ? (v[k] > best) : (v[k] < best);
        if (b || (v[k] == best && i64(id[k]) < bidx)) { best = v[k]; bidx = id[k]; }
      }
      val[q * N + i] = best;
      idx[q * N + i] = bidx;
    }
  });
}

template <typename T>
void argminmax(const T* x, const T* y, const T* h, T* val, i64* idx, i64 B, i64 N, i64 M, i64 D, int mode, int nt) {
  if (mode == 0) argminmax_m<T, 0>(x, y, h, val, idx, B, N, M, D, nt);
  else argminmax_m<T, 1>(x, y, h, val, idx, B, N, M, D, nt);
}

template void argminmax<float>(const float*, const float*, const float*, float*, i64*, i64, i64, i64, i64, int, int);
template void argminmax<double>(const double*, const double*, const double*, double*, i64*, i64, i64, i64, i64, int,
                                int);

}  // namespace otk
