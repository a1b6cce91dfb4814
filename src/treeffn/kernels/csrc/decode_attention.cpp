// One decoding step of an attention layer with a KV cache, in one call (see treeffn/kernels/decode_attention.py).
//
// Decoding runs an attention layer on one new position per sequence. Done op by op from Python, the projections
// are a small part of that call: the view/transpose of q, k and v, two rotary rotations (a table lookup, a roll,
// a multiply and an add each), the in-place writes of the cache, the attention itself and the output projection
// are each a dispatch of a few microseconds on tensors of a few hundred numbers. This kernel does the whole step:
//
//   x      (B, D) or (B, 1, D) fp32   the normed input of the new position of each sequence (pos (B,) or (B, 1))
//   q/k/v  = x Wqᵀ (+ b), x Wkᵀ (+ b), x Wvᵀ (+ b)        at::linear, or small_linear.h with small_gemm, as every
//                                                        other linear layer of the model (kernels/small_linear.py)
//   q, k   rotated by the rotary table row of the position (table (P, 2C): [cos | cos | −sin | sin]):
//          r[c] = x[c]·table[p, c] + x[(c + C/2) mod C]·table[p, C + c]
//   cache  k and v written at slot n of kbuf/vbuf (B, G, cap, C), cap > n, the position at posbuf[:, n] (B, cap),
//          validbuf[:, n] = the new position's validity (new_valid (B,), or true); the caller keeps the count
//   head h (query group g = h / (H/G)) attends to slots 0..n of group g: softmax(q·kⱼ / √C) weighted sum of vⱼ;
//          masked (a padded cache): only to the valid slots at positions <= its own, and to slot n
//   y      = attn Woᵀ (+ b)      (B, D), or (B, 1, D) for x (B, 1, D)
//
// The scores and the softmax are fp32 with a fixed order of summation per head, so the result does not depend on
// the thread count; it differs from scaled_dot_product_attention only by the order of summation (tests compare).
// The (batch, head) pairs are split across torch's threads when there is enough cache to read.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include "small_linear.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

// Below this many cached floats read (keys and values of every head) the step stays on the calling thread.
constexpr int64_t kParallelWork = 1 << 15;
// Cached rows read ahead of the one being used (keys and values in the score pass, values in the weighted sum):
// at batch 8 with 192 and 384 cached positions, 16 rows and the values prefetched with the keys took the step 4 %
// and 7 % less time than 8 rows and the values left to the weighted sum; batch 1 unchanged.
constexpr int64_t kPrefetchRows = 16;

inline void rotate(const float* __restrict x, const float* __restrict row, float* __restrict out, int64_t C) {
  const int64_t half = C / 2;
  const float* cosv = row;
  const float* sinv = row + C;
#pragma omp simd
  for (int64_t c = 0; c < half; ++c) out[c] = x[c] * cosv[c] + x[c + half] * sinv[c];
#pragma omp simd
  for (int64_t c = half; c < C; ++c) out[c] = x[c] * cosv[c] + x[c - half] * sinv[c];
}

// exp(x) for x <= 0 (scores minus their maximum), in plain arithmetic so that loops over it vectorise: x = n ln2 + r
// with |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n from the exponent bits.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}

// One head: softmax(q·kⱼ · scale) over S cached keys — slots 0..S-1, or the slots idx[0..S-1] when idx is given
// (a padded cache: the others are masked out) — and the weighted sum of their values into out. CC is the head width
// when it is known at compile time (the loops over it then unroll and the accumulator stays in registers), 0 when
// it is only known at run time (C).
template <int64_t CC>
inline void attend_head(const float* __restrict q, const float* __restrict kbase, int64_t kss,
                        const float* __restrict vbase, int64_t vss, const int64_t* __restrict idx, int64_t S,
                        float scale, float* __restrict s, float* __restrict out, int64_t Crt) {
  const int64_t C = CC > 0 ? CC : Crt;
  auto slot = [idx](int64_t j) { return idx ? idx[j] : j; };
  auto ahead = [idx, S](int64_t j) { return idx ? idx[std::min(j + kPrefetchRows, S - 1)] : j + kPrefetchRows; };
  float mx = -INFINITY;
  for (int64_t j = 0; j < S; ++j) {
    const float* kj = kbase + slot(j) * kss;
    const float* kn = kbase + ahead(j) * kss;
    const float* vn = vbase + ahead(j) * vss;  // the value pass's rows start coming in with the keys
    for (int64_t c = 0; c < C; c += 16) __builtin_prefetch(kn + c, 0, 3), __builtin_prefetch(vn + c, 0, 2);
    float d = 0.0f;
#pragma omp simd reduction(+ : d)
    for (int64_t c = 0; c < C; ++c) d += q[c] * kj[c];
    s[j] = d * scale;
    mx = std::max(mx, s[j]);
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < S; ++j) {
    s[j] = exp_nonpositive(s[j] - mx);
    sum += s[j];
  }
  const float inv = 1.0f / sum;
  if constexpr (CC > 0) {
    float acc[CC] = {};
    for (int64_t j = 0; j < S; ++j) {
      const float* vj = vbase + slot(j) * vss;
      const float* vn = vbase + ahead(j) * vss;
      for (int64_t c = 0; c < CC; c += 16) __builtin_prefetch(vn + c, 0, 3);
      const float w = s[j];
#pragma omp simd
      for (int64_t c = 0; c < CC; ++c) acc[c] += w * vj[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < CC; ++c) out[c] = acc[c] * inv;
  } else {
    std::fill(out, out + C, 0.0f);
    for (int64_t j = 0; j < S; ++j) {
      const float* vj = vbase + slot(j) * vss;
      const float w = s[j];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] += w * vj[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] *= inv;
  }
}

at::Tensor decode_attention(const at::Tensor& x_in, const at::Tensor& wq, const std::optional<at::Tensor>& bq,
                            const at::Tensor& wk, const std::optional<at::Tensor>& bk, const at::Tensor& wv,
                            const std::optional<at::Tensor>& bv, const at::Tensor& wo,
                            const std::optional<at::Tensor>& bo, const at::Tensor& table, const at::Tensor& pos_in,
                            at::Tensor kbuf, at::Tensor vbuf, at::Tensor posbuf, at::Tensor validbuf, int64_t n,
                            const std::optional<at::Tensor>& new_valid, bool masked, int64_t n_head,
                            bool small_gemm) {
  TORCH_CHECK((x_in.dim() == 2 || (x_in.dim() == 3 && x_in.size(1) == 1)) && x_in.scalar_type() == at::kFloat &&
                  x_in.device().is_cpu(),
              "decode_attention: x must be a (B, D) or (B, 1, D) fp32 CPU tensor");
  const at::Tensor x = x_in.reshape({x_in.size(0), x_in.size(-1)}).contiguous();
  const at::Tensor pos = pos_in.reshape({-1});
  TORCH_CHECK(kbuf.dim() == 4 && vbuf.sizes() == kbuf.sizes() && kbuf.scalar_type() == at::kFloat &&
                  vbuf.scalar_type() == at::kFloat && kbuf.stride(3) == 1 && vbuf.stride(3) == 1,
              "decode_attention: kbuf and vbuf must be (B, G, cap, C) fp32 with unit stride in C");
  const int64_t B = x.size(0), G = kbuf.size(1), cap = kbuf.size(2), C = kbuf.size(3), H = n_head;
  TORCH_CHECK(kbuf.size(0) == B, "decode_attention: the cache holds ", kbuf.size(0), " sequences, x ", B);
  TORCH_CHECK(n >= 0 && n < cap, "decode_attention: slot ", n, " is outside the cache's capacity ", cap);
  TORCH_CHECK(H > 0 && H % G == 0 && C % 2 == 0, "decode_attention: ", H, " heads over ", G,
              " key/value groups of width ", C);
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 2 * C && table.scalar_type() == at::kFloat &&
                  table.is_contiguous(), "decode_attention: rotary table must be (P, 2C) fp32 contiguous");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == B && pos.scalar_type() == at::kLong,
              "decode_attention: pos must be (B,) int64");
  TORCH_CHECK(posbuf.dim() == 2 && posbuf.size(0) == B && posbuf.size(1) == cap &&
                  posbuf.scalar_type() == at::kLong && validbuf.dim() == 2 && validbuf.size(0) == B &&
                  validbuf.size(1) == cap && validbuf.scalar_type() == at::kBool,
              "decode_attention: posbuf and validbuf must be (B, cap) int64 and bool");
  const bool has_nv = new_valid.has_value() && new_valid->defined();
  at::Tensor nv;
  if (has_nv) {
    nv = new_valid->reshape({-1}).contiguous();
    TORCH_CHECK(nv.size(0) == B && nv.scalar_type() == at::kBool, "decode_attention: valid must be (B,) bool");
  }

  const auto proj = [small_gemm](const at::Tensor& in, const at::Tensor& w, const std::optional<at::Tensor>& b) {
    return small_gemm ? treeffn_small_linear::linear(in, w, b) : at::linear(in, w, b);
  };
  const at::Tensor q = proj(x, wq, bq).contiguous();  // (B, H*C)
  const at::Tensor k = proj(x, wk, bk).contiguous();  // (B, G*C)
  const at::Tensor v = proj(x, wv, bv).contiguous();
  TORCH_CHECK(q.size(1) == H * C && k.size(1) == G * C && v.size(1) == G * C,
              "decode_attention: projection widths do not match ", H, "x", C, " queries and ", G, "x", C,
              " keys/values");
  const auto pos_a = pos.contiguous();
  const int64_t* p = pos_a.data_ptr<int64_t>();
  const int64_t P = table.size(0);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(p[b] >= 0 && p[b] < P, "decode_attention: position ", p[b], " is outside the rotary table (", P,
                ")");

  at::Tensor qr = at::empty({B, H * C}, x.options());
  float* qrp = qr.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  float* kb = kbuf.data_ptr<float>();
  float* vb = vbuf.data_ptr<float>();
  const int64_t ksb = kbuf.stride(0), ksg = kbuf.stride(1), kss = kbuf.stride(2);
  const int64_t vsb = vbuf.stride(0), vsg = vbuf.stride(1), vss = vbuf.stride(2);
  int64_t* pb = posbuf.data_ptr<int64_t>();
  bool* vd = validbuf.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    pb[b * posbuf.stride(0) + n * posbuf.stride(1)] = p[b];
    vd[b * validbuf.stride(0) + n * validbuf.stride(1)] = has_nv ? nv.data_ptr<bool>()[b] : true;
    const float* row = tp + p[b] * 2 * C;
    for (int64_t h = 0; h < H; ++h) rotate(qp + (b * H + h) * C, row, qrp + (b * H + h) * C, C);
    for (int64_t g = 0; g < G; ++g) {
      rotate(kp + (b * G + g) * C, row, kb + b * ksb + g * ksg + n * kss, C);
      const float* src = vp + (b * G + g) * C;
      float* dst = vb + b * vsb + g * vsg + n * vss;
      std::copy(src, src + C, dst);
    }
  }

  const int64_t S = n + 1, per_group = H / G;
  const float scale = 1.0f / std::sqrt(static_cast<float>(C));
  at::Tensor attn = at::empty({B, H * C}, x.options());
  float* ap = attn.data_ptr<float>();
  // masked: each sequence attends to its valid slots at positions <= its own, and always to the new slot (the
  // PyTorch path's mask); otherwise to every slot
  std::vector<int64_t> idx(masked ? B * S : 0), count(B, S);
  for (int64_t b = 0; masked && b < B; ++b) {
    int64_t c = 0;
    const bool* vrow = vd + b * validbuf.stride(0);
    const int64_t* prow = pb + b * posbuf.stride(0);
    for (int64_t j = 0; j < n; ++j)
      if (vrow[j * validbuf.stride(1)] && prow[j * posbuf.stride(1)] <= p[b]) idx[b * S + c++] = j;
    idx[b * S + c++] = n;
    count[b] = c;
  }
  const auto attend = C == 64 ? attend_head<64> : C == 128 ? attend_head<128> : attend_head<0>;
  auto heads = [&](int64_t begin, int64_t end) {
    std::vector<float> s(S);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, g = (bh % H) / per_group;
      const float* kbase = kb + b * ksb + g * ksg;
      const float* vbase = vb + b * vsb + g * vsg;
      attend(qrp + bh * C, kbase, kss, vbase, vss, masked ? idx.data() + b * S : nullptr, count[b], scale,
             s.data(), ap + bh * C, C);
    }
  };
  if (B * G * S * C * 2 >= kParallelWork && at::get_num_threads() > 1) {
    at::parallel_for(0, B * H, 1, heads);
  } else {
    heads(0, B * H);
  }
  const at::Tensor y = proj(attn, wo, bo);
  return x_in.dim() == 3 ? y.view({B, 1, y.size(1)}) : y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "one decoding step of attention with a KV cache: projections, rotary, cache write, attention, output");
}
