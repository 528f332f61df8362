// Shared helpers for the CUDA entry points: argument checks that raise Python ValueErrors
// (pybind11 maps std::invalid_argument to ValueError) and CUDA error checks (RuntimeError).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

namespace dalle {

// dtype codes passed from Python (dalle_kernels/_cuda.py keeps the same table).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kUInt8 = 4 };

inline void check_arg(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// Each op's file defines one register_* function; bindings.cpp calls them all.
void register_runtime(pybind11::module_& m);
void register_logit_laplace(pybind11::module_& m);
void register_orthogonalize(pybind11::module_& m);
void register_attention(pybind11::module_& m);
// Emulation build only (csrc/emu/): the emulator's controls and its test kernels.
void register_emu(pybind11::module_& m);
void register_emu_selftest(pybind11::module_& m);

}  // namespace dalle

#define DALLE_CUDA_CHECK(expr)                                                            \
  do {                                                                                    \
    cudaError_t err_ = (expr);                                                            \
    if (err_ != cudaSuccess)                                                              \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err_) +   \
                               " at " __FILE__ ":" + std::to_string(__LINE__));           \
  } while (0)
