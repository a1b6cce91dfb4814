// Fused training kernels (forward and backward) for tree feed-forward layers, UFB-23 form (DS-26 placements).
//
// Shapes: M tokens, D model width, K trees, L = depth + 1 levels, N = 2^L - 1 nodes per tree, W units per node.
//   x (M, D);  w_in, w_out (K, N, W, D);  b_in (K, N, W) or None;  y (M, D);  paths (M, K, L) int64
//   thr (K, N) fp32 or None: routing thresholds (tree.balance), no gradient
//   paths_in (M, K, L) int64 or None: paths routed by the caller (tree.route=children); thr is then unused
//
// For token m, tree k, level t, visited node j = paths[m, k, t], unit w:
//   lam = u_kjw . x_m + b_kjw          right child iff  sum_w lam > thr_kj (0 without thr; no gradient)
//   "node"   : y_m = sum_{k,t,w} phi(lam) v_kjw                 G_mk = dy_m,                 coef = phi(lam)
//   "output" : y_m = sum_k phi(z_mk),  z_mk = sum_{t,w} lam v_kjw   G_mk = phi'(z_mk) * dy_m,  coef = lam
// Backward, with G_mk the upstream gradient of tree k's D-vector sum and g = dL/dlam:
//   g = (v_kjw . G_mk) * (node: phi'(lam) | output: 1)
//   dx_m += g u_kjw      du_kjw += g x_m      db_kjw += g      dv_kjw += coef G_mk
//
// Work per token is K*L*W row operations of length D; nothing is sized by N except the (dense, zero-initialised)
// parameter-gradient tensors PyTorch expects, which are written once per batch.
//
// The cost is memory traffic, not arithmetic (one multiply-add per row element read), so the loops are ordered for
// cache reuse (OpenMP in torch's runtime, torch's thread count):
//   forward  : token chunks (dynamic work items, no barriers); per chunk, trees in L2-sized groups, each in two
//              passes (routing: u rows; output: v rows), so a tree's rows stay hot across the chunk's tokens.
//   backward : per tree, tokens in leaf order (the order of their paths): consecutive tokens share their upper
//              path, so u and v rows stay hot, and each node's tokens are contiguous, so du, dv, db are summed in a
//              per-level accumulator and each gradient row is written exactly once, with no atomics. Trees are
//              work items (per-thread dx buffers) when there are at least as many trees as threads; otherwise each
//              tree's leaf order is split between threads and the few straddling nodes are merged afterwards.
//   both     : up to 4 tokens at the same node share each load of its row (a small register-blocked GEMM).
// bf16 tensors are read with an fp32 widening and all sums are in fp32 (fp64 for fp64 tensors, for gradcheck).

// Narrow headers instead of <torch/extension.h>: the kernel only needs tensors and the op registry, and the full
// header (libtorch + pybind11) costs over a minute of compile time on 2 cores.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <Python.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using bf16_t = uint16_t;  // raw bits of at::BFloat16: reading is a 16-bit shift, which vectorises

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

inline float ld(const float* p, int64_t i) { return p[i]; }
inline double ld(const double* p, int64_t i) { return p[i]; }
inline float ld(const bf16_t* p, int64_t i) {
  uint32_t b = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(double* p, int64_t i, double v) { p[i] = v; }
inline void st(bf16_t* p, int64_t i, float v) {  // round to nearest even, as at::BFloat16(float)
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if (std::isnan(v)) { p[i] = 0x7FC0; return; }
  b += 0x7FFFu + ((b >> 16) & 1u);
  p[i] = bf16_t(b >> 16);
}

// y += alpha * a
template <typename T, typename A>
inline void axpy(A* __restrict y, A alpha, const T* __restrict a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * ld(a, i);
}

template <typename T, typename A>
inline void load_row(A* __restrict dst, const T* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = ld(src, i);
}

// Several tokens that sit at the same node (consecutive in a tree's leaf order) share one pass over the node's
// rows: the row is loaded once for R tokens, and an accumulator row is read and written once for R tokens.
// out[r] = a . b[r]
template <int R, typename T, typename A>
inline void dot_multi(const T* __restrict a, const A* const* b, A* out, int64_t n) {
  constexpr int U = 32 / sizeof(A) * 2;  // 2 vector registers per token
  A acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < U; ++j) acc[r][j] = 0;
  int64_t i = 0;
  for (; i + U <= n; i += U) {
#pragma omp simd
    for (int j = 0; j < U; ++j) {
      const A av = ld(a, i + j);
      for (int r = 0; r < R; ++r) acc[r][j] += av * b[r][i + j];
    }
  }
  for (int r = 0; r < R; ++r) {
    A s = 0;
    for (int j = 0; j < U; ++j) s += acc[r][j];
    for (int64_t q = i; q < n; ++q) s += ld(a, q) * b[r][q];
    out[r] = s;
  }
}

// y[r] += alpha[r] * a
template <int R, typename T, typename A>
inline void axpy_multi(A* const* y, const A* alpha, const T* __restrict a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A av = ld(a, i);
    for (int r = 0; r < R; ++r) y[r][i] += alpha[r] * av;
  }
}

// y += sum_r alpha[r] * a[r]
template <int R, typename A>
inline void gather_axpy(A* __restrict y, const A* alpha, const A* const* a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    A s = y[i];
    for (int r = 0; r < R; ++r) s += alpha[r] * a[r][i];
    y[i] = s;
  }
}

// ---- activations ------------------------------------------------------------------------------------------------
// Codes as in treeffn.kernels.tree_train: 0 gelu (exact, erf), 1 relu, 2 tanh, 3 silu, 4 identity.

template <typename A>
inline A act_scalar(int act, A z) {
  switch (act) {
    case 0: return A(0.5) * z * (A(1) + std::erf(z * A(M_SQRT1_2)));
    case 1: return z > 0 ? z : A(0);
    case 2: return std::tanh(z);
    case 3: return z / (A(1) + std::exp(-z));
    default: return z;
  }
}

template <typename A>
inline A act_grad_scalar(int act, A z) {
  switch (act) {
    case 0: {
      A cdf = A(0.5) * (A(1) + std::erf(z * A(M_SQRT1_2)));
      A pdf = std::exp(A(-0.5) * z * z) * A(0.3989422804014327);
      return cdf + z * pdf;
    }
    case 1: return z > 0 ? A(1) : A(0);
    case 2: { A t = std::tanh(z); return A(1) - t * t; }
    case 3: { A s = A(1) / (A(1) + std::exp(-z)); return s * (A(1) + z * (A(1) - s)); }
    default: return A(1);
  }
}

// Branch-free fp32 exp and erfc pieces that GCC vectorises inside `omp simd` loops (the "output" placement applies
// phi to D-vectors per token and tree, where a libm call per element would cost more than the whole tree walk).
inline float vexp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693359375f + k * 2.12194440e-4f;  // Cody-Waite split of ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float e = p * r * r + r + 1.0f;
  int32_t bits = (int32_t(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return e * scale;
}

// 0.5 * erfc(a / sqrt 2) for a >= 0 (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7 as erf), i.e. Phi(-a).
inline float half_erfc_scaled(float a) {
  float x = a * 0.70710678118654752f;
  float t = 1.0f / (1.0f + 0.3275911f * x);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  return 0.5f * p * t * vexp(-x * x);
}

// y[i] += phi(z[i]) over a D-vector
inline void act_accumulate(int act, float* __restrict y, const float* __restrict z, int64_t n) {
  switch (act) {
    case 0:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float q = half_erfc_scaled(std::fabs(z[i]));
        float cdf = z[i] < 0 ? q : 1.0f - q;
        y[i] += z[i] * cdf;
      }
      break;
    case 1:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] += z[i] > 0 ? z[i] : 0.0f;
      break;
    case 2:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float e = vexp(-2.0f * std::fabs(z[i]));
        float t = (1.0f - e) / (1.0f + e);
        y[i] += z[i] < 0 ? -t : t;
      }
      break;
    case 3:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] += z[i] / (1.0f + vexp(-z[i]));
      break;
    default:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] += z[i];
  }
}

// out[i] = phi'(z[i]) * g[i] over a D-vector
inline void act_grad_mul(int act, float* __restrict out, const float* __restrict z, const float* __restrict g,
                         int64_t n) {
  switch (act) {
    case 0:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float q = half_erfc_scaled(std::fabs(z[i]));
        float cdf = z[i] < 0 ? q : 1.0f - q;
        float pdf = vexp(-0.5f * z[i] * z[i]) * 0.3989422804014327f;
        out[i] = (cdf + z[i] * pdf) * g[i];
      }
      break;
    case 1:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = z[i] > 0 ? g[i] : 0.0f;
      break;
    case 2:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float e = vexp(-2.0f * std::fabs(z[i]));
        float t = (1.0f - e) / (1.0f + e);
        out[i] = (1.0f - t * t) * g[i];
      }
      break;
    case 3:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float s = 1.0f / (1.0f + vexp(-z[i]));
        out[i] = s * (1.0f + z[i] * (1.0f - s)) * g[i];
      }
      break;
    default:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = g[i];
  }
}

// phi(z) and phi'(z) for the L*W responses of one token's path in one tree ("node" placement): one short vector
// loop instead of a libm erf/exp pair per visited unit.
inline void act_values(int act, const float* __restrict z, float* __restrict phi, float* __restrict dphi, int64_t n) {
  switch (act) {
    case 0:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float q = half_erfc_scaled(std::fabs(z[i]));
        float cdf = z[i] < 0 ? q : 1.0f - q;
        phi[i] = z[i] * cdf;
        dphi[i] = cdf + z[i] * vexp(-0.5f * z[i] * z[i]) * 0.3989422804014327f;
      }
      break;
    case 1:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        phi[i] = z[i] > 0 ? z[i] : 0.0f;
        dphi[i] = z[i] > 0 ? 1.0f : 0.0f;
      }
      break;
    case 2:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float e = vexp(-2.0f * std::fabs(z[i]));
        float t = (1.0f - e) / (1.0f + e);
        t = z[i] < 0 ? -t : t;
        phi[i] = t;
        dphi[i] = 1.0f - t * t;
      }
      break;
    case 3:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        float sg = 1.0f / (1.0f + vexp(-z[i]));
        phi[i] = z[i] * sg;
        dphi[i] = sg * (1.0f + z[i] * (1.0f - sg));
      }
      break;
    default:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        phi[i] = z[i];
        dphi[i] = 1.0f;
      }
  }
}

inline void act_values(int act, const double* z, double* phi, double* dphi, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    phi[i] = act_scalar<double>(act, z[i]);
    dphi[i] = act_grad_scalar<double>(act, z[i]);
  }
}

// Pull a row of a token that will be processed next into cache (the backward visits tokens in leaf order, so their
// rows are not sequential in memory and the hardware prefetcher cannot guess them).
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

// fp64 (gradcheck only): plain libm, accuracy over speed.
inline void act_accumulate(int act, double* y, const double* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += act_scalar<double>(act, z[i]);
}
inline void act_grad_mul(int act, double* out, const double* z, const double* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = act_grad_scalar<double>(act, z[i]) * g[i];
}

struct Shape {
  int64_t M, K, N, W, D, L;
};

// torch's intra-op thread count, or 1 when the parallel section has too little work to pay for waking threads
// (~2^16 multiply-adds, tens of microseconds): small batches and gradcheck-sized problems run serially.
// The team size a call plans for: 1 for small work and inside another parallel region (as the inference kernel).
// OpenMP may still give a region fewer threads (OMP_THREAD_LIMIT, nesting limits), so code inside a region reads
// its team size with omp_get_num_threads() and never assumes this count.
inline int num_threads(int64_t work) {
  if (work < (int64_t(1) << 16) || at::in_parallel_region()) return 1;
  return std::max(1, at::get_num_threads());
}

// ---- forward ----------------------------------------------------------------------------------------------------

// Trees are processed in groups whose input (or output) rows fit in L2, at least one tree per group, and each group
// in two passes over a chunk of tokens: routing (u rows, dot products) then output (v rows, axpy). Each pass touches
// half of a tree's rows, so e.g. a depth-7 tree at D = 768 (255 rows of 3 KB per pass) stays cache-hot across the
// chunk, where walking all K·N rows token by token would stream them from L3 or DRAM for every token. The price is
// one more read of the token's x (pass 1) and y (pass 2) rows per group, next to its L visited rows per pass.
inline int64_t tree_group(const Shape& s, int64_t elem_bytes) {
  const int64_t tree_bytes = s.N * s.W * s.D * elem_bytes;
  return std::max<int64_t>(1, std::min<int64_t>(s.K, (int64_t(512) << 10) / std::max<int64_t>(1, tree_bytes)));
}

// Token chunks are independent work items (a token's y row is only ever written by the thread that owns its
// chunk), handed out dynamically: no barrier between tree groups, and a thread that gets descheduled on a busy
// machine does not hold the others up. Within a chunk, blocks of up to RB tokens that sit at the same node share
// each load of the node's row (pass 1: all tokens share the root, and half of them each child; pass 2 walks the
// chunk in leaf order, so neighbouring tokens share most of their path).
template <typename T>
void forward_impl(const Shape& s, const T* x, const T* w_in, const T* b_in, const T* w_out, const float* thr,
                  const int64_t* given, int act, int placement, typename AccOf<T>::type* yacc, int64_t* paths,
                  typename AccOf<T>::type* lam) {
  using A = typename AccOf<T>::type;
  constexpr int RB = 4;
  const int64_t M = s.M, K = s.K, N = s.N, W = s.W, D = s.D, L = s.L;
  const int64_t group = tree_group(s, sizeof(T));
  const int nt = num_threads(M * K * L * W * D);
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(256, M / (4 * nt)));
  const int64_t nchunks = (M + chunk - 1) / chunk;
#pragma omp parallel num_threads(nt)
  {
    std::vector<A> xf(RB * D), zf(RB * D), ph(L * W), dph(L * W), coef(RB * L * W);
    std::vector<uint64_t> keys(chunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t m0 = c * chunk, m1 = std::min(M, m0 + chunk);
      for (int64_t k0 = 0; k0 < K; k0 += group) {
        const int64_t k1 = std::min(K, k0 + group);
        // pass 1: paths and responses, RB tokens at a time
        for (int64_t mb = m0; mb < m1; mb += RB) {
          const int nb = int(std::min<int64_t>(RB, m1 - mb));
          for (int i = 0; i < nb; ++i) load_row(xf.data() + i * D, x + (mb + i) * D, D);
          for (int64_t k = k0; k < k1; ++k) {
            int64_t node[RB] = {0, 0, 0, 0};
            for (int64_t t = 0; t < L; ++t) {
              A score[RB] = {0, 0, 0, 0};
              bool done[RB] = {false, false, false, false};
              for (int i = 0; i < nb; ++i) {
                if (done[i]) continue;
                int idx[RB], r = 0;  // the block's tokens at this token's node
                for (int j = i; j < nb; ++j)
                  if (!done[j] && node[j] == node[i]) { idx[r++] = j; done[j] = true; }
                const int64_t row = (k * N + node[i]) * W;
                const A* X[RB];
                for (int q = 0; q < r; ++q) X[q] = xf.data() + idx[q] * D;
                for (int64_t w = 0; w < W; ++w) {
                  A l[RB];
                  switch (r) {
                    case 1: dot_multi<1>(w_in + (row + w) * D, X, l, D); break;
                    case 2: dot_multi<2>(w_in + (row + w) * D, X, l, D); break;
                    case 3: dot_multi<3>(w_in + (row + w) * D, X, l, D); break;
                    default: dot_multi<4>(w_in + (row + w) * D, X, l, D); break;
                  }
                  const A b = b_in ? A(ld(b_in, row + w)) : A(0);
                  for (int q = 0; q < r; ++q) {
                    const int64_t m = mb + idx[q];
                    lam[((m * K + k) * L + t) * W + w] = l[q] + b;
                    score[idx[q]] += l[q] + b;
                  }
                }
              }
              for (int i = 0; i < nb; ++i) {
                const int64_t at = ((mb + i) * K + k) * L + t;
                paths[at] = node[i];
                if (t + 1 == L) continue;
                if (given) {  // routed by the caller (tree.route=children): take its next node
                  node[i] = given[at + 1];
                } else {
                  const A th = thr ? A(thr[k * N + node[i]]) : A(0);
                  node[i] = 2 * node[i] + 1 + (score[i] > th ? 1 : 0);
                }
              }
            }
          }
        }
        // pass 2: outputs, per tree in leaf order, RB tokens at a time
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t nc = m1 - m0;
          for (int64_t i = 0; i < nc; ++i)
            keys[i] = (uint64_t(paths[((m0 + i) * K + k) * L + L - 1]) << 32) | uint64_t(m0 + i);
          std::sort(keys.begin(), keys.begin() + nc);
          for (int64_t pb = 0; pb < nc; pb += RB) {
            const int nb = int(std::min<int64_t>(RB, nc - pb));
            int64_t ms[RB];
            const int64_t* pth[RB];
            A* acc[RB];
            for (int i = 0; i < nb; ++i) {
              const int64_t m = ms[i] = int64_t(keys[pb + i] & 0xFFFFFFFFu);
              pth[i] = paths + (m * K + k) * L;
              const A* lm = lam + (m * K + k) * L * W;
              if (placement == 0) {
                act_values(act, lm, coef.data() + i * L * W, dph.data(), L * W);
                acc[i] = yacc + m * D;
              } else {
                std::copy(lm, lm + L * W, coef.data() + i * L * W);
                acc[i] = zf.data() + i * D;
                std::fill(acc[i], acc[i] + D, A(0));
              }
            }
            for (int64_t t = 0; t < L; ++t) {
              for (int i = 0; i < nb;) {  // runs at the same node (consecutive: leaf order)
                const int64_t node = pth[i][t];
                int j = i + 1;
                while (j < nb && pth[j][t] == node) ++j;
                const int64_t row = (k * N + node) * W;
                for (int64_t w = 0; w < W; ++w) {
                  A cf[RB];
                  for (int q = i; q < j; ++q) cf[q - i] = coef[(q * L + t) * W + w];
                  switch (j - i) {
                    case 1: axpy_multi<1>(acc + i, cf, w_out + (row + w) * D, D); break;
                    case 2: axpy_multi<2>(acc + i, cf, w_out + (row + w) * D, D); break;
                    case 3: axpy_multi<3>(acc + i, cf, w_out + (row + w) * D, D); break;
                    default: axpy_multi<4>(acc + i, cf, w_out + (row + w) * D, D); break;
                  }
                }
                i = j;
              }
            }
            if (placement == 1)
              for (int i = 0; i < nb; ++i) act_accumulate(act, yacc + ms[i] * D, acc[i], D);
          }
        }
      }
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------------------------

// Tokens of tree k sorted by leaf: the order of their paths (heap numbering is left to right within a level), so
// each node's tokens are one contiguous range and consecutive tokens share their upper path.
void sort_by_leaf(const Shape& s, const int64_t* paths, int64_t k, int32_t* out) {
  const int64_t M = s.M, K = s.K, L = s.L;
  const int64_t base = (int64_t(1) << (L - 1)) - 1, width = int64_t(1) << (L - 1);
  auto leaf = [&](int64_t m) { return paths[(m * K + k) * L + L - 1] - base; };
  if (width <= 2 * M) {  // counting sort, O(M + 2^depth)
    std::vector<int32_t> count(width + 1, 0);
    for (int64_t m = 0; m < M; ++m) count[leaf(m) + 1]++;
    for (int64_t j = 0; j < width; ++j) count[j + 1] += count[j];
    for (int64_t m = 0; m < M; ++m) out[count[leaf(m)]++] = int32_t(m);
  } else {  // deep tree, few tokens: O(M log M) instead of O(2^depth)
    std::vector<uint64_t> keys(M);
    for (int64_t m = 0; m < M; ++m) keys[m] = (uint64_t(leaf(m)) << 32) | uint64_t(m);
    std::sort(keys.begin(), keys.end());
    for (int64_t i = 0; i < M; ++i) out[i] = int32_t(keys[i] & 0xFFFFFFFFu);
  }
}

// A node's gradient sums from one thread that saw only part of the node's tokens; summed after the parallel part.
template <typename A>
struct Partial {
  int64_t row;                // (k * N + node) * W
  std::vector<A> du, dv, db;  // W*D, W*D, W
};

// Backward of one tree over the tokens ord[p0, p1) (a slice of the tree's leaf order), in blocks of up to RB
// consecutive tokens:
//   per token  : x_m and G_mk are loaded once, dx_m is updated once;
//   per node   : u, v rows are shared with the neighbouring tokens (hot; within a block, tokens at the same node
//                share each row load), and du, dv, db are summed in one accumulator per level while the node stays
//                on the path, then written once when the path leaves it.
// A node that extends beyond [p0, p1) (at most 2 per level) goes to `partials` instead.
template <typename T>
struct TreeBackward {
  using A = typename AccOf<T>::type;
  static constexpr int RB = 4;
  const Shape& s;
  const T *x, *w_in, *w_out, *dy;
  const int64_t* paths;
  const A* lam;
  int act, placement;
  bool need_dx, need_params;
  T *gw_in, *gb_in, *gw_out;
  // per-thread scratch: RB tokens' x and G rows, phi / phi' of their responses, one accumulator row set per level
  std::vector<A> xf, Gf, zf, ph, dph, adu, adv, adb;
  std::vector<int64_t> open;
  std::vector<char> partial_start;

  TreeBackward(const Shape& s_, const T* x_, const T* w_in_, const T* w_out_, const T* dy_, const int64_t* paths_,
               const A* lam_, int act_, int placement_, bool need_dx_, bool need_params_, T* gw_in_, T* gb_in_,
               T* gw_out_)
      : s(s_), x(x_), w_in(w_in_), w_out(w_out_), dy(dy_), paths(paths_), lam(lam_), act(act_),
        placement(placement_), need_dx(need_dx_), need_params(need_params_), gw_in(gw_in_), gb_in(gb_in_),
        gw_out(gw_out_), xf(RB * s_.D), Gf(RB * s_.D), zf(s_.D), ph(RB * s_.L * s_.W), dph(RB * s_.L * s_.W),
        adu(need_params_ ? s_.L * s_.W * s_.D : 0), adv(need_params_ ? s_.L * s_.W * s_.D : 0), adb(s_.L * s_.W),
        open(s_.L, -1), partial_start(s_.L, 0) {}

  template <int R>
  void node_step(int64_t k, int64_t t, int64_t node, const int* idx, const int64_t* ms, A* dx_acc) {
    const int64_t N = s.N, W = s.W, D = s.D, L = s.L;
    const int64_t row = (k * N + node) * W;
    const A* G[R];
    const A* X[R];
    A* DX[R];
    for (int r = 0; r < R; ++r) {
      G[r] = Gf.data() + idx[r] * D;
      X[r] = xf.data() + idx[r] * D;
      DX[r] = need_dx ? dx_acc + ms[idx[r]] * D : nullptr;
    }
    for (int64_t w = 0; w < W; ++w) {
      A g[R], c[R];
      dot_multi<R>(w_out + (row + w) * D, G, g, D);
      for (int r = 0; r < R; ++r) {
        const int64_t q = (idx[r] * L + t) * W + w;
        if (placement == 0) {
          g[r] *= dph[q];
          c[r] = ph[q];
        } else {
          c[r] = lam[((ms[idx[r]] * s.K + k) * L + t) * W + w];
        }
      }
      if (need_dx) axpy_multi<R>(DX, g, w_in + (row + w) * D, D);
      if (need_params) {
        gather_axpy<R>(adu.data() + (t * W + w) * D, g, X, D);
        gather_axpy<R>(adv.data() + (t * W + w) * D, c, G, D);
        for (int r = 0; r < R; ++r) adb[t * W + w] += g[r];
      }
    }
  }

  void run(int64_t k, const int32_t* ord, int64_t p0, int64_t p1, A* dx_acc, std::vector<Partial<A>>& partials) {
    const int64_t M = s.M, K = s.K, N = s.N, W = s.W, D = s.D, L = s.L;
    auto node_at = [&](int64_t m, int64_t t) { return paths[(m * K + k) * L + t]; };
    auto flush = [&](int64_t t, bool at_end) {
      const int64_t node = open[t];
      const int64_t row = (k * N + node) * W;
      const bool partial_end = at_end && p1 < M && node_at(ord[p1], t) == node;
      A* du = adu.data() + t * W * D;
      A* dv = adv.data() + t * W * D;
      A* db = adb.data() + t * W;
      if (partial_start[t] || partial_end) {
        partials.push_back(Partial<A>{row, std::vector<A>(du, du + W * D), std::vector<A>(dv, dv + W * D),
                                      std::vector<A>(db, db + W)});
      } else {
        for (int64_t i = 0; i < W * D; ++i) {
          st(gw_in + row * D, i, du[i]);
          st(gw_out + row * D, i, dv[i]);
        }
        if (gb_in)
          for (int64_t w = 0; w < W; ++w) st(gb_in, row + w, db[w]);
      }
      open[t] = -1;
    };
    auto prefetch_token = [&](int64_t m) {
      prefetch_row(paths + (m * K + k) * L, L * sizeof(int64_t));
      prefetch_row(lam + (m * K + k) * L * W, L * W * sizeof(A));
      prefetch_row(dy + m * D, D * sizeof(T));
      if (need_params) prefetch_row(x + m * D, D * sizeof(T));
    };

    int64_t ms[RB];
    const int64_t* pth[RB];
    for (int64_t pb = p0; pb < p1; pb += RB) {
      const int nb = int(std::min<int64_t>(RB, p1 - pb));
      for (int i = 0; i < nb; ++i) {
        const int64_t m = ms[i] = ord[pb + i];
        pth[i] = paths + (m * K + k) * L;
        const A* lm = lam + (m * K + k) * L * W;
        if (pb + RB + i < p1) prefetch_token(ord[pb + RB + i]);  // the next block's rows, one token at a time
        if (need_params) load_row(xf.data() + i * D, x + m * D, D);
        A* Gi = Gf.data() + i * D;
        load_row(Gi, dy + m * D, D);
        if (placement == 0) {
          act_values(act, lm, ph.data() + i * L * W, dph.data() + i * L * W, L * W);
        } else {  // G = phi'(z) * dy with z = sum_t sum_w lam v (the path's v rows, shared, hot)
          std::fill(zf.begin(), zf.end(), A(0));
          for (int64_t t = 0; t < L; ++t)
            for (int64_t w = 0; w < W; ++w)
              axpy(zf.data(), lm[t * W + w], w_out + ((k * N + pth[i][t]) * W + w) * D, D);
          act_grad_mul(act, Gi, zf.data(), Gi, D);
        }
      }
      if (need_dx && pb + RB < p1)  // dx rows of the next block are read and written there
        for (int i = 0; i < int(std::min<int64_t>(RB, p1 - pb - RB)); ++i)
          prefetch_row(dx_acc + int64_t(ord[pb + RB + i]) * D, D * sizeof(A));
      for (int64_t t = 0; t < L; ++t) {
        for (int i = 0; i < nb;) {  // runs of block tokens at the same node (consecutive: leaf order)
          const int64_t node = pth[i][t];
          int j = i + 1;
          while (j < nb && pth[j][t] == node) ++j;
          if (need_params && open[t] != node) {
            if (open[t] >= 0) flush(t, false);
            open[t] = node;
            partial_start[t] = pb + i == p0 && p0 > 0 && node_at(ord[p0 - 1], t) == node;
            std::fill(adu.begin() + t * W * D, adu.begin() + (t + 1) * W * D, A(0));
            std::fill(adv.begin() + t * W * D, adv.begin() + (t + 1) * W * D, A(0));
            std::fill(adb.begin() + t * W, adb.begin() + (t + 1) * W, A(0));
          }
          int idx[RB];
          for (int r = 0; r < j - i; ++r) idx[r] = i + r;
          switch (j - i) {
            case 1: node_step<1>(k, t, node, idx, ms, dx_acc); break;
            case 2: node_step<2>(k, t, node, idx, ms, dx_acc); break;
            case 3: node_step<3>(k, t, node, idx, ms, dx_acc); break;
            default: node_step<4>(k, t, node, idx, ms, dx_acc); break;
          }
          i = j;
        }
      }
    }
    if (need_params)
      for (int64_t t = 0; t < L; ++t)
        if (open[t] >= 0) flush(t, true);
  }
};

// Two schedules, both race-free without atomics:
//  * trees >= threads: each tree is one work item, owned whole by one thread, so all its gradient rows are complete
//    when written; dx rows are shared between trees, so each thread sums into its own dx buffer and the buffers are
//    added at the end (threads x M x D floats, only when there are several threads). Trees go to threads
//    round-robin (static schedule), so each dx buffer sums the same trees in the same order on every call: the
//    gradients are bitwise reproducible for a given thread count, which exact resume relies on.
//  * few trees (e.g. 1x11): each tree's leaf order is split into one contiguous slice per thread (no dx row is in two
//    slices of one tree); nodes straddling two slices are summed from per-thread partials, one barrier per tree.
template <typename T>
void backward_impl(const Shape& s, const T* x, const T* w_in, const T* w_out, const T* dy, const int64_t* paths,
                   const typename AccOf<T>::type* lam, int act, int placement, bool need_dx, bool need_params,
                   typename AccOf<T>::type* dx_acc, T* gw_in, T* gb_in, T* gw_out) {
  using A = typename AccOf<T>::type;
  const int64_t M = s.M, K = s.K, W = s.W, D = s.D, L = s.L;
  const int nt = num_threads(M * K * L * W * D);

  std::vector<int32_t> order(K * M);
#pragma omp parallel for num_threads(std::min<int64_t>(nt, K)) schedule(dynamic, 1)
  for (int64_t k = 0; k < K; ++k) sort_by_leaf(s, paths, k, order.data() + k * M);

  std::vector<std::vector<Partial<A>>> partials(nt);
  if (K >= nt) {
    std::vector<std::vector<A>> dx_extra(need_dx ? nt - 1 : 0);
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();  // team <= nt
      A* dxb = nullptr;
      if (need_dx) {
        if (tid == 0) {
          dxb = dx_acc;
        } else {
          dx_extra[tid - 1].assign(M * D, A(0));
          dxb = dx_extra[tid - 1].data();
        }
      }
      TreeBackward<T> tb(s, x, w_in, w_out, dy, paths, lam, act, placement, need_dx, need_params, gw_in, gb_in,
                         gw_out);
#pragma omp for schedule(static, 1)
      for (int64_t k = 0; k < K; ++k) tb.run(k, order.data() + k * M, 0, M, dxb, partials[tid]);
      if (need_dx && team > 1) {  // dx_acc += the other threads' buffers (of this team), rows split between threads
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m)
          for (int j = 0; j + 1 < team; ++j) {
            const A* src = dx_extra[j].data() + m * D;
            A* dst = dx_acc + m * D;
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) dst[i] += src[i];
          }
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
#pragma omp parallel num_threads(nt)
      {
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        TreeBackward<T> tb(s, x, w_in, w_out, dy, paths, lam, act, placement, need_dx, need_params, gw_in, gb_in,
                           gw_out);
        tb.run(k, order.data() + k * M, M * tid / nth, M * (tid + 1) / nth, dx_acc, partials[tid]);
      }
    }
  }

  // Straddling nodes: sum the partials of all threads in fp32, write once.
  std::vector<Partial<A>*> all;
  for (auto& v : partials)
    for (auto& pa : v) all.push_back(&pa);
  std::stable_sort(all.begin(), all.end(), [](const Partial<A>* a, const Partial<A>* b) { return a->row < b->row; });
  for (size_t i = 0; i < all.size();) {
    size_t e = i + 1;
    while (e < all.size() && all[e]->row == all[i]->row) {
      for (int64_t j = 0; j < W * D; ++j) {
        all[i]->du[j] += all[e]->du[j];
        all[i]->dv[j] += all[e]->dv[j];
      }
      for (int64_t w = 0; w < W; ++w) all[i]->db[w] += all[e]->db[w];
      ++e;
    }
    const int64_t row = all[i]->row;
    for (int64_t j = 0; j < W * D; ++j) {
      st(gw_in + row * D, j, all[i]->du[j]);
      st(gw_out + row * D, j, all[i]->dv[j]);
    }
    if (gb_in)
      for (int64_t w = 0; w < W; ++w) st(gb_in, row + w, all[i]->db[w]);
    i = e;
  }
}

// ---- bindings ---------------------------------------------------------------------------------------------------

Shape check(const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
            const at::Tensor& w_out, int64_t depth) {
  TORCH_CHECK(x.device().is_cpu(), "tree_train cpp: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w_in.dim() == 4 && w_out.sizes() == w_in.sizes(), "tree_train cpp: bad shapes");
  TORCH_CHECK(x.is_contiguous() && w_in.is_contiguous() && w_out.is_contiguous(), "tree_train cpp: non-contiguous");
  TORCH_CHECK(w_in.scalar_type() == x.scalar_type() && w_out.scalar_type() == x.scalar_type(),
              "tree_train cpp: x and weights must share a dtype");
  Shape s{x.size(0), w_in.size(0), w_in.size(1), w_in.size(2), w_in.size(3), depth + 1};
  TORCH_CHECK(s.D == x.size(1), "tree_train cpp: d_model mismatch");
  TORCH_CHECK(depth >= 0 && depth < 31 && s.N == (int64_t(2) << depth) - 1, "tree_train cpp: N != 2^(depth+1) - 1");
  TORCH_CHECK(s.M < (int64_t(1) << 31), "tree_train cpp: too many tokens for one call");
  if (b_in.has_value()) {
    TORCH_CHECK(b_in->is_contiguous() && b_in->scalar_type() == x.scalar_type(), "tree_train cpp: bad bias");
    TORCH_CHECK(b_in->dim() == 3 && b_in->size(0) == s.K && b_in->size(1) == s.N && b_in->size(2) == s.W,
                "tree_train cpp: bias shape");
  }
  return s;
}

template <typename T, typename S>
const T* ptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr<S>()); }
template <typename T, typename S>
T* mptr(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr<S>()); }

// -> (y, paths, lam)
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
                                const at::Tensor& w_out, int64_t depth, int64_t act, int64_t placement,
                                const std::optional<at::Tensor>& thr_in,
                                const std::optional<at::Tensor>& paths_in) {
  const Shape s = check(x, w_in, b_in, w_out, depth);
  at::Tensor given_t;
  if (paths_in.has_value()) {  // the caller's paths: (M, K, L) int64, a child of the previous level's node each
    TORCH_CHECK(paths_in->dim() == 3 && paths_in->size(0) == s.M && paths_in->size(1) == s.K &&
                    paths_in->size(2) == s.L && paths_in->device().is_cpu() && paths_in->scalar_type() == at::kLong,
                "tree_train cpp: given paths must be (M, K, L) int64 on the CPU");
    given_t = paths_in->contiguous();
    const int64_t* g = given_t.data_ptr<int64_t>();
    bool ok = true;
    for (int64_t r = 0; r < s.M * s.K && ok; ++r)
      for (int64_t t = 0; t < s.L && ok; ++t) {
        const int64_t j = g[r * s.L + t], prev = t ? g[r * s.L + t - 1] : -1;
        ok = t ? (j == 2 * prev + 1 || j == 2 * prev + 2) : j == 0;
      }
    TORCH_CHECK(ok, "tree_train cpp: given paths must start at the root and go to a child at every level");
  }
  const int64_t* given = given_t.defined() ? given_t.data_ptr<int64_t>() : nullptr;
  at::Tensor thr_t;
  if (thr_in.has_value()) {
    TORCH_CHECK(thr_in->dim() == 2 && thr_in->size(0) == s.K && thr_in->size(1) == s.N && thr_in->device().is_cpu(),
                "tree_train cpp: routing threshold must be (K, N) on the CPU");
    thr_t = thr_in->to(at::kFloat).contiguous();
  }
  const float* thr = thr_t.defined() ? thr_t.data_ptr<float>() : nullptr;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor yacc = at::zeros({s.M, s.D}, x.options().dtype(acc));  // summed over tree groups
  at::Tensor paths = at::empty({s.M, s.K, s.L}, x.options().dtype(at::kLong));
  at::Tensor lam = at::empty({s.M, s.K, s.L, s.W}, x.options().dtype(acc));
  const bool hb = b_in.has_value();
  switch (x.scalar_type()) {
    case at::kFloat:
      forward_impl<float>(s, ptr<float, float>(x), ptr<float, float>(w_in), hb ? ptr<float, float>(*b_in) : nullptr,
                          ptr<float, float>(w_out), thr, given, int(act), int(placement), yacc.data_ptr<float>(),
                          paths.data_ptr<int64_t>(), lam.data_ptr<float>());
      break;
    case at::kBFloat16:
      forward_impl<bf16_t>(s, ptr<bf16_t, at::BFloat16>(x), ptr<bf16_t, at::BFloat16>(w_in),
                           hb ? ptr<bf16_t, at::BFloat16>(*b_in) : nullptr, ptr<bf16_t, at::BFloat16>(w_out), thr, given,
                           int(act), int(placement), yacc.data_ptr<float>(), paths.data_ptr<int64_t>(),
                           lam.data_ptr<float>());
      break;
    case at::kDouble:
      forward_impl<double>(s, ptr<double, double>(x), ptr<double, double>(w_in),
                           hb ? ptr<double, double>(*b_in) : nullptr, ptr<double, double>(w_out), thr, given, int(act),
                           int(placement), yacc.data_ptr<double>(), paths.data_ptr<int64_t>(),
                           lam.data_ptr<double>());
      break;
    default:
      TORCH_CHECK(false, "tree_train cpp: dtype must be float32, bfloat16 or float64");
  }
  at::Tensor y = yacc.scalar_type() == x.scalar_type() ? yacc : yacc.to(x.scalar_type());
  return {y, paths, lam};
}

// -> (dx or undefined, dw_in, db_in or undefined, dw_out)
std::vector<at::Tensor> backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& w_in,
                                 const std::optional<at::Tensor>& b_in, const at::Tensor& w_out,
                                 const at::Tensor& paths, const at::Tensor& lam, int64_t depth, int64_t act,
                                 int64_t placement, bool need_dx, bool need_params) {
  const Shape s = check(x, w_in, b_in, w_out, depth);
  at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  TORCH_CHECK(paths.is_contiguous() && lam.is_contiguous(), "tree_train cpp: saved tensors must be contiguous");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dx_acc = need_dx ? at::zeros({s.M, s.D}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor gw_in, gb_in, gw_out;
  if (need_params) {  // unvisited nodes get exact zeros
    gw_in = at::zeros_like(w_in);
    gw_out = at::zeros_like(w_out);
    if (b_in.has_value()) gb_in = at::zeros_like(*b_in);
  }
  const bool hb = need_params && b_in.has_value();
  switch (x.scalar_type()) {
    case at::kFloat:
      backward_impl<float>(s, ptr<float, float>(x), ptr<float, float>(w_in), ptr<float, float>(w_out),
                           ptr<float, float>(dy), paths.data_ptr<int64_t>(), lam.data_ptr<float>(), int(act),
                           int(placement), need_dx, need_params, need_dx ? dx_acc.data_ptr<float>() : nullptr,
                           need_params ? mptr<float, float>(gw_in) : nullptr, hb ? mptr<float, float>(gb_in) : nullptr,
                           need_params ? mptr<float, float>(gw_out) : nullptr);
      break;
    case at::kBFloat16:
      backward_impl<bf16_t>(s, ptr<bf16_t, at::BFloat16>(x), ptr<bf16_t, at::BFloat16>(w_in),
                            ptr<bf16_t, at::BFloat16>(w_out), ptr<bf16_t, at::BFloat16>(dy),
                            paths.data_ptr<int64_t>(), lam.data_ptr<float>(), int(act), int(placement), need_dx,
                            need_params, need_dx ? dx_acc.data_ptr<float>() : nullptr,
                            need_params ? mptr<bf16_t, at::BFloat16>(gw_in) : nullptr,
                            hb ? mptr<bf16_t, at::BFloat16>(gb_in) : nullptr,
                            need_params ? mptr<bf16_t, at::BFloat16>(gw_out) : nullptr);
      break;
    case at::kDouble:
      backward_impl<double>(s, ptr<double, double>(x), ptr<double, double>(w_in), ptr<double, double>(w_out),
                            ptr<double, double>(dy), paths.data_ptr<int64_t>(), lam.data_ptr<double>(), int(act),
                            int(placement), need_dx, need_params, need_dx ? dx_acc.data_ptr<double>() : nullptr,
                            need_params ? mptr<double, double>(gw_in) : nullptr,
                            hb ? mptr<double, double>(gb_in) : nullptr,
                            need_params ? mptr<double, double>(gw_out) : nullptr);
      break;
    default:
      TORCH_CHECK(false, "tree_train cpp: dtype must be float32, bfloat16 or float64");
  }
  at::Tensor dx = need_dx ? (dx_acc.scalar_type() == x.scalar_type() ? dx_acc : dx_acc.to(x.scalar_type()))
                          : at::Tensor();
  return {dx, gw_in, gb_in, gw_out};
}

}  // namespace

// Registered as torch ops in a namespace named after the build (TORCH_EXTENSION_NAME carries the source hash, so
// two builds loaded in one process do not collide); Python calls torch.ops.<module name>.forward / .backward.
#define TT_CAT2(a, b) a##b
#define TT_CAT(a, b) TT_CAT2(a, b)
#define TT_STR2(a) #a
#define TT_STR(a) TT_STR2(a)
#define TT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

TT_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}

// An empty Python module, so that torch.utils.cpp_extension.load can import the library (which registers the ops).
PyMODINIT_FUNC TT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, TT_STR(TORCH_EXTENSION_NAME), "tree_train kernels (torch.ops)", -1,
                            nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
