// The one pybind11 module, dalle_kernels._C. Each op's .cu file defines a register_* function
// (declared in common.h) that validates its arguments and launches; this file only wires them up.
// The emulation build (setup.py, DALLE_KERNELS_CUDA_EMU=1) compiles the same files into dalle_kernels._C_emu
// and adds the emulator's controls and test kernels.
#include "common.h"

#ifndef DALLE_EXTENSION_NAME
#define DALLE_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(DALLE_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of dalle_kernels (raw-pointer entry points; see dalle_kernels/_cuda.py)";
  dalle::register_runtime(m);
  dalle::register_logit_laplace(m);
  dalle::register_orthogonalize(m);
  dalle::register_attention(m);
#ifdef DALLE_CUDA_EMU
  dalle::register_emu(m);
  dalle::register_emu_selftest(m);
#endif
}
