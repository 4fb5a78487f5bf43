// The sequential recursions of the Markov solvers' square-root form as XLA FFI handlers: one
// custom call per pass over all points. Covariances are carried as factors and every update is
// one Householder triangularisation of a pre-array, as in the pure-JAX reference,
// gpgrad_jax/_solver/markov/square_root.py (same pre-arrays, same reflections).
//
// Layout: row-major, leading axes are a batch (vmap), looped over here; single-threaded (no
// thread pool, so nothing here can wait on another call's work).
//
//   filter:       A (…, n, N, N), L (…, n, N, N) (process-noise factors), C (…, n, p, N),
//                 o (…, n, p, q)
//                 → m_k|k (…, n, N, q), S_k|k (…, n, N, N), C S_k|k (…, n, p, N),
//                   o − C m_k|k (…, n, p, q), log terms (…, n), spread (…, n)
//   smooth:       A_{k+1}, L_{k+1} at k (zero at the last point), C, o, and the filter's
//                 m_k|k, S_k|k, C S_k|k, o − C m_k|k
//                 → E[s_k|y] (…, n, N, q), o − C E[s_k|y] (…, n, p, q), a factor G of
//                   Cov(s_k|y) (…, n, N, N), C G (…, n, p, N), and the pseudo-observation
//                   (W, ỹ) of s_k by the data from k on ((…, n, N, N), (…, n, N, q)) by the
//                   backward information filter

#include <cmath>
#include <cstdint>
#include <vector>

#include "small_matrix.h"

namespace ffi = xla::ffi;

namespace {

using gpgrad::Dispatch;
using gpgrad::MatMul;
using gpgrad::Rank;
using gpgrad::SolveLower;
using gpgrad::SolveLowerTransposed;
using gpgrad::Sizes;
using gpgrad::SizesOf;
using gpgrad::Triangularize;

// Per step: S⁻ = tria([A S, L]), m⁻ = A m; then
// [[I, C S⁻], [0, S⁻], [I, 0]] Θ = [[R, 0], [K̄, S⁺], [R⁻ᵀ, −C S⁺]] (R Rᵀ = U), v = o − C m⁻,
// m⁺ = m⁻ + K̄ R⁻¹v, o − C m⁺ = R⁻ᵀR⁻¹v, term −½‖R⁻¹v‖² − q log|det R|.
template <typename T, int NB = 0, int PB = 0>
void FilterOne(const T* a, const T* noise_factor, const T* c, const T* o, T* mean_out, T* factor_out,
               T* c_factor_out, T* residual_out, T* terms, T* spread, int64_t n, int64_t big_in,
               int64_t p_in, int64_t q, T* work) {
  const int64_t big = NB > 0 ? NB : big_in, p = PB > 0 ? PB : p_in;
  const int64_t joint_w = 2 * big, pre_w = p + big, pre_rows = 2 * p + big;
  T* mean = work;                       // N × q
  T* factor = mean + big * q;           // N × N
  T* pred_mean = factor + big * big;    // N × q
  T* joint = pred_mean + big * q;       // N × 2N
  T* pre = joint + big * joint_w;       // (2p + N) × (p + N)
  T* innovation = pre + pre_rows * pre_w;  // p × q
  T* whitened = innovation + p * q;     // p × q
  T* floor = whitened + p * q;          // N
  for (int64_t i = 0; i < big * q; ++i) mean[i] = T(0);
  for (int64_t i = 0; i < big * big; ++i) factor[i] = T(0);
  for (int64_t k = 0; k < n; ++k) {
    const T* a_k = a + k * big * big;
    const T* l_k = noise_factor + k * big * big;
    const T* c_k = c + k * p * big;
    const T* o_k = o + k * p * q;
    MatMul(a_k, mean, pred_mean, big, big, q);
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t j = 0; j < big; ++j) {
        T acc = T(0);
        for (int64_t l = 0; l < big; ++l) acc += a_k[i * big + l] * factor[l * big + j];
        joint[i * joint_w + j] = acc;
        joint[i * joint_w + big + j] = l_k[i * big + j];
      }
    }
    Triangularize(joint, big, joint_w, big, false, floor);  // S⁻: the first N columns
    for (int64_t i = 0; i < pre_rows * pre_w; ++i) pre[i] = T(0);
    T c_norm = T(0);
    for (int64_t i = 0; i < p; ++i) {
      pre[i * pre_w + i] = T(1);
      pre[(p + big + i) * pre_w + i] = T(1);
      for (int64_t j = 0; j < big; ++j) {
        T acc = T(0);
        for (int64_t l = 0; l < big; ++l) acc += c_k[i * big + l] * joint[l * joint_w + j];
        pre[i * pre_w + p + j] = acc;
        c_norm += acc * acc;
      }
    }
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t j = 0; j < big; ++j) pre[(p + i) * pre_w + p + j] = joint[i * joint_w + j];
    }
    T o_norm = T(0);
    for (int64_t i = 0; i < p * q; ++i) o_norm += o_k[i] * o_k[i];
    spread[k] = std::sqrt(o_norm) + std::sqrt(c_norm);
    Triangularize(pre, pre_rows, pre_w, p, true, floor);
    MatMul(c_k, pred_mean, innovation, p, big, q);
    for (int64_t i = 0; i < p * q; ++i) innovation[i] = o_k[i] - innovation[i];
    SolveLower(pre, pre_w, innovation, whitened, p, q);  // R⁻¹ v
    T* residual_k = residual_out + k * p * q;
    SolveLowerTransposed(pre, pre_w, whitened, residual_k, p, q);  // U⁻¹ v = o − C m⁺
    T quadratic = T(0), log_det = T(0);
    for (int64_t i = 0; i < p * q; ++i) quadratic += whitened[i] * whitened[i];
    for (int64_t i = 0; i < p; ++i) log_det += std::log(std::abs(pre[i * pre_w + i]));
    terms[k] = T(-0.5) * quadratic - T(q) * log_det;
    T* mean_k = mean_out + k * big * q;
    T* factor_k = factor_out + k * big * big;
    T* c_factor_k = c_factor_out + k * p * big;
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t col = 0; col < q; ++col) {
        T acc = pred_mean[i * q + col];
        for (int64_t l = 0; l < p; ++l) acc += pre[(p + i) * pre_w + l] * whitened[l * q + col];
        mean[i * q + col] = acc;
        mean_k[i * q + col] = acc;
      }
      for (int64_t j = 0; j < big; ++j) {
        const T value = pre[(p + i) * pre_w + p + j];
        factor[i * big + j] = value;
        factor_k[i * big + j] = value;
      }
    }
    for (int64_t i = 0; i < p; ++i) {
      for (int64_t j = 0; j < big; ++j) c_factor_k[i * big + j] = -pre[(p + big + i) * pre_w + p + j];
    }
  }
}

// Backwards over the points, carrying (W, ỹ) of s_{k+1} by the data from k + 1 on. Time update:
// [[I, (W L)ᵀ], [0, (W A)ᵀ], [0, ỹᵀ]] Θ eliminates the process noise ξ (rows N … 2N and 2N …
// give (W, ỹ) of s_k by the data after k, transposed). The smoothed marginals: the filtered
// ones conditioned on that pseudo-observation, [[I, W S⁺], [0, S⁺], [0, C S⁺]] Θ =
// [[R, 0], [K̄, G], [C K̄, C G]], E[s|y] = m⁺ + K̄ R⁻¹(ỹ − W m⁺), o − C E[s|y] = (o − C m⁺) −
// C K̄ R⁻¹(ỹ − W m⁺). Then point k's rows merged in by tria([[Wᵀ, Cᵀ], [ỹᵀ, oᵀ]]) (its first
// N columns, transposed): the pseudo-observation by the data from k on, the carry.
template <typename T, int NB = 0, int PB = 0>
void SmoothOne(const T* a_next, const T* noise_next, const T* c, const T* o, const T* filt_mean,
               const T* filt_factor, const T* filt_c_factor, const T* filt_residual, T* mean_out,
               T* residual_out, T* factor_out, T* c_factor_out, T* from_root, T* from_obs, int64_t n,
               int64_t big_in, int64_t p_in, int64_t q, T* work) {
  const int64_t big = NB > 0 ? NB : big_in, p = PB > 0 ? PB : p_in;
  const int64_t pre_w = 2 * big, pre_rows = 2 * big + q, merge_w = big + p, merge_rows = big + q;
  const int64_t smooth_rows = 2 * big + p;
  T* root = work;                            // W, N × N (carried)
  T* obs = root + big * big;                 // ỹ, N × q (carried)
  T* after_root = obs + big * q;             // N × N
  T* after_obs = after_root + big * big;     // N × q
  T* pre = after_obs + big * q;              // (2N + q) × 2N
  T* merged = pre + pre_rows * pre_w;        // (N + q) × (N + p)
  T* smoothing = merged + merge_rows * merge_w;  // (2N + p) × 2N
  T* whitened = smoothing + smooth_rows * pre_w;  // N × q
  T* floor = whitened + big * q;             // N
  for (int64_t i = 0; i < big * big; ++i) root[i] = T(0);
  for (int64_t i = 0; i < big * q; ++i) obs[i] = T(0);
  for (int64_t k = n - 1; k >= 0; --k) {
    const T* a_k = a_next + k * big * big;
    const T* l_k = noise_next + k * big * big;
    const T* c_k = c + k * p * big;
    const T* o_k = o + k * p * q;
    const T* fm_k = filt_mean + k * big * q;
    const T* fs_k = filt_factor + k * big * big;
    const T* fcs_k = filt_c_factor + k * p * big;
    const T* fr_k = filt_residual + k * p * q;
    // Time update.
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t j = 0; j < big; ++j) {
        T through_l = T(0), through_a = T(0);  // (W L)_ji, (W A)_ji
        for (int64_t l = 0; l < big; ++l) {
          through_l += root[j * big + l] * l_k[l * big + i];
          through_a += root[j * big + l] * a_k[l * big + i];
        }
        pre[i * pre_w + j] = i == j ? T(1) : T(0);
        pre[i * pre_w + big + j] = through_l;
        pre[(big + i) * pre_w + j] = T(0);
        pre[(big + i) * pre_w + big + j] = through_a;
      }
    }
    for (int64_t col = 0; col < q; ++col) {
      for (int64_t j = 0; j < big; ++j) {
        pre[(2 * big + col) * pre_w + j] = T(0);
        pre[(2 * big + col) * pre_w + big + j] = obs[j * q + col];
      }
    }
    Triangularize(pre, pre_rows, pre_w, big, true, floor);
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t j = 0; j < big; ++j) after_root[i * big + j] = pre[(big + j) * pre_w + big + i];
      for (int64_t col = 0; col < q; ++col) after_obs[i * q + col] = pre[(2 * big + col) * pre_w + big + i];
    }
    // Smoothed marginals.
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t j = 0; j < big; ++j) {
        T acc = T(0);  // (W S⁺)_ij
        for (int64_t l = 0; l < big; ++l) acc += after_root[i * big + l] * fs_k[l * big + j];
        smoothing[i * pre_w + j] = i == j ? T(1) : T(0);
        smoothing[i * pre_w + big + j] = acc;
        smoothing[(big + i) * pre_w + j] = T(0);
        smoothing[(big + i) * pre_w + big + j] = fs_k[i * big + j];
      }
      for (int64_t col = 0; col < q; ++col) {
        T acc = after_obs[i * q + col];  // ỹ − W m⁺
        for (int64_t l = 0; l < big; ++l) acc -= after_root[i * big + l] * fm_k[l * q + col];
        whitened[i * q + col] = acc;
      }
    }
    for (int64_t i = 0; i < p; ++i) {
      for (int64_t j = 0; j < big; ++j) {
        smoothing[(2 * big + i) * pre_w + j] = T(0);
        smoothing[(2 * big + i) * pre_w + big + j] = fcs_k[i * big + j];
      }
    }
    Triangularize(smoothing, smooth_rows, pre_w, big, true, floor);
    SolveLower(smoothing, pre_w, whitened, whitened, big, q);
    T* mean_k = mean_out + k * big * q;
    T* residual_k = residual_out + k * p * q;
    T* factor_k = factor_out + k * big * big;
    T* c_factor_k = c_factor_out + k * p * big;
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t col = 0; col < q; ++col) {
        T acc = fm_k[i * q + col];
        for (int64_t l = 0; l < big; ++l) acc += smoothing[(big + i) * pre_w + l] * whitened[l * q + col];
        mean_k[i * q + col] = acc;
      }
      for (int64_t j = 0; j < big; ++j) factor_k[i * big + j] = smoothing[(big + i) * pre_w + big + j];
    }
    for (int64_t i = 0; i < p; ++i) {
      for (int64_t col = 0; col < q; ++col) {
        T acc = fr_k[i * q + col];
        for (int64_t l = 0; l < big; ++l) acc -= smoothing[(2 * big + i) * pre_w + l] * whitened[l * q + col];
        residual_k[i * q + col] = acc;
      }
      for (int64_t j = 0; j < big; ++j) c_factor_k[i * big + j] = smoothing[(2 * big + i) * pre_w + big + j];
    }
    // Point k's rows merged in: the carry.
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t j = 0; j < big; ++j) merged[i * merge_w + j] = after_root[j * big + i];
      for (int64_t j = 0; j < p; ++j) merged[i * merge_w + big + j] = c_k[j * big + i];
    }
    for (int64_t col = 0; col < q; ++col) {
      for (int64_t j = 0; j < big; ++j) merged[(big + col) * merge_w + j] = after_obs[j * q + col];
      for (int64_t j = 0; j < p; ++j) merged[(big + col) * merge_w + big + j] = o_k[j * q + col];
    }
    Triangularize(merged, merge_rows, merge_w, big, false, floor);
    T* from_root_k = from_root + k * big * big;
    T* from_obs_k = from_obs + k * big * q;
    for (int64_t i = 0; i < big; ++i) {
      for (int64_t j = 0; j < big; ++j) {
        const T value = merged[j * merge_w + i];
        from_root_k[i * big + j] = value;
        root[i * big + j] = value;
      }
      for (int64_t col = 0; col < q; ++col) {
        const T value = merged[(big + col) * merge_w + i];
        from_obs_k[i * q + col] = value;
        obs[i * q + col] = value;
      }
    }
  }
}

template <ffi::DataType DT>
ffi::Error Filter(ffi::Buffer<DT> a, ffi::Buffer<DT> noise_factor, ffi::Buffer<DT> c, ffi::Buffer<DT> o,
                  ffi::ResultBuffer<DT> mean, ffi::ResultBuffer<DT> factor, ffi::ResultBuffer<DT> c_factor,
                  ffi::ResultBuffer<DT> residual, ffi::ResultBuffer<DT> terms, ffi::ResultBuffer<DT> spread) {
  using T = ffi::NativeType<DT>;
  if (auto err = Rank(a, 3, "transition"); err.failure()) return err;
  if (auto err = Rank(c, 3, "obs_matrix"); err.failure()) return err;
  const Sizes s = SizesOf(a, c, o);
  const int64_t big = s.big, p = s.p, q = s.q, n = s.n;
  std::vector<T> work(2 * big * q + big * big + 2 * big * big + (2 * p + big) * (p + big) + 2 * p * q + big);
  for (int64_t b = 0; b < s.batch; ++b) {
    Dispatch<true>(big, p, [&](auto nb, auto pb) {
      FilterOne<T, decltype(nb)::value, decltype(pb)::value>(
          a.typed_data() + b * n * big * big, noise_factor.typed_data() + b * n * big * big,
          c.typed_data() + b * n * p * big, o.typed_data() + b * n * p * q, mean->typed_data() + b * n * big * q,
          factor->typed_data() + b * n * big * big, c_factor->typed_data() + b * n * p * big,
          residual->typed_data() + b * n * p * q, terms->typed_data() + b * n, spread->typed_data() + b * n, n,
          big, p, q, work.data());
    });
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error Smooth(ffi::Buffer<DT> a_next, ffi::Buffer<DT> noise_next, ffi::Buffer<DT> c, ffi::Buffer<DT> o,
                  ffi::Buffer<DT> filt_mean, ffi::Buffer<DT> filt_factor, ffi::Buffer<DT> filt_c_factor,
                  ffi::Buffer<DT> filt_residual, ffi::ResultBuffer<DT> mean, ffi::ResultBuffer<DT> residual,
                  ffi::ResultBuffer<DT> factor, ffi::ResultBuffer<DT> c_factor, ffi::ResultBuffer<DT> from_root,
                  ffi::ResultBuffer<DT> from_obs) {
  using T = ffi::NativeType<DT>;
  if (auto err = Rank(a_next, 3, "transition"); err.failure()) return err;
  if (auto err = Rank(c, 3, "obs_matrix"); err.failure()) return err;
  const Sizes s = SizesOf(a_next, c, o);
  const int64_t big = s.big, p = s.p, q = s.q, n = s.n;
  std::vector<T> work(2 * big * big + 3 * big * q + (2 * big + q) * 2 * big + (big + q) * (big + p) +
                      (2 * big + p) * 2 * big + big);
  const int64_t mat = n * big * big, vec = n * big * q, row = n * p * big, res = n * p * q;
  for (int64_t b = 0; b < s.batch; ++b) {
    Dispatch<true>(big, p, [&](auto nb, auto pb) {
      SmoothOne<T, decltype(nb)::value, decltype(pb)::value>(
          a_next.typed_data() + b * mat, noise_next.typed_data() + b * mat, c.typed_data() + b * row,
          o.typed_data() + b * res, filt_mean.typed_data() + b * vec, filt_factor.typed_data() + b * mat,
          filt_c_factor.typed_data() + b * row, filt_residual.typed_data() + b * res, mean->typed_data() + b * vec,
          residual->typed_data() + b * res, factor->typed_data() + b * mat, c_factor->typed_data() + b * row,
          from_root->typed_data() + b * mat, from_obs->typed_data() + b * vec, n, big, p, q, work.data());
    });
  }
  return ffi::Error::Success();
}

}  // namespace

#define GPGRAD_SQRT_FILTER(NAME, DT)                                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Filter<DT>,                                                 \
                                ffi::Ffi::Bind()                                                  \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>());

#define GPGRAD_SQRT_SMOOTH(NAME, DT)                                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Smooth<DT>,                                                 \
                                ffi::Ffi::Bind()                                                  \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Arg<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>()                                       \
                                    .Ret<ffi::Buffer<DT>>());

extern "C" {
GPGRAD_SQRT_FILTER(GpgradSquareRootFilterF32, ffi::F32)
GPGRAD_SQRT_FILTER(GpgradSquareRootFilterF64, ffi::F64)
GPGRAD_SQRT_SMOOTH(GpgradSquareRootSmoothF32, ffi::F32)
GPGRAD_SQRT_SMOOTH(GpgradSquareRootSmoothF64, ffi::F64)
}
