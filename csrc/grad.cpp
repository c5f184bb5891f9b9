// Gradient of the Sinkhorn extrapolation step from the final potentials, in one pass and
// without building the plan:
//
//   out_i = g_i Σ_j s_j P_ij ∇_1 C(a_i, b_j),   P_ij = exp((h_j − C_ij/ε) + fscale·f_i)
//   ∇_1 C = a_i − b_j (p = 2),  (a_i − b_j)/C_ij (p = 1, 0 where geomloss's clamp is active)
//
// so out_i = g_i Σ_j w_ij (a_i − b_j) with w_ij = s_j P_ij [/C_ij], the differences formed
// inside the tile (acc_diff in tiles.h for D > 8, vector accumulators for D ≤ 8): the expanded
// a_i Σ_j w_ij − Σ_j w_ij b_j (attention's P·V as one GEMM) cancels catastrophically when the
// plan sits on b_j ≈ a_i (the self-costs C(x, x) at small ε: a gradient 1e-19 instead of 0).
// Weights whose exponential underflows are exact zeros (vexp_or_0), and a tile with at most a
// third nonzero weights — a plan at small ε: ~1.5 entries a row at 10k, D = 128, blur 0.05 —
// is summed pair by pair (acc_diff_auto; the two gradient passes there: 408 -> 120 ms).
// fscale = 1/ε for a potential f; −1 when f is the log-sum-exp of the forward softmin, so that
// (h_j − C_ij/ε) − lse_i is ≤ 0 with the forward's rounding (P ≤ 1 even if C/ε ≫ 1/ε_mach).
#include <limits>

#include "tiles.h"

namespace otk {

std::atomic<i64> grad_tiles[2];
void grad_counts(i64* out, bool reset) {
  for (int k = 0; k < 2; ++k) out[k] = reset ? grad_tiles[k].exchange(0) : grad_tiles[k].load();
}

// w_j for the tile columns [0, W) of one row; sink(j, w, lanes) receives each vector (lanes
// beyond `lanes` are zero).  Returns Σ_j w_j.
// Grad: the gradient's weights (p = 1: divided by C_ij); false: the plan's entries alone.
// Raw: the exponent h_j − C_ij/ε + fe itself, not its exponential.
template <typename T, int P, typename L, typename Sink, bool Grad = true, bool Raw = false>
inline T row_weights(const L& ld, i64 W, const T* h, const T* s, T inv, T fe, Sink&& sink) {
  constexpr int n = VT<T>::N;
  const vec<T> ie = vset(-inv), fv = vset(fe), thr = vset(T(std::sqrt(T(1e-8))));
  vec<T> acc = vset(T(0));
  auto one = [&](vec<T> c, vec<T> hv, vec<T> sv, i64 j, int lanes) {
    vec<T> w = vfma(c, ie, hv) + fv;
    if constexpr (!Raw) w = Grad ? vexp_or_0(w) : vexp(w);
    if (s) w *= sv;
    if constexpr (P == 1 && Grad) w = select(c > thr, w / c, vset(T(0)));
    if (lanes < n) w = select(lanes_below<T>(lanes), w, vset(T(0)));
    acc += w;
    sink(j, w, lanes);
  };
  i64 j = 0;
  for (; j + n <= W; j += n) one(ld.at(j), vload(h + j), s ? vload(s + j) : vset(T(1)), j, n);
  if (j < W) {
    const int rem = int(W - j);
    one(ld.tail(j, rem), vload_part(h + j, rem, T(0)), s ? vload_part(s + j, rem, T(0)) : vset(T(1)), j, rem);
  }
  return hsum(acc);
}

// Vector accumulators Σ_j w_j (a_k − bT[k, j]) for k < D ≤ DIRECT_MAX_D.
template <typename T> struct DirectAcc {
  vec<T> acc[DIRECT_MAX_D], av[DIRECT_MAX_D];
  const T* bT;
  i64 ld;
  int D;
  DirectAcc(const T* a, const T* bT_, i64 ld_, int D_) : bT(bT_), ld(ld_), D(D_) {
    for (int k = 0; k < D; ++k) acc[k] = vset(T(0)), av[k] = vset(a[k]);
  }
  void operator()(i64 j, vec<T> w, int lanes) {  // w is zero beyond `lanes`
    constexpr int n = VT<T>::N;
    for (int k = 0; k < D; ++k)
      acc[k] = vfma(w, av[k] - (lanes == n ? vload(bT + k * ld + j) : vload_part(bT + k * ld + j, lanes, T(0))),
                    acc[k]);
  }
};

// Row-direction gradient over segments (a dense batch is the uniform case), with a row loader
// factory: make_row(q, i, j0, W, aq, bT, ldT, G, ha, hb) -> loader of segment q's row i.
template <typename T, int P, typename MakeRow>
static void grad_rows(const T* a, const T* b, const T* h, const T* f, const T* g, const T* s, T* out,
                      const Segs& sg, i64 D, double fscale, int nt, bool need_gemm_cost, MakeRow make_row) {
  const bool direct = D <= DIRECT_MAX_D;
  const T half = P == 2 ? T(0.5) : T(1);
  const i64 Ny = sg.yo.back();
  ColumnTerms<T> ct(b, 1, Ny, D, direct, need_gemm_cost, half);
  const SegTasks tk(sg, rows_per_task(1, sg.xo.back(), nt, ROWS));
  const i64 R = tk.R;
  struct Ctx {
    std::vector<T> G, Wb, acc;
  };
  parallel_tasks(tk.count(), nt,
                 [&] {
                   return Ctx{std::vector<T>(need_gemm_cost ? size_t(R * COLS) : 0),
                              std::vector<T>(direct ? 0 : size_t(R * COLS)),
                              std::vector<T>(size_t(R * D))};
                 },
                 [&](i64 task, Ctx& c) {
    i64 q, i0, i1;
    tk.locate(sg, task, q, i0, i1);
    const i64 nr = i1 - i0, Nb = sg.m(q), y0 = sg.yo[size_t(q)];
    const T inv = T(1.0 / sg.eps[size_t(q)]);
    const T* aq = a + sg.xo[size_t(q)] * D;
    const T* bq = b + y0 * D;
    const T* hq = h + q * sg.mmax;
    const T* sq = s ? s + q * sg.mmax : nullptr;
    const T* fq = f + q * sg.nmax;
    T ha[ROWS];
    std::fill(c.acc.begin(), c.acc.begin() + nr * D, T(0));
    if (need_gemm_cost) sqnorms(aq + i0 * D, nr, D, half, ha);
    if (direct) {
      const T* bT = ct.bT.data() + y0;
      for (i64 i = i0; i < i1; ++i) {
        DirectAcc<T> acc(aq + i * D, bT, Ny, int(D));
        const T fe = T(fq[i] * fscale);
        for (i64 j0 = 0; j0 < Nb; j0 += COLS) {
          const i64 W = std::min<i64>(COLS, Nb - j0);
          acc.bT = bT + j0;
          auto ld = make_row(q, i, j0, W, aq, bT + j0, Ny, (const T*)nullptr, T(0), (const T*)nullptr);
          row_weights<T, P>(ld, W, hq + j0, sq ? sq + j0 : nullptr, inv, fe, acc);
        }
        for (int k = 0; k < D; ++k) c.acc[(i - i0) * D + k] = hsum(acc.acc[k]);
      }
    } else {
      const T* hb = need_gemm_cost ? ct.hb.data() + y0 : nullptr;
      for (i64 j0 = 0; j0 < Nb; j0 += COLS) {
        const i64 W = std::min<i64>(COLS, Nb - j0);
        if (need_gemm_cost)
          gemm(false, true, nr, W, D, T(P == 2 ? 1 : 2), aq + i0 * D, D, bq + j0 * D, D, T(0), c.G.data(), W);
        for (i64 i = i0; i < i1; ++i) {
          T* wrow = c.Wb.data() + (i - i0) * W;
          auto sink = [&](i64 j, vec<T> w, int lanes) {
            if (lanes == VT<T>::N) vstore(wrow + j, w);
            else vstore_part(wrow + j, w, lanes);
          };
          auto ld = make_row(q, i, j0, W, aq, (const T*)nullptr, Ny,
                             need_gemm_cost ? c.G.data() + (i - i0) * W : nullptr,
                             need_gemm_cost ? ha[i - i0] : T(0), hb ? hb + j0 : nullptr);
          row_weights<T, P>(ld, W, hq + j0, sq ? sq + j0 : nullptr, inv, T(fq[i] * fscale), sink);
        }
        // acc_i += Σ_j Wb_ij (a_i − b_j) over the tile's columns
        acc_diff_auto(c.Wb.data(), W, nr, W, aq + i0 * D, bq + j0 * D, D, c.acc.data());
      }
    }
    for (i64 i = i0; i < i1; ++i) {
      const T gi = g[q * sg.nmax + i];
      const T* ac = c.acc.data() + (i - i0) * D;
      T* o = out + (sg.xo[size_t(q)] + i) * D;
      for (i64 k = 0; k < D; ++k) o[k] = gi * ac[k];
    }
  });
}

template <typename T>
void grad_online(const T* a, const T* b, const T* h, const T* f, const T* g, const T* s, T* out, const Segs& sg,
                 i64 D, int p, double fscale, int nt) {
  const bool direct = D <= DIRECT_MAX_D;
  auto run = [&](auto pc) {
    constexpr int P = decltype(pc)::value;
    if (direct) {
      grad_rows<T, P>(a, b, h, f, g, s, out, sg, D, fscale, nt, false,
                      [D](i64, i64 i, i64, i64, const T* aq, const T* bT, i64 ldT, const T*, T, const T*) {
                        return CostRow<T, P, DirectRow<T>, true>{DirectRow<T>(aq + i * D, bT, ldT, int(D))};
                      });
    } else {
      grad_rows<T, P>(a, b, h, f, g, s, out, sg, D, fscale, nt, true,
                      [](i64, i64, i64, i64, const T*, const T*, i64, const T* G, T ha, const T* hb) {
                        return CostRow<T, P, GemmRow<T>, false>{GemmRow<T>{G, hb, ha}};
                      });
    }
  };
  if (p == 1) run(std::integral_constant<int, 1>());
  else run(std::integral_constant<int, 2>());
}

// ----------------------------------------------------------------------------- cached, columns
// Transposed cache C (B,Nb,Na): the handle's rows are the columns of C.
template <typename T, typename S, int P>
static void grad_cols_cached(const S* C, T cscale, const T* a, const T* b, const T* h, const T* f, const T* g,
                             const T* s, T* out, i64 B, i64 Na, i64 Nb, i64 D, double eps, double fscale,
                             int nt) {
  constexpr int n = VT<T>::N;
  constexpr i64 RB = 64, SW = 256;
  const bool direct = D <= DIRECT_MAX_D;
  const T inv = T(1.0 / eps), fs = T(fscale);
  const vec<T> ie = vset(-inv), thr = vset(T(std::sqrt(T(1e-8))));
  i64 width = std::max<i64>(n, ceil_div(ceil_div(B * Na, 4 * i64(num_threads_or(nt))), n) * n);
  width = std::min<i64>(width, ceil_div(Na, n) * n);
  const i64 nrng = ceil_div(Na, width);
  struct Ctx {
    std::vector<T> aT, acc, Wt, WtT;
  };
  parallel_tasks(B * nrng, nt,
                 [&] {
                   return Ctx{std::vector<T>(direct ? size_t(width * D) : 0), std::vector<T>(size_t(width * D)),
                              std::vector<T>(size_t(RB * SW)), std::vector<T>(direct ? 0 : size_t(RB * SW))};
                 },
                 [&](i64 task, Ctx& c) {
    const i64 q = task / nrng, c0 = (task % nrng) * width, c1 = std::min(Na, c0 + width), w = c1 - c0;
    const S* Cq = C + q * Nb * Na;
    const T* aq = a + q * Na * D;
    const T* bq = b + q * Nb * D;
    const T* hq = h + q * Nb;
    const T* sq = s ? s + q * Nb : nullptr;
    const T* fq = f + q * Na;
    std::fill(c.acc.begin(), c.acc.begin() + w * D, T(0));  // direct: (D, w); GEMM: (w, D)
    if (direct) transpose_to(aq + c0 * D, w, D, c.aT.data());  // (D, w): this range's a, by lanes
    for (i64 r0 = 0; r0 < Nb; r0 += RB) {
      const i64 R = std::min(RB, Nb - r0);
      for (i64 s0 = 0; s0 < w; s0 += SW) {
        const i64 sw = std::min(SW, w - s0);
        for (i64 r = 0; r < R; ++r) {
          const i64 i = r0 + r;
          CachedRow<T, S> ld{Cq + i * Na + c0 + s0, cscale};
          const vec<T> hv = vset(hq[i]);
          vec<T> bv[DIRECT_MAX_D];  // b_i's coordinates, broadcast once per row
          if (direct)
            for (int k = 0; k < int(D); ++k) bv[k] = vset(bq[i * D + k]);
          const T si = sq ? sq[i] : T(1);
          T* wr = c.Wt.data() + r * sw;
          for (i64 j = 0; j < sw; j += n) {
            const int lanes = int(std::min<i64>(n, sw - j));
            vec<T> cv = lanes == n ? ld.at(j) : ld.tail(j, lanes);
            vec<T> fe = (lanes == n ? vload(fq + c0 + s0 + j) : vload_part(fq + c0 + s0 + j, lanes, T(0))) * fs;
            vec<T> wv = vexp_or_0(vfma(cv, ie, hv) + fe) * si;
            if constexpr (P == 1) wv = select(cv > thr, wv / cv, vset(T(0)));
            if (lanes < n) wv = select(lanes_below<T>(lanes), wv, vset(T(0)));
            if (direct) {  // acc[k, j] += w_ij (a_jk − b_ik)
              T* ak = c.acc.data() + s0 + j;
              const T* xk = c.aT.data() + s0 + j;
              for (int k = 0; k < int(D); ++k, ak += w, xk += w) {
                if (lanes == n) {
                  vstore(ak, vfma(wv, vload(xk) - bv[k], vload(ak)));
                } else {
                  vstore_part(ak, vfma(wv, vload_part(xk, lanes, T(0)) - bv[k], vload_part(ak, lanes, T(0))), lanes);
                }
              }
            } else if (lanes == n) {
              vstore(wr + j, wv);
            } else {
              vstore_part(wr + j, wv, lanes);
            }
          }
        }
        if (!direct) {  // acc[s0 + t] += Σ_r Wt[r, t] (a_{c0+s0+t} − b_{r0+r}), Wt transposed first
          for (i64 r = 0; r < R; ++r)
            for (i64 t = 0; t < sw; ++t) c.WtT[t * R + r] = c.Wt[r * sw + t];
          acc_diff_auto(c.WtT.data(), R, sw, R, aq + (c0 + s0) * D, bq + r0 * D, D, c.acc.data() + s0 * D);
        }
      }
    }
    for (i64 j = 0; j < w; ++j) {
      const i64 jj = c0 + j;
      const T gj = g[q * Na + jj];
      T* o = out + (q * Na + jj) * D;
      for (i64 k = 0; k < D; ++k) o[k] = gj * (direct ? c.acc[k * w + j] : c.acc[j * D + k]);
    }
  });
}

template <typename T, typename S>
void grad_cached(const S* C, T cscale, bool transpose, const T* a, const T* b, const T* h, const T* f, const T* g,
                 const T* s, T* out, i64 B, i64 Na, i64 Nb, i64 D, int p, double eps, double fscale, int nt) {
  auto run = [&](auto pc) {
    constexpr int P = decltype(pc)::value;
    if (transpose) {
      grad_cols_cached<T, S, P>(C, cscale, a, b, h, f, g, s, out, B, Na, Nb, D, eps, fscale, nt);
      return;
    }
    grad_rows<T, P>(a, b, h, f, g, s, out, Segs::dense(B, Na, Nb, eps), D, fscale, nt, false,
                    [C, cscale, Na, Nb](i64 q, i64 i, i64 j0, i64, const T*, const T*, i64, const T*, T, const T*) {
                      return CachedRow<T, S, true>{C + (q * Na + i) * Nb + j0, cscale};
                    });
  };
  if (p == 1) run(std::integral_constant<int, 1>());
  else run(std::integral_constant<int, 2>());
}

// Packed triangle of C(a, a) (tiles.h, Packed): the row pass of grad_cached, each row read
// from its stored part and, left of its block, from the mirrored entries one lane at a time
// (a column read: 1.27× the full cache's pass at N = 10k, D = 128; a per-thread buffer of the
// mirrored entries, 16 rows × a tile, measured no faster — the strided reads are the cost).
template <typename T, typename S>
void grad_packed(const S* C, T cscale, const T* a, const T* h, const T* f, const T* g, const T* s, T* out, i64 B,
                 i64 N, i64 D, int p, double eps, double fscale, int nt) {
  const Packed pk(N);
  const i64 per = pk.numel();
  auto row = [C, cscale, per, &pk](i64 q, i64 i, i64 j0, i64, const T*, const T*, i64, const T*, T, const T*) {
    return PackedRow<T, S>(C + q * per, &pk, i, j0, cscale);
  };
  auto run = [&](auto pc) {
    constexpr int P = decltype(pc)::value;
    grad_rows<T, P>(a, a, h, f, g, s, out, Segs::dense(B, N, N, eps), D, fscale, nt, false, row);
  };
  if (p == 1) run(std::integral_constant<int, 1>());
  else run(std::integral_constant<int, 2>());
}

#define OTK_GRAD_CACHED(T, S)                                                                            \
  template void grad_cached<T, S>(const S*, T, bool, const T*, const T*, const T*, const T*, const T*,     \
                                  const T*, T*, i64, i64, i64, i64, int, double, double, int);            \
  template void grad_packed<T, S>(const S*, T, const T*, const T*, const T*, const T*, const T*, T*, i64, i64, \
                                  i64, int, double, double, int);
OTK_GRAD_CACHED(float, float)
OTK_GRAD_CACHED(float, bf16_t)
OTK_GRAD_CACHED(float, f16_t)
OTK_GRAD_CACHED(double, double)
template void grad_online<float>(const float*, const float*, const float*, const float*, const float*,
                                 const float*, float*, const Segs&, i64, int, double, int);
template void grad_online<double>(const double*, const double*, const double*, const double*, const double*,
                                  const double*, double*, const Segs&, i64, int, double, int);

// ----------------------------------------------------------------------------- plan products
// For each row i: lse_i = log Σ_j exp(h_j − C(a_i, b_j)/ε) and S_i = Σ_j softmax_j(h_j − C_ij/ε) V_j,
// V (B,Nb,K): the entropic plan applied to V without storing it (otkernels.plan), in ONE pass
// over tiles computed on the fly.  Per tile, each row's exponents come from the gradient's row
// loaders (GEMM cost tiles for D > 8, direct distances for D ≤ 8); the row's running maximum
// m_i rescales its (K) accumulator and sum when a tile raises it (FlashAttention's output
// update), the tile's exp(s − m_i) go through one GEMM (rows × tile)·(tile × K).  Every
// exponential is ≤ 1: no overflow whatever h; rows with all exponents −inf give S = 0, lse = −inf.
template <typename T, int P, typename MakeRow>
static void apply_rows(const T* a, const T* b, const T* h, const T* V, T* out, T* lse, i64 B, i64 Na, i64 Nb,
                       i64 D, i64 K, double eps, int nt, bool need_gemm_cost, MakeRow make_row) {
  constexpr int n = VT<T>::N;
  const bool direct = D <= DIRECT_MAX_D;
  const T inv = T(1.0 / eps);
  const T half = P == 2 ? T(0.5) : T(1);
  const T ninf = -std::numeric_limits<T>::infinity();
  ColumnTerms<T> ct(b, B, Nb, D, direct, need_gemm_cost, half);
  const i64 R = rows_per_task(B, Na, nt, ROWS), nblk = ceil_div(Na, R);
  struct Ctx {
    std::vector<T> G, Wb, acc, m, l;
  };
  parallel_tasks(B * nblk, nt,
                 [&] {
                   return Ctx{std::vector<T>(need_gemm_cost ? size_t(R * COLS) : 0), std::vector<T>(size_t(R * COLS)),
                              std::vector<T>(size_t(R * K)), std::vector<T>(size_t(R)), std::vector<T>(size_t(R))};
                 },
                 [&](i64 task, Ctx& c) {
    const i64 q = task / nblk, i0 = (task % nblk) * R, i1 = std::min(Na, i0 + R), nr = i1 - i0;
    const T* aq = a + q * Na * D;
    const T* bq = b + q * Nb * D;
    const T* hq = h + q * Nb;
    const T* Vq = V + q * Nb * K;
    const T* hb = need_gemm_cost ? ct.hb.data() + q * Nb : nullptr;
    const T* bT = direct ? ct.bT.data() + q * Nb * D : nullptr;
    T ha[ROWS];
    std::fill(c.acc.begin(), c.acc.begin() + nr * K, T(0));
    std::fill(c.m.begin(), c.m.begin() + nr, ninf);
    std::fill(c.l.begin(), c.l.begin() + nr, T(0));
    if (need_gemm_cost) sqnorms(aq + i0 * D, nr, D, half, ha);
    for (i64 j0 = 0; j0 < Nb; j0 += COLS) {
      const i64 W = std::min<i64>(COLS, Nb - j0);
      if (need_gemm_cost)
        gemm(false, true, nr, W, D, T(P == 2 ? 1 : 2), aq + i0 * D, D, bq + j0 * D, D, T(0), c.G.data(), W);
      for (i64 i = i0; i < i1; ++i) {
        const i64 r = i - i0;
        T* wrow = c.Wb.data() + r * W;
        auto sink = [&](i64 j, vec<T> w, int lanes) {
          if (lanes == n) vstore(wrow + j, w);
          else vstore_part(wrow + j, w, lanes);
        };
        auto ld = make_row(q, i, j0, W, aq, bT ? bT + j0 : nullptr, need_gemm_cost ? c.G.data() + r * W : nullptr,
                           need_gemm_cost ? ha[r] : T(0), hb ? hb + j0 : nullptr);
        row_weights<T, P, decltype(ld), decltype(sink)&, false, true>(ld, W, hq + j0, (const T*)nullptr, inv, T(0),
                                                                       sink);
        T tmax = ninf;
        for (i64 j = 0; j < W; ++j) tmax = std::max(tmax, wrow[j]);
        const T mnew = std::max(c.m[r], tmax);
        if (mnew == ninf) {  // nothing of this row so far: its weights are all 0
          std::fill(wrow, wrow + W, T(0));
          continue;
        }
        if (mnew > c.m[r]) {  // rescale what the earlier tiles accumulated
          const T sc = c.m[r] == ninf ? T(0) : std::exp(c.m[r] - mnew);
          T* ar = c.acc.data() + r * K;
          for (i64 k = 0; k < K; ++k) ar[k] *= sc;
          c.l[r] *= sc;
          c.m[r] = mnew;
        }
        const vec<T> mv = vset(mnew);
        vec<T> sum = vset(T(0));
        i64 j = 0;
        for (; j + n <= W; j += n) {
          vec<T> w = vexp(vload(wrow + j) - mv);
          vstore(wrow + j, w);
          sum += w;
        }
        if (j < W) {
          const int rem = int(W - j);
          vec<T> w = vexp(vload_part(wrow + j, rem, ninf) - mv);
          w = select(lanes_below<T>(rem), w, vset(T(0)));
          vstore_part(wrow + j, w, rem);
          sum += w;
        }
        c.l[r] += hsum(sum);
      }
      gemm(false, false, nr, K, W, T(1), c.Wb.data(), W, Vq + j0 * K, K, T(1), c.acc.data(), K);
    }
    for (i64 r = 0; r < nr; ++r) {
      const T lr = c.l[r];
      const T* ar = c.acc.data() + r * K;
      T* o = out + (q * Na + i0 + r) * K;
      if (lr > T(0)) {
        const T il = T(1) / lr;
        for (i64 k = 0; k < K; ++k) o[k] = ar[k] * il;
        lse[q * Na + i0 + r] = c.m[r] + std::log(lr);
      } else {
        for (i64 k = 0; k < K; ++k) o[k] = T(0);
        lse[q * Na + i0 + r] = ninf;
      }
    }
  });
}

template <typename T>
void plan_apply(const T* a, const T* b, const T* h, const T* V, T* out, T* lse, i64 B, i64 Na, i64 Nb, i64 D, i64 K,
                int p, double eps, int nt) {
  const bool direct = D <= DIRECT_MAX_D;
  auto run = [&](auto pc) {
    constexpr int P = decltype(pc)::value;
    if (direct) {
      apply_rows<T, P>(a, b, h, V, out, lse, B, Na, Nb, D, K, eps, nt, false,
                       [D, Nb](i64, i64 i, i64, i64, const T* aq, const T* bT, const T*, T, const T*) {
                         return CostRow<T, P, DirectRow<T>, true>{DirectRow<T>(aq + i * D, bT, Nb, int(D))};
                       });
    } else {
      apply_rows<T, P>(a, b, h, V, out, lse, B, Na, Nb, D, K, eps, nt, true,
                       [](i64, i64, i64, i64, const T*, const T*, const T* G, T ha, const T* hb) {
                         return CostRow<T, P, GemmRow<T>, false>{GemmRow<T>{G, hb, ha}};
                       });
    }
  };
  if (p == 1) run(std::integral_constant<int, 1>());
  else run(std::integral_constant<int, 2>());
}

template void plan_apply<float>(const float*, const float*, const float*, const float*, float*, float*, i64, i64,
                                i64, i64, i64, int, double, int);
template void plan_apply<double>(const double*, const double*, const double*, const double*, double*, double*, i64,
                                 i64, i64, i64, i64, int, double, int);

}  // namespace otk
