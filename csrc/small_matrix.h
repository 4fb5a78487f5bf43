// Small dense matrices for the native passes (csrc/covariance.cc, csrc/square_root.cc): products,
// the inverse of a small SPD matrix, Householder triangularisation, substitutions — loops over
// row-major arrays, no allocation — and the dispatch that makes the built-in kernels' sizes
// compile-time constants.

#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace gpgrad {

namespace ffi = xla::ffi;

// c (r × s) = a (r × k) · b (k × s). Each entry a dot product kept in a register: the outputs
// never alias the inputs (``__restrict__``), so nothing waits on a store.
template <typename T>
inline void MatMul(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, int64_t r,
                   int64_t k, int64_t s) {
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < s; ++j) {
      T acc = T(0);
      for (int64_t l = 0; l < k; ++l) acc += a[i * k + l] * b[l * s + j];
      c[i * s + j] = acc;
    }
  }
}

// c (r × s) = a (r × k) · bᵀ, b (s × k)
template <typename T>
inline void MatMulT(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, int64_t r,
                    int64_t k, int64_t s) {
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < s; ++j) {
      T acc = T(0);
      for (int64_t l = 0; l < k; ++l) acc += a[i * k + l] * b[j * k + l];
      c[i * s + j] = acc;
    }
  }
}

// c (r × s) = aᵀ · b for a (k × r), b (k × s)
template <typename T>
inline void TMatMul(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c, int64_t r,
                    int64_t k, int64_t s) {
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < s; ++j) {
      T acc = T(0);
      for (int64_t l = 0; l < k; ++l) acc += a[l * r + i] * b[l * s + j];
      c[i * s + j] = acc;
    }
  }
}

// (U⁻¹, log|U|) of a small symmetric positive definite U (p × p) by Cholesky: U⁻¹ = TᵀT with
// T = L⁻¹. A pivot that is not positive gives NaN, which reaches the outputs (as in JAX).
template <typename T>
inline T SpdInverse(const T* u, T* inverse, T* low, T* tri, int64_t p) {
  for (int64_t i = 0; i < p * p; ++i) low[i] = T(0);
  T logdet = T(0);
  for (int64_t j = 0; j < p; ++j) {
    T pivot = u[j * p + j];
    for (int64_t l = 0; l < j; ++l) pivot -= low[j * p + l] * low[j * p + l];
    const T root = std::sqrt(pivot);
    low[j * p + j] = root;
    logdet += T(2) * std::log(root);
    for (int64_t i = j + 1; i < p; ++i) {
      T v = u[i * p + j];
      for (int64_t l = 0; l < j; ++l) v -= low[i * p + l] * low[j * p + l];
      low[i * p + j] = v / root;
    }
  }
  // T = L⁻¹ by forward substitution, column by column.
  for (int64_t i = 0; i < p * p; ++i) tri[i] = T(0);
  for (int64_t j = 0; j < p; ++j) {
    tri[j * p + j] = T(1) / low[j * p + j];
    for (int64_t i = j + 1; i < p; ++i) {
      T v = T(0);
      for (int64_t l = j; l < i; ++l) v -= low[i * p + l] * tri[l * p + j];
      tri[i * p + j] = v / low[i * p + i];
    }
  }
  for (int64_t i = 0; i < p; ++i) {
    for (int64_t j = 0; j < p; ++j) {
      T acc = T(0);
      for (int64_t l = (i > j ? i : j); l < p; ++l) acc += tri[l * p + i] * tri[l * p + j];
      inverse[i * p + j] = acc;
    }
  }
  return logdet;
}


// x (rows × cols) ← x Θ for the orthogonal Θ, a product of Householder reflections, that makes
// the first ``pivots`` rows lower triangular (exact zeros right of the diagonal); the other rows
// are transformed alike. The same reflections as gpgrad_jax/_smallmatrix.py's ``triangularize``:
// H = I − τ v vᵀ maps the pivot row's remainder u to −α e_i. ``unit_pivots``: x starts with an
// identity block (the pre-arrays [[I, M], …] of square-root updates), so α ≥ 1 needs no guard;
// otherwise a remainder below the rounding floor of its row counts as zero (left as it is).
template <typename T>
inline void Triangularize(T* __restrict__ x, int64_t rows, int64_t cols, int64_t pivots, bool unit_pivots,
                          T* __restrict__ floor) {
  if (!unit_pivots) {
    const T scale = T(cols) * std::numeric_limits<T>::epsilon();
    for (int64_t i = 0; i < pivots; ++i) {
      T norm = T(0);
      for (int64_t j = 0; j < cols; ++j) norm += x[i * cols + j] * x[i * cols + j];
      floor[i] = scale * scale * norm;
    }
  }
  for (int64_t i = 0; i < pivots; ++i) {
    T* pivot_row = x + i * cols;
    T norm_sq = T(0);
    for (int64_t j = i; j < cols; ++j) norm_sq += pivot_row[j] * pivot_row[j];
    const T u0 = pivot_row[i];
    T alpha, tau;
    if (unit_pivots) {
      alpha = std::sqrt(norm_sq);
      tau = T(1) / (alpha * (alpha + u0));
    } else if (norm_sq > floor[i]) {
      alpha = std::copysign(std::sqrt(norm_sq), u0);
      tau = T(1) / (alpha * (alpha + u0));
    } else {  // a zero row (no information, no process noise): its rounding noise dropped
      for (int64_t j = i; j < cols; ++j) pivot_row[j] = T(0);
      continue;
    }
    for (int64_t r = i + 1; r < rows; ++r) {
      T* row = x + r * cols;
      T product = T(0);
      for (int64_t j = i; j < cols; ++j) product += row[j] * pivot_row[j];
      const T w = (product + alpha * row[i]) * tau;
      row[i] -= w * (u0 + alpha);
      for (int64_t j = i + 1; j < cols; ++j) row[j] -= w * pivot_row[j];
    }
    pivot_row[i] = -alpha;
    for (int64_t j = i + 1; j < cols; ++j) pivot_row[j] = T(0);
  }
}

// L⁻¹ b (forward substitution), low (r × r) lower triangular with row stride ``stride``,
// b and x (r × k); x may be b.
template <typename T>
inline void SolveLower(const T* low, int64_t stride, const T* b, T* x, int64_t r, int64_t k) {
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t c = 0; c < k; ++c) {
      T v = b[i * k + c];
      for (int64_t l = 0; l < i; ++l) v -= low[i * stride + l] * x[l * k + c];
      x[i * k + c] = v / low[i * stride + i];
    }
  }
}

// L⁻ᵀ b (back substitution), as SolveLower.
template <typename T>
inline void SolveLowerTransposed(const T* low, int64_t stride, const T* b, T* x, int64_t r, int64_t k) {
  for (int64_t i = r - 1; i >= 0; --i) {
    for (int64_t c = 0; c < k; ++c) {
      T v = b[i * k + c];
      for (int64_t l = i + 1; l < r; ++l) v -= low[l * stride + i] * x[l * k + c];
      x[i * k + c] = v / low[i * stride + i];
    }
  }
}

// Runs CALL(NB, PB) with the sizes as compile-time constants for models of N ≤ 8 states and
// p ≤ 3 observation rows (the built-in kernels'), with run-time sizes otherwise; ``Unrolled``
// false: always run-time sizes (a pass that is rarely run: shorter to build).
template <bool Unrolled, typename F>
void Dispatch(int64_t big, int64_t p, F&& call) {
  if constexpr (Unrolled) {
    if (p >= 1 && p <= 3 && big >= 1 && big <= 8) {
      switch ((p - 1) * 8 + (big - 1)) {
#define GPGRAD_CASE(P, N) \
  case (P - 1) * 8 + (N - 1): call(std::integral_constant<int, N>{}, std::integral_constant<int, P>{}); return;
        // N = p · k (k states per coordinate): only multiples of p occur.
        GPGRAD_CASE(1, 1) GPGRAD_CASE(1, 2) GPGRAD_CASE(1, 3) GPGRAD_CASE(1, 4)
        GPGRAD_CASE(1, 5) GPGRAD_CASE(1, 6) GPGRAD_CASE(1, 7) GPGRAD_CASE(1, 8)
        GPGRAD_CASE(2, 2) GPGRAD_CASE(2, 4) GPGRAD_CASE(2, 6) GPGRAD_CASE(2, 8)
        GPGRAD_CASE(3, 3) GPGRAD_CASE(3, 6)
#undef GPGRAD_CASE
      }
    }
  }
  call(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
}

template <typename Buf>
ffi::Error Rank(const Buf& buffer, size_t at_least, const char* name) {
  if (buffer.dimensions().size() < at_least) {
    return ffi::Error::InvalidArgument(std::string(name) + " has too few dimensions");
  }
  return ffi::Error::Success();
}


// The sizes of a pass from its transition A (…, n, N, N), observation matrix C (…, n, p, N) and
// data o (…, n, p, q): the leading axes are one batch axis of ``batch`` problems (0 when n or N
// is 0: nothing to do).
struct Sizes {
  int64_t batch, n, big, p, q;
};

template <typename Buf>
Sizes SizesOf(const Buf& a, const Buf& c, const Buf& o) {
  const auto dims = a.dimensions();
  const size_t rank = dims.size();
  Sizes s{0, dims[rank - 3], dims[rank - 1], c.dimensions()[rank - 2], o.dimensions()[rank - 1]};
  s.batch = s.n * s.big == 0 ? 0 : static_cast<int64_t>(a.element_count()) / (s.n * s.big * s.big);
  return s;
}

}  // namespace gpgrad
