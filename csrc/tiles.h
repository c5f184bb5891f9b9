// Tile machinery shared by the kernels: scratch buffers, work splitting, and the "row
// loaders" that produce cost (or distance / score) vectors for one row of a tile:
//
//   CachedRow   a row of a cached cost matrix (T, bf16 or scaled f16 storage)
//   GemmRow     u = ha + hb_j − G_j from a GEMM tile G = alpha·a·bᵀ (ha, hb: row/col terms)
//   DirectRow   Σ_k (a_k − b_jk)² (or Σ_k a_k b_jk) from b stored transposed, for small D
//
// A loader has at(j) (N columns from j) and tail(j, rem) (rem < N columns, other lanes
// arbitrary: consumers mask them).  Consumers (in the .cpp files) apply a transform (cost
// for p = 1, 2; kernel value) and reduce.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "otk.h"

namespace otk {

template <typename T> constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }
template <typename T> constexpr T pos_inf() { return std::numeric_limits<T>::infinity(); }

template <typename T> inline veci<T> lanes_below(int rem) { return iota<T>() < vset<T>(T(rem)); }

// 64-byte aligned scratch, one per thread (allocated inside the parallel region).
template <typename T> struct Scratch {
  T* p = nullptr;
  explicit Scratch(i64 n) {
    size_t bytes = (size_t(n > 0 ? n : 1) * sizeof(T) + 63) / 64 * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

inline i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// Rows per task: at most maxR, small enough that B·N rows make ≥ 4 tasks per thread.
inline i64 rows_per_task(i64 B, i64 N, int nt, i64 maxR) {
  i64 want = 4 * i64(nt);
  i64 r = ceil_div(B * N, want);
  return std::max<i64>(1, std::min<i64>(maxR, r));
}

// Tasks of at most R rows over the rows of every segment: one launch for all segments.
struct SegTasks {
  std::vector<i64> first;  // (S+1): the first task of each segment
  i64 R;
  SegTasks(const Segs& sg, i64 R_) : R(R_) {
    first.assign(1, 0);
    for (i64 q = 0; q < sg.S(); ++q) first.push_back(first.back() + ceil_div(sg.n(q), R));
  }
  i64 count() const { return first.back(); }
  // segment q and its rows [i0, i1) (local indices) of a task
  void locate(const Segs& sg, i64 task, i64& q, i64& i0, i64& i1) const {
    q = i64(std::upper_bound(first.begin(), first.end(), task) - first.begin()) - 1;
    i0 = (task - first[size_t(q)]) * R;
    i1 = std::min(sg.n(q), i0 + R);
  }
};

// ----------------------------------------------------------------------------- loaders
constexpr int PREFETCH_BYTES = 2048;  // software prefetch distance along one cached row
// (helps the single-stream row reductions; the column reduction reads 16 rows at once)

template <typename T, typename S, bool Prefetch = false> struct CachedRow {
  const S* p;
  T scale;  // stored value × scale = cost (f16 storage only)
  static constexpr bool scaled = std::is_same<S, f16_t>::value;
  vec<T> at(i64 j) const {
    if constexpr (Prefetch) __builtin_prefetch(reinterpret_cast<const char*>(p + j) + PREFETCH_BYTES);
    vec<T> v = sload(p + j);
    if constexpr (scaled) v *= scale;
    return v;
  }
  vec<T> tail(i64 j, int rem) const {
    vec<T> v = sload_part<T>(p + j, rem);
    if constexpr (scaled) v *= scale;
    return v;
  }
};

// Packed storage of a symmetric cost C(x, x) (N × N, issue 23): row blocks of PB rows (a power
// of two, 16–64, chosen from N alone); block b stores, row after row, the columns [b·PB, N) of
// its rows — the upper triangle plus the whole diagonal blocks, Σ_b rows_b·(N − b·PB) ≈
// N²/2 + N·PB/2 elements a batch.  Every stored row is contiguous from its block's first
// column, so a row block reads as from a full matrix with row stride N − b·PB (the cached
// sym pass: rows, and the mirrored columns from the same chunk), and entry (i, j) with j
// left of row i's block is the stored (j, i).
struct Packed {
  i64 N, PB = 16, shift = 4, nb;
  explicit Packed(i64 N_) : N(N_) {
    while (PB < 64 && PB * 32 < N) PB *= 2, ++shift;
    nb = ceil_div(N, PB);
  }
  i64 offset(i64 b) const { return PB * b * N - PB * PB * b * (b - 1) / 2; }  // block b's first element
  i64 numel() const { return nb ? offset(nb - 1) + (N - (nb - 1) * PB) * (N - (nb - 1) * PB) : 0; }
  // index of (i, j), j ≥ the first column of row i's block
  i64 at(i64 i, i64 j) const {
    const i64 b = i >> shift, f = b << shift;
    return offset(b) + (i - f) * (N - f) + (j - f);
  }
};

// Row i of a packed symmetric cost, columns from j0: the stored row where a vector lies right
// of the row's block start, else one entry a lane (the mirrored (j, i) left of it; within a
// task's tile those come from a few cache lines that the next rows reuse).
template <typename T, typename S> struct PackedRow {
  const S* C;  // the batch's packed storage
  const Packed* pk;
  i64 i, j0, lo;  // lo: the first stored column of row i
  T scale;
  PackedRow(const S* C_, const Packed* pk_, i64 i_, i64 j0_, T scale_)
      : C(C_), pk(pk_), i(i_), j0(j0_), lo((i_ >> pk_->shift) << pk_->shift), scale(scale_) {}
  vec<T> gather(i64 c, int lanes) const {
    constexpr int n = VT<T>::N;
    S v[n];
    const i64 b = c >> pk->shift, last = c + lanes - 1;
    if (last < lo && (last >> pk->shift) == b) {  // the usual case: one block of rows above, stride N − its start
      const i64 f = b << pk->shift, ld = pk->N - f;
      const S* p = C + pk->offset(b) + (c - f) * ld + (i - f);
      for (int l = 0; l < n; ++l) v[l] = p[std::min(l, lanes - 1) * ld];  // lanes past `lanes`: masked by the consumer
    } else {
      for (int l = 0; l < n; ++l) {
        const i64 k = c + std::min(l, lanes - 1);
        v[l] = C[k >= lo ? pk->at(i, k) : pk->at(k, i)];
      }
    }
    return CachedRow<T, S>{v, scale}.at(0);
  }
  vec<T> at(i64 j) const {
    const i64 c = j0 + j;
    return c >= lo ? CachedRow<T, S>{C + pk->at(i, c), scale}.at(0) : gather(c, VT<T>::N);
  }
  vec<T> tail(i64 j, int rem) const {
    const i64 c = j0 + j;
    return c >= lo ? CachedRow<T, S>{C + pk->at(i, c), scale}.tail(0, rem) : gather(c, rem);
  }
};

template <typename T> struct GemmRow {
  const T* G;   // tile row
  const T* hb;  // column terms, at the tile's first column
  T ha;
  vec<T> at(i64 j) const { return (vset(ha) + vload(hb + j)) - vload(G + j); }
  vec<T> tail(i64 j, int rem) const {
    return (vset(ha) + vload_part(hb + j, rem, T(0))) - vload_part(G + j, rem, T(0));
  }
};

// Σ_k (a_k − bT[k, j])² (Dot = false) or Σ_k a_k bT[k, j] (Dot = true), D ≤ DIRECT_MAX_D.
template <typename T, bool Dot = false> struct DirectRow {
  vec<T> av[DIRECT_MAX_D];
  const T* bT;  // (D, ld) at the tile's first column
  i64 ld;
  int D;
  DirectRow(const T* a, const T* bT_, i64 ld_, int D_) : bT(bT_), ld(ld_), D(D_) {
    for (int k = 0; k < D; ++k) av[k] = vset(a[k]);
  }
  vec<T> at(i64 j) const {
    vec<T> acc = vset(T(0));
    for (int k = 0; k < D; ++k) {
      vec<T> bv = vload(bT + k * ld + j);
      if constexpr (Dot) {
        acc = vfma(av[k], bv, acc);
      } else {
        vec<T> d = av[k] - bv;
        acc = vfma(d, d, acc);
      }
    }
    return acc;
  }
  vec<T> tail(i64 j, int rem) const {
    vec<T> acc = vset(T(0));
    for (int k = 0; k < D; ++k) {
      vec<T> bv = vload_part(bT + k * ld + j, rem, T(0));
      if constexpr (Dot) {
        acc = vfma(av[k], bv, acc);
      } else {
        vec<T> d = av[k] - bv;
        acc = vfma(d, d, acc);
      }
    }
    return acc;
  }
};

// Cost transforms: a loader of "u" into a loader of costs.
//   p = 2: GemmRow with half norms and alpha = 1 gives ½|a−b|² directly; DirectRow gives |a−b|² (×½).
//   p = 1: u = |a−b|², cost = sqrt(max(u, 1e-8)) (geomloss's clamp).
template <typename T, int P, typename L, bool HalfIt> struct CostRow {
  L l;
  static vec<T> f(vec<T> u) {
    if constexpr (P == 1) {
      return vsqrt(vmax(u, vset(T(1e-8))));
    } else if constexpr (HalfIt) {
      return u * T(0.5);
    } else {
      return u;
    }
  }
  vec<T> at(i64 j) const { return f(l.at(j)); }
  vec<T> tail(i64 j, int rem) const { return f(l.tail(j, rem)); }
};

// acc (nr × D, row stride D) += Σ_{j<W} w[r·ldw + j] (a_r − b_j), a (nr × D), b (W × D)
// row-major: a weighted sum of per-pair differences, formed inside the tile.  The expanded
// form a_r Σ_j w_rj − Σ_j w_rj b_j (one GEMM) loses every digit when the weight sits on
// points b_j ≈ a_r (the diagonal of a self-cost, a nearly diagonal kernel or plan): each
// product carries an error ≈ ε_mach·|a|·w, while a_r − b_j is exact there (Sterbenz).
//
// A register-blocked micro-kernel in the machine's native vector width (AVX2: 32 bytes, 16
// registers; AVX-512: 64 bytes): three rows × two vectors of coordinates accumulate over a
// block of b rows that stays in L1, with the rows' coordinates held in registers (one SUB and
// one FMA per multiply-add; measured 0.45–0.6× MKL's GEMM of the same shape on Zen 3).
#if defined(__AVX512F__)
constexpr int ACC_BYTES = 64;
#else
constexpr int ACC_BYTES = 32;
#endif
template <typename T> struct AV {
  typedef T v __attribute__((vector_size(ACC_BYTES)));
  static constexpr int N = ACC_BYTES / int(sizeof(T));
};
template <typename T> inline typename AV<T>::v aload(const T* p) {
  typename AV<T>::v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> inline void astore(T* p, typename AV<T>::v v) { std::memcpy(p, &v, sizeof(v)); }
template <typename T> inline typename AV<T>::v abcast(T x) {  // one broadcast (V{} + x adds 0.0 first)
  typedef typename AV<T>::v V;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) return (V)_mm512_set1_ps(x);
  else return (V)_mm512_set1_pd(x);
#elif defined(__AVX__)
  if constexpr (std::is_same<T, float>::value) return (V)_mm256_set1_ps(x);
  else return (V)_mm256_set1_pd(x);
#else
  return V{} + x;
#endif
}

// R rows × K vectors of coordinates [k, k + K·n) over the b rows [j0, j1).
template <typename T, int R, int K>
inline void acc_diff_block(const T* w, i64 ldw, const T* a, const T* b, i64 D, T* acc, i64 k, i64 j0, i64 j1) {
  typedef typename AV<T>::v V;
  constexpr int n = AV<T>::N;
  V s[R][K], x[R][K];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < K; ++q) {
      s[r][q] = aload(acc + r * D + k + q * n);
      x[r][q] = aload(a + r * D + k + q * n);
    }
  const T* bp = b + j0 * D + k;
  for (i64 j = j0; j < j1; ++j, bp += D) {
    V bv[K];
    for (int q = 0; q < K; ++q) bv[q] = aload(bp + q * n);
    for (int r = 0; r < R; ++r) {
      const V c = abcast(w[r * ldw + j]);
      for (int q = 0; q < K; ++q) s[r][q] += c * (x[r][q] - bv[q]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < K; ++q) astore(acc + r * D + k + q * n, s[r][q]);
}

template <typename T>
inline void acc_diff(const T* w, i64 ldw, i64 nr, i64 W, const T* a, const T* b, i64 D, T* acc) {
  constexpr int n = AV<T>::N;
  const i64 D2 = D / (2 * n) * (2 * n), D1 = D / n * n;
  const i64 JB = std::max<i64>(16, i64(16384 / sizeof(T)) / std::max<i64>(D, 1));  // 16 KB of b per block
  for (i64 j0 = 0; j0 < W; j0 += JB) {
    const i64 j1 = std::min(W, j0 + JB);
    i64 r = 0;
    for (; r + 3 <= nr; r += 3) {
      const T* wr = w + r * ldw;
      const T* ar = a + r * D;
      T* cr = acc + r * D;
      for (i64 k = 0; k < D2; k += 2 * n) acc_diff_block<T, 3, 2>(wr, ldw, ar, b, D, cr, k, j0, j1);
      if (D1 > D2) acc_diff_block<T, 3, 1>(wr, ldw, ar, b, D, cr, D2, j0, j1);
    }
    for (; r < nr; ++r) {
      const T* wr = w + r * ldw;
      for (i64 k = 0; k < D2; k += 2 * n) acc_diff_block<T, 1, 2>(wr, ldw, a + r * D, b, D, acc + r * D, k, j0, j1);
      if (D1 > D2) acc_diff_block<T, 1, 1>(wr, ldw, a + r * D, b, D, acc + r * D, D2, j0, j1);
    }
    if (D1 == D) continue;
    for (r = 0; r < nr; ++r) {  // the last D − D1 < n coordinates
      const T* wr = w + r * ldw;
      for (i64 k = D1; k < D; ++k) {
        const T x = a[r * D + k];
        T s = 0;
        for (i64 j = j0; j < j1; ++j) s += wr[j] * (x - b[j * D + k]);
        acc[r * D + k] += s;
      }
    }
  }
}

// Bits of the lanes where a ≥ b (lane k -> bit k).
template <typename V> inline uint32_t ge_bits(V a, V b) {
  typedef elem_t<V> T;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GE_OQ);
  else return _mm512_cmp_pd_mask((__m512d)a, (__m512d)b, _CMP_GE_OQ);
#else
  uint32_t m = 0;
  for (int k = 0; k < VT<T>::N; ++k) m |= uint32_t(a[k] >= b[k]) << k;
  return m;
#endif
}

// acc (D) += w·(a − b), one pair (the sparse path of acc_diff_auto).
template <typename T> inline void acc_diff_one(T w, const T* a, const T* b, i64 D, T* acc) {
  typedef typename AV<T>::v V;
  constexpr int n = AV<T>::N;
  const V c = abcast(w);
  i64 k = 0;
  for (; k + n <= D; k += n) astore(acc + k, aload(acc + k) + c * (aload(a + k) - aload(b + k)));
  for (; k < D; ++k) acc[k] += w * (a[k] - b[k]);
}

// acc_diff where most weights are zero (issue 23): at small ε a plan row holds a few entries
// and the exponentials of the others underflow (the gradient's weights are exact zeros there:
// row_weights).  When at most a third of the tile's weights are nonzero, the nonzero pairs
// are added one by one (D multiply-adds each) instead of the tile's nr·W·D; otherwise, or
// with a non-finite weight (it must reach the result), acc_diff.  Same sums, another order.
extern std::atomic<i64> grad_tiles[2];  // sparse, dense (grad.cpp)
template <typename T>
inline void acc_diff_auto(const T* w, i64 ldw, i64 nr, i64 W, const T* a, const T* b, i64 D, T* acc) {
  constexpr int n = VT<T>::N;
  const vec<T> big = vset(std::numeric_limits<T>::max()), tiny = vset(std::numeric_limits<T>::min());
  const uint32_t all = (1u << n) - 1u;
  i64 kept = 0;
  bool finite = true;
  for (i64 r = 0; r < nr && finite; ++r) {
    const T* wr = w + r * ldw;
    i64 j = 0;
    for (; j + n <= W; j += n) {
      const vec<T> v = vload(wr + j), av = vmax(v, -v);
      if (ge_bits(big, av) != all) finite = false;  // inf or NaN
      kept += __builtin_popcount(ge_bits(av, tiny));
    }
    for (; j < W; ++j) {
      if (!(std::abs(wr[j]) <= std::numeric_limits<T>::max())) finite = false;
      kept += wr[j] != T(0);
    }
  }
  if (!finite || 3 * kept > nr * W) {
    ++grad_tiles[1];
    acc_diff(w, ldw, nr, W, a, b, D, acc);
    return;
  }
  ++grad_tiles[0];
  for (i64 r = 0; r < nr; ++r) {
    const T* wr = w + r * ldw;
    const T* ar = a + r * D;
    T* cr = acc + r * D;
    i64 j = 0;
    for (; j + n <= W; j += n) {
      const vec<T> v = vload(wr + j);
      for (uint32_t bits = ge_bits(vmax(v, -v), tiny); bits; bits &= bits - 1) {
        const i64 jj = j + __builtin_ctz(bits);
        acc_diff_one(wr[jj], ar, b + jj * D, D, cr);
      }
    }
    for (; j < W; ++j)
      if (wr[j] != T(0)) acc_diff_one(wr[j], ar, b + j * D, D, cr);
  }
}

// Squared norms |x_i|² · scale for n points of dimension D.
template <typename T> inline void sqnorms(const T* x, i64 n, i64 D, T scale, T* out) {
  for (i64 i = 0; i < n; ++i) {
    T s = 0;
    const T* xi = x + i * D;
    for (i64 k = 0; k < D; ++k) s += xi[k] * xi[k];
    out[i] = s * scale;
  }
}

// bT (D, n) = transpose of x (n, D)
template <typename T> inline void transpose_to(const T* x, i64 n, i64 D, T* bT) {
  for (i64 i = 0; i < n; ++i)
    for (i64 k = 0; k < D; ++k) bT[k * n + i] = x[i * D + k];
}

// Per-batch precomputation of the column terms (norms and/or transposed points) of b.
template <typename T> struct ColumnTerms {
  std::vector<T> hb;  // (B, Nb)
  std::vector<T> bT;  // (B, D, Nb), only when direct
  ColumnTerms(const T* b, i64 B, i64 Nb, i64 D, bool direct, bool norms, T scale) {
    if (norms) {
      hb.resize(size_t(B * Nb));
      for (i64 q = 0; q < B; ++q) sqnorms(b + q * Nb * D, Nb, D, scale, hb.data() + q * Nb);
    }
    if (direct) {
      bT.resize(size_t(B * Nb * D));
      for (i64 q = 0; q < B; ++q) transpose_to(b + q * Nb * D, Nb, D, bT.data() + q * Nb * D);
    }
  }
};

}  // namespace otk

namespace otk {

// Runs body(task, ctx) for task in [0, n) on up to nt threads; ctx = init() once per thread.
// Every thread flushes denormals and keeps BLAS single-threaded while inside.
template <typename Init, typename Body>
inline void parallel_tasks(i64 n, int nt, Init init, Body body) {
  if (n <= 0) return;
  int threads = int(std::max<i64>(1, std::min<i64>(num_threads_or(nt), n)));
  (void)threads;
#pragma omp parallel num_threads(threads)
  {
    FlushDenormals fd;
    BlasOneThread bo;
    auto ctx = init();
#pragma omp for schedule(dynamic, 1)
    for (i64 t = 0; t < n; ++t) body(t, ctx);
  }
}

}  // namespace otk
