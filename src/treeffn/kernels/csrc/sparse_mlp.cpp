// Gathered sparse GEMV for training-free activation sparsity of an MLP (see treeffn/layers/sparse_mlp.py for the
// three rules and treeffn/kernels/sparse_mlp.py for the Python side).
//
// A sparse MLP only saves time at small batch if the weights of the dropped inputs and units are never read. For
// each token this kernel reads only the kept rows of row-major tables laid out for that purpose:
//
//   x        (M, D) fp32                  the MLP input, M tokens (one at a time: this is a GEMV path)
//   w_in     TEAL/WINA: (D, n*H)          [W1 | W3] transposed: row i holds input coordinate i's weights to every
//                                         unit (gate first, then up for SwiGLU), so a kept coordinate is one row
//            CATS:      (n*H, D)          [W1; W3] as stored: row j is unit j's gate weights (then up weights)
//   b_in     (H,) optional                the first layer's bias (dense MLP)
//   w_out_t  (H, D)                       W2 transposed: row j holds unit j's output weights
//   b_out    (D,) optional
//   n = 2 for SwiGLU (gate and up matrices), 1 for a dense MLP.
//
// Per token:
//   TEAL  kept inputs  I = {i : |x_i| > t_in};              z = sum_{i in I} x_i w_in[i, :]   (|I| rows of n*H)
//         h = silu(z_gate) * z_up (SwiGLU) or act(z + b_in);  kept units J = {j : |h_j| > t_mid}
//   WINA  I = top k_in of |x_i| * norm_in_i;  as TEAL;         J = top k_mid of |h_j| * norm_mid_j
//   CATS  g = silu(W1 x) (or act(W1 x + b_in)) for every unit (H rows of D, the gate in full);
//         J = {j : |g_j| > t_mid};  h_j = g_j * (W3[j, :] . x) for j in J (|J| rows of D), or h_j = g_j
//   y = sum_{j in J} h_j w_out_t[j, :] + b_out                  (|J| rows of D)
//
// So TEAL and WINA read a fraction F of every matrix, CATS all of W1 and a fraction F of the others. The sums are
// fp32 and their order is fixed (inputs and units in increasing index), so the result does not depend on the
// thread count; it differs from the masked dense reference only by the order of summation (tests compare the two).
// Parallelism: the row reads are split by columns across torch's threads (at::get_num_threads) when a token's
// work is large enough to pay for waking them.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum Method : int { TEAL = 0, CATS = 1, WINA = 2 };
enum Act : int { GELU = 0, RELU = 1, TANH = 2, SILU = 3, IDENTITY = 4 };  // treeffn.ops.activations.ACT_CODE

// Below this many weights read per phase we stay on the calling thread (waking the team costs microseconds).
constexpr int64_t kParallelWork = 1 << 16;

inline float act(int a, float z) {
  switch (a) {
    case GELU: return 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752f));
    case RELU: return z > 0.0f ? z : 0.0f;
    case TANH: return std::tanh(z);
    case SILU: return z / (1.0f + std::exp(-z));
    default: return z;
  }
}

inline float dot(const float* __restrict w, const float* __restrict x, int64_t D) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += w[d] * x[d];
  return s;
}

inline int threads_for(int64_t work) {
#ifdef _OPENMP
  return work >= kParallelWork ? std::max(1, at::get_num_threads()) : 1;
#else
  (void)work;
  return 1;
#endif
}

// acc[c] = sum_r coef[r] * rows[idx[r] * stride + c] for c in [0, C): the gathered rows split by column ranges.
void gathered_axpy(const float* __restrict rows, int64_t stride, const std::vector<int64_t>& idx,
                   const std::vector<float>& coef, float* __restrict acc, int64_t C) {
  const int64_t R = static_cast<int64_t>(idx.size());
  const int nt = threads_for(R * C);
  const int64_t chunk = ((C + nt - 1) / nt + 15) / 16 * 16;  // whole cache lines per thread
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int t = 0; t < nt; ++t) {
    const int64_t c0 = std::min<int64_t>(C, t * chunk), c1 = std::min<int64_t>(C, c0 + chunk);
    float* __restrict a = acc + c0;
    const int64_t n = c1 - c0;
    for (int64_t c = 0; c < n; ++c) a[c] = 0.0f;
    for (int64_t r = 0; r < R; ++r) {
      const float* __restrict w = rows + idx[r] * stride + c0;
      if (r + 1 < R) __builtin_prefetch(rows + idx[r + 1] * stride + c0);
      const float k = coef[r];
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) a[c] += k * w[c];
    }
  }
}

// out[r] = rows[idx[r]] . x (idx null: every row 0..R-1), split by rows.
void gathered_dots(const float* __restrict rows, int64_t D, const int64_t* idx, int64_t R, const float* x,
                   float* out) {
  const int nt = threads_for(R * D);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t r = 0; r < R; ++r) out[r] = dot(rows + (idx ? idx[r] : r) * D, x, D);
}

// Indices of the k largest scores, in increasing index order (ties: the lower index first).
void top_k(const std::vector<float>& score, int64_t k, std::vector<int64_t>& out) {
  const int64_t n = static_cast<int64_t>(score.size());
  k = std::min(k, n);
  out.resize(n);
  for (int64_t i = 0; i < n; ++i) out[i] = i;
  auto greater = [&](int64_t a, int64_t b) { return score[a] > score[b] || (score[a] == score[b] && a < b); };
  std::nth_element(out.begin(), out.begin() + k, out.end(), greater);
  out.resize(k);
  std::sort(out.begin(), out.end());
}

struct Problem {
  int method, mlp_n, act;
  int64_t D, H, k_in, k_mid;
  float t_in, t_mid;
  const float *w_in, *b_in, *w_out_t, *b_out, *norm_in, *norm_mid;
};

void token(const Problem& p, const float* x, float* y) {
  const int64_t D = p.D, H = p.H, nH = p.mlp_n * H;
  std::vector<int64_t> units;
  std::vector<float> h;  // h of the kept units, in the order of `units`
  if (p.method == CATS) {
    std::vector<float> g(H);
    gathered_dots(p.w_in, D, nullptr, H, x, g.data());  // the gate, every unit
    for (int64_t j = 0; j < H; ++j) {
      const float gj = p.mlp_n == 2 ? act(SILU, g[j]) : act(p.act, g[j] + (p.b_in ? p.b_in[j] : 0.0f));
      if (std::fabs(gj) > p.t_mid) {
        units.push_back(j);
        h.push_back(gj);
      }
    }
    if (p.mlp_n == 2) {  // up projection of the kept units only: rows H + j of [W1; W3]
      std::vector<int64_t> rows(units.size());
      for (size_t r = 0; r < units.size(); ++r) rows[r] = H + units[r];
      std::vector<float> up(units.size());
      gathered_dots(p.w_in, D, rows.data(), static_cast<int64_t>(rows.size()), x, up.data());
      for (size_t r = 0; r < units.size(); ++r) h[r] *= up[r];
    }
  } else {
    std::vector<int64_t> inputs;
    if (p.method == TEAL) {
      for (int64_t i = 0; i < D; ++i)
        if (std::fabs(x[i]) > p.t_in) inputs.push_back(i);
    } else {
      std::vector<float> score(D);
      for (int64_t i = 0; i < D; ++i) score[i] = std::fabs(x[i]) * p.norm_in[i];
      top_k(score, p.k_in, inputs);
    }
    std::vector<float> xs(inputs.size());
    for (size_t r = 0; r < inputs.size(); ++r) xs[r] = x[inputs[r]];
    std::vector<float> z(nH);
    gathered_axpy(p.w_in, nH, inputs, xs, z.data(), nH);
    std::vector<float> hall(H);
    for (int64_t j = 0; j < H; ++j)
      hall[j] = p.mlp_n == 2 ? act(SILU, z[j]) * z[H + j] : act(p.act, z[j] + (p.b_in ? p.b_in[j] : 0.0f));
    if (p.method == TEAL) {
      for (int64_t j = 0; j < H; ++j)
        if (std::fabs(hall[j]) > p.t_mid) units.push_back(j);
    } else {
      std::vector<float> score(H);
      for (int64_t j = 0; j < H; ++j) score[j] = std::fabs(hall[j]) * p.norm_mid[j];
      top_k(score, p.k_mid, units);
    }
    h.resize(units.size());
    for (size_t r = 0; r < units.size(); ++r) h[r] = hall[units[r]];
  }
  gathered_axpy(p.w_out_t, D, units, h, y, D);
  if (p.b_out)
    for (int64_t d = 0; d < D; ++d) y[d] += p.b_out[d];
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, "sparse_mlp: ", name,
              " must be a contiguous fp32 tensor of ", n, " values");
  return t->data_ptr<float>();
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& w_in, const c10::optional<at::Tensor>& b_in,
                   const at::Tensor& w_out_t, const c10::optional<at::Tensor>& b_out, int64_t method, int64_t mlp_n,
                   int64_t act_code, double t_in, double t_mid, const c10::optional<at::Tensor>& norm_in,
                   const c10::optional<at::Tensor>& norm_mid, int64_t k_in, int64_t k_mid) {
  TORCH_CHECK(method == TEAL || method == CATS || method == WINA, "sparse_mlp: unknown method code ", method);
  TORCH_CHECK(mlp_n == 1 || mlp_n == 2, "sparse_mlp: mlp_n must be 1 (dense) or 2 (SwiGLU)");
  for (const at::Tensor* t : {&x, &w_in, &w_out_t})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "sparse_mlp: x and the weight tables must be contiguous fp32 CPU tensors");
  TORCH_CHECK(w_out_t.dim() == 2, "sparse_mlp: w_out_t must be (H, D)");
  const int64_t H = w_out_t.size(0), D = w_out_t.size(1);
  TORCH_CHECK(x.size(-1) == D, "sparse_mlp: x has width ", x.size(-1), ", the MLP ", D);
  const bool transposed = method != CATS;
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(0) == (transposed ? D : mlp_n * H) &&
                  w_in.size(1) == (transposed ? mlp_n * H : D),
              "sparse_mlp: w_in has the wrong shape for this method");
  Problem p{static_cast<int>(method), static_cast<int>(mlp_n), static_cast<int>(act_code), D, H, k_in, k_mid,
            static_cast<float>(t_in), static_cast<float>(t_mid), w_in.data_ptr<float>(), opt_ptr(b_in, H, "b_in"),
            w_out_t.data_ptr<float>(), opt_ptr(b_out, D, "b_out"), opt_ptr(norm_in, D, "norm_in"),
            opt_ptr(norm_mid, H, "norm_mid")};
  TORCH_CHECK(method != WINA || (p.norm_in && p.norm_mid), "sparse_mlp: WINA needs norm_in and norm_mid");
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t M = x.numel() / D;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) token(p, xp + m * D, yp + m * D);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward,
        "y = sparse MLP(x), reading only the kept rows; method: 0 teal 1 cats 2 wina; mlp_n: 2 SwiGLU, 1 dense",
        pybind11::arg("x"), pybind11::arg("w_in"), pybind11::arg("b_in"), pybind11::arg("w_out_t"),
        pybind11::arg("b_out"), pybind11::arg("method"), pybind11::arg("mlp_n"), pybind11::arg("act"),
        pybind11::arg("t_in"), pybind11::arg("t_mid"), pybind11::arg("norm_in"), pybind11::arg("norm_mid"),
        pybind11::arg("k_in"), pybind11::arg("k_mid"));
}
