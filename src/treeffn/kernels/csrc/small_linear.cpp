// Python binding of small_linear.h: y = x Wᵀ + b for a few rows (treeffn/kernels/small_linear.py).

#include <torch/csrc/utils/pybind.h>

#include "small_linear.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &treeffn_small_linear::small_linear, "y (M, N) = x (M, K) W^T + b for M <= 8 rows, fp32 CPU");
}
