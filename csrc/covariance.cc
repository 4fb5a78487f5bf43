// The sequential recursions of the Markov solvers' covariance form as XLA FFI handlers: one
// custom call per pass over all points, so that a step costs its arithmetic instead of a trip
// through XLA:CPU's loop machinery. The pure-JAX scans in gpgrad_jax/_solver/markov/covariance.py
// are the reference (same formulas, same order of operations where it matters).
//
// Layout: row-major, leading axes are a batch (vmap), looped over here; single-threaded (no
// thread pool, so nothing here can wait on another call's work).
//
//   filter:   A (…, n, N, N), Q (…, n, N, N), C (…, n, p, N), o (…, n, p, q)
//             → m⁻ (…, n, N, q), P⁻ (…, n, N, N), log terms (…, n)
//   smooth:   A, C, o, m⁻, P⁻ (as above and as the filter gave them)
//             → ν, N (the adjoints), m_k|k, P_k|k, E[s_k|y], Cov(s_k|y), by the backward
//             recursion ν_k = E_k ν_{k+1} + CᵀU⁻¹v, N_k = E_k N_{k+1} E_kᵀ + CᵀU⁻¹C with
//             E_k = (I − K_k C_k)ᵀ A_{k+1}ᵀ.

#include <cstdint>
#include <type_traits>
#include <vector>

#include "small_matrix.h"

namespace ffi = xla::ffi;

namespace {

using gpgrad::Dispatch;
using gpgrad::MatMul;
using gpgrad::MatMulT;
using gpgrad::Rank;
using gpgrad::Sizes;
using gpgrad::SizesOf;
using gpgrad::SpdInverse;
using gpgrad::TMatMul;

// NB, PB > 0: the state size N and the observation rows p known at compile time, so that the
// small loops unroll (2× faster for the built-in kernels' models); 0: read at run time.
template <typename T, int NB = 0, int PB = 0>
void FilterOne(const T* a, const T* noise, const T* c, const T* o, T* pred_mean, T* pred_cov,
               T* terms, int64_t n, int64_t big_in, int64_t p_in, int64_t q, std::vector<T>& work) {
  const int64_t big = NB > 0 ? NB : big_in, p = PB > 0 ? PB : p_in;
  T* mean = work.data();           // N × q
  T* cov = mean + big * q;         // N × N
  T* tmp = cov + big * big;        // N × N
  T* pc = tmp + big * big;         // N × p
  T* u = pc + big * p;             // p × p
  T* u_inv = u + p * p;            // p × p
  T* low = u_inv + p * p;          // p × p
  T* tri = low + p * p;            // p × p
  T* innovation = tri + p * p;     // p × q
  T* gain = innovation + p * q;    // N × p
  T* solved = gain + big * p;      // p × q
  for (int64_t i = 0; i < big * q; ++i) mean[i] = T(0);
  for (int64_t i = 0; i < big * big; ++i) cov[i] = T(0);
  for (int64_t k = 0; k < n; ++k) {
    const T* a_k = a + k * big * big;
    const T* q_k = noise + k * big * big;
    const T* c_k = c + k * p * big;
    const T* o_k = o + k * p * q;
    T* m_k = pred_mean + k * big * q;
    T* p_k = pred_cov + k * big * big;
    MatMul(a_k, mean, m_k, big, big, q);  // m⁻ = A m
    MatMul(a_k, cov, tmp, big, big, big);
    MatMulT(tmp, a_k, p_k, big, big, big);  // P⁻ = A P Aᵀ + Q
    for (int64_t i = 0; i < big * big; ++i) p_k[i] += q_k[i];
    MatMulT(p_k, c_k, pc, big, big, p);  // P⁻Cᵀ
    MatMul(c_k, pc, u, p, big, p);       // U = I + C P⁻ Cᵀ
    for (int64_t i = 0; i < p; ++i) u[i * p + i] += T(1);
    const T logdet = SpdInverse(u, u_inv, low, tri, p);
    MatMul(c_k, m_k, innovation, p, big, q);  // v = o − C m⁻
    for (int64_t i = 0; i < p * q; ++i) innovation[i] = o_k[i] - innovation[i];
    MatMul(pc, u_inv, gain, big, p, p);  // K = P⁻CᵀU⁻¹
    MatMul(u_inv, innovation, solved, p, p, q);
    T quadratic = T(0);
    for (int64_t i = 0; i < p * q; ++i) quadratic += innovation[i] * solved[i];
    terms[k] = T(-0.5) * quadratic - T(0.5) * T(q) * logdet;
    MatMul(gain, innovation, mean, big, p, q);  // m = m⁻ + K v
    for (int64_t i = 0; i < big * q; ++i) mean[i] += m_k[i];
    MatMulT(gain, pc, cov, big, p, big);  // P = P⁻ − K (P⁻Cᵀ)ᵀ, symmetrised
    for (int64_t i = 0; i < big * big; ++i) cov[i] = p_k[i] - cov[i];
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t j = 0; j < i; ++j) {
        const T s = T(0.5) * (cov[i * big + j] + cov[j * big + i]);
        cov[i * big + j] = s;
        cov[j * big + i] = s;
      }
    }
  }
}

// The smoother, backwards over the points, carrying ν_{k+1}, N_{k+1}: the observation update
// recomputed from the predicted moments (K = P⁻CᵀU⁻¹, R = I − KC, v = o − Cm⁻), the filtered
// moments m_k|k = m⁻ + Kv, P_k|k = R P⁻ Rᵀ + KKᵀ, with λ̂ = A_{k+1}ᵀν_{k+1}, Λ̂ = A_{k+1}ᵀN_{k+1}A_{k+1}
// the smoothed ones m_k|k + P_k|k λ̂ and P_k|k − P_k|k Λ̂ P_k|k, and the adjoints
// ν_k = Rᵀλ̂ + CᵀU⁻¹v, N_k = RᵀΛ̂R + CᵀU⁻¹C.
template <typename T, int NB = 0, int PB = 0>
void SmoothOne(const T* a, const T* c, const T* o, const T* pred_mean, const T* pred_cov, T* nu,
               T* info, T* filt_mean, T* filt_cov, T* mean, T* cov, int64_t n, int64_t big_in,
               int64_t p_in, int64_t q, std::vector<T>& work) {
  const int64_t big = NB > 0 ? NB : big_in, p = PB > 0 ? PB : p_in;
  T* pc = work.data();             // N × p
  T* u = pc + big * p;             // p × p
  T* u_inv = u + p * p;            // p × p
  T* low = u_inv + p * p;          // p × p
  T* tri = low + p * p;            // p × p
  T* innovation = tri + p * p;     // p × q
  T* gain = innovation + p * q;    // N × p
  T* resid = gain + big * p;       // N × N: R = I − K C
  T* tmp = resid + big * big;      // N × N
  T* tmp2 = tmp + big * big;       // N × N
  T* later_mean = tmp2 + big * big;  // N × q
  T* later_info = later_mean + big * q;  // N × N
  T* ct_uinv = later_info + big * big;   // N × p
  for (int64_t k = n - 1; k >= 0; --k) {
    const T* c_k = c + k * p * big;
    const T* o_k = o + k * p * q;
    const T* m_k = pred_mean + k * big * q;
    const T* p_k = pred_cov + k * big * big;
    T* nu_k = nu + k * big * q;
    T* info_k = info + k * big * big;
    T* fm_k = filt_mean + k * big * q;
    T* fc_k = filt_cov + k * big * big;
    T* mean_k = mean + k * big * q;
    T* cov_k = cov + k * big * big;
    MatMulT(p_k, c_k, pc, big, big, p);  // P⁻Cᵀ
    MatMul(c_k, pc, u, p, big, p);
    for (int64_t i = 0; i < p; ++i) u[i * p + i] += T(1);
    SpdInverse(u, u_inv, low, tri, p);
    MatMul(c_k, m_k, innovation, p, big, q);
    for (int64_t i = 0; i < p * q; ++i) innovation[i] = o_k[i] - innovation[i];
    MatMul(pc, u_inv, gain, big, p, p);
    MatMul(gain, c_k, resid, big, p, big);
    for (int64_t i = 0; i < big * big; ++i) resid[i] = -resid[i];
    for (int64_t i = 0; i < big; ++i) resid[i * big + i] += T(1);
    // m_k|k and P_k|k (Joseph form).
    MatMul(gain, innovation, fm_k, big, p, q);
    for (int64_t i = 0; i < big * q; ++i) fm_k[i] += m_k[i];
    MatMul(resid, p_k, tmp, big, big, big);
    MatMulT(tmp, resid, fc_k, big, big, big);
    MatMulT(gain, gain, tmp, big, p, big);
    for (int64_t i = 0; i < big * big; ++i) fc_k[i] += tmp[i];
    // λ̂ and Λ̂ from step k + 1 (zero after the last point).
    if (k + 1 < n) {
      const T* a_next = a + (k + 1) * big * big;
      const T* nu_next = nu + (k + 1) * big * q;
      const T* info_next = info + (k + 1) * big * big;
      TMatMul(a_next, nu_next, later_mean, big, big, q);  // Aᵀν
      MatMul(info_next, a_next, tmp, big, big, big);      // Aᵀ (N A)
      TMatMul(a_next, tmp, later_info, big, big, big);
    } else {
      for (int64_t i = 0; i < big * q; ++i) later_mean[i] = T(0);
      for (int64_t i = 0; i < big * big; ++i) later_info[i] = T(0);
    }
    // Smoothed moments.
    MatMul(fc_k, later_mean, mean_k, big, big, q);
    for (int64_t i = 0; i < big * q; ++i) mean_k[i] += fm_k[i];
    MatMul(fc_k, later_info, tmp, big, big, big);
    MatMul(tmp, fc_k, tmp2, big, big, big);
    for (int64_t i = 0; i < big * big; ++i) cov_k[i] = fc_k[i] - tmp2[i];
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t j = 0; j < i; ++j) {
        const T s = T(0.5) * (cov_k[i * big + j] + cov_k[j * big + i]);
        cov_k[i * big + j] = s;
        cov_k[j * big + i] = s;
      }
    }
    // Adjoints: ν_k = Rᵀλ̂ + CᵀU⁻¹v, N_k = RᵀΛ̂R + CᵀU⁻¹C.
    TMatMul(c_k, u_inv, ct_uinv, big, p, p);  // CᵀU⁻¹
    MatMul(ct_uinv, innovation, nu_k, big, p, q);
    TMatMul(resid, later_mean, tmp2, big, big, q);  // + Rᵀ λ̂
    for (int64_t i = 0; i < big * q; ++i) nu_k[i] += tmp2[i];
    MatMul(ct_uinv, c_k, info_k, big, p, big);
    MatMul(later_info, resid, tmp, big, big, big);  // + Rᵀ (Λ̂ R)
    TMatMul(resid, tmp, tmp2, big, big, big);
    for (int64_t i = 0; i < big * big; ++i) info_k[i] += tmp2[i];
  }
}

template <ffi::DataType DT>
ffi::Error Filter(ffi::Buffer<DT> a, ffi::Buffer<DT> noise, ffi::Buffer<DT> c, ffi::Buffer<DT> o,
                  ffi::ResultBuffer<DT> pred_mean, ffi::ResultBuffer<DT> pred_cov,
                  ffi::ResultBuffer<DT> terms) {
  using T = ffi::NativeType<DT>;
  if (auto err = Rank(a, 3, "transition"); err.failure()) return err;
  if (auto err = Rank(c, 3, "obs_matrix"); err.failure()) return err;
  const Sizes s = SizesOf(a, c, o);
  const int64_t batch = s.batch, n = s.n, big = s.big, p = s.p, q = s.q;
  if (batch == 0) return ffi::Error::Success();
  std::vector<T> work(big * q + 3 * big * big + 2 * big * p + 4 * p * p + 2 * p * q + big * p);
  for (int64_t b = 0; b < batch; ++b) {
    // float32 runs the square-root form by default: its covariance passes keep run-time sizes.
    Dispatch<std::is_same_v<T, double>>(big, p, [&](auto nb, auto pb) {
      FilterOne<T, decltype(nb)::value, decltype(pb)::value>(
          a.typed_data() + b * n * big * big, noise.typed_data() + b * n * big * big,
          c.typed_data() + b * n * p * big, o.typed_data() + b * n * p * q,
          pred_mean->typed_data() + b * n * big * q, pred_cov->typed_data() + b * n * big * big,
          terms->typed_data() + b * n, n, big, p, q, work);
    });
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error Smooth(ffi::Buffer<DT> a, ffi::Buffer<DT> c, ffi::Buffer<DT> o, ffi::Buffer<DT> pred_mean,
                  ffi::Buffer<DT> pred_cov, ffi::ResultBuffer<DT> nu, ffi::ResultBuffer<DT> info,
                  ffi::ResultBuffer<DT> filt_mean, ffi::ResultBuffer<DT> filt_cov,
                  ffi::ResultBuffer<DT> mean, ffi::ResultBuffer<DT> cov) {
  using T = ffi::NativeType<DT>;
  if (auto err = Rank(a, 3, "transition"); err.failure()) return err;
  if (auto err = Rank(c, 3, "obs_matrix"); err.failure()) return err;
  const Sizes s = SizesOf(a, c, o);
  const int64_t batch = s.batch, n = s.n, big = s.big, p = s.p, q = s.q;
  if (batch == 0) return ffi::Error::Success();
  std::vector<T> work(3 * big * p + 4 * p * p + p * q + 4 * big * big + big * q);
  const int64_t vec = n * big * q, mat = n * big * big;
  for (int64_t b = 0; b < batch; ++b) {
    // float32 runs the square-root form by default: its covariance passes keep run-time sizes.
    Dispatch<std::is_same_v<T, double>>(big, p, [&](auto nb, auto pb) {
    SmoothOne<T, decltype(nb)::value, decltype(pb)::value>(a.typed_data() + b * mat, c.typed_data() + b * n * p * big, o.typed_data() + b * n * p * q,
              pred_mean.typed_data() + b * vec, pred_cov.typed_data() + b * mat, nu->typed_data() + b * vec,
              info->typed_data() + b * mat, filt_mean->typed_data() + b * vec,
              filt_cov->typed_data() + b * mat, mean->typed_data() + b * vec, cov->typed_data() + b * mat,
              n, big, p, q, work);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

#define GPGRAD_FILTER(NAME, DT)                                                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Filter<DT>,                                             \
                                ffi::Ffi::Bind()                                              \
                                    .Arg<ffi::Buffer<DT>>()                                   \
                                    .Arg<ffi::Buffer<DT>>()                                   \
                                    .Arg<ffi::Buffer<DT>>()                                   \
                                    .Arg<ffi::Buffer<DT>>()                                   \
                                    .Ret<ffi::Buffer<DT>>()                                   \
                                    .Ret<ffi::Buffer<DT>>()                                   \
                                    .Ret<ffi::Buffer<DT>>());

#define GPGRAD_SMOOTH(NAME, DT)                                                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Smooth<DT>,                                             \
                                ffi::Ffi::Bind()                                              \
                                    .Arg<ffi::Buffer<DT>>()                                   \
                                    .Arg<ffi::Buffer<DT>>()                                   \
                                    .Arg<ffi::Buffer<DT>>()                                   \
                                    .Arg<ffi::Buffer<DT>>()                                   \
                                    .Arg<ffi::Buffer<DT>>()                                   \
                                    .Ret<ffi::Buffer<DT>>()                                   \
                                    .Ret<ffi::Buffer<DT>>()                                   \
                                    .Ret<ffi::Buffer<DT>>()                                   \
                                    .Ret<ffi::Buffer<DT>>()                                   \
                                    .Ret<ffi::Buffer<DT>>()                                   \
                                    .Ret<ffi::Buffer<DT>>());

extern "C" {
GPGRAD_FILTER(GpgradCovarianceFilterF32, ffi::F32)
GPGRAD_FILTER(GpgradCovarianceFilterF64, ffi::F64)
GPGRAD_SMOOTH(GpgradCovarianceSmoothF32, ffi::F32)
GPGRAD_SMOOTH(GpgradCovarianceSmoothF64, ffi::F64)
}
