// Single-threaded row-major GEMM for the tiles of the native kernels.
//
// The BLAS that torch links (MKL on x86 wheels) usually exports the Fortran symbols
// sgemm_/dgemm_; they are declared weak here, so the extension loads whether or not they
// exist, and without them the bindings' fallback (at::mm on views) is used.
#include "otk.h"

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// C interface (the lower-case names are the Fortran ones, taking a pointer)
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace otk {

static gemm_fallback_f g_fallback = nullptr;

void set_gemm_fallback(gemm_fallback_f f) { g_fallback = f; }

const char* blas_name() {
  if (sgemm_ && dgemm_) return MKL_Set_Num_Threads_Local ? "MKL sgemm_/dgemm_" : "BLAS sgemm_/dgemm_";
  return "at::mm fallback";
}

BlasOneThread::BlasOneThread() : saved(0) {
  if (MKL_Set_Num_Threads_Local) saved = MKL_Set_Num_Threads_Local(1);
}
BlasOneThread::~BlasOneThread() {
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(saved);
}

static inline bool fits_int(i64 v) { return v >= 0 && v <= 2147483647LL; }

// Row-major C (m×n) = alpha op(A) op(B) + beta C  <=>  column-major Cᵀ = op(B)ᵀ op(A)ᵀ.
void gemm(bool tA, bool tB, i64 m, i64 n, i64 k, float alpha, const float* A, i64 lda,
          const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ && fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    const char ta = tA ? 'T' : 'N', tb = tB ? 'T' : 'N';
    int M = int(n), Nn = int(m), K = int(k), la = int(ldb), lb = int(lda), lc = int(ldc);
    sgemm_(&tb, &ta, &M, &Nn, &K, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  g_fallback(tA, tB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, false);
}

void gemm(bool tA, bool tB, i64 m, i64 n, i64 k, double alpha, const double* A, i64 lda,
          const double* B, i64 ldb, double beta, double* C, i64 ldc) {
  if (m == 0 || n == 0) return;
  if (dgemm_ && fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    const char ta = tA ? 'T' : 'N', tb = tB ? 'T' : 'N';
    int M = int(n), Nn = int(m), K = int(k), la = int(ldb), lb = int(lda), lc = int(ldc);
    dgemm_(&tb, &ta, &M, &Nn, &K, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  g_fallback(tA, tB, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, true);
}

}  // namespace otk
