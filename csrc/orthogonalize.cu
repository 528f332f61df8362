// Householder orthogonalization of a batch of tall-skinny matrices, one thread block per matrix.
//
// Same algorithm as dalle_kernels/ops/orthogonalize.py (see its docstring): scale columns by their
// largest magnitude; factorize with r Householder reflections, H_k = I - beta v v^T; form
// Q = H_0 ... H_{r-1} [I; 0] backwards in place; multiply column k by sign(R_kk). A column whose remaining
// sum of squares is <= tiny gets the identity reflection (Q's column is then a unit vector orthogonal to
// the others, never NaN). Each pass streams the rows once (thread i takes rows i, i + blockDim, ...); the
// r-vectors the next pass needs are block-reduced into shared memory, so n is unbounded. When the n x r fp32
// matrix fits in the block's shared memory (up to ~55k elements on sm_90), it is staged there instead of the
// workspace, so global memory is read twice (column maxima, staging) and written once.
// All arithmetic is fp32; fp16/bf16 input is staged in an fp32 workspace W (W == P for fp32 input, so P and W
// may alias: no __restrict__).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "dtypes.h"

namespace dalle {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRank = 64;

// out[j] = sum (or max) over the block of acc[j], for j < R; every thread sees out after the call.
template <int R, bool kMax>
__device__ void block_reduce(float (&acc)[R], float* red, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < R; ++j) {
    float v = acc[j];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float u = __shfl_xor_sync(0xffffffffu, v, o);
      v = kMax ? fmaxf(v, u) : v + u;
    }
    if (lane == 0) red[warp * R + j] = v;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    float v = red[j];
    for (int w = 1; w < kWarps; ++w) v = kMax ? fmaxf(v, red[w * R + j]) : v + red[w * R + j];
    out[j] = v;
  }
  __syncthreads();
}

// Register-array element k (k is a runtime index: a select chain keeps the array in registers).
template <int R>
__device__ __forceinline__ float pick(const float (&a)[R], int k) {
  float v = 0.f;
#pragma unroll
  for (int j = 0; j < R; ++j) v = (j == k) ? a[j] : v;
  return v;
}

template <typename T, int R>
__global__ void __launch_bounds__(kThreads) orthogonalize_kernel(
    T* P, float* W, int64_t n, int r, int64_t spb, int64_t spn, int64_t spr, int64_t swb,
    int64_t swn, int64_t swr, float tiny, bool in_smem) {
  __shared__ float red[kWarps * R];
  __shared__ float s[R], arow[R], w[R], beta_s[R], v0_s[R], sign_s[R];
  extern __shared__ float smem_matrix[];  // n x r, row-major, when the whole matrix fits (in_smem)
  P += static_cast<int64_t>(blockIdx.x) * spb;
  if (in_smem) {
    W = smem_matrix;  // generic addressing: the passes below read and write shared memory instead
    swn = r;
    swr = 1;
  } else {
    W += static_cast<int64_t>(blockIdx.x) * swb;
  }
  float acc[R], row[R];

  // Pass 1: largest magnitude per column -> scale factors (kept in w).
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
#pragma unroll
    for (int j = 0; j < R; ++j)
      if (j < r) acc[j] = fmaxf(acc[j], fabsf(to_f(P[i * spn + j * spr])));
  }
  block_reduce<R, true>(acc, red, w);

  // Pass 2: scaled copy into W; s = x^T A for x = column 0.
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const float m = w[j];
      row[j] = (j < r) ? to_f(P[i * spn + j * spr]) / (m > 0.f ? m : 1.f) : 0.f;
      if (j < r) W[i * swn + j * swr] = row[j];
    }
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] += row[0] * row[j];
  }
  block_reduce<R, false>(acc, red, s);

  // Factorization: reflection k from s and row k; pass k applies it and accumulates s for k + 1.
  for (int k = 0; k < r; ++k) {
    for (int j = threadIdx.x; j < R; j += blockDim.x) arow[j] = (j < r) ? W[k * swn + j * swr] : 0.f;
    __syncthreads();
    const float nrm2 = s[k], x0 = arow[k];
    const bool ok = nrm2 > tiny;
    const float nrm = sqrtf(ok ? nrm2 : 1.f);
    const float sgn = x0 >= 0.f ? 1.f : -1.f;
    const float alpha = -sgn * nrm;
    const float v0 = ok ? x0 - alpha : x0;
    const float beta = ok ? 1.f / (nrm * (nrm + fabsf(x0))) : 0.f;
    __syncthreads();  // everyone has read s and arow before they are overwritten
    if (threadIdx.x == 0) {
      beta_s[k] = beta;
      v0_s[k] = v0;
      sign_s[k] = ok ? -sgn : 1.f;
    }
    for (int j = threadIdx.x; j < R; j += blockDim.x) w[j] = s[j] - alpha * arow[j];
    __syncthreads();
    if (k == r - 1) break;
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] = 0.f;
    for (int64_t i = k + threadIdx.x; i < n; i += kThreads) {
#pragma unroll
      for (int j = 0; j < R; ++j) row[j] = (j >= k && j < r) ? W[i * swn + j * swr] : 0.f;
      const float v = (i > k) ? pick(row, k) : v0;
#pragma unroll
      for (int j = 0; j < R; ++j) {
        if (j > k && j < r) {
          row[j] -= beta * v * w[j];
          W[i * swn + j * swr] = row[j];
        }
      }
      const float x1 = (i >= k + 1) ? pick(row, k + 1) : 0.f;
#pragma unroll
      for (int j = 0; j < R; ++j) acc[j] += x1 * row[j];
    }
    block_reduce<R, false>(acc, red, s);
  }

  // Formation, k = r-1 .. 0: Q <- H_k Q on columns >= k; pass k accumulates v_{k-1}^T Q for the next.
  for (int j = threadIdx.x; j < R; j += blockDim.x) w[j] = 0.f;
  __syncthreads();
  for (int k = r - 1; k >= 0; --k) {
    const float beta = beta_s[k], v0 = v0_s[k];
    const float v0p = k > 0 ? v0_s[k - 1] : 0.f;
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
#pragma unroll
      for (int j = 0; j < R; ++j) row[j] = (j >= k - 1 && j < r) ? W[i * swn + j * swr] : 0.f;
      const float v = (i > k) ? pick(row, k) : (i == k ? v0 : 0.f);
      const float vp = (k == 0) ? 0.f : (i > k - 1) ? pick(row, k - 1) : (i == k - 1 ? v0p : 0.f);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        if (j < k || j >= r) continue;
        row[j] = (j == k) ? ((i == k ? 1.f : 0.f) - beta * v0 * v) : row[j] - beta * v * w[j];
        acc[j] += vp * row[j];
        if (k > 0) {
          W[i * swn + j * swr] = row[j];
        } else {
          P[i * spn + j * spr] = from_f<T>(row[j] * sign_s[j]);
        }
      }
    }
    block_reduce<R, false>(acc, red, w);
  }
}

// Bytes of dynamic shared memory a block may use on the current device (opt-in maximum, minus room for the
// kernel's static shared memory).
int64_t smem_budget() {
  int dev = 0, optin = 0;
  DALLE_CUDA_CHECK(cudaGetDevice(&dev));
  DALLE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return static_cast<int64_t>(optin) - 4096;
}

template <typename T, int R>
void launch_r(T* p, float* w, int64_t batch, int64_t n, int r, int64_t spb, int64_t spn, int64_t spr, int64_t swb,
              int64_t swn, int64_t swr, float tiny, cudaStream_t stream) {
  // Matrices that fit in shared memory stay there between passes (one read and one write of global memory).
  const int64_t bytes = n * r * static_cast<int64_t>(sizeof(float));
  const bool in_smem = bytes <= smem_budget();
  if (in_smem && bytes > 48 * 1024)
    DALLE_CUDA_CHECK(cudaFuncSetAttribute(orthogonalize_kernel<T, R>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
  orthogonalize_kernel<T, R><<<static_cast<unsigned>(batch), kThreads, in_smem ? bytes : 0, stream>>>(
      p, w, n, r, spb, spn, spr, swb, swn, swr, tiny, in_smem);
}

template <typename T>
void launch(T* p, float* w, int64_t batch, int64_t n, int r, int64_t spb, int64_t spn, int64_t spr, int64_t swb,
            int64_t swn, int64_t swr, float tiny, cudaStream_t stream) {
#define DALLE_ORTHO_LAUNCH(R) launch_r<T, R>(p, w, batch, n, r, spb, spn, spr, swb, swn, swr, tiny, stream)
  if (r <= 4) DALLE_ORTHO_LAUNCH(4);
  else if (r <= 8) DALLE_ORTHO_LAUNCH(8);
  else if (r <= 16) DALLE_ORTHO_LAUNCH(16);
  else if (r <= 32) DALLE_ORTHO_LAUNCH(32);
  else DALLE_ORTHO_LAUNCH(64);
#undef DALLE_ORTHO_LAUNCH
  DALLE_CUDA_CHECK(cudaGetLastError());
}

void orthogonalize(std::uintptr_t p, std::uintptr_t w, int64_t batch, int64_t n, int64_t r, int64_t spb,
                   int64_t spn, int64_t spr, int64_t swb, int64_t swn, int64_t swr, int dtype,
                   std::uintptr_t stream) {
  check_arg(batch >= 0, "orthogonalize: batch must be >= 0, got " + std::to_string(batch));
  check_arg(batch <= 2147483647LL, "orthogonalize: batch must be < 2**31, got " + std::to_string(batch));
  check_arg(r >= 1 && r <= kMaxRank,
            "orthogonalize: r must be in [1, " + std::to_string(kMaxRank) + "], got " + std::to_string(r));
  check_arg(n >= r, "orthogonalize: n >= r is needed, got n=" + std::to_string(n) + ", r=" + std::to_string(r));
  check_arg(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
            "orthogonalize: dtype must be float32, float16 or bfloat16 (code 0, 1, 2), got code " +
                std::to_string(dtype));
  if (batch == 0) return;
  check_arg(p != 0 && w != 0, "orthogonalize: null data pointer");
  check_arg(dtype == kFloat32 || w != p, "orthogonalize: fp16/bf16 input needs a separate fp32 workspace w");
  const float tiny = 1.17549435e-38f / 1.1920929e-07f;  // FLT_MIN / FLT_EPSILON, as in the reference
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* wf = reinterpret_cast<float*>(w);
  const int ri = static_cast<int>(r);
  switch (dtype) {
    case kFloat32:
      launch(reinterpret_cast<float*>(p), wf, batch, n, ri, spb, spn, spr, swb, swn, swr, tiny, s);
      break;
    case kFloat16:
      launch(reinterpret_cast<__half*>(p), wf, batch, n, ri, spb, spn, spr, swb, swn, swr, tiny, s);
      break;
    default:
      launch(reinterpret_cast<__nv_bfloat16*>(p), wf, batch, n, ri, spb, spn, spr, swb, swn, swr, tiny, s);
  }
}

}  // namespace

void register_orthogonalize(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("orthogonalize", &orthogonalize,
        "In place: each (n, r) matrix of P <- Q of its Householder QR (diag(R) >= 0). Strides in elements; "
        "w: fp32 workspace of the same shape (w == p for float32).",
        py::arg("p"), py::arg("w"), py::arg("batch"), py::arg("n"), py::arg("r"), py::arg("stride_pb"),
        py::arg("stride_pn"), py::arg("stride_pr"), py::arg("stride_wb"), py::arg("stride_wn"),
        py::arg("stride_wr"), py::arg("dtype"), py::arg("stream"));
}

}  // namespace dalle
