// y (M, N) = x (M, K) Wᵀ + b for a few rows M <= kSmallRows (see treeffn/kernels/small_linear.py).
//
// Decoding multiplies a handful of token vectors by every weight matrix: the matrices are read from memory once
// per step and each weight is used M times. Each output row n is computed by one thread: W's rows are loaded once
// per 16 columns, a few rows at a time, and multiplied into one accumulator per row and token, so the matrix
// streams through the core once whatever M is; the next rows are prefetched while these are multiplied. Rows are
// split across torch's threads in blocks of 16 (whole cache lines of y). Every output is one dot product in a fixed
// order, so the result does not depend on the thread count; it differs from at::linear only by the order of
// summation.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace treeffn_small_linear {

constexpr int64_t kSmallRows = 8;
// Below this many weights the call stays on the calling thread (waking the team costs microseconds).
constexpr int64_t kParallelWeights = 1 << 16;

#if defined(__AVX512F__)
// R consecutive rows of W against the M tokens: R·M accumulators, so each 16 columns cost R + M loads for R·M
// FMAs (one row at a time would be 1 + M loads for M FMAs, bound by loads rather than arithmetic).
template <int M, int R>
inline void block_avx512(const float* __restrict x, int64_t K, const float* __restrict w, const float* __restrict b,
                         float* __restrict y, int64_t N, int64_t n) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (K % 16)) - 1u);
  const int64_t K16 = K - K % 16;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * K + k), _MM_HINT_T1);  // the next block's rows
      wv[r] = _mm512_loadu_ps(w + (n + r) * K + k);
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  if (tail) {
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * K + K16);
      for (int r = 0; r < R; ++r)
        acc[r][m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + (n + r) * K + K16), xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float bias = b ? b[n + r] : 0.0f;
    for (int m = 0; m < M; ++m) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + bias;
  }
}

template <int M>
inline void rows_avx512(const float* x, int64_t K, const float* w, const float* b, float* y, int64_t N, int64_t n0,
                        int64_t n1) {
  constexpr int R = M <= 4 ? 4 : 2;  // R·M <= 16 accumulators of the 32 registers
  int64_t n = n0;
  for (; n + R <= n1; n += R) block_avx512<M, R>(x, K, w, b, y, N, n);
  for (; n < n1; ++n) block_avx512<M, 1>(x, K, w, b, y, N, n);
}
#endif

inline void rows_generic(const float* __restrict x, int64_t M, int64_t K, const float* __restrict w,
                         const float* __restrict b, float* __restrict y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += wr[k] * xr[k];
      y[m * N + n] = s + (b ? b[n] : 0.0f);
    }
  }
}

inline void rows(const float* x, int64_t M, int64_t K, const float* w, const float* b, float* y, int64_t N,
                 int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
  switch (M) {
    case 1: return rows_avx512<1>(x, K, w, b, y, N, n0, n1);
    case 2: return rows_avx512<2>(x, K, w, b, y, N, n0, n1);
    case 3: return rows_avx512<3>(x, K, w, b, y, N, n0, n1);
    case 4: return rows_avx512<4>(x, K, w, b, y, N, n0, n1);
    case 5: return rows_avx512<5>(x, K, w, b, y, N, n0, n1);
    case 6: return rows_avx512<6>(x, K, w, b, y, N, n0, n1);
    case 7: return rows_avx512<7>(x, K, w, b, y, N, n0, n1);
    case 8: return rows_avx512<8>(x, K, w, b, y, N, n0, n1);
    default: break;
  }
#endif
  rows_generic(x, M, K, w, b, y, N, n0, n1);
}

// x (M, K) fp32 contiguous, M <= kSmallRows; w (N, K) fp32 contiguous; b (N,) or undefined.
inline at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu() &&
                  x.size(0) <= kSmallRows,
              "small_linear: x must be (M <= ", kSmallRows, ", K) contiguous fp32 on the CPU");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(1) == x.size(1),
              "small_linear: w must be (N, K) contiguous fp32 with K = ", x.size(1));
  const bool has_b = b.has_value() && b->defined();
  TORCH_CHECK(!has_b || (b->dim() == 1 && b->size(0) == w.size(0) && b->scalar_type() == at::kFloat &&
                         b->is_contiguous()),
              "small_linear: b must be (N,) contiguous fp32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = has_b ? b->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (N * K >= kParallelWeights && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t s0, int64_t s1) {
      rows(xp, M, K, wp, bp, yp, N, s0 * 16, std::min(N, s1 * 16));
    });
  } else {
    rows(xp, M, K, wp, bp, yp, N, 0, N);
  }
  return y;
}

// at::linear where the kernel does not apply (more rows, another dtype or layout, off the CPU).
inline at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  if (x.dim() == 2 && x.size(0) <= kSmallRows && x.scalar_type() == at::kFloat && x.is_contiguous() &&
      x.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() &&
      (!b.has_value() || !b->defined() || (b->scalar_type() == at::kFloat && b->is_contiguous())))
    return small_linear(x, w, b);
  return at::linear(x, w, b);
}

}  // namespace treeffn_small_linear
