// LayerNorm and RMSNorm over the last dimension of a few rows, on the calling thread (treeffn/kernels/small_norm.py).
//
//   x  (..., D) fp32 contiguous, at most a few rows (a decoding step: one position per sequence)
//   LayerNorm: y = (x − mean) / sqrt(var + eps) · w + b    (biased variance; w, b optional)
//   RMSNorm:   y = x / sqrt(mean(x²) + eps) · w            (w optional)
//
// Per row: two passes in fp32 (the mean, then the sum of squared deviations), as many summation orders as torch's
// own kernel uses different ones; results agree with torch.nn.functional.layer_norm / rms_norm to ~1e-6 relative
// (tests compare). No thread team: a decoding step's norm is a few thousand numbers, less work than waking one.

#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>

namespace {

at::Tensor norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                double eps, bool rms) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "small_norm: x must be a contiguous fp32 CPU tensor (..., D)");
  const int64_t D = x.size(-1), M = D > 0 ? x.numel() / D : 0;
  auto param = [&](const c10::optional<at::Tensor>& t, const char* name) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == D,
                "small_norm: ", name, " must be a contiguous fp32 CPU tensor of D elements");
    return t->data_ptr<float>();
  };
  const float* w = param(weight, "weight");
  const float* b = param(bias, "bias");
  TORCH_CHECK(!(rms && b), "small_norm: RMSNorm has no bias");
  at::Tensor y = at::detail::empty_cpu(x.sizes(), x.scalar_type(), false, c10::nullopt);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * D;
    float* o = yp + m * D;
    float mean = 0.0f;
    if (!rms) {
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += r[d];
      mean = s / static_cast<float>(D);
    }
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += (r[d] - mean) * (r[d] - mean);
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(D) + e);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      float v = (r[d] - mean) * scale;
      if (w) v *= w[d];
      if (b) v += b[d];
      o[d] = v;
    }
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm", &norm, "LayerNorm (rms=False) or RMSNorm (rms=True) of the rows of x over its last dimension",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"),
        pybind11::arg("rms"));
}
