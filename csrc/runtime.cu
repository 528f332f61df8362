// Runtime queries, used by the Python side to report what the extension was built with.
#include <cuda_runtime.h>

#include "common.h"

namespace dalle {

void register_runtime(pybind11::module_& m) {
  m.def("cuda_runtime_version", []() { return CUDART_VERSION; },
        "CUDA runtime version the extension was compiled against (e.g. 13000).");
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }
    return n;
  }, "Number of CUDA devices visible to the extension (0 when no driver or device).");
}

}  // namespace dalle
