// The one pybind11 module, dalle_kernels._C. Each op's .cu file defines a register_* function
// (declared in common.h) that validates its arguments and launches; this file only wires them up.
#include "common.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of dalle_kernels (raw-pointer entry points; see dalle_kernels/_cuda.py)";
  dalle::register_runtime(m);
  dalle::register_logit_laplace(m);
  dalle::register_orthogonalize(m);
}
