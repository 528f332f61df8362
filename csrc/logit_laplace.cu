// Fused logit-Laplace NLL of the dVAE (paper appendix A.3): forward (+ the gradient for mean/sum of float32 params)
// and a recomputing backward (16-bit params: g / n stored before the loss scale would underflow).
//
// Per value, y = (1 - 2 eps) x + eps, mu = params[:, 0:3], ln_b = params[:, 3:6]:
//   nll            = |logit(y) - mu| * exp(-ln_b) + ln_b + ln(y) + ln(1 - y) + ln 2
//   d nll / d mu   = -sign(logit(y) - mu) * exp(-ln_b)     (sign(0) = 0)
//   d nll / d ln_b = 1 - |logit(y) - mu| * exp(-ln_b)
// Inputs are contiguous NCHW (the Python side makes them so). Each block reads a tile of 2048 consecutive
// values of one image (8 per thread, vectorized when sizes and pointers allow), computes in fp32 and writes
// the per-value loss, a per-block partial sum, and/or the gradient. Partial sums are reduced by one block in a
// fixed order: results are bit-identical run to run (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"
#include "dtypes.h"

namespace dalle {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // values per thread: one 16-byte load of fp16/bf16, two of fp32
constexpr int64_t kTile = int64_t(kThreads) * kItems;

enum Reduction : int { kNone = 0, kSum = 1, kMean = 2 };

using dalle::to_f;  // the float/half/bfloat16 overloads (dtypes.h) beside this file's uint8 one
__device__ __forceinline__ float to_f(uint8_t v) { return static_cast<float>(v) * (1.0f / 255.0f); }

// kItems values moved as one aligned struct: the compiler emits 128-bit (or 64-bit for uint8) accesses.
template <typename T>
struct alignas(sizeof(T) * kItems) Pack {
  T v[kItems];
};

// Move a Pack as 16-byte (or, for 8-byte packs, 8-byte) words through the load/store intrinsics: a plain
// struct assignment is scalarized by the compiler into 4- and 2-byte stores (seen in the PTX).
template <typename T>
using Word = typename std::conditional<(sizeof(Pack<T>) >= 16), uint4, uint2>::type;

template <typename T>
__device__ __forceinline__ Pack<T> vec_load(const Pack<T>* src) {
  constexpr int kWords = sizeof(Pack<T>) / sizeof(Word<T>);
  Word<T> w[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __ldg(reinterpret_cast<const Word<T>*>(src) + i);
  Pack<T> pk;
  memcpy(&pk, w, sizeof(pk));
  return pk;
}

template <typename T>
__device__ __forceinline__ void vec_store(Pack<T>* dst, const Pack<T>& pk) {
  constexpr int kWords = sizeof(Pack<T>) / sizeof(Word<T>);
  Word<T> w[kWords];
  memcpy(w, &pk, sizeof(pk));
#pragma unroll
  for (int i = 0; i < kWords; ++i) __stwb(reinterpret_cast<Word<T>*>(dst) + i, w[i]);
}

template <bool kFull, typename T>
__device__ __forceinline__ void load_items(const T* p, int64_t base, int64_t n, float (&out)[kItems]) {
  if constexpr (kFull) {
    Pack<T> pk = vec_load(reinterpret_cast<const Pack<T>*>(p + base));
#pragma unroll
    for (int i = 0; i < kItems; ++i) out[i] = to_f(pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) out[i] = base + i < n ? to_f(p[base + i]) : 0.0f;
  }
}

template <bool kFull, typename T>
__device__ __forceinline__ void store_items(T* p, int64_t base, int64_t n, const float (&in)[kItems]) {
  if constexpr (kFull) {
    Pack<T> pk;
#pragma unroll
    for (int i = 0; i < kItems; ++i) pk.v[i] = from_f<T>(in[i]);
    vec_store(reinterpret_cast<Pack<T>*>(p + base), pk);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (base + i < n) p[base + i] = from_f<T>(in[i]);
  }
}

// Sum over the block, fixed order (shuffle tree per warp, then warp 0 over the warp sums). Valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0f;
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

struct Args {
  const void* params;      // (B, 6, H, W)
  const void* target;      // (B, 3, H, W)
  float* loss;             // (B, 3, H, W) fp32, or null
  float* partial;          // (B * gridDim.x) fp32, or null
  void* grad;              // (B, 6, H, W) in the params dtype, or null
  const float* grad_out;   // fp32 grad_output: (B, 3, H, W) per value, one value (grad_out_scalar), or null (1)
  bool grad_out_scalar;
  int64_t chw;             // 3 * H * W
  float eps;
  float grad_scale;
  bool vec;                // sizes and pointers allow Pack accesses
};

// One thread's kItems values; kFull: all in range and Pack-aligned (straight-line vector accesses).
template <bool kFull, typename P, typename X>
__device__ __forceinline__ float tile(const Args& a, int64_t b, int64_t base) {
  const int64_t n = a.chw;
  const P* mu_p = static_cast<const P*>(a.params) + b * 2 * n;  // image b holds 6HW = 2 * chw values
  const X* x_p = static_cast<const X*>(a.target) + b * n;

  float mu[kItems], ln_b[kItems], x[kItems];
  load_items<kFull>(mu_p, base, n, mu);
  load_items<kFull>(mu_p + n, base, n, ln_b);
  load_items<kFull>(x_p, base, n, x);

  const float ln2 = 0.69314718055994531f;
  const float slope = 1.0f - 2.0f * a.eps;
  float nll[kItems], g_mu[kItems], g_lnb[kItems];
  float local = 0.0f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const float y = fmaf(x[i], slope, a.eps);
    const float log_y = logf(y), log_1my = logf(1.0f - y);
    const float d = (log_y - log_1my) - mu[i];
    const float inv_b = expf(-ln_b[i]);
    const float ad = fabsf(d);
    const float scaled = ad == 0.0f ? 0.0f : ad * inv_b;  // 0, not 0 * inf = nan, at the kink
    nll[i] = scaled + ln_b[i] + log_y + log_1my + ln2;
    g_mu[i] = d > 0.0f ? -inv_b : (d < 0.0f ? inv_b : 0.0f);
    g_lnb[i] = 1.0f - scaled;
    local += base + i < n ? nll[i] : 0.0f;
  }

  if (a.loss != nullptr) store_items<kFull>(a.loss + b * n, base, n, nll);

  if (a.grad != nullptr) {
    float go[kItems];
    if (a.grad_out != nullptr && a.grad_out_scalar) {
      const float g0 = __ldg(a.grad_out);
#pragma unroll
      for (int i = 0; i < kItems; ++i) go[i] = g0;
    } else if (a.grad_out != nullptr) {
      load_items<kFull>(a.grad_out + b * n, base, n, go);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) go[i] = 1.0f;
    }
    // grad_output (a loss scale up to 2**24) and 1/n multiply the fp32 gradient; it is rounded to P once.
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float s = go[i] * a.grad_scale;
      g_mu[i] *= s;
      g_lnb[i] *= s;
    }
    P* g_p = static_cast<P*>(a.grad) + b * 2 * n;
    store_items<kFull>(g_p, base, n, g_mu);
    store_items<kFull>(g_p + n, base, n, g_lnb);
  }
  return local;
}

template <typename P, typename X>
__global__ void __launch_bounds__(kThreads) logit_laplace_kernel(Args a) {
  const int64_t b = blockIdx.y;
  const int64_t base = int64_t(blockIdx.x) * kTile + int64_t(threadIdx.x) * kItems;
  const float local = a.vec && base + kItems <= a.chw ? tile<true, P, X>(a, b, base) : tile<false, P, X>(a, b, base);
  if (a.partial != nullptr) {
    const float s = block_sum(local);
    if (threadIdx.x == 0) a.partial[b * gridDim.x + blockIdx.x] = s;
  }
}

// out[0] = scale * sum(partial[:n]), one block, fixed order.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* partial, int64_t n, float scale,
                                                                float* out) {
  float v = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) v += partial[i];
  v = block_sum(v);
  if (threadIdx.x == 0) out[0] = v * scale;
}

template <typename P, typename X>
void launch_typed(const Args& a, int64_t batch, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.chw + kTile - 1) / kTile), static_cast<unsigned>(batch));
  logit_laplace_kernel<P, X><<<grid, kThreads, 0, stream>>>(a);
}

template <typename P>
void launch_target(const Args& a, int target_dtype, int64_t batch, cudaStream_t stream) {
  switch (target_dtype) {
    case kFloat32: return launch_typed<P, float>(a, batch, stream);
    case kFloat16: return launch_typed<P, __half>(a, batch, stream);
    case kBFloat16: return launch_typed<P, __nv_bfloat16>(a, batch, stream);
    default: return launch_typed<P, uint8_t>(a, batch, stream);
  }
}

void launch(const Args& a, int params_dtype, int target_dtype, int64_t batch, cudaStream_t stream) {
  switch (params_dtype) {
    case kFloat32: launch_target<float>(a, target_dtype, batch, stream); break;
    case kFloat16: launch_target<__half>(a, target_dtype, batch, stream); break;
    default: launch_target<__nv_bfloat16>(a, target_dtype, batch, stream); break;
  }
  DALLE_CUDA_CHECK(cudaGetLastError());
}

int64_t elem_size(int dtype) { return dtype == kFloat32 ? 4 : (dtype == kUInt8 ? 1 : 2); }

bool aligned(uintptr_t p, int64_t bytes) { return p % static_cast<uintptr_t>(bytes) == 0; }

// Argument checks shared by both entry points; everything here runs before any CUDA call.
void check_common(uintptr_t params, uintptr_t target, int64_t batch, int64_t height, int64_t width,
                  int params_dtype, int target_dtype, double eps, int reduction) {
  check_arg(params != 0, "params: null data pointer");
  check_arg(target != 0, "target: null data pointer");
  check_arg(batch > 0 && height > 0 && width > 0,
            "batch, height, width must be positive, got " + std::to_string(batch) + ", " +
                std::to_string(height) + ", " + std::to_string(width));
  check_arg(batch < 65536, "batch must be < 65536 (grid y), got " + std::to_string(batch));
  check_arg(3 * height * width < (int64_t(1) << 31), "3 * height * width must be < 2**31");
  check_arg(params_dtype == kFloat32 || params_dtype == kFloat16 || params_dtype == kBFloat16,
            "params_dtype must be float32 (0), float16 (1) or bfloat16 (2), got " + std::to_string(params_dtype));
  check_arg(target_dtype == kFloat32 || target_dtype == kFloat16 || target_dtype == kBFloat16 ||
                target_dtype == kUInt8,
            "target_dtype must be float32 (0), float16 (1), bfloat16 (2) or uint8 (4), got " +
                std::to_string(target_dtype));
  check_arg(eps > 0.0 && eps < 0.5, "eps must be in (0, 0.5), got " + std::to_string(eps));
  check_arg(reduction == kNone || reduction == kSum || reduction == kMean,
            "reduction must be 0 (none), 1 (sum) or 2 (mean), got " + std::to_string(reduction));
}

int64_t partial_count(int64_t batch, int64_t height, int64_t width) {
  return batch * ((3 * height * width + kTile - 1) / kTile);
}

void forward(uintptr_t params, uintptr_t target, uintptr_t loss, uintptr_t partial, uintptr_t grad, int64_t batch,
             int64_t height, int64_t width, int params_dtype, int target_dtype, double eps, int reduction,
             uintptr_t stream) {
  check_common(params, target, batch, height, width, params_dtype, target_dtype, eps, reduction);
  check_arg(loss != 0, "loss: null data pointer");
  check_arg(reduction == kNone || partial != 0, "partial: null data pointer (needed for sum/mean)");
  check_arg(reduction != kNone || grad == 0,
            "grad must be 0 for reduction 'none' (its backward recomputes with the per-value grad_output)");
  // g / n stored in 16 bits before the backward's loss scale underflows (float16: below 2**-24 for n ~ 1e6).
  check_arg(params_dtype == kFloat32 || grad == 0,
            "grad must be 0 for float16/bfloat16 params (logit_laplace_backward recomputes it, rounding once)");
  const int64_t chw = 3 * height * width;
  const int64_t ps = elem_size(params_dtype), ts = elem_size(target_dtype);
  Args a{};
  a.params = reinterpret_cast<const void*>(params);
  a.target = reinterpret_cast<const void*>(target);
  a.loss = reduction == kNone ? reinterpret_cast<float*>(loss) : nullptr;
  a.partial = reduction == kNone ? nullptr : reinterpret_cast<float*>(partial);
  a.grad = reinterpret_cast<void*>(grad);
  a.grad_out = nullptr;
  a.chw = chw;
  a.eps = static_cast<float>(eps);
  a.grad_scale = reduction == kMean ? static_cast<float>(1.0 / static_cast<double>(batch * chw)) : 1.0f;
  a.vec = chw % kItems == 0 && aligned(params, ps * kItems) && aligned(target, ts * kItems) &&
          (grad == 0 || aligned(grad, ps * kItems)) && (reduction != kNone || aligned(loss, 4 * kItems));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  launch(a, params_dtype, target_dtype, batch, s);
  if (reduction != kNone) {
    const float scale = reduction == kMean ? static_cast<float>(1.0 / static_cast<double>(batch * chw)) : 1.0f;
    sum_partials_kernel<<<1, kThreads, 0, s>>>(a.partial, partial_count(batch, height, width), scale,
                                                reinterpret_cast<float*>(loss));
    DALLE_CUDA_CHECK(cudaGetLastError());
  }
}

// Backward, recomputed: grad = d loss / d params * grad_out, formed in fp32 and rounded to the params dtype once.
// reduction none: grad_out is (B, 3, H, W); sum: one value; mean: one value, times 1 / (B * 3 * H * W).
void backward(uintptr_t params, uintptr_t target, uintptr_t grad_out, uintptr_t grad, int64_t batch,
              int64_t height, int64_t width, int params_dtype, int target_dtype, double eps, int reduction,
              uintptr_t stream) {
  check_common(params, target, batch, height, width, params_dtype, target_dtype, eps, reduction);
  check_arg(grad_out != 0, "grad_out: null data pointer");
  check_arg(grad != 0, "grad: null data pointer");
  const int64_t chw = 3 * height * width;
  const int64_t ps = elem_size(params_dtype), ts = elem_size(target_dtype);
  Args a{};
  a.params = reinterpret_cast<const void*>(params);
  a.target = reinterpret_cast<const void*>(target);
  a.loss = nullptr;
  a.partial = nullptr;
  a.grad = reinterpret_cast<void*>(grad);
  a.grad_out = reinterpret_cast<const float*>(grad_out);
  a.grad_out_scalar = reduction != kNone;
  a.chw = chw;
  a.eps = static_cast<float>(eps);
  a.grad_scale = reduction == kMean ? static_cast<float>(1.0 / static_cast<double>(batch * chw)) : 1.0f;
  a.vec = chw % kItems == 0 && aligned(params, ps * kItems) && aligned(target, ts * kItems) &&
          aligned(grad, ps * kItems) && (a.grad_out_scalar || aligned(grad_out, 4 * kItems));
  launch(a, params_dtype, target_dtype, batch, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

void register_logit_laplace(pybind11::module_& m) {
  using pybind11::arg;
  m.def("logit_laplace_partial_count", &partial_count, arg("batch"), arg("height"), arg("width"),
        "Length of the fp32 partial-sum buffer logit_laplace_forward needs.");
  m.def("logit_laplace_forward", &forward, arg("params"), arg("target"), arg("loss"), arg("partial"), arg("grad"),
        arg("batch"), arg("height"), arg("width"), arg("params_dtype"), arg("target_dtype"), arg("eps"),
        arg("reduction"), arg("stream"),
        "Logit-Laplace NLL. Pointers to contiguous params (B,6,H,W), target (B,3,H,W), fp32 loss ((B,3,H,W) for "
        "reduction 0, else a scalar), fp32 partial buffer (logit_laplace_partial_count), grad (B,6,H,W) or 0. "
        "reduction 0 none, 1 sum, 2 mean; with grad != 0 (sum/mean of float32 params only) also writes "
        "d loss / d params for grad_output 1.");
  m.def("logit_laplace_backward", &backward, arg("params"), arg("target"), arg("grad_out"), arg("grad"),
        arg("batch"), arg("height"), arg("width"), arg("params_dtype"), arg("target_dtype"), arg("eps"),
        arg("reduction"), arg("stream"),
        "d loss / d params recomputed, times grad_out (fp32: (B,3,H,W) for reduction 0, one value for 1 sum and "
        "2 mean, which also takes 1/(B*3*H*W)), formed in fp32 and written to grad (B,6,H,W) in the params "
        "dtype.");
}

}  // namespace dalle
