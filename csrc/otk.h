// otkernels native CPU kernels: shared SIMD helpers and kernel declarations.
//
// Plain C++17 + OpenMP, no torch headers (only bindings.cpp includes torch), so the kernel
// files compile fast and on any compiler with GCC/Clang vector extensions.  Vectors are
// 64-byte GCC vector types: with -march=native they compile to AVX-512 (or pairs of AVX2
// ops, or SSE) without intrinsics.
//
// Conventions: all arrays are dense row-major; a batch index b selects the slab
// x + b*N*D etc.  T is the compute type (float or double); S the storage type of a cached
// cost matrix (T, or for T=float: bf16_t / f16_t, 16-bit stored with a scale).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // inside GCC 12's AVX-512 intrinsics
#endif

#if defined(__SSE__) || defined(__x86_64__)
#include <immintrin.h>
#define OTK_X86 1
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace otk {

typedef int64_t i64;

// ----------------------------------------------------------------------------- 16-bit storage
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// ----------------------------------------------------------------------------- vector types
// The machine's native width: 64 bytes with AVX-512, else 32 (AVX2).  GCC lowers a 64-byte
// generic vector on AVX2 through the stack: a load + add loop measured 0.77 ns/element
// against 0.25 with 32-byte vectors (Zen 3), and every pass of the kernels paid it.
#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#else
constexpr int VBYTES = 32;
#endif
template <typename T> struct VT;
template <> struct VT<float> {
  static constexpr int N = VBYTES / 4;
  typedef float v __attribute__((vector_size(VBYTES)));
  typedef int32_t vi __attribute__((vector_size(VBYTES)));
};
template <> struct VT<double> {
  static constexpr int N = VBYTES / 8;
  typedef double v __attribute__((vector_size(VBYTES)));
  typedef int64_t vi __attribute__((vector_size(VBYTES)));
};

template <typename T> using vec = typename VT<T>::v;
template <typename T> using veci = typename VT<T>::vi;

template <typename T> inline vec<T> vset(T a) { return vec<T>{} + a; }
template <typename T> inline vec<T> vload(const T* p) { vec<T> v; std::memcpy(&v, p, sizeof(v)); return v; }
template <typename T> inline void vstore(T* p, vec<T> v) { std::memcpy(p, &v, sizeof(v)); }
// Generic in the vector type V (vec<T> is a non-deduced alias, so helpers take V itself).
template <typename V> using elem_t = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;
template <typename V> inline V vmax(V a, V b) { return a > b ? a : b; }
template <typename V> inline V vmin(V a, V b) { return a < b ? a : b; }
template <typename Mk, typename V> inline V select(Mk m, V a, V b) { return m ? a : b; }
// a·b + c in one rounding where the target has FMA
inline vec<float> vfma(vec<float> a, vec<float> b, vec<float> c) {
#if defined(__AVX512F__)
  return (vec<float>)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  return a * b + c;
#endif
}
inline vec<double> vfma(vec<double> a, vec<double> b, vec<double> c) {
#if defined(__AVX512F__)
  return (vec<double>)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#else
  return a * b + c;
#endif
}
inline vec<float> vsqrt(vec<float> a) {
#if defined(__AVX512F__)
  return (vec<float>)_mm512_sqrt_ps((__m512)a);
#else
  vec<float> r;
  for (int k = 0; k < VT<float>::N; ++k) r[k] = std::sqrt(a[k]);
  return r;
#endif
}
inline vec<double> vsqrt(vec<double> a) {
#if defined(__AVX512F__)
  return (vec<double>)_mm512_sqrt_pd((__m512d)a);
#else
  vec<double> r;
  for (int k = 0; k < VT<double>::N; ++k) r[k] = std::sqrt(a[k]);
  return r;
#endif
}
template <typename V> inline elem_t<V> hmax(V a) {
  typedef elem_t<V> T;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) return _mm512_reduce_max_ps((__m512)a);
  else return _mm512_reduce_max_pd((__m512d)a);
#else
  T m = a[0];
  for (int k = 1; k < VT<T>::N; ++k) m = a[k] > m ? a[k] : m;
  return m;
#endif
}
template <typename V> inline elem_t<V> hsum(V a) {
  // a tree of pairwise sums, so float sums of 16 lanes keep their accuracy
  typedef elem_t<V> T;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) return _mm512_reduce_add_ps((__m512)a);
  else return _mm512_reduce_add_pd((__m512d)a);
#else
  constexpr int n = VT<T>::N;
  T t[n];
  std::memcpy(t, &a, sizeof(a));
  for (int w = n / 2; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) t[k] += t[k + w];
  return t[0];
#endif
}
// any lane of a > b
template <typename V> inline bool any_gt(V a, V b) {
  typedef elem_t<V> T;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GT_OQ) != 0;
  else return _mm512_cmp_pd_mask((__m512d)a, (__m512d)b, _CMP_GT_OQ) != 0;
#else
  for (int k = 0; k < VT<T>::N; ++k)
    if (a[k] > b[k]) return true;
  return false;
#endif
}
template <typename T> inline vec<T> iota() {
  vec<T> r;
  for (int k = 0; k < VT<T>::N; ++k) r[k] = T(k);
  return r;
}
// lanes k < rem of p (rem < N), `fill` elsewhere
template <typename T> inline vec<T> vload_part(const T* p, int rem, T fill) {
  T t[VT<T>::N];
  for (int k = 0; k < VT<T>::N; ++k) t[k] = k < rem ? p[k] : fill;
  return vload(t);
}
template <typename T> inline void vstore_part(T* p, vec<T> v, int rem) {
  for (int k = 0; k < rem; ++k) p[k] = v[k];
}

// exp(x) with x clamped to [lo, hi] so that the result is a normal number (never a denormal,
// never inf): lo = -86 / -700, hi = 88 / 709.  2^n · 2^f with n = round(x·log2 e) (the
// 1.5·2^23 "magic" addition), f = x·log2 e − n by one FMA, 2^f by a polynomial on |f| ≤ ½:
// float a degree-5 minimax fit (2.4e-7 relative, 2 ulp); double Taylor to degree 13 (2e-16).
// 2^n is added to the exponent bits: (t_bits << 23) = n << 23 since the magic's low 9 bits
// are zero.  vexp_le0 skips the upper clamp for arguments known to be ≤ 0 (log-sum-exp).
template <typename T> struct ExpC;
template <> struct ExpC<float> { static constexpr float lo = -86.f, hi = 88.f; };
template <> struct ExpC<double> { static constexpr double lo = -700., hi = 709.; };

inline vec<float> vexp_le0(vec<float> x) {
  typedef vec<float> V; typedef veci<float> VI;
  x = vmax(x, vset(ExpC<float>::lo));
  const V magic = vset(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V l2e = vset(1.44269504088896341f);
  V t = vfma(x, l2e, magic);
  V n = t - magic;
  V f = vfma(x, l2e, -n);
  V p = vset(1.327647151972771e-03f);
  p = vfma(p, f, vset(9.675541330685163e-03f));
  p = vfma(p, f, vset(5.550713274960701e-02f));
  p = vfma(p, f, vset(2.4022119723933866e-01f));
  p = vfma(p, f, vset(6.931469670638644e-01f));
  p = vfma(p, f, vset(1.0000000716546547f));
  return (V)((VI)p + ((VI)t << 23));
}
inline vec<float> vexp(vec<float> x) { return vexp_le0(vmin(x, vset(ExpC<float>::hi))); }

inline vec<double> vexp_le0(vec<double> x) {
  typedef vec<double> V; typedef veci<double> VI;
  x = vmax(x, vset(ExpC<double>::lo));
  const V magic = vset(6755399441055744.0);  // 1.5 * 2^52
  const V l2e = vset(1.4426950408889634074);
  V t = vfma(x, l2e, magic);
  V n = t - magic;
  // f = x·log2e − n, with the rounding error of log2e added back
  V f = vfma(x, l2e, -n);
  f = vfma(x, vset(2.0355273740931033e-17), f);
  static const double c[14] = {1.0, 6.9314718055994531e-01, 2.4022650695910071e-01,
                               5.5504108664821580e-02, 9.6181291076284772e-03,
                               1.3333558146428443e-03, 1.5403530393381610e-04,
                               1.5252733804059841e-05, 1.3215486790144307e-06,
                               1.0178086009239699e-07, 7.0549116208011234e-09,
                               4.4455382718708114e-10, 2.5678435993488205e-11,
                               1.3691488853904128e-12};
  V p = vset(c[13]);
  for (int k = 12; k >= 0; --k) p = vfma(p, f, vset(c[k]));
  return (V)((VI)p + ((VI)t << 52));
}
inline vec<double> vexp(vec<double> x) { return vexp_le0(vmin(x, vset(ExpC<double>::hi))); }
// vexp with 0 below the clamp: what exp gives there after rounding (and flushing) to the
// dtype, where vexp's e^lo stands in for a denormal.  The gradient's weights use it, so that
// a plan's underflowing entries are zeros its sparse path can skip (tiles.h, acc_diff_auto).
template <typename V> inline V vexp_or_0(V x) {
  typedef elem_t<V> T;
  return select(x >= vset(ExpC<T>::lo), vexp(x), vset(T(0)));
}

inline float sexp(float x) { return std::exp(x); }
inline double sexp(double x) { return std::exp(x); }

// ----------------------------------------------------------------------------- storage loads
// Load N consecutive stored values as a vector of T.
template <typename T> inline vec<T> sload(const T* p) { return vload(p); }
typedef uint16_t vhalf __attribute__((vector_size(VBYTES / 2)));  // N 16-bit values
inline vec<float> sload(const bf16_t* p) {
  typedef vhalf vh;
  vh h; std::memcpy(&h, p, sizeof(h));
  veci<float> i = __builtin_convertvector(h, veci<float>) << 16;
  return (vec<float>)i;
}
inline vec<float> sload(const f16_t* p) {
#if defined(__AVX512F__)
  __m256i h; std::memcpy(&h, p, sizeof(h));
  return (vec<float>)_mm512_cvtph_ps(h);
#elif defined(__F16C__)
  __m128i h; std::memcpy(&h, p, 16);
  return (vec<float>)_mm256_cvtph_ps(h);
#else
  vec<float> r;
  for (int k = 0; k < VT<float>::N; ++k) {
    uint16_t h = p[k].bits;
    uint32_t s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, bits;
    if (e == 0) {  // zero / subnormal
      float v = std::ldexp((float)m, -24); std::memcpy(&bits, &v, 4); bits |= s;
    } else if (e == 31) {
      bits = s | 0x7f800000u | (m << 13);
    } else {
      bits = s | ((e + 112) << 23) | (m << 13);
    }
    float v; std::memcpy(&v, &bits, 4); r[k] = v;
  }
  return r;
#endif
}
template <typename T, typename S> inline vec<T> sload_part(const S* p, int rem) {
  S t[VT<T>::N];
  std::memset(t, 0, sizeof(t));
  for (int k = 0; k < rem; ++k) t[k] = p[k];
  return sload(t);
}
template <typename T> inline T sscalar(const T* p) { return *p; }
inline float sscalar(const bf16_t* p) { uint32_t b = uint32_t(p->bits) << 16; float v; std::memcpy(&v, &b, 4); return v; }
inline float sscalar(const f16_t* p) { f16_t t[16] = {}; t[0] = *p; return sload(t)[0]; }

// Store N values of T into storage S (round to nearest even for the 16-bit types).
template <typename T> inline void sstore(T* p, vec<T> v) { vstore(p, v); }
inline void sstore(bf16_t* p, vec<float> v) {
  typedef vhalf vh;
  veci<float> b = (veci<float>)v;
  veci<float> r = (b + 0x7fff + ((b >> 16) & 1)) >> 16;  // arithmetic shift: keep the low 16 bits
  vh h = __builtin_convertvector(r & 0xffff, vh);
  std::memcpy(p, &h, sizeof(h));
}
inline void sstore(f16_t* p, vec<float> v) {
#if defined(__AVX512F__)
  __m256i h = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  std::memcpy(p, &h, sizeof(h));
#elif defined(__F16C__)
  __m128i h = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(p, &h, 16);
#else
  for (int k = 0; k < VT<float>::N; ++k) {  // truncating fallback (values are clamped to the f16 range)
    float f = v[k]; uint32_t b; std::memcpy(&b, &f, 4);
    uint32_t s = (b >> 16) & 0x8000u; int e = int((b >> 23) & 0xff) - 127 + 15;
    uint16_t h;
    if (e <= 0) h = uint16_t(s);
    else if (e >= 31) h = uint16_t(s | 0x7bffu);
    else h = uint16_t(s | (e << 10) | ((b >> 13) & 0x3ffu));
    p[k].bits = h;
  }
#endif
}
// sstore bypassing the caches where the target is 64-byte aligned (a cost cache written once,
// read in later passes: no read-for-ownership of its lines); a fence (stream_fence) must
// follow before other threads read it.
template <typename S, typename V> inline void sstore_nt(S* p, V v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<S, float>::value || std::is_same<S, double>::value) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      if constexpr (std::is_same<S, float>::value) _mm512_stream_ps(p, (__m512)v);
      else _mm512_stream_pd(p, (__m512d)v);
      return;
    }
  }
#endif
  sstore(p, v);
}
inline void stream_fence() {
#ifdef OTK_X86
  _mm_sfence();
#endif
}
template <typename T, typename S> inline void sstore_part(S* p, vec<T> v, int rem) {
  S t[VT<T>::N];
  sstore(t, v);
  for (int k = 0; k < rem; ++k) p[k] = t[k];
}

// ----------------------------------------------------------------------------- threads, FTZ
inline int num_threads_or(int nt) { return nt > 0 ? nt : 1; }

// Sets flush-to-zero / denormals-are-zero for the calling thread and restores the previous
// mode on exit (created once per thread inside every parallel region).
struct FlushDenormals {
#ifdef OTK_X86
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Single-threaded GEMM on row-major matrices: C = alpha·op(A)·op(B) + beta·C, op(A) m×k,
// op(B) k×n.  MKL/BLAS from the process when it exports sgemm_/dgemm_, else a fallback
// registered by the bindings (at::mm).  Called inside parallel regions: one thread each.
void gemm(bool transA, bool transB, i64 m, i64 n, i64 k, float alpha, const float* A, i64 lda,
          const float* B, i64 ldb, float beta, float* C, i64 ldc);
void gemm(bool transA, bool transB, i64 m, i64 n, i64 k, double alpha, const double* A, i64 lda,
          const double* B, i64 ldb, double beta, double* C, i64 ldc);
typedef void (*gemm_fallback_f)(bool, bool, i64, i64, i64, double, const void*, i64, const void*,
                                i64, double, void*, i64, bool is_double);
void set_gemm_fallback(gemm_fallback_f f);
const char* blas_name();
// Per-thread guard: BLAS single-threaded inside our regions (restored on exit).
struct BlasOneThread {
  int saved;
  BlasOneThread();
  ~BlasOneThread();
};

// Tile sizes.
constexpr int DIRECT_MAX_D = 8;  // D ≤ this: distances computed directly, else GEMM tiles
constexpr int ROWS = 256;        // rows per task (GEMM tiles: 256 × 512 keeps MKL near its peak)
constexpr int COLS = 512;        // columns per tile

// ----------------------------------------------------------------------------- kernel API
// All functions: B batches, dense arrays.  nt = threads.  p ∈ {1, 2}.
// cost cache: C (B,N,M) = C(x_i, y_j); cscale multiplies stored values (f16).
template <typename T, typename S>
void cost_matrix(const T* x, const T* y, S* C, i64 B, i64 N, i64 M, i64 D, int p, T cscale_inv, int nt);

// Segments of a ragged batch (issue 21), also the dense batch's layout: segment q pairs the
// rows [xo[q], xo[q+1]) of x (Nx, D) with the rows [yo[q], yo[q+1]) of y (Ny, D), at ε_q = eps[q];
// its row-indexed vectors (f, g, out) sit at q·nmax of padded (S, nmax) arrays and its
// column-indexed ones (h, s) at q·mmax of (S, mmax).  A dense batch (B, N, M) is the uniform
// case: x (B,N,D) is (B·N, D) stacked, nmax = N, mmax = M.
struct Segs {
  std::vector<i64> xo, yo;
  std::vector<double> eps;
  i64 nmax = 0, mmax = 0;
  i64 S() const { return i64(eps.size()); }
  i64 n(i64 q) const { return xo[size_t(q) + 1] - xo[size_t(q)]; }
  i64 m(i64 q) const { return yo[size_t(q) + 1] - yo[size_t(q)]; }
  static Segs dense(i64 B, i64 N, i64 M, double eps) {
    Segs s;
    s.nmax = N, s.mmax = M;
    s.eps.assign(size_t(B), eps);
    for (i64 q = 0; q <= B; ++q) s.xo.push_back(q * N), s.yo.push_back(q * M);
    return s;
  }
};

// softmin over the rows of a cached C (B,N,M), returned as the log-sum-exp
// out (B,N) = log Σ_j exp(h_j − C_ij/ε), h (B,M) (the softmin is −ε·out);
// transpose: over its columns, out (B,M) = log Σ_i exp(h_i − C_ij/ε), h (B,N).
template <typename T, typename S>
void softmin_cached(const S* C, T cscale, bool transpose, const T* h, T* out, i64 B, i64 N, i64 M,
                    double eps, int nt);
// both reductions of one Sinkhorn iteration from one read of a cached C (B,N,M): out_r (B,N)
// over the rows with hr (B,M), out_c (B,M) over the columns with hc (B,N); sym: C symmetric
// (N = M, stored whole), hc = hr, out_c unused, only the upper triangle is read.
template <typename T, typename S>
i64 softmin_cached_two(const S* C, T cscale, const T* hr, const T* hc, T* out_r, T* out_c, i64 B, i64 N, i64 M,
                       double eps, bool sym, bool plan, int nt);
// plan: one exp per entry (the plan's row and column sums; softmin.cpp, "plan form"), the
// log-sum-exp passes where a sum leaves the safe range; returns the rows and columns so
// recomputed (0 without plan).  plan_counts: (passes, rows and columns recomputed,
// whole-cache column recomputations) since the last reset.
void plan_counts(i64* out, bool reset);
// The gradient's tiles (acc_diff_auto, tiles.h) summed pair by pair (sparse) and whole (dense)
// since the last reset: grad_counts(out[2], reset).
void grad_counts(i64* out, bool reset);
// packed triangles of symmetric costs C(x, x) (issue 23; layout: tiles.h, Packed): C (B, numel)
// with numel = packed_numel(N) ≈ N²/2 + 32·N.  cost_packed fills it; softmin_packed is
// softmin_cached_two's sym pass on it (out (B,N) with h (B,N)).
i64 packed_numel(i64 N);
template <typename T, typename S>
void cost_packed(const T* x, S* C, i64 B, i64 N, i64 D, int p, T cscale_inv, int nt);
template <typename T, typename S>
i64 softmin_packed(const S* C, T cscale, const T* h, T* out, i64 B, i64 N, double eps, bool plan, int nt);
// the same with C(x_i, y_j) computed on the fly, over segments: out (S,nmax) with
// out_qi = log Σ_j exp(h_qj − C(x_i, y_j)/ε_q), j over segment q's rows of y, h (S,mmax);
// rows i ≥ n_q of out are not written.
template <typename T>
void softmin_online(const T* x, const T* y, const T* h, T* out, const Segs& sg, i64 D, int p, int nt);
// both reductions of one Sinkhorn iteration from the same GEMM tiles (D > DIRECT_MAX_D):
// out_r (B,N) = log Σ_j exp(hr_j − C_ij/ε) (hr (B,M)) and out_c (B,M) = log Σ_i exp(hc_i − C_ij/ε)
// (hc (B,N)); sym: y = x, hc = hr, out_c unused, only the upper-triangle tiles are computed.
template <typename T>
void softmin_online_two(const T* x, const T* y, const T* hr, const T* hc, T* out_r, T* out_c, i64 B, i64 N,
                        i64 M, i64 D, int p, double eps, bool sym, int nt);

// grad (B,Na,D) = Σ_j g_i s_j exp(h_j − C_ij/ε + fscale·f_i) ∇_1 C(a_i, b_j), a (B,Na,D) the
// first cloud, b (B,Nb,D) the second; h, s (B,Nb); f, g (B,Na); s may be null (= 1).
// fscale = 1/ε for a potential f, −1 for the log-sum-exp returned by the softmin kernels.
// Cached: C (B,Na,Nb), or with transpose C (B,Nb,Na) read as C(a_i, b_j) = C[j,i].
template <typename T, typename S>
void grad_cached(const S* C, T cscale, bool transpose, const T* a, const T* b, const T* h,
                 const T* f, const T* g, const T* s, T* out, i64 B, i64 Na, i64 Nb, i64 D, int p,
                 double eps, double fscale, int nt);
// Packed triangle of C(a, a) (B, Packed(N).numel()) (tiles.h): the same with b = a.
template <typename T, typename S>
void grad_packed(const S* C, T cscale, const T* a, const T* h, const T* f, const T* g, const T* s, T* out,
                 i64 B, i64 N, i64 D, int p, double eps, double fscale, int nt);
// Online, over segments (Segs: a = x, b = y): out (Nx, D), f and g (S,nmax), h and s (S,mmax).
template <typename T>
void grad_online(const T* a, const T* b, const T* h, const T* f, const T* g, const T* s, T* out,
                 const Segs& sg, i64 D, int p, double fscale, int nt);

// Plan products (otkernels.plan), one pass, cost computed on the fly: lse (B,Na) =
// log Σ_j exp(h_j − C(a_i, b_j)/ε) and out (B,Na,K) = Σ_j exp(h_j − C_ij/ε − lse_i) V_j, V (B,Nb,K).
template <typename T>
void plan_apply(const T* a, const T* b, const T* h, const T* V, T* out, T* lse, i64 B, i64 Na, i64 Nb, i64 D,
                i64 K, int p, double eps, int nt);

// Kernel sums: val (B,N) = Σ_j k(|x_i−y_j|²) w_j; grad (B,N,D) = 2 g_i Σ_j w_j k'(d²) (x_i − y_j)
// (k' w.r.t. the unscaled d²).  kernel: 0 gaussian exp(−d²/2σ²), 1 laplacian exp(−√max(d²/σ²,1e-8)),
// 2 energy −√max(d², 1e-8).  val / grad may be null (not computed); g null = 1.
template <typename T>
void kernel_sum(const T* x, const T* y, const T* w, const T* g, T* val, T* grad, i64 B, i64 N, i64 M,
                i64 D, int kernel, double sigma, int nt);

// argmax_j ⟨x_i, y_j⟩ + h_j (mode 0) or argmin_j |x_i − y_j|² + h_j (mode 1), h may be null;
// first index on ties.  val (B,N), idx (B,N).
template <typename T>
void argminmax(const T* x, const T* y, const T* h, T* val, i64* idx, i64 B, i64 N, i64 M, i64 D,
               int mode, int nt);

}  // namespace otk
