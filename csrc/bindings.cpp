// Python bindings of the native kernels (module otkernels._C, or otkernels_C when built
// just-in-time).  Every entry point checks devices, dtypes, contiguity and sizes again with
// TORCH_CHECK (a RuntimeError, never a crash); the Python layer (otkernels/backends/native.py)
// validates first, with clearer messages.  The GIL is released while the kernels run.
#include <torch/extension.h>

#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "otk.h"

namespace {

using otk::i64;

int threads() { return std::max(1, at::get_num_threads()); }

// at::mm on views: the GEMM fallback when the process exports no BLAS symbols.
void gemm_fallback(bool tA, bool tB, i64 m, i64 n, i64 k, double alpha, const void* A, i64 lda, const void* B,
                   i64 ldb, double beta, void* C, i64 ldc, bool is_double) {
  auto opt = at::TensorOptions().dtype(is_double ? at::kDouble : at::kFloat);
  at::Tensor a = tA ? at::from_blob(const_cast<void*>(A), {k, m}, {lda, 1}, opt).t()
                    : at::from_blob(const_cast<void*>(A), {m, k}, {lda, 1}, opt);
  at::Tensor b = tB ? at::from_blob(const_cast<void*>(B), {n, k}, {ldb, 1}, opt).t()
                    : at::from_blob(const_cast<void*>(B), {k, n}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  at::Tensor r = at::mm(a, b);
  if (beta == 0) c.copy_(r.mul_(alpha));
  else c.mul_(beta).add_(r, alpha);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "otkernels native: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "otkernels native: ", name, " must be contiguous");
}

void check_points(const at::Tensor& t, const char* name, at::ScalarType dt) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 3, "otkernels native: ", name, " must be (B,N,D), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "otkernels native: ", name, " has dtype ", t.scalar_type(), ", expected ", dt);
}

void check_vec(const at::Tensor& t, const char* name, at::ScalarType dt, i64 B, i64 n) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == dt, "otkernels native: ", name, " has dtype ", t.scalar_type(), ", expected ", dt);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == n, "otkernels native: ", name, " must be (", B, ",", n,
              "), got ", t.sizes());
}

at::ScalarType compute_type(const at::Tensor& t) {
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "otkernels native: expected float32 or float64, got ", dt);
  return dt;
}

void check_cache(const at::Tensor& C, at::ScalarType dt, i64 packed_n = -1) {
  check_cpu(C, "C");
  if (packed_n < 0) {
    TORCH_CHECK(C.dim() == 3, "otkernels native: the cost cache must be (B,N,M), got ", C.sizes());
  } else {
    TORCH_CHECK(C.dim() == 2 && C.size(1) == otk::packed_numel(packed_n), "otkernels native: a packed cache of N=",
                packed_n, " must be (B, ", otk::packed_numel(packed_n), "), got ", C.sizes());
  }
  auto s = C.scalar_type();
  if (dt == at::kDouble) {
    TORCH_CHECK(s == at::kDouble, "otkernels native: a float64 problem needs a float64 cache, got ", s);
  } else {
    TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf,
                "otkernels native: a float32 problem needs a float32, bfloat16 or float16 cache, got ", s);
  }
}

// Calls f(T*, S*) with the typed pointers of a (compute, storage) pair.
template <typename F> void dispatch_cache(at::ScalarType dt, const at::Tensor& C, F f) {
  auto s = C.scalar_type();
  if (dt == at::kDouble) f(double(0), static_cast<const double*>(C.data_ptr()));
  else if (s == at::kFloat) f(float(0), static_cast<const float*>(C.data_ptr()));
  else if (s == at::kBFloat16) f(float(0), static_cast<const otk::bf16_t*>(C.data_ptr()));
  else f(float(0), static_cast<const otk::f16_t*>(C.data_ptr()));
}

template <typename T> const T* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }
template <typename T> T* mptr(at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// ----------------------------------------------------------------------------- cache memory
// Cost caches are large (400 MB for 10k × 10k float32) and written once per loss call: on
// fresh memory the page faults cost more than the GEMM that fills them.  Blocks are 2 MiB
// aligned, marked for transparent huge pages, and recycled through a pool when released
// (up to a limit, set from Python; 0 disables the pool).
struct Pool {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // size -> block
  size_t pooled = 0, limit = 0;

  void* take(size_t bytes, size_t* got) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = free_blocks.lower_bound(bytes);
    if (it != free_blocks.end() && it->first <= bytes + bytes / 4) {
      void* p = it->second;
      *got = it->first;
      pooled -= it->first;
      free_blocks.erase(it);
      return p;
    }
    return nullptr;
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (pooled + bytes <= limit) {
        free_blocks.emplace(bytes, p);
        pooled += bytes;
        return;
      }
    }
    std::free(p);
  }
  void trim(size_t new_limit) {
    std::lock_guard<std::mutex> lock(mu);
    limit = new_limit;
    while (pooled > limit && !free_blocks.empty()) {
      auto it = free_blocks.begin();
      pooled -= it->first;
      std::free(it->second);
      free_blocks.erase(it);
    }
  }
};
Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may outlive module teardown
  return *p;
}

at::Tensor alloc_cache(i64 B, i64 N, i64 M, at::ScalarType dtype) {
  TORCH_CHECK(B >= 0 && N >= 0 && M >= 0, "otkernels native: negative cache size");
  const size_t item = c10::elementSize(dtype);
  const size_t bytes = size_t(B) * size_t(N) * size_t(M) * item;
  const size_t align = size_t(2) << 20;
  if (bytes < align) return at::empty({B, N, M}, at::TensorOptions().dtype(dtype));
  const size_t rounded = (bytes + align - 1) / align * align;
  size_t got = rounded;
  void* p = pool().take(rounded, &got);
  if (p == nullptr) {
    p = std::aligned_alloc(align, rounded);
    TORCH_CHECK(p != nullptr, "otkernels native: cannot allocate ", bytes, " bytes for a cost cache");
#ifdef MADV_HUGEPAGE
    madvise(p, rounded, MADV_HUGEPAGE);
#endif
  }
  return at::from_blob(p, {B, N, M}, [got](void* q) { pool().give(q, got); }, at::TensorOptions().dtype(dtype));
}

// Sets the pool limit in bytes (frees pooled blocks above it); returns the pooled bytes.
int64_t set_pool_limit(int64_t bytes) {
  pool().trim(size_t(std::max<int64_t>(0, bytes)));
  std::lock_guard<std::mutex> lock(pool().mu);
  return int64_t(pool().pooled);
}

void cost_matrix(const at::Tensor& x, const at::Tensor& y, int64_t p, at::Tensor& out, double scale_inv) {
  auto dt = compute_type(x);
  check_points(x, "x", dt);
  check_points(y, "y", dt);
  const i64 B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  TORCH_CHECK(y.size(0) == B && y.size(2) == D, "otkernels native: x ", x.sizes(), " and y ", y.sizes(), " mismatch");
  const bool packed = out.dim() == 2;  // the packed triangle of C(x, x) (issue 23)
  check_cache(out, dt, packed ? N : -1);
  if (packed) {
    TORCH_CHECK(out.size(0) == B && y.data_ptr() == x.data_ptr(),
                "otkernels native: a packed cache (B, numel) holds C(x, x): y must be x, B=", B);
  } else {
    TORCH_CHECK(out.size(0) == B && out.size(1) == N && out.size(2) == M, "otkernels native: cache ", out.sizes(),
                " does not match (", B, ",", N, ",", M, ")");
  }
  TORCH_CHECK(p == 1 || p == 2, "otkernels native: p must be 1 or 2");
  const int nt = threads();
  pybind11::gil_scoped_release nogil;
  dispatch_cache(dt, out, [&](auto t, auto cptr) {
    typedef decltype(t) T;
    typedef std::remove_const_t<std::remove_pointer_t<decltype(cptr)>> S;
    if (packed) otk::cost_packed<T, S>(ptr<T>(x), const_cast<S*>(cptr), B, N, D, int(p), T(scale_inv), nt);
    else otk::cost_matrix<T, S>(ptr<T>(x), ptr<T>(y), const_cast<S*>(cptr), B, N, M, D, int(p), T(scale_inv), nt);
  });
}

at::Tensor softmin_cached(const at::Tensor& C, double cscale, bool transpose, const at::Tensor& h, double eps) {
  auto dt = compute_type(h);
  check_cache(C, dt);
  const i64 B = C.size(0), N = C.size(1), M = C.size(2);
  check_vec(h, "h", dt, B, transpose ? N : M);
  TORCH_CHECK(eps > 0, "otkernels native: eps must be > 0");
  at::Tensor out = at::empty({B, transpose ? M : N}, h.options());
  const int nt = threads();
  pybind11::gil_scoped_release nogil;
  dispatch_cache(dt, C, [&](auto t, auto cptr) {
    typedef decltype(t) T;
    typedef std::remove_const_t<std::remove_pointer_t<decltype(cptr)>> S;
    otk::softmin_cached<T, S>(cptr, T(cscale), transpose, ptr<T>(h), mptr<T>(out), B, N, M, eps, nt);
  });
  return out;
}

// K kernel counters (plan_counts, grad_counts), read and optionally reset.
template <int K> std::vector<int64_t> counters(void (*read)(otk::i64*, bool), bool reset) {
  otk::i64 c[K];
  read(c, reset);
  return std::vector<int64_t>(c, c + K);
}

std::vector<at::Tensor> softmin_cached_two(const at::Tensor& C, double cscale, const at::Tensor& hr,
                                           const at::Tensor& hc, double eps, bool sym, bool plan) {
  auto dt = compute_type(hr);
  const bool packed = C.dim() == 2;  // the packed triangle of a symmetric C (issue 23): N from hr
  TORCH_CHECK(!packed || (sym && hr.dim() == 2), "otkernels native: a packed cache needs sym and hr (B,N)");
  check_cache(C, dt, packed ? hr.size(1) : -1);
  const i64 B = C.size(0), N = packed ? hr.size(1) : C.size(1), M = packed ? N : C.size(2);
  TORCH_CHECK(!sym || N == M, "otkernels native: sym needs a square cache, got ", C.sizes());
  check_vec(hr, "hr", dt, B, M);
  if (!sym) check_vec(hc, "hc", dt, B, N);
  TORCH_CHECK(eps > 0, "otkernels native: eps must be > 0");
  at::Tensor out_r = at::empty({B, N}, hr.options());
  at::Tensor out_c = at::empty({B, sym ? 0 : M}, hr.options());
  const int nt = threads();
  i64 redone = 0;
  {
    pybind11::gil_scoped_release nogil;
    dispatch_cache(dt, C, [&](auto t, auto cptr) {
      typedef decltype(t) T;
      typedef std::remove_const_t<std::remove_pointer_t<decltype(cptr)>> S;
      if (packed)
        redone = otk::softmin_packed<T, S>(cptr, T(cscale), ptr<T>(hr), mptr<T>(out_r), B, N, eps, plan, nt);
      else
        redone = otk::softmin_cached_two<T, S>(cptr, T(cscale), ptr<T>(hr), sym ? ptr<T>(hr) : ptr<T>(hc),
                                               mptr<T>(out_r), mptr<T>(out_c), B, N, M, eps, sym, plan, nt);
    });
  }
  return {out_r, out_c, at::scalar_tensor(double(redone), at::TensorOptions().dtype(at::kLong))};
}

at::Tensor softmin_online(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h, double eps, int64_t p) {
  auto dt = compute_type(x);
  check_points(x, "x", dt);
  check_points(y, "y", dt);
  const i64 B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  TORCH_CHECK(y.size(0) == B && y.size(2) == D, "otkernels native: x ", x.sizes(), " and y ", y.sizes(), " mismatch");
  check_vec(h, "h", dt, B, M);
  TORCH_CHECK(p == 1 || p == 2, "otkernels native: p must be 1 or 2");
  TORCH_CHECK(eps > 0, "otkernels native: eps must be > 0");
  at::Tensor out = at::empty({B, N}, x.options());
  const int nt = threads();
  pybind11::gil_scoped_release nogil;
  const auto sg = otk::Segs::dense(B, N, M, eps);
  if (dt == at::kDouble)
    otk::softmin_online<double>(ptr<double>(x), ptr<double>(y), ptr<double>(h), mptr<double>(out), sg, D, int(p), nt);
  else
    otk::softmin_online<float>(ptr<float>(x), ptr<float>(y), ptr<float>(h), mptr<float>(out), sg, D, int(p), nt);
  return out;
}

// Ragged batches (issue 21): segment q pairs rows [xo[q], xo[q+1]) of x (Nx,D) with rows
// [yo[q], yo[q+1]) of y (Ny,D) at ε_q = eps[q]; row vectors padded (S, nmax), column vectors
// padded (S, mmax), nmax / mmax at least the largest segment.
otk::Segs ragged_segs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xo, const at::Tensor& yo,
                      const at::Tensor& eps, i64 nmax, i64 mmax, at::ScalarType dt) {
  for (auto [t, name] : {std::pair{&x, "x"}, std::pair{&y, "y"}}) {
    check_cpu(*t, name);
    TORCH_CHECK(t->dim() == 2, "otkernels native: ", name, " must be (N, D) (segments stacked), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dt, "otkernels native: ", name, " has dtype ", t->scalar_type(), ", expected ", dt);
  }
  TORCH_CHECK(x.size(1) == y.size(1), "otkernels native: x ", x.sizes(), " and y ", y.sizes(), " mismatch");
  otk::Segs sg;
  const i64 S = eps.numel();
  TORCH_CHECK(eps.scalar_type() == at::kDouble && eps.dim() == 1 && eps.is_contiguous() && eps.device().is_cpu(),
              "otkernels native: eps must be a contiguous float64 CPU vector, one value per segment");
  for (auto [t, name, o, n] : {std::tuple{&xo, "xo", &sg.xo, x.size(0)}, std::tuple{&yo, "yo", &sg.yo, y.size(0)}}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->numel() == S + 1 && t->device().is_cpu(),
                "otkernels native: ", name, " must be an int64 CPU vector of S+1 = ", S + 1, " offsets");
    auto a = t->contiguous();
    o->assign(a.data_ptr<int64_t>(), a.data_ptr<int64_t>() + S + 1);
    TORCH_CHECK((*o)[0] == 0 && o->back() == n, "otkernels native: ", name, " must run from 0 to ", n);
  }
  sg.eps.assign(eps.data_ptr<double>(), eps.data_ptr<double>() + S);
  sg.nmax = nmax, sg.mmax = mmax;
  for (i64 q = 0; q < S; ++q) {
    TORCH_CHECK(sg.n(q) >= 0 && sg.m(q) >= 0 && sg.n(q) <= nmax && sg.m(q) <= mmax,
                "otkernels native: segment ", q, " has ", sg.n(q), " x ", sg.m(q), " points, padded to ", nmax, " x ", mmax);
    TORCH_CHECK(sg.eps[size_t(q)] > 0, "otkernels native: eps must be > 0");
  }
  return sg;
}

at::Tensor softmin_ragged(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xo, const at::Tensor& yo,
                          const at::Tensor& h, const at::Tensor& eps, int64_t nmax, int64_t p) {
  auto dt = compute_type(x);
  check_vec(h, "h", dt, eps.numel(), h.dim() == 2 ? h.size(1) : -1);
  const auto sg = ragged_segs(x, y, xo, yo, eps, nmax, h.size(1), dt);
  TORCH_CHECK(p == 1 || p == 2, "otkernels native: p must be 1 or 2");
  at::Tensor out = at::zeros({sg.S(), nmax}, x.options());
  const int nt = threads();
  pybind11::gil_scoped_release nogil;
  if (dt == at::kDouble)
    otk::softmin_online<double>(ptr<double>(x), ptr<double>(y), ptr<double>(h), mptr<double>(out), sg, x.size(1), int(p), nt);
  else
    otk::softmin_online<float>(ptr<float>(x), ptr<float>(y), ptr<float>(h), mptr<float>(out), sg, x.size(1), int(p), nt);
  return out;
}

at::Tensor grad_ragged(const at::Tensor& a, const at::Tensor& b, const at::Tensor& xo, const at::Tensor& yo,
                       const at::Tensor& h, const at::Tensor& f, const at::Tensor& g, const at::Tensor& eps,
                       int64_t p, double fscale) {
  auto dt = compute_type(a);
  const i64 S = eps.numel();
  check_vec(h, "h", dt, S, h.dim() == 2 ? h.size(1) : -1);
  check_vec(f, "f", dt, S, f.dim() == 2 ? f.size(1) : -1);
  check_vec(g, "g", dt, S, f.size(1));
  const auto sg = ragged_segs(a, b, xo, yo, eps, f.size(1), h.size(1), dt);
  TORCH_CHECK(p == 1 || p == 2, "otkernels native: p must be 1 or 2");
  at::Tensor out = at::zeros({a.size(0), a.size(1)}, a.options());
  const int nt = threads();
  pybind11::gil_scoped_release nogil;
  if (dt == at::kDouble)
    otk::grad_online<double>(ptr<double>(a), ptr<double>(b), ptr<double>(h), ptr<double>(f), ptr<double>(g), nullptr,
                             mptr<double>(out), sg, a.size(1), int(p), fscale, nt);
  else
    otk::grad_online<float>(ptr<float>(a), ptr<float>(b), ptr<float>(h), ptr<float>(f), ptr<float>(g), nullptr,
                            mptr<float>(out), sg, a.size(1), int(p), fscale, nt);
  return out;
}

std::vector<at::Tensor> softmin_online_two(const at::Tensor& x, const at::Tensor& y, const at::Tensor& hr,
                                           const at::Tensor& hc, double eps, int64_t p, bool sym) {
  auto dt = compute_type(x);
  check_points(x, "x", dt);
  check_points(y, "y", dt);
  const i64 B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  TORCH_CHECK(y.size(0) == B && y.size(2) == D, "otkernels native: x ", x.sizes(), " and y ", y.sizes(), " mismatch");
  TORCH_CHECK(D > otk::DIRECT_MAX_D, "otkernels native: softmin_online_two needs D > ", otk::DIRECT_MAX_D);
  TORCH_CHECK(!sym || (N == M && x.data_ptr() == y.data_ptr()), "otkernels native: sym needs y = x");
  check_vec(hr, "hr", dt, B, M);
  check_vec(hc, "hc", dt, B, N);
  TORCH_CHECK(p == 1 || p == 2, "otkernels native: p must be 1 or 2");
  TORCH_CHECK(eps > 0, "otkernels native: eps must be > 0");
  at::Tensor out_r = at::empty({B, N}, x.options());
  at::Tensor out_c = at::empty({B, sym ? 0 : M}, x.options());
  const int nt = threads();
  {
    pybind11::gil_scoped_release nogil;
    if (dt == at::kDouble)
      otk::softmin_online_two<double>(ptr<double>(x), ptr<double>(y), ptr<double>(hr), ptr<double>(hc),
                                      mptr<double>(out_r), mptr<double>(out_c), B, N, M, D, int(p), eps, sym, nt);
    else
      otk::softmin_online_two<float>(ptr<float>(x), ptr<float>(y), ptr<float>(hr), ptr<float>(hc),
                                     mptr<float>(out_r), mptr<float>(out_c), B, N, M, D, int(p), eps, sym, nt);
  }
  return {out_r, out_c};
}

void check_grad_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& h, const at::Tensor& f,
                     const at::Tensor& g, const c10::optional<at::Tensor>& s, at::ScalarType dt) {
  check_points(a, "a", dt);
  check_points(b, "b", dt);
  const i64 B = a.size(0), Na = a.size(1), Nb = b.size(1);
  TORCH_CHECK(b.size(0) == B && b.size(2) == a.size(2), "otkernels native: a ", a.sizes(), " and b ", b.sizes(), " mismatch");
  check_vec(h, "h", dt, B, Nb);
  check_vec(f, "f", dt, B, Na);
  check_vec(g, "g", dt, B, Na);
  if (s.has_value()) check_vec(*s, "s", dt, B, Nb);
}

at::Tensor grad_cached(const at::Tensor& C, double cscale, bool transpose, const at::Tensor& a, const at::Tensor& b,
                       const at::Tensor& h, const at::Tensor& f, const at::Tensor& g, const c10::optional<at::Tensor>& s,
                       double eps, int64_t p, double fscale) {
  auto dt = compute_type(a);
  check_grad_args(a, b, h, f, g, s, dt);
  const i64 B = a.size(0), Na = a.size(1), Nb = b.size(1), D = a.size(2);
  const bool packed = C.dim() == 2;  // the packed triangle of C(a, a) (issue 23)
  if (packed) {
    check_cache(C, dt, Na);
    TORCH_CHECK(C.size(0) == B && !transpose && b.data_ptr() == a.data_ptr(),
                "otkernels native: a packed cache (B, numel) holds C(a, a): b must be a, no transpose");
  } else {
    check_cache(C, dt);
    const bool ok = transpose ? (C.size(0) == B && C.size(1) == Nb && C.size(2) == Na)
                              : (C.size(0) == B && C.size(1) == Na && C.size(2) == Nb);
    TORCH_CHECK(ok, "otkernels native: cache ", C.sizes(), " does not match the clouds (B=", B, ", ", Na, ", ", Nb,
                ", transpose=", transpose, ")");
  }
  TORCH_CHECK(p == 1 || p == 2, "otkernels native: p must be 1 or 2");
  TORCH_CHECK(eps > 0, "otkernels native: eps must be > 0");
  at::Tensor out = at::empty({B, Na, D}, a.options());
  at::Tensor sv = s.has_value() ? *s : at::Tensor();
  const int nt = threads();
  pybind11::gil_scoped_release nogil;
  dispatch_cache(dt, C, [&](auto t, auto cptr) {
    typedef decltype(t) T;
    typedef std::remove_const_t<std::remove_pointer_t<decltype(cptr)>> S;
    if (packed)
      otk::grad_packed<T, S>(cptr, T(cscale), ptr<T>(a), ptr<T>(h), ptr<T>(f), ptr<T>(g), ptr<T>(sv), mptr<T>(out), B,
                             Na, D, int(p), eps, fscale, nt);
    else
      otk::grad_cached<T, S>(cptr, T(cscale), transpose, ptr<T>(a), ptr<T>(b), ptr<T>(h), ptr<T>(f), ptr<T>(g),
                             ptr<T>(sv), mptr<T>(out), B, Na, Nb, D, int(p), eps, fscale, nt);
  });
  return out;
}

at::Tensor grad_online(const at::Tensor& a, const at::Tensor& b, const at::Tensor& h, const at::Tensor& f,
                       const at::Tensor& g, const c10::optional<at::Tensor>& s, double eps, int64_t p,
                       double fscale) {
  auto dt = compute_type(a);
  check_grad_args(a, b, h, f, g, s, dt);
  TORCH_CHECK(p == 1 || p == 2, "otkernels native: p must be 1 or 2");
  TORCH_CHECK(eps > 0, "otkernels native: eps must be > 0");
  const i64 B = a.size(0), Na = a.size(1), Nb = b.size(1), D = a.size(2);
  at::Tensor out = at::empty({B, Na, D}, a.options());
  at::Tensor sv = s.has_value() ? *s : at::Tensor();
  const int nt = threads();
  pybind11::gil_scoped_release nogil;
  const auto sg = otk::Segs::dense(B, Na, Nb, eps);
  if (dt == at::kDouble)
    otk::grad_online<double>(ptr<double>(a), ptr<double>(b), ptr<double>(h), ptr<double>(f), ptr<double>(g),
                             ptr<double>(sv), mptr<double>(out), sg, D, int(p), fscale, nt);
  else
    otk::grad_online<float>(ptr<float>(a), ptr<float>(b), ptr<float>(h), ptr<float>(f), ptr<float>(g),
                            ptr<float>(sv), mptr<float>(out), sg, D, int(p), fscale, nt);
  return out;
}

std::tuple<at::Tensor, at::Tensor> plan_apply(const at::Tensor& a, const at::Tensor& b, const at::Tensor& h,
                                              const at::Tensor& V, double eps, int64_t p) {
  auto dt = compute_type(a);
  check_points(a, "x", dt);
  check_points(b, "y", dt);
  const i64 B = a.size(0), Na = a.size(1), Nb = b.size(1), D = a.size(2);
  TORCH_CHECK(b.size(0) == B && b.size(2) == D, "otkernels native: x ", a.sizes(), " and y ", b.sizes(), " mismatch");
  check_vec(h, "v", dt, B, Nb);
  check_points(V, "V", dt);
  TORCH_CHECK(V.size(0) == B && V.size(1) == Nb, "otkernels native: V ", V.sizes(), " must be (B, M, K) with B=", B,
              ", M=", Nb);
  TORCH_CHECK(p == 1 || p == 2, "otkernels native: p must be 1 or 2");
  TORCH_CHECK(eps > 0, "otkernels native: eps must be > 0");
  const i64 K = V.size(2);
  at::Tensor out = at::zeros({B, Na, K}, a.options());
  at::Tensor lse = at::full({B, Na}, -std::numeric_limits<double>::infinity(), a.options());
  if (Na == 0 || Nb == 0) return {out, lse};
  const int nt = threads();
  pybind11::gil_scoped_release nogil;
  if (dt == at::kDouble)
    otk::plan_apply<double>(ptr<double>(a), ptr<double>(b), ptr<double>(h), ptr<double>(V), mptr<double>(out),
                            mptr<double>(lse), B, Na, Nb, D, K, int(p), eps, nt);
  else
    otk::plan_apply<float>(ptr<float>(a), ptr<float>(b), ptr<float>(h), ptr<float>(V), mptr<float>(out),
                           mptr<float>(lse), B, Na, Nb, D, K, int(p), eps, nt);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> kernel_sum(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w,
                                              const c10::optional<at::Tensor>& g, int64_t kernel, double sigma,
                                              bool want_val, bool want_grad) {
  auto dt = compute_type(x);
  check_points(x, "x", dt);
  check_points(y, "y", dt);
  const i64 B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  TORCH_CHECK(y.size(0) == B && y.size(2) == D, "otkernels native: x ", x.sizes(), " and y ", y.sizes(), " mismatch");
  check_vec(w, "b", dt, B, M);
  if (g.has_value()) check_vec(*g, "g", dt, B, N);
  TORCH_CHECK(kernel >= 0 && kernel <= 2, "otkernels native: kernel must be 0 (gaussian), 1 (laplacian) or 2 (energy)");
  TORCH_CHECK(sigma > 0, "otkernels native: blur must be > 0");
  at::Tensor val = want_val ? at::empty({B, N}, x.options()) : at::Tensor();
  at::Tensor grad = want_grad ? at::empty({B, N, D}, x.options()) : at::Tensor();
  at::Tensor gv = g.has_value() ? *g : at::Tensor();
  const int nt = threads();
  {
    pybind11::gil_scoped_release nogil;
    if (dt == at::kDouble)
      otk::kernel_sum<double>(ptr<double>(x), ptr<double>(y), ptr<double>(w), ptr<double>(gv), mptr<double>(val),
                              mptr<double>(grad), B, N, M, D, int(kernel), sigma, nt);
    else
      otk::kernel_sum<float>(ptr<float>(x), ptr<float>(y), ptr<float>(w), ptr<float>(gv), mptr<float>(val),
                             mptr<float>(grad), B, N, M, D, int(kernel), sigma, nt);
  }
  return {val, grad};
}

std::tuple<at::Tensor, at::Tensor> argminmax(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& h,
                                             int64_t mode) {
  auto dt = compute_type(x);
  check_points(x, "x", dt);
  check_points(y, "y", dt);
  const i64 B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  TORCH_CHECK(y.size(0) == B && y.size(2) == D, "otkernels native: x ", x.sizes(), " and y ", y.sizes(), " mismatch");
  TORCH_CHECK(M >= 1, "otkernels native: y must have at least one point");
  TORCH_CHECK(dt == at::kDouble || M < (i64(1) << 31), "otkernels native: too many points for int32 indices");
  if (h.has_value()) check_vec(*h, "h", dt, B, M);
  TORCH_CHECK(mode == 0 || mode == 1, "otkernels native: mode must be 0 (argmax inner) or 1 (argmin sqdist)");
  at::Tensor val = at::empty({B, N}, x.options());
  at::Tensor idx = at::empty({B, N}, x.options().dtype(at::kLong));
  at::Tensor hv = h.has_value() ? *h : at::Tensor();
  const int nt = threads();
  {
    pybind11::gil_scoped_release nogil;
    if (dt == at::kDouble)
      otk::argminmax<double>(ptr<double>(x), ptr<double>(y), ptr<double>(hv), mptr<double>(val), idx.data_ptr<int64_t>(),
                             B, N, M, D, int(mode), nt);
    else
      otk::argminmax<float>(ptr<float>(x), ptr<float>(y), ptr<float>(hv), mptr<float>(val), idx.data_ptr<int64_t>(),
                            B, N, M, D, int(mode), nt);
  }
  return {val, idx};
}

pybind11::dict info() {
  pybind11::dict d;
  d["blas"] = otk::blas_name();
#if defined(__AVX512F__)
  d["simd"] = "avx512";
#elif defined(__AVX2__)
  d["simd"] = "avx2";
#elif defined(__SSE2__)
  d["simd"] = "sse2";
#else
  d["simd"] = "generic";
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["threads"] = threads();
  d["direct_max_d"] = otk::DIRECT_MAX_D;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  otk::set_gemm_fallback(&gemm_fallback);
  m.doc() = "otkernels native CPU kernels (csrc/): fused softmin, Sinkhorn gradients, kernel sums, argmin/argmax";
  m.def("info", &info);
  m.def("alloc_cache", &alloc_cache, "uninitialised (B,N,M) tensor on huge pages, recycled through a pool");
  m.def("set_pool_limit", &set_pool_limit, "bytes of released caches kept for reuse; returns the pooled bytes");
  m.def("cost_matrix", &cost_matrix, "fill a (B,N,M) cost cache, or the packed triangle (B, packed_numel(N)) of C(x, x)");
  m.def("softmin_cached", &softmin_cached, "log Σ exp(h − C/ε) over the rows (or columns) of a cached C");
  m.def("softmin_cached_two", &softmin_cached_two,
        "both log-sum-exps of a Sinkhorn iteration (rows with hr, columns with hc) from one read of a cached C; "
        "sym: C symmetric, upper triangle only (C (B,N,N), or packed (B, packed_numel(N))); plan: one exp per "
        "entry through the plan's row and column sums (log-sum-exp kept where a sum leaves the safe range); "
        "returns [out_r, out_c, rows and columns the plan form recomputed (0-d int64)]",
        pybind11::arg("C"), pybind11::arg("cscale"), pybind11::arg("hr"), pybind11::arg("hc"), pybind11::arg("eps"),
        pybind11::arg("sym"), pybind11::arg("plan") = true);
  m.def("plan_counts", [](bool reset) { return counters<4>(otk::plan_counts, reset); }, pybind11::arg("reset") = false,
        "plan form since the last reset: [passes, rows and columns recomputed by log-sum-exp, whole-cache column passes]");
  m.def("grad_counts", [](bool reset) { return counters<2>(otk::grad_counts, reset); }, pybind11::arg("reset") = false,
        "the gradient's tiles since the last reset: [summed pair by pair (sparse), summed whole]");
  m.def("packed_numel", [](int64_t N) { return otk::packed_numel(N); },
        "elements a batch of the packed triangle of a symmetric N × N cost (row blocks from their diagonal)");
  m.def("softmin_online", &softmin_online, "log Σ_j exp(h_j − C(x_i, y_j)/ε), C computed on the fly");
  m.def("softmin_online_two", &softmin_online_two,
        "rows and columns log-sum-exp of one Sinkhorn iteration from shared GEMM tiles (sym: y = x, triangle)");
  m.def("grad_cached", &grad_cached,
        "Σ_j g_i s_j exp(h_j − C_ij/ε + fscale·f_i) ∇_1 C, cached C (B,Na,Nb), or packed C(a, a) (B, numel)");
  m.def("grad_online", &grad_online, "the same with C computed on the fly");
  m.def("softmin_ragged", &softmin_ragged,
        "ragged batches: log Σ_j exp(h_qj − C(x_i, y_j)/ε_q) over segment q's points, one launch for all segments");
  m.def("grad_ragged", &grad_ragged, "ragged batches: the softmin's gradient for x, one launch for all segments");
  m.def("plan_apply", &plan_apply, "(Σ_j softmax_j(h_j − C_ij/ε) V_j, log Σ_j exp(h_j − C_ij/ε)), one pass");
  m.def("kernel_sum", &kernel_sum);
  m.def("argminmax", &argminmax);
}
