// Fused inference kernel for tree feed-forward layers (see treeffn/layers/tree.py for the maths).
//
// Shapes: M tokens, D model width, K trees, L = depth + 1 levels, N = 2^L - 1 nodes per tree, W units per node.
//   x      (M, D)          fp32 or bf16
//   w_in   (K, N, W, D)    fp32 or bf16 (w_in, b_in and w_out share one dtype)
//   b_in   (K, N, W)       optional
//   w_out  (K, N, W, D)
//   thr    (K, N)          optional fp32 routing thresholds (tree.balance): right child iff sum_w lam > thr
//   route  0 (self): a node routes on sum_w lam of its own units; 1 (children, tree.route): on the difference of its
//          children's, sum_w lam(right child) - sum_w lam(left child) > thr (both children's responses are computed,
//          the chosen one's kept; walk_block is not used)
//   y      (M, D)          x's dtype;  paths (M, K, L) int64 (only from infer_paths)
//
// One call walks every tree of every token through all levels. Per visited node it reads the node's W*D input
// weights (one contiguous block thanks to the (K, N, W, D) layout), takes W dot products with the token, routes on
// the sign of their sum, and adds the node's contribution to the output. That is K*L*W*D multiply-adds twice per
// token instead of K*N*W*D for the dense layer: the whole point of the layer, which per-op framework overhead
// would otherwise eat at small batch (compare the tree-torch and tree-cpp rows of `treeffn bench layer`).
//
// Two walks:
// * one token (route + accumulate: batch 1, and a block's last token): first the routing, level by level across all
//   trees, then the output, adding every visited node's contribution in a fixed order. Each tree's walk is a chain
//   of dependent loads (the next row's address depends on the current dot product's sign), and at batch 1 inside a
//   model the rows are cold (the model's other layers ran since this one): taking the K chains in step lets their
//   loads overlap, and the children and grandchildren of every node are prefetched before its sign is known. Walking
//   one tree after the other measured 10-25 % slower for 16x7 on one thread, warm or cold;
// * a block of tokens level by level (walk_block): tokens at the same node are processed together so the node's
//   weights are read once per block, four tokens per weight load.
//
// Accumulation is always fp32 (bf16 is widened on load), and every schedule adds the same terms in the same order
// for a token: trees in order, then levels, then units; each response is one dot() whatever the grouping of the
// tokens. The result is therefore bit-identical whatever the thread count and the batch split (tests check it).
// Parallelism: OpenMP over tokens when there are enough of them, over trees when the batch is small (routing split
// by trees, then the output split by columns), and none at all when the work is too small to pay for waking threads.
// Thread count: torch's (at::get_num_threads), so torch.set_num_threads applies; the GIL is released for calls big
// enough to matter.

// Narrow headers instead of <torch/extension.h>: the same binding (at::Tensor <-> torch.Tensor casters) in less
// than half the first-use compile time.
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TREEFFN_AVX2 1
#endif

namespace {

enum Act : int { GELU = 0, RELU = 1, TANH = 2, SILU = 3, IDENTITY = 4 };
enum Placement : int { NODE = 0, OUTPUT = 1 };
enum Route : int { SELF = 0, CHILDREN = 1 };

// Below this many multiply-adds per call (M*K*L*W*D) we stay on the calling thread: waking the OpenMP team costs
// from a microsecond (its threads still spinning from the previous parallel op) to tens (asleep), against a few
// microseconds for the whole walk. Measured (2 cores, D=768, batch 1): with the team spinning, two threads were as
// fast as one from 2x10 (17K) on; after 20 ms idle, 20-35 us slower at 2x10 and 4x9 (31K), even at 16x7 (98K).
constexpr int64_t kParallelWork = 1 << 15;

using bf16_t = uint16_t;  // raw bfloat16 bits; the top half of an IEEE float

inline float bf2f(bf16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const bf16_t* p, int64_t i) { return bf2f(p[i]); }

// ---- scalar activations (node placement: one call per visited unit, so exactness beats speed) ----------------
inline float act_scalar(int act, float z) {
  switch (act) {
    case GELU: return 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752f));
    case RELU: return z > 0.0f ? z : 0.0f;
    case TANH: return std::tanh(z);
    case SILU: return z / (1.0f + std::exp(-z));
    default: return z;
  }
}

// ---- vector activations (output placement: D values per tree and token) ------------------------------------
// libm's erf/exp are scalar calls that would cost several times the tree walk itself for the "output" placement
// (D of them per tree and token), and GCC does not vectorise them (nor, without -fno-trapping-math, a hand-written
// exp with a clamp), hence AVX2 intrinsics for whole vectors of 8 and libm for the tail. Accuracy ~1e-7 absolute.
#ifdef TREEFFN_AVX2
// e^x: x = n*ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (relative error < 1e-8 there), 2^n
// built in the exponent bits. n comes from the 1.5*2^23 rounding trick, so no float->int conversion is needed.
inline __m256 exp8(__m256 x) {
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 split hi/lo: n*hi exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic)), _mm256_set1_epi32(127)),
      23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), odd-extended.
inline __m256 erf8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign, x);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), one));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  const __m256 q = _mm256_mul_ps(_mm256_mul_ps(p, t), exp8(_mm256_mul_ps(_mm256_xor_ps(a, sign), a)));
  return _mm256_or_ps(_mm256_sub_ps(one, q), _mm256_and_ps(sign, x));
}

inline __m256 act8(int act, __m256 z) {
  const __m256 one = _mm256_set1_ps(1.0f);
  switch (act) {
    case GELU:
      return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), z),
                           _mm256_add_ps(one, erf8(_mm256_mul_ps(z, _mm256_set1_ps(0.70710678118654752f)))));
    case RELU: return _mm256_max_ps(z, _mm256_setzero_ps());
    case TANH:  // 1 - 2 / (e^{2z} + 1): exact limits at +-inf
      return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(exp8(_mm256_add_ps(z, z)), one)));
    case SILU: return _mm256_div_ps(z, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
    default: return z;
  }
}
#endif

// acc[d] += phi(z[d]) for d < D.
inline void add_act(int act, const float* __restrict z, float* __restrict acc, int64_t D) {
  int64_t d = 0;
#ifdef TREEFFN_AVX2
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), act8(act, _mm256_loadu_ps(z + d))));
#endif
  for (; d < D; ++d) acc[d] += act_scalar(act, z[d]);
}

// ---- dot products and axpy over D ---------------------------------------------------------------------------
// The dot product is the critical path of the walk (the next node's address depends on its sign), so it uses
// independent accumulators to hide FMA latency. GCC does not reorder a float reduction without -ffast-math,
// hence intrinsics where available and an `omp simd` reduction otherwise. dot4 adds each token's products in
// exactly dot's order, so a response does not depend on how the tokens were grouped.
#ifdef TREEFFN_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {  // 8 bf16 -> 8 fp32: widen to 32 bits, shift into the top half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
#endif

// Σ_d w[d]·x[d]: four accumulators over blocks of 32, the blocks of 8 left into the first, then the last D mod 8
// products one by one.
template <typename TW>
inline float dot(const TW* __restrict w, const float* __restrict x, int64_t D) {
#ifdef TREEFFN_AVX2
  int64_t d = 0;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; d + 32 <= D; d += 32) {
    a0 = _mm256_fmadd_ps(load8(w + d), _mm256_loadu_ps(x + d), a0);
    a1 = _mm256_fmadd_ps(load8(w + d + 8), _mm256_loadu_ps(x + d + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + d + 16), _mm256_loadu_ps(x + d + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + d + 24), _mm256_loadu_ps(x + d + 24), a3);
  }
  for (; d + 8 <= D; d += 8) a0 = _mm256_fmadd_ps(load8(w + d), _mm256_loadu_ps(x + d), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; d < D; ++d) s += load(w, d) * x[d];
  return s;
#else
  float r = 0.0f;
#pragma omp simd reduction(+ : r)
  for (int64_t i = 0; i < D; ++i) r += load(w, i) * x[i];
  return r;
#endif
}

// Four tokens against one weight row (tokens at the same node), each in dot's order: each weight vector is loaded
// once for four FMAs, so the loop is bound by FMA throughput rather than by loads. x rows are xs[0..3].
template <typename TW>
inline void dot4(const TW* __restrict w, const float* const* xs, int64_t D, float* out) {
#ifdef TREEFFN_AVX2
  const float* __restrict x0 = xs[0];
  const float* __restrict x1 = xs[1];
  const float* __restrict x2 = xs[2];
  const float* __restrict x3 = xs[3];
  __m256 a[4][4];  // [token][accumulator]: 16 registers; AVX-512 has 32, with AVX2's 16 a few spill (no slower)
  for (int q = 0; q < 4; ++q)
    for (int c = 0; c < 4; ++c) a[q][c] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256 wc = load8(w + d + 8 * c);
      a[0][c] = _mm256_fmadd_ps(wc, _mm256_loadu_ps(x0 + d + 8 * c), a[0][c]);
      a[1][c] = _mm256_fmadd_ps(wc, _mm256_loadu_ps(x1 + d + 8 * c), a[1][c]);
      a[2][c] = _mm256_fmadd_ps(wc, _mm256_loadu_ps(x2 + d + 8 * c), a[2][c]);
      a[3][c] = _mm256_fmadd_ps(wc, _mm256_loadu_ps(x3 + d + 8 * c), a[3][c]);
    }
  }
  for (; d + 8 <= D; d += 8) {
    const __m256 w0 = load8(w + d);
    a[0][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + d), a[0][0]);
    a[1][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + d), a[1][0]);
    a[2][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x2 + d), a[2][0]);
    a[3][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x3 + d), a[3][0]);
  }
  float s[4];
  for (int q = 0; q < 4; ++q)
    s[q] = hsum(_mm256_add_ps(_mm256_add_ps(a[q][0], a[q][1]), _mm256_add_ps(a[q][2], a[q][3])));
  for (; d < D; ++d) {
    const float wd = load(w, d);
    s[0] += wd * x0[d];
    s[1] += wd * x1[d];
    s[2] += wd * x2[d];
    s[3] += wd * x3[d];
  }
  out[0] = s[0], out[1] = s[1], out[2] = s[2], out[3] = s[3];
#else
  for (int q = 0; q < 4; ++q) out[q] = dot(w, xs[q], D);
#endif
}

// acc[d] += a * v[d]: no reduction, so plain loops vectorise (elementwise: the same on any sub-range of d).
template <typename TW>
inline void axpy(float a, const TW* __restrict v, float* __restrict acc, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += a * load(v, d);
}

// acc[d] = a * v[d]: a token's first term, written instead of added to zeros (the same value: 0 + a·v rounds as
// a·v, up to the sign of a zero), which spares the output's zero fill and one read of it.
template <typename TW>
inline void scale(float a, const TW* __restrict v, float* __restrict acc, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] = a * load(v, d);
}

// Pull candidate rows towards the core before the current node's sign is known: the children 2j+1 and 2j+2 are
// adjacent, and so are the four grandchildren 4j+3 .. 4j+6, so each generation is one contiguous block of rows.
// Touching the first lines of each row is enough for the hardware stream prefetcher to carry on: prefetching
// whole rows measured no better cold and slower warm (the prefetch instructions themselves cost).
template <typename TW>
inline void prefetch_children(const TW* rows, int64_t row_elems, int64_t nrows) {
  constexpr int64_t kLine = 64 / sizeof(TW);
  const int64_t lines = std::min<int64_t>((row_elems + kLine - 1) / kLine, 4);
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(rows + r * row_elems + l * kLine, 0, 3);
}

// Every cache line of n elements from p into L2: a row that will be read soon, but not next.
template <typename TW>
inline void prefetch_l2(const TW* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(TW));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
  __builtin_prefetch(c + bytes - 1, 0, 2);
}

struct Problem {
  int64_t M, D, K, N, L, W;
  int act, placement;
  const float* thr;  // (K, N) routing thresholds or null (= 0): a token goes right iff its score s > thr
  int route;         // SELF or CHILDREN: what the score s is
};

// ---- one token: route, then accumulate ----------------------------------------------------------------------
// Routing of one token x (D floats) through trees [k0, k1): its responses lam (K, L, W) and visited nodes node
// (K, L) (entries of other trees untouched). Level by level across the trees, so that the K chains of dependent
// loads overlap: the rows a tree needs next were prefetched (children and grandchildren of its node) before the
// other trees' dot products ran. With one tree, the grandchildren keep two levels of the chain in flight, and each
// visited node's output row v is prefetched for accumulate, which otherwise waits for them after the chain (1x11
// cold: 10 % faster; with several trees accumulate reads many rows at once, and the prefetches cost more than they
// save: 16x7 warm 30 % slower).
// Route::CHILDREN: the root's responses, then per level both children's; the token goes to the one whose summed
// responses exceed the other's by more than the node's threshold, and its responses are the next level's lam.
template <typename TW>
void route_children(const Problem& p, const float* __restrict x, const TW* __restrict u, const TW* __restrict b,
                    int64_t k0, int64_t k1, float* __restrict lam, int64_t* __restrict node) {
  const int64_t D = p.D, W = p.W, WD = W * D, L = p.L, N = p.N, NWD = N * WD;
  static thread_local std::vector<float> right;
  if (static_cast<int64_t>(right.size()) < W) right.resize(W);
  for (int64_t k = k0; k < k1; ++k) {
    node[k * L] = 0;
    for (int64_t w = 0; w < W; ++w)
      lam[k * L * W + w] = dot(u + k * NWD + w * D, x, D) + (b ? load(b, k * N * W + w) : 0.0f);
  }
  for (int64_t t = 0; t + 1 < L; ++t) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j = node[k * L + t], c = 2 * j + 1;
      const TW* uk = u + k * NWD;
      if (t + 2 < L) prefetch_children(uk + (2 * c + 1) * WD, D, 4 * W);
      float* l = lam + (k * L + t + 1) * W;  // the left child's responses, replaced by the right's if it wins
      float sl = 0.0f, sr = 0.0f;
      for (int64_t w = 0; w < W; ++w) {
        l[w] = dot(uk + c * WD + w * D, x, D) + (b ? load(b, (k * N + c) * W + w) : 0.0f);
        right[w] = dot(uk + (c + 1) * WD + w * D, x, D) + (b ? load(b, (k * N + c + 1) * W + w) : 0.0f);
        sl += l[w];
        sr += right[w];
      }
      const bool go_right = sr - sl > (p.thr ? p.thr[k * N + j] : 0.0f);
      if (go_right) std::copy(right.data(), right.data() + W, l);
      node[k * L + t + 1] = c + (go_right ? 1 : 0);
    }
  }
}

template <typename TW>
void route(const Problem& p, const float* __restrict x, const TW* __restrict u, const TW* __restrict b,
           const TW* __restrict v, int64_t k0, int64_t k1, float* __restrict lam, int64_t* __restrict node) {
  if (p.route == CHILDREN) return route_children(p, x, u, b, k0, k1, lam, node);
  const int64_t D = p.D, W = p.W, WD = W * D, L = p.L, N = p.N, NWD = N * WD;
  const bool one = k1 - k0 == 1;
  for (int64_t k = k0; k < k1; ++k) node[k * L] = 0;
  if (one) prefetch_l2(v + k0 * NWD, WD);
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j = node[k * L + t];
      const TW* uk = u + k * NWD;
      if (t + 1 < L) prefetch_children(uk + (2 * j + 1) * WD, D, 2 * W);
      if (t + 2 < L) prefetch_children(uk + (4 * j + 3) * WD, D, 4 * W);
      float* l = lam + (k * L + t) * W;
      float s = 0.0f;
      for (int64_t w = 0; w < W; ++w) {
        const float bias = b ? load(b, (k * N + j) * W + w) : 0.0f;
        l[w] = dot(uk + j * WD + w * D, x, D) + bias;
        s += l[w];
      }
      if (t + 1 < L) {
        const int64_t c = 2 * j + 1 + (s > (p.thr ? p.thr[k * N + j] : 0.0f) ? 1 : 0);
        node[k * L + t + 1] = c;
        if (one) prefetch_l2(v + k * NWD + c * WD, WD);
      }
    }
  }
}

// Output columns [d0, d1) of one routed token: acc[d0, d1) = its trees' contributions, trees in order, then
// levels, then units (walk_block's order). z: d1 - d0 floats of scratch (output placement). d0 must be a multiple
// of 8 and d1 one of 8 or D, so that add_act splits the columns into vectors and a scalar tail as it would whole
// rows (its vector and scalar φ differ in the last bits).
template <typename TW>
void accumulate(const Problem& p, const float* __restrict lam, const int64_t* __restrict node,
                const TW* __restrict v, float* __restrict acc, int64_t d0, int64_t d1, float* __restrict z) {
  const int64_t D = p.D, W = p.W, WD = W * D, L = p.L, NWD = p.N * WD, n = d1 - d0;
  const bool node_place = p.placement == NODE;
  float* target = node_place ? acc + d0 : z;
  if (!node_place) std::fill(acc + d0, acc + d1, 0.0f);
  for (int64_t k = 0; k < p.K; ++k) {
    if (!node_place) std::fill(z, z + n, 0.0f);
    for (int64_t t = 0; t < L; ++t) {
      const TW* vr = v + k * NWD + node[k * L + t] * WD + d0;
      const float* l = lam + (k * L + t) * W;
      for (int64_t w = 0; w < W; ++w) {
        if (node_place && k == 0 && t == 0 && w == 0) scale(act_scalar(p.act, l[w]), vr, target, n);
        else axpy(node_place ? act_scalar(p.act, l[w]) : l[w], vr + w * D, target, n);
      }
    }
    if (!node_place) add_act(p.act, z, acc + d0, n);
  }
}

// Scratch for walking a block of B tokens through one tree (sized once per thread, see scratch()).
struct BlockScratch {
  int32_t* order;   // (B) tokens sorted by current node (stable), so tokens at one node form a contiguous run
  int32_t* order2;  // (B) next level's order
  int64_t* node;    // (B) current node of each token
  float* lam;       // (B, W) responses at the current node
  float* z;         // (B, D) per-tree accumulation for the output placement
  static size_t floats(int64_t B, int64_t W, int64_t D) { return B * (W + D) + 4 * B + 16; }
  BlockScratch(float* base, int64_t B, int64_t W) {
    node = reinterpret_cast<int64_t*>(base);
    order = reinterpret_cast<int32_t*>(node + B);
    order2 = order + B;
    lam = reinterpret_cast<float*>(order2 + B);
    z = lam + B * W;
  }
};

// B tokens (rows xs + b*D) through tree k, level by level, adding its contributions to their output rows (acc +
// b*D; for the first tree, first, the token's first term is written: the rows need no zero fill). Tokens at the
// same node are processed together, so a node's weights are read from memory once per block instead of once per
// token: at large batch the top levels (and, for shallow trees, every level) are shared by many tokens, and reading
// each token's own path from L3 is what limits a token-at-a-time walk. Children of nodes in increasing order are
// again in increasing order, so a stable partition of each run into left-goers then right-goers keeps the order
// sorted by node without sorting. paths (if not null): token b's entries at paths + b*path_stride.
template <typename TW>
void walk_block(const Problem& p, int64_t B, const float* __restrict xs, const TW* __restrict u_k,
                const TW* __restrict b_k, const TW* __restrict v_k, const float* __restrict thr_k, bool first,
                float* __restrict acc, BlockScratch& sc, int64_t* paths, int64_t path_stride) {
  const int64_t D = p.D, W = p.W, WD = W * D, L = p.L;
  const bool node_place = p.placement == NODE;
  float* target = node_place ? acc : sc.z;
  if (!node_place) std::fill(sc.z, sc.z + B * D, 0.0f);
  if (!node_place && first) std::fill(acc, acc + B * D, 0.0f);
  for (int64_t b = 0; b < B; ++b) sc.order[b] = static_cast<int32_t>(b), sc.node[b] = 0;
  int32_t* order = sc.order;
  int32_t* next = sc.order2;
  for (int64_t t = 0; t < L; ++t) {
    const bool last = t + 1 == L;
    for (int64_t i = 0; i < B;) {
      const int64_t j = sc.node[order[i]];
      int64_t e = i + 1;
      while (e < B && sc.node[order[e]] == j) ++e;
      const TW* u = u_k + j * WD;
      const TW* v = v_k + j * WD;
      if (!last) prefetch_children(u_k + (2 * j + 1) * WD, D, 2 * W);
      // responses of the run's tokens, four at a time where possible
      for (int64_t w = 0; w < W; ++w) {
        const float bias = b_k ? load(b_k, j * W + w) : 0.0f;
        int64_t r = i;
        for (; r + 4 <= e; r += 4) {
          const float* x4[4] = {xs + order[r] * D, xs + order[r + 1] * D, xs + order[r + 2] * D,
                                xs + order[r + 3] * D};
          float o[4];
          dot4(u + w * D, x4, D, o);
          for (int q = 0; q < 4; ++q) sc.lam[order[r + q] * W + w] = o[q] + bias;
        }
        for (; r < e; ++r) sc.lam[order[r] * W + w] = dot(u + w * D, xs + order[r] * D, D) + bias;
      }
      // contributions, then routing
      const float thr = thr_k ? thr_k[j] : 0.0f;
      for (int64_t r = i; r < e; ++r) {
        const int64_t b = order[r];
        float s = 0.0f;
        for (int64_t w = 0; w < W; ++w) {
          const float lam = sc.lam[b * W + w];
          s += lam;
          if (node_place && first && t == 0 && w == 0) scale(act_scalar(p.act, lam), v, target + b * D, D);
          else axpy(node_place ? act_scalar(p.act, lam) : lam, v + w * D, target + b * D, D);
        }
        if (paths) paths[b * path_stride + t] = j;
        sc.node[b] = 2 * j + 1 + (s > thr ? 1 : 0);
      }
      if (!last) {  // stable partition of the run: left child (smaller index) first
        int64_t o = i;
        for (int64_t r = i; r < e; ++r)
          if (sc.node[order[r]] == 2 * j + 1) next[o++] = order[r];
        for (int64_t r = i; r < e; ++r)
          if (sc.node[order[r]] != 2 * j + 1) next[o++] = order[r];
      }
      i = e;
    }
    std::swap(order, next);
  }
  if (!node_place)
    for (int64_t b = 0; b < B; ++b) add_act(p.act, sc.z + b * D, acc + b * D, D);
}

// Per-thread scratch, reused across calls so the hot path does not allocate (thread_local: safe when several
// Python threads call in with the GIL released, and each OpenMP worker gets its own).
inline float* scratch(size_t n) {
  static thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Tokens per block. Larger blocks share more nodes (at level t a block of B tokens touches at most min(B, 2^t)
// distinct nodes per tree), at the price of x/acc rows spilling from L2: measured (2 cores, D=768) 16x7 at
// M=256 ran 1.7x faster per token with B=256 than with B=32, and 1x11 (little sharing) did not care.
// _set_block() overrides it for tuning experiments.
int64_t g_block = 256;
inline int64_t block_size() { return g_block; }

inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void to_float(const bf16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf2f(src[i]);
}
inline void store(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store(const float* src, bf16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]).x;  // round to nearest even
}

// One token's route + accumulate scratch: visited nodes (K, L) int64, responses (K, L, W), z (D) floats; an even
// number of floats, so that what follows it stays 8-byte aligned.
struct TokenScratch {
  int64_t* node;
  float* lam;
  float* z;
  static size_t floats(const Problem& p) { return (2 * p.K * p.L + p.K * p.L * p.W + p.D + 1) & ~int64_t(1); }
  TokenScratch(float* base, const Problem& p) {
    node = reinterpret_cast<int64_t*>(base);
    lam = reinterpret_cast<float*>(node + p.K * p.L);
    z = lam + p.K * p.L * p.W;
  }
};

// Tokens [m0, m1), all trees, on the calling thread, written to acc (rows of D floats, row 0 is token m0).
// fp32 tokens are read in place; bf16 tokens are widened once per block. A block of one token (batch 1, or the
// last of a range) goes through route + accumulate, a larger one through walk_block tree by tree.
template <typename TX, typename TW>
void run_range(const Problem& p, const TX* x, const TW* u, const TW* b, const TW* v, float* acc, int64_t* paths,
               int64_t m0, int64_t m1) {
  const int64_t D = p.D, K = p.K, L = p.L, NWD = p.N * p.W * D, NW = p.N * p.W;
  const int64_t B = std::min(block_size(), m1 - m0);
  const bool fx = std::is_same<TX, float>::value;
  const size_t ntok = TokenScratch::floats(p), nsc = BlockScratch::floats(B, p.W, D);
  float* buf = scratch(ntok + nsc + (fx ? 0 : B * D));
  TokenScratch ts(buf, p);
  BlockScratch sc(buf + ntok, B, p.W);
  float* xbuf = buf + ntok + nsc;
  for (int64_t mb = m0; mb < m1; mb += B) {
    const int64_t nb = std::min(B, m1 - mb);
    const float* xf;
    if (fx) {
      xf = reinterpret_cast<const float*>(x) + mb * D;
    } else {
      to_float(x + mb * D, xbuf, nb * D);
      xf = xbuf;
    }
    float* a = acc + (mb - m0) * D;
    if (nb == 1 || p.route == CHILDREN) {  // walk_block routes on the nodes' own units only
      for (int64_t i = 0; i < nb; ++i) {
        int64_t* node = paths ? paths + (mb + i) * K * L : ts.node;
        route(p, xf + i * D, u, b, v, 0, K, ts.lam, node);
        accumulate(p, ts.lam, node, v, a + i * D, 0, D, ts.z);
      }
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      const TW* bk = b ? b + k * NW : nullptr;
      const float* tk = p.thr ? p.thr + k * p.N : nullptr;
      int64_t* pk = paths ? paths + mb * K * L + k * L : nullptr;
      walk_block(p, nb, xf, u + k * NWD, bk, v + k * NWD, tk, k == 0, a, sc, pk, K * L);
    }
  }
}

// Tokens [m0, m1), all trees, written to y. fp32 output accumulates in place; bf16 output through an fp32 buffer.
template <typename TX, typename TW>
void run_tokens(const Problem& p, const TX* x, const TW* u, const TW* b, const TW* v, TX* y, int64_t* paths,
                int64_t m0, int64_t m1) {
  const int64_t D = p.D;
  if (m1 <= m0) return;
  if (std::is_same<TX, float>::value) {
    float* acc = reinterpret_cast<float*>(y) + m0 * D;
    run_range(p, x, u, b, v, acc, paths, m0, m1);
    return;
  }
  // bf16 output: an fp32 accumulator per chunk of tokens (its own thread_local, distinct from scratch()).
  static thread_local std::vector<float> accbuf;
  const int64_t chunk = 256;
  if (static_cast<int64_t>(accbuf.size()) < chunk * D) accbuf.resize(chunk * D);
  for (int64_t c = m0; c < m1; c += chunk) {
    const int64_t n = std::min(chunk, m1 - c);
    run_range(p, x, u, b, v, accbuf.data(), paths, c, c + n);
    store(accbuf.data(), y + c * D, n * D);
  }
}

// Few tokens, many trees: route + accumulate on several threads. Each thread routes every token through its share
// of the trees; after a barrier each adds the contributions of all trees to its share of the output columns (slices
// of 16 floats, whole cache lines), in the one-thread order: the result is that of run_tokens, bit for bit.
template <typename TX, typename TW>
void run_trees(const Problem& p, const TX* x, const TW* u, const TW* b, const TW* v, TX* y, int64_t* paths,
               int nthreads) {
  const int64_t M = p.M, D = p.D, K = p.K, KL = K * p.L, KLW = KL * p.W;
  const bool fx = std::is_same<TX, float>::value;
  // the calling thread's buffers, shared with the team: nodes (M, K, L) unless paths holds them, responses
  // (M, K, L, W), and for bf16 the widened tokens and the fp32 outputs (M, D) each
  static thread_local std::vector<float> shared;  // distinct from scratch(), which the team's threads use
  const size_t need = (paths ? 0 : 2 * M * KL) + M * KLW + (fx ? 0 : 2 * M * D);
  if (shared.size() < need) shared.resize(need);
  int64_t* node = paths ? paths : reinterpret_cast<int64_t*>(shared.data());
  float* lam = shared.data() + (paths ? 0 : 2 * M * KL);
  const float* xf = reinterpret_cast<const float*>(x);
  float* acc = reinterpret_cast<float*>(y);
  if (!fx) {
    float* xw = lam + M * KLW;
    to_float(x, xw, M * D);
    xf = xw;
    acc = xw + M * D;
  }
  const int64_t slices = (D + 15) / 16;
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, K));
#pragma omp parallel num_threads(nthreads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int tid = 0, nt = 1;
#endif
    const int64_t k0 = K * tid / nt, k1 = K * (tid + 1) / nt;
    for (int64_t m = 0; m < M; ++m) route(p, xf + m * D, u, b, v, k0, k1, lam + m * KLW, node + m * KL);
#pragma omp barrier
    const int64_t d0 = std::min(D, 16 * (slices * tid / nt)), d1 = std::min(D, 16 * (slices * (tid + 1) / nt));
    if (d0 < d1) {
      float* z = scratch(d1 - d0);
      for (int64_t m = 0; m < M; ++m) {
        float* a = acc + m * D;
        accumulate(p, lam + m * KLW, node + m * KL, v, a, d0, d1, z);
        if (!fx) store(a + d0, y + m * D + d0, d1 - d0);
      }
    }
  }
}

template <typename TX, typename TW>
void run(const Problem& p, const at::Tensor& x, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
         const at::Tensor& w_out, at::Tensor& y, int64_t* paths) {
  const TX* xp = reinterpret_cast<const TX*>(x.data_ptr());
  const TW* up = reinterpret_cast<const TW*>(w_in.data_ptr());
  const TW* bp = b_in.has_value() ? reinterpret_cast<const TW*>(b_in->data_ptr()) : nullptr;
  const TW* vp = reinterpret_cast<const TW*>(w_out.data_ptr());
  TX* yp = reinterpret_cast<TX*>(y.data_ptr());
  const int64_t work = p.M * p.K * p.L * p.W * p.D;
  const int nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (nthreads <= 1 || work < kParallelWork || (p.M == 1 && p.K == 1)) {
    run_tokens(p, xp, up, bp, vp, yp, paths, 0, p.M);
  } else if (p.M >= 2 * nthreads || p.K == 1) {
    const int nt = static_cast<int>(std::min<int64_t>(nthreads, p.M));
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
#else
      const int tid = 0, n = 1;
#endif
      run_tokens(p, xp, up, bp, vp, yp, paths, p.M * tid / n, p.M * (tid + 1) / n);
    }
  } else {
    run_trees(p, xp, up, bp, vp, yp, paths, nthreads);
  }
}

bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }
bool kernel_dtype(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

// y = the layer on x (..., D), in x's shape; with paths_out, the visited nodes (M, K, L) of its M = numel / D tokens.
at::Tensor forward(const at::Tensor& x_, const at::Tensor& w_in_, const c10::optional<at::Tensor>& b_in_,
                   const at::Tensor& w_out_, int64_t depth, int64_t act, int64_t placement,
                   const c10::optional<at::Tensor>& thr_, int64_t route, bool with_paths, at::Tensor* paths_out) {
  TORCH_CHECK(x_.dim() >= 1 && w_in_.dim() == 4, "tree_infer: x must be (..., D) and w_in (K, N, W, D)");
  TORCH_CHECK(x_.device().is_cpu() && w_in_.device().is_cpu() && w_out_.device().is_cpu(),
              "tree_infer C++ kernel: tensors must be on the CPU");
  const int64_t D = x_.size(-1), M = D > 0 ? x_.numel() / D : 0;
  const int64_t K = w_in_.size(0), N = w_in_.size(1), W = w_in_.size(2);
  TORCH_CHECK(depth >= 0 && depth < 40 && N == (int64_t(1) << (depth + 1)) - 1,
              "tree_infer: w_in has ", N, " nodes per tree, depth ", depth, " needs 2^(depth+1)-1");
  TORCH_CHECK(w_in_.size(3) == D && w_out_.sizes() == w_in_.sizes(), "tree_infer: w_in/w_out must be (K, N, W, D)",
              " with D = x.size(-1)");
  TORCH_CHECK(act >= 0 && act <= IDENTITY && (placement == NODE || placement == OUTPUT) &&
                  (route == SELF || route == CHILDREN),
              "tree_infer: bad activation/placement/route code");
  const auto wt = w_in_.scalar_type();
  TORCH_CHECK(kernel_dtype(w_in_) && w_out_.scalar_type() == wt,
              "tree_infer: w_in and w_out must both be float32 or both bfloat16");
  TORCH_CHECK(kernel_dtype(x_), "tree_infer: x must be float32 or bfloat16");
  // .contiguous() returns the same tensor (no copy) when it already is; the check avoids even the refcount churn.
  const at::Tensor x = x_.is_contiguous() ? x_ : x_.contiguous();
  const at::Tensor w_in = w_in_.is_contiguous() ? w_in_ : w_in_.contiguous();
  const at::Tensor w_out = w_out_.is_contiguous() ? w_out_ : w_out_.contiguous();
  c10::optional<at::Tensor> b_in;
  if (b_in_.has_value() && b_in_->defined()) {
    const at::Tensor& b = *b_in_;
    TORCH_CHECK(b.dim() == 3 && b.size(0) == K && b.size(1) == N && b.size(2) == W && b.device().is_cpu(),
                "tree_infer: b_in must be (K, N, W) on the CPU");
    b_in = (b.scalar_type() == wt ? b : b.to(wt)).contiguous();
  }
  at::Tensor thr;
  if (thr_.has_value() && thr_->defined()) {
    const at::Tensor& c = *thr_;
    TORCH_CHECK(c.dim() == 2 && c.size(0) == K && c.size(1) == N && c.device().is_cpu(),
                "tree_infer: the routing threshold must be (K, N) on the CPU");
    thr = (c.scalar_type() == at::kFloat ? c : c.to(at::kFloat)).contiguous();
  }
  // empty_cpu skips the dispatcher (a tenth of a microsecond; a batch-1 call costs two)
  at::Tensor y = at::detail::empty_cpu(x.sizes(), x.scalar_type(), false, c10::nullopt);
  int64_t* pp = nullptr;
  if (with_paths) {
    *paths_out = at::empty({M, K, depth + 1}, x.options().dtype(at::kLong));
    pp = paths_out->data_ptr<int64_t>();
  }
  if (M == 0) return y;
  const Problem p{M, D, K, N, depth + 1, W, static_cast<int>(act), static_cast<int>(placement),
                  thr.defined() ? thr.data_ptr<float>() : nullptr, static_cast<int>(route)};
  // Release the GIL only for calls long enough for it to matter to other Python threads.
  const bool release = M * K * (depth + 1) * W * D >= kParallelWork;
  auto go = [&] {
    const bool xb = is_bf16(x), wb = wt == at::kBFloat16;
    if (!xb && !wb) run<float, float>(p, x, w_in, b_in, w_out, y, pp);
    else if (!xb && wb) run<float, bf16_t>(p, x, w_in, b_in, w_out, y, pp);
    else if (xb && !wb) run<bf16_t, float>(p, x, w_in, b_in, w_out, y, pp);
    else run<bf16_t, bf16_t>(p, x, w_in, b_in, w_out, y, pp);
  };
  if (release) {
    pybind11::gil_scoped_release nogil;
    go();
  } else {
    go();
  }
  return y;
}

at::Tensor infer(const at::Tensor& x, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
                 const at::Tensor& w_out, int64_t depth, int64_t act, int64_t placement,
                 const c10::optional<at::Tensor>& thr, int64_t route) {
  return forward(x, w_in, b_in, w_out, depth, act, placement, thr, route, false, nullptr);
}

// infer, or None when x or the weights are off the CPU or of a dtype the kernel lacks (the caller then takes
// another path): the check costs nanoseconds here against a fraction of a microsecond in Python.
c10::optional<at::Tensor> try_infer(const at::Tensor& x, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
                                    const at::Tensor& w_out, int64_t depth, int64_t act, int64_t placement,
                                    const c10::optional<at::Tensor>& thr, int64_t route) {
  if (!(x.device().is_cpu() && w_in.device().is_cpu() && w_out.device().is_cpu() && kernel_dtype(x) &&
        kernel_dtype(w_in) && kernel_dtype(w_out)))
    return c10::nullopt;
  return forward(x, w_in, b_in, w_out, depth, act, placement, thr, route, false, nullptr);
}

std::tuple<at::Tensor, at::Tensor> infer_paths(const at::Tensor& x, const at::Tensor& w_in,
                                               const c10::optional<at::Tensor>& b_in, const at::Tensor& w_out,
                                               int64_t depth, int64_t act, int64_t placement,
                                               const c10::optional<at::Tensor>& thr, int64_t route) {
  at::Tensor paths;
  at::Tensor y = forward(x, w_in, b_in, w_out, depth, act, placement, thr, route, true, &paths);
  return {y, paths};
}

// ---- memory floor (benchmarks) -------------------------------------------------------------------------------
// What any kernel needs at least to bring a walk's weights in: the input and output rows of the given nodes read
// once each, with no dependence between them (every address known up front, `ahead` nodes prefetched in advance),
// no arithmetic beyond a sum that keeps the loads alive, split across threads as run() splits tokens (one thread
// below kParallelWork elements). `treeffn bench layer` times it on the nodes a batch visits (its read-floor rows).
template <typename TW>
float sum_rows(const TW* __restrict u, const TW* __restrict v, const int64_t* rows, int64_t r0, int64_t r1,
               int64_t n, int64_t ahead) {
  for (int64_t i = r0; i < std::min(r1, r0 + ahead); ++i)
    prefetch_l2(u + rows[i] * n, n), prefetch_l2(v + rows[i] * n, n);
  float s = 0.0f;
  for (int64_t i = r0; i < r1; ++i) {
    if (i + ahead < r1) prefetch_l2(u + rows[i + ahead] * n, n), prefetch_l2(v + rows[i + ahead] * n, n);
    const TW* a = u + rows[i] * n;
    const TW* b = v + rows[i] * n;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; ++d) s += load(a, d) + load(b, d);
  }
  return s;
}

double read_rows(const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& nodes, int64_t ahead) {
  TORCH_CHECK(w_in.dim() == 4 && w_out.sizes() == w_in.sizes() && w_in.is_contiguous() && w_out.is_contiguous() &&
                  w_in.device().is_cpu() && w_out.device().is_cpu() && kernel_dtype(w_in) &&
                  w_out.scalar_type() == w_in.scalar_type(),
              "read_rows: w_in and w_out must be contiguous (K, N, W, D) CPU tensors of one kernel dtype");
  TORCH_CHECK(nodes.dim() == 1 && nodes.scalar_type() == at::kLong && nodes.is_contiguous() && ahead >= 0,
              "read_rows: nodes must be a contiguous 1-d int64 tensor of flat node indices k*N + j");
  const int64_t R = nodes.numel(), KN = w_in.size(0) * w_in.size(1), n = w_in.size(2) * w_in.size(3);
  const int64_t* rows = nodes.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(rows[i] >= 0 && rows[i] < KN, "read_rows: node index out of range");
  const int nthreads = R * n < kParallelWork || at::in_parallel_region() ? 1 : at::get_num_threads();
  double total = 0.0;
  auto go = [&](auto tag) {
    using TW = decltype(tag);
    const TW* u = reinterpret_cast<const TW*>(w_in.data_ptr());
    const TW* v = reinterpret_cast<const TW*>(w_out.data_ptr());
    if (nthreads == 1) {
      total = sum_rows(u, v, rows, 0, R, n, ahead);
      return;
    }
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
#ifdef _OPENMP
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
      const int tid = 0, nt = 1;
#endif
      total += sum_rows(u, v, rows, R * tid / nt, R * (tid + 1) / nt, n, ahead);
    }
  };
  if (is_bf16(w_in)) go(bf16_t{});
  else go(float{});
  return total;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_set_block", [](int64_t b) { g_block = b > 0 ? b : 256; }, "tokens per block (tuning experiments only)");
  m.doc() = "treeffn fused tree-FFN inference kernel (see treeffn/kernels/tree_infer.py)";
  m.def("infer", &infer, "y = tree layer(x); act: 0 gelu 1 relu 2 tanh 3 silu 4 identity; placement: 0 node 1 output; route: "
        "0 self 1 children",
        pybind11::arg("x"), pybind11::arg("w_in"), pybind11::arg("b_in"), pybind11::arg("w_out"),
        pybind11::arg("depth"), pybind11::arg("act"), pybind11::arg("placement"),
        pybind11::arg("thr") = pybind11::none(), pybind11::arg("route") = 0);
  m.def("try_infer", &try_infer, "infer, or None for tensors off the CPU or of another dtype; arguments as infer",
        pybind11::arg("x"), pybind11::arg("w_in"), pybind11::arg("b_in"), pybind11::arg("w_out"),
        pybind11::arg("depth"), pybind11::arg("act"), pybind11::arg("placement"),
        pybind11::arg("thr") = pybind11::none(), pybind11::arg("route") = 0);
  m.def("read_rows", &read_rows, "sum of the input and output rows of the given flat node indices k*N + j, read "
        "with `ahead` nodes prefetched in advance (the memory floor of a walk; benchmarks)", pybind11::arg("w_in"),
        pybind11::arg("w_out"), pybind11::arg("nodes"), pybind11::arg("ahead") = 16);
  m.def("infer_paths", &infer_paths, "(y, paths (M, K, L) int64); arguments as infer", pybind11::arg("x"),
        pybind11::arg("w_in"), pybind11::arg("b_in"), pybind11::arg("w_out"), pybind11::arg("depth"),
        pybind11::arg("act"), pybind11::arg("placement"), pybind11::arg("thr") = pybind11::none(), pybind11::arg("route") = 0);
}
