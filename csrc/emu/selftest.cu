// Test kernels of the emulation build only (dalle_kernels._C_emu; tests/test_cuda_emu.py): deliberately broken
// kernels that the race and memory checkers must flag, their correct twins, the warp intrinsics, and the PTX
// twins of ptx.h against the PTX ISA's fragment layouts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "ptx.h"

namespace dalle {
namespace {

constexpr int kThreads = 128;

// Block sum as logit_laplace.cu does it; `broken` drops the barrier between writing and reading the warp sums.
__global__ void block_sum_kernel(const float* in, float* out, int n, bool broken) {
  __shared__ float warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float v = 0.0f;
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < n; i += kThreads * gridDim.x) v += in[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  if (!broken) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
    out[blockIdx.x] = s;
  }
}

// Copies in[0:n] to out; `broken` 1 also copies element n (i <= n, the classic bound mistake): one read and one
// write past the end of the tensors; 2 writes element i to out[i - 64] (a negative index: the 256 bytes before
// the tensor, where the heap keeps its bookkeeping).
__global__ void copy_kernel(const float* in, float* out, int n, int broken) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (broken == 2 && i < n) out[i - 64] = in[i];
  if (broken != 2 && (broken ? i <= n : i < n)) out[i] = in[i];
}

// One thread per block takes the next slot of a counter and writes its block index there: `out` lists the blocks
// in the order they ran (atomics: no race, but a result that depends on the block order).
__global__ void block_order_kernel(int* counter, int* out) {
  if (threadIdx.x == 0) out[atomicAdd(counter, 1)] = static_cast<int>(blockIdx.x);
}

// Global memory shared between the blocks of one launch. mode 0: each block writes its own element (clean);
// 1: every block writes out[0] (write-after-write between blocks); 2: block b > 0 reads out[b - 1], which block
// b - 1 writes (read-after-write, or write-after-read in the other order); 3: every block adds to out[0]
// atomically (clean); 4: block 0 adds atomically, the others write plainly (a race: not both atomic).
__global__ void cross_block_kernel(float* out, int mode) {
  if (threadIdx.x != 0) return;
  const int b = static_cast<int>(blockIdx.x);
  if (mode == 0) out[b] = 1.0f + b;
  if (mode == 1) out[0] = 1.0f + b;
  if (mode == 2) out[b] = b > 0 ? out[b - 1] + 1.0f : 1.0f;
  if (mode == 3 || (mode == 4 && b == 0)) atomicAdd(&out[0], 1.0f);
  if (mode == 4 && b > 0) out[0] = 2.0f;
}

// Two static __shared__ arrays of 32 floats, one warp; `overflow`: lane 31 writes a[32], one past the end of `a`
// (on a GPU the compiler lays the variables out: that may be b[0], or nothing the block owns).
__global__ void shared_overflow_kernel(float* out, bool overflow) {
  __shared__ float a[32];
  __shared__ float b[32];
  const int t = threadIdx.x;
  b[t] = 2.0f;
  a[overflow && t == 31 ? 32 : t] = 1.0f;
  __syncthreads();
  out[t] = a[t] + b[t];
}

// Writes a row of results per thread: shuffles with widths 32/8, up/down/xor, votes, match.
__global__ void warp_kernel(int* out, int stride) {
  const int t = threadIdx.x, lane = t & 31;
  int* o = out + t * stride;
  o[0] = __shfl_sync(0xffffffffu, t * 10, (lane * 7 + 3) & 31);
  o[1] = __shfl_sync(0xffffffffu, t * 10, lane + 5, 8);  // srcLane taken modulo the width
  o[2] = __shfl_up_sync(0xffffffffu, t * 10, 3);
  o[3] = __shfl_up_sync(0xffffffffu, t * 10, 3, 8);
  o[4] = __shfl_down_sync(0xffffffffu, t * 10, 5);
  o[5] = __shfl_down_sync(0xffffffffu, t * 10, 5, 16);
  o[6] = __shfl_xor_sync(0xffffffffu, t * 10, 9);
  o[7] = __shfl_xor_sync(0xffffffffu, t * 10, 9, 8);  // partner in a later group of 8: own value
  o[8] = static_cast<int>(__ballot_sync(0xffffffffu, (t % 3) == 0));
  o[9] = __any_sync(0xffffffffu, t == 37);
  o[10] = __all_sync(0xffffffffu, t < 40);
  o[11] = static_cast<int>(__match_any_sync(0xffffffffu, lane / 4));
  o[12] = __shfl_sync(0xffffffffu, 0.5f * t, 31) == 0.5f * ((t & ~31) + 31);  // float through 64-bit slots
  o[13] = __syncthreads_count(t % 5 == 0);
  o[14] = static_cast<int>(__shfl_xor_sync(0xffffffffu, static_cast<double>(t) + 0.25, 1) * 4.0);
  int pred = 0;
  o[15] = static_cast<int>(__match_all_sync(0xffffffffu, t / 32, &pred));
  o[16] = pred;
  // shared-memory atomics: every thread adds its id; read back after a barrier
  __shared__ int acc;
  if (t == 0) acc = 0;
  __syncthreads();
  atomicAdd(&acc, t);
  __syncthreads();
  o[17] = acc;
}

// Threads of lanes >= `keep` return, the others shuffle with the full mask: the GPU would hang.
__global__ void exited_lane_kernel(int* out, int keep) {
  if (static_cast<int>(threadIdx.x) >= keep) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// One warp: 4 matrices of 8x8 uint16 stored in shared memory at scattered rows (row r of matrix i at shared row
// perm[8 i + r]), loaded by ldmatrix<N, kTrans> with lane l giving the address of (matrix l / 8, row l % 8).
template <int N, bool kTrans>
__global__ void ldmatrix_kernel(const uint16_t* in, const int* perm, uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[32][8];
  const int l = threadIdx.x;
  for (int c = 0; c < 8; ++c) tile[perm[l]][c] = in[l * 8 + c];
  __syncwarp();
  uint32_t r[N];
  ptx::ldmatrix<N, kTrans>(r, &tile[perm[l]][0]);
  for (int i = 0; i < N; ++i) out[l * N + i] = r[i];
}

template <typename T>
__device__ uint32_t pack2(const T* p) {
  uint16_t lo, hi;
  memcpy(&lo, p, 2);
  memcpy(&hi, p + 1, 2);
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

// One warp: D = A B + C with A (16x16) row-major, B (16x8) given as B^T (8x16, row-major: column n of B is row n),
// C, D (16x8) row-major fp32. Fragments built from the PTX ISA formulas, or (via_ldmatrix) loaded with ldmatrix
// from shared memory the way the attention kernels do: A with x4, B^T with x2.
template <typename T>
__global__ void mma_kernel(const T* A, const T* Bt, const float* C, float* D, bool via_ldmatrix) {
  __shared__ __align__(16) T sA[16][16];
  __shared__ __align__(16) T sB[8][16];
  const int l = threadIdx.x, g = l >> 2, t = l & 3;
  uint32_t a[4], b[2];
  if (via_ldmatrix) {
    for (int i = l; i < 256; i += 32) sA[i / 16][i % 16] = A[i];
    for (int i = l; i < 128; i += 32) sB[i / 16][i % 16] = Bt[i];
    __syncwarp();
    // x4: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3]
    ptx::ldmatrix<4>(a, &sA[(l & 7) + 8 * ((l >> 3) & 1)][8 * (l >> 4)]);
    // x2 on B^T: matrices (n 0-7, k 0-7), (n 0-7, k 8-15): lane holds B[2t + {0,1}][g] = B^T[g][2t + {0,1}]
    ptx::ldmatrix<2>(b, &sB[l & 7][8 * ((l >> 3) & 1)]);
  } else {
    for (int i = 0; i < 4; ++i) a[i] = pack2(A + (g + 8 * (i & 1)) * 16 + 2 * t + 8 * (i >> 1));
    for (int i = 0; i < 2; ++i) b[i] = pack2(Bt + g * 16 + 2 * t + 8 * i);
  }
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  ptx::mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

// 64 threads copy n floats (n <= 1024, padded to 4) through shared memory with cp.async in two groups; `broken`
// reads its own copy before waiting for it (what the emulator makes visible: the destination still holds 0xff).
__global__ void cp_async_kernel(const float* in, float* out, int n, bool broken) {
  __shared__ __align__(16) float buf[1024];
  const int t = threadIdx.x;
  for (int i = 4 * t; i < n; i += 4 * 64) {
    const int valid = n - i >= 4 ? 16 : 4 * (n - i);
    ptx::cp_async_16(&buf[i], &in[i], valid);
    if (i == 4 * t) ptx::cp_async_commit();  // first group: each thread's first chunk
  }
  ptx::cp_async_commit();
  if (broken) {
    if (4 * t < n) out[4 * t] = buf[4 * t];
  }
  ptx::cp_async_wait<1>();  // the first group has landed
  if (!broken && 4 * t < n) out[4 * t] = buf[4 * t];
  ptx::cp_async_wait<0>();
  __syncthreads();
  for (int i = t; i < n; i += 64)
    if (i % 4 != 0 || i / 4 >= 64) out[i] = buf[i];
}

// Fills `bytes` of dynamic shared memory and sums them back, one block of 64 threads.
__global__ void dynamic_smem_kernel(float* out, int count) {
  extern __shared__ __align__(16) float dyn[];
  for (int i = threadIdx.x; i < count; i += blockDim.x) dyn[i] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int i = 0; i < count; ++i) s += dyn[i];
    out[0] = s;
  }
}

float* F(uintptr_t p) { return reinterpret_cast<float*>(p); }

}  // namespace

void register_emu_selftest(pybind11::module_& m) {
  using pybind11::arg;
  m.def("selftest_block_sum", [](uintptr_t in, uintptr_t out, int n, int blocks, bool broken) {
    block_sum_kernel<<<blocks, kThreads>>>(F(in), F(out), n, broken);
  }, arg("inp"), arg("out"), arg("n"), arg("blocks"), arg("broken"));
  m.def("selftest_copy", [](uintptr_t in, uintptr_t out, int n, int broken) {
    copy_kernel<<<(n + 63) / 64 + 1, 64>>>(F(in), F(out), n, broken);
  }, arg("inp"), arg("out"), arg("n"), arg("broken"));
  m.def("selftest_block_order", [](uintptr_t counter, uintptr_t out, int blocks) {
    block_order_kernel<<<blocks, 32>>>(reinterpret_cast<int*>(counter), reinterpret_cast<int*>(out));
  }, arg("counter"), arg("out"), arg("blocks"));
  m.def("selftest_cross_block", [](uintptr_t out, int blocks, int mode) {
    cross_block_kernel<<<blocks, 32>>>(F(out), mode);
  }, arg("out"), arg("blocks"), arg("mode"));
  m.def("selftest_shared_overflow", [](uintptr_t out, bool overflow) {
    shared_overflow_kernel<<<1, 32>>>(F(out), overflow);
  }, arg("out"), arg("overflow"));
  m.def("selftest_warp", [](uintptr_t out, int threads, int stride) {
    warp_kernel<<<1, threads>>>(reinterpret_cast<int*>(out), stride);
  }, arg("out"), arg("threads"), arg("stride"));
  m.def("selftest_exited_lane", [](uintptr_t out, int keep) {
    exited_lane_kernel<<<1, 32>>>(reinterpret_cast<int*>(out), keep);
  }, arg("out"), arg("keep"));
  m.def("selftest_ldmatrix", [](uintptr_t in, uintptr_t perm, uintptr_t out, int n, bool trans) {
    auto i = reinterpret_cast<const uint16_t*>(in);
    auto p = reinterpret_cast<const int*>(perm);
    auto o = reinterpret_cast<uint32_t*>(out);
    if (n == 1 && !trans) ldmatrix_kernel<1, false><<<1, 32>>>(i, p, o);
    if (n == 1 && trans) ldmatrix_kernel<1, true><<<1, 32>>>(i, p, o);
    if (n == 2 && !trans) ldmatrix_kernel<2, false><<<1, 32>>>(i, p, o);
    if (n == 2 && trans) ldmatrix_kernel<2, true><<<1, 32>>>(i, p, o);
    if (n == 4 && !trans) ldmatrix_kernel<4, false><<<1, 32>>>(i, p, o);
    if (n == 4 && trans) ldmatrix_kernel<4, true><<<1, 32>>>(i, p, o);
  }, arg("inp"), arg("perm"), arg("out"), arg("n"), arg("trans"));
  m.def("selftest_mma", [](uintptr_t a, uintptr_t bt, uintptr_t c, uintptr_t d, int dtype, bool via_ldmatrix) {
    if (dtype == kFloat16)
      mma_kernel<__half><<<1, 32>>>(reinterpret_cast<const __half*>(a), reinterpret_cast<const __half*>(bt), F(c),
                                    F(d), via_ldmatrix);
    else
      mma_kernel<__nv_bfloat16><<<1, 32>>>(reinterpret_cast<const __nv_bfloat16*>(a),
                                           reinterpret_cast<const __nv_bfloat16*>(bt), F(c), F(d), via_ldmatrix);
  }, arg("a"), arg("bt"), arg("c"), arg("d"), arg("dtype"), arg("via_ldmatrix"));
  m.def("selftest_dynamic_smem", [](uintptr_t out, int bytes, bool opt_in) {
    if (opt_in)
      DALLE_CUDA_CHECK(cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    dynamic_smem_kernel<<<1, 64, bytes>>>(F(out), bytes / 4);
    DALLE_CUDA_CHECK(cudaGetLastError());
  }, arg("out"), arg("bytes"), arg("opt_in"));
  m.def("selftest_cp_async", [](uintptr_t in, uintptr_t out, int n, bool broken) {
    cp_async_kernel<<<1, 64>>>(F(in), F(out), n, broken);
  }, arg("inp"), arg("out"), arg("n"), arg("broken"));
}

}  // namespace dalle
