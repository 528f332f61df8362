// CUDA's execution model on the CPU: the header every .cu file is compiled with in the emulation build
// (dalle_kernels._C_emu; setup.py passes it with -include, after rewriting launches and __shared__ declarations,
// see emu_transform in dalle_kernels/_emu_build.py). The runtime behind these declarations is csrc/emu/runtime.cpp.
//
// What it provides:
// - every block of the grid runs, one after another; the threads of a block run as fibers on one OS thread,
//   switched at __syncthreads() (a real barrier) and at warp collectives (__shfl*_sync, votes, __syncwarp,
//   the PTX twins of ptx.h), which exchange values between the 32 lanes of a warp as the hardware does;
// - threadIdx/blockIdx/blockDim/gridDim, __shared__ memory per block (static and dynamic, filled with 0xff
//   bytes, i.e. NaN, at block start), atomics, __ldg and the cache-hinted loads/stores, the vector types and
//   __half/__nv_bfloat16 of the CUDA toolkit's own headers (host code paths);
// - checks the hardware does not give: a shared-memory race detector (two threads touching the same byte
//   between two barriers, at least one writing; any access to the bytes of a cp.async in flight), a cross-block
//   race detector (two blocks of one launch touching the same byte of a writable tensor, one writing, not both
//   atomically) and a memory checker (a global access outside the tensors the caller registered; such an access
//   is reported and not carried out). They see every load and store of the kernel code because the .cu files
//   are compiled with -fsanitize=thread and csrc/emu/runtime.cpp implements the __tsan_* hooks (no
//   ThreadSanitizer runtime); reports name the source lines (the extension keeps line tables, -g1).
// - a schedule for what the GPU leaves unordered: blocks forward, reversed or shuffled; cp.async copies landing
//   at their wait (late) or at issue (early).
// __threadfence: the emulator's memory is sequentially consistent (one thread runs at a time), so a fence orders
// nothing more than is already ordered; it does not make a plain cross-block access in one launch race-free (the
// checker accepts only atomics on both sides; no kernel here hands data between blocks of one launch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef DALLE_CUDA_EMU
#define DALLE_CUDA_EMU 1
#endif

// Execution-space and launch qualifiers mean nothing on the host.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __constant__
#define __constant__
#undef __launch_bounds__
#define __launch_bounds__(...)
// setup.py rewrites every `__shared__` declaration; one it missed fails to compile here, naming this macro.
#undef __shared__
#define __shared__ cuda_emu_shared_declaration_not_rewritten_by_setup_py

// Functions whose bodies must not be instrumented (they touch the emulator's own state).
#define CUDA_EMU_UNCHECKED __attribute__((no_sanitize_thread, noinline))

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr int kSlotBytes = 64;  // per-lane bytes a warp collective may take in and give back

uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void syncthreads();
int syncthreads_reduce(int kind, int predicate);  // kind: 0 count, 1 and, 2 or
void threadfence();
unsigned active_mask();
int lane_id();
int warp_thread0();  // linear thread index of lane 0 of the calling thread's warp

// Warp collectives. Each lane of `mask` deposits kSlotBytes at most; when the last one arrives, `combine` runs
// once with every lane's input (in[l] for lane l) and writes each lane's output (out[l]); then every lane resumes
// with its own output. Lanes of one collective must pass the same mask and the same combine (checked).
using Combine = void (*)(const unsigned char (*in)[kSlotBytes], unsigned char (*out)[kSlotBytes], unsigned mask,
                         int warp_thread0);
void warp_collective(unsigned mask, Combine combine, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     const char* what);
uint64_t shfl(int kind, unsigned mask, uint64_t value, int arg, int width);  // kind: 0 idx, 1 up, 2 down, 3 xor
unsigned vote(int kind, unsigned mask, int predicate);                       // kind: 0 ballot, 1 any, 2 all
unsigned match(int kind, unsigned mask, uint64_t value, int* pred);          // kind: 0 any, 1 all
void syncwarp(unsigned mask);

// Accesses done on a thread's behalf by runtime code (PTX twins, atomics): checked like the kernel's own; `pc` is
// the place in the kernel code that the reports name. false: the access is invalid (reported) and must not be done.
bool check_access(int thread, const void* p, size_t bytes, bool write, bool atomic, const void* pc);
void read_shared(int thread, const void* p, size_t bytes, void* dst);  // also checks that p is shared memory
bool is_shared(const void* p, size_t bytes);
void report(const char* fmt, ...);

// cp.async: copies queued per thread, in flight from issue to the wait_group that covers them (any access to their
// bytes meanwhile is a hazard); their data lands at that wait (late schedule) or at issue (early).
void cp_async(void* dst_shared, const void* src_global, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// Shared memory. A declaration site holds the offset of its variable for the block being run.
struct SharedSite {
  uint64_t block_serial;
  size_t offset;
};
void* shared_alloc(SharedSite& site, size_t bytes, size_t align);
void* dynamic_shared();
template <class T>
inline T& shared_var(SharedSite& site, size_t align = 0) {
  return *static_cast<T*>(shared_alloc(site, sizeof(T), align > alignof(T) ? align : alignof(T)));
}

// Launch: `kernel<<<g, b, s, st>>>(args)` is rewritten to `kernel ^ ::cuda_emu::config("kernel", g, b, s, st)(args)`.
struct Config {
  const char* name;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};
void launch(const Config& cfg, const void* kernel, void (*run)(void*), void* ctx);

template <class... A>
struct Bound {
  Config cfg;
  std::tuple<A...> args;
};
struct ConfigBuilder {
  Config cfg;
  template <class... A>
  Bound<std::decay_t<A>...> operator()(A&&... args) const {
    return {cfg, std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)};
  }
};
inline ConfigBuilder config(const char* name, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = 0) {
  return {Config{name, grid, block, smem, stream}};
}
template <class... P>
struct Call {
  void (*kernel)(P...);
  std::tuple<P...> params;  // converted once, as cudaLaunchKernel copies its arguments
  CUDA_EMU_UNCHECKED static void run(void* self) {
    // Each thread gets its own copy of the parameters on its stack (kernel parameters are trivially copyable).
    auto* c = static_cast<Call*>(self);
    alignas(std::tuple<P...>) unsigned char copy[sizeof(std::tuple<P...>)];
    std::memcpy(copy, &c->params, sizeof(copy));
    std::apply(c->kernel, *reinterpret_cast<std::tuple<P...>*>(copy));
  }
};
template <class... P, class... A>
void operator^(void (*kernel)(P...), Bound<A...>&& b) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  Call<P...> call{kernel, std::apply([](auto&&... a) { return std::tuple<P...>(a...); }, b.args)};
  launch(b.cfg, reinterpret_cast<const void*>(kernel), &Call<P...>::run, &call);
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp intrinsics take values of <= 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Atomics: the emulator runs one thread at a time, so a plain read-modify-write is atomic; the access is
// reported as atomic (atomics do not race with each other). An invalid one is not done and returns 0xff bytes.
template <class T, class F>
CUDA_EMU_UNCHECKED T atomic_rmw(T* p, F f) {
  if (!check_access(-1, p, sizeof(T), true, true, __builtin_return_address(0))) {
    T poison;
    std::memset(&poison, 0xff, sizeof(T));
    return poison;
  }
  T old = *p;
  *p = f(old);
  return old;
}

}  // namespace cuda_emu

#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#undef warpSize
#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())
#define warpSize (::cuda_emu::kWarpSize)

// The runtime API's kernel-pointer overloads (cuda_runtime.h declares them for nvcc only).
template <class... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

__attribute__((always_inline)) inline void __syncthreads() { ::cuda_emu::syncthreads(); }
inline int __syncthreads_count(int p) { return ::cuda_emu::syncthreads_reduce(0, p); }
inline int __syncthreads_and(int p) { return ::cuda_emu::syncthreads_reduce(1, p); }
inline int __syncthreads_or(int p) { return ::cuda_emu::syncthreads_reduce(2, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cuda_emu::syncwarp(mask); }
inline void __threadfence() { ::cuda_emu::threadfence(); }
inline void __threadfence_block() { ::cuda_emu::threadfence(); }
inline void __threadfence_system() { ::cuda_emu::threadfence(); }
inline unsigned __activemask() { return ::cuda_emu::active_mask(); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::shfl(0, mask, ::cuda_emu::to_bits(v), src, width));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::shfl(1, mask, ::cuda_emu::to_bits(v), static_cast<int>(delta), width));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::shfl(2, mask, ::cuda_emu::to_bits(v), static_cast<int>(delta), width));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::cuda_emu::from_bits<T>(::cuda_emu::shfl(3, mask, ::cuda_emu::to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int p) { return ::cuda_emu::vote(0, mask, p); }
inline int __any_sync(unsigned mask, int p) { return static_cast<int>(::cuda_emu::vote(1, mask, p)); }
inline int __all_sync(unsigned mask, int p) { return static_cast<int>(::cuda_emu::vote(2, mask, p)); }
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  return ::cuda_emu::match(0, mask, ::cuda_emu::to_bits(v), nullptr);
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T v, int* pred) {
  return ::cuda_emu::match(1, mask, ::cuda_emu::to_bits(v), pred);
}

// Loads and stores with cache hints: plain accesses here (checked like any other).
#define CUDA_EMU_LOAD(name) \
  template <class T>        \
  inline T name(const T* p) { return *p; }
#define CUDA_EMU_STORE(name) \
  template <class T>         \
  inline void name(T* p, T v) { *p = v; }
CUDA_EMU_LOAD(__ldg)
CUDA_EMU_LOAD(__ldca)
CUDA_EMU_LOAD(__ldcg)
CUDA_EMU_LOAD(__ldcs)
CUDA_EMU_LOAD(__ldlu)
CUDA_EMU_LOAD(__ldcv)
CUDA_EMU_STORE(__stwb)
CUDA_EMU_STORE(__stcg)
CUDA_EMU_STORE(__stcs)
CUDA_EMU_STORE(__stwt)
#undef CUDA_EMU_LOAD
#undef CUDA_EMU_STORE

template <class T>
inline T atomicAdd(T* p, T v) { return ::cuda_emu::atomic_rmw(p, [v](T o) { return static_cast<T>(o + v); }); }
template <class T>
inline T atomicSub(T* p, T v) { return ::cuda_emu::atomic_rmw(p, [v](T o) { return static_cast<T>(o - v); }); }
template <class T>
inline T atomicExch(T* p, T v) { return ::cuda_emu::atomic_rmw(p, [v](T) { return v; }); }
template <class T>
inline T atomicMin(T* p, T v) { return ::cuda_emu::atomic_rmw(p, [v](T o) { return v < o ? v : o; }); }
template <class T>
inline T atomicMax(T* p, T v) { return ::cuda_emu::atomic_rmw(p, [v](T o) { return v > o ? v : o; }); }
template <class T>
inline T atomicAnd(T* p, T v) { return ::cuda_emu::atomic_rmw(p, [v](T o) { return static_cast<T>(o & v); }); }
template <class T>
inline T atomicOr(T* p, T v) { return ::cuda_emu::atomic_rmw(p, [v](T o) { return static_cast<T>(o | v); }); }
template <class T>
inline T atomicXor(T* p, T v) { return ::cuda_emu::atomic_rmw(p, [v](T o) { return static_cast<T>(o ^ v); }); }
template <class T>
inline T atomicCAS(T* p, T cmp, T v) { return ::cuda_emu::atomic_rmw(p, [cmp, v](T o) { return o == cmp ? v : o; }); }
inline unsigned atomicInc(unsigned* p, unsigned lim) {
  return ::cuda_emu::atomic_rmw(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned lim) {
  return ::cuda_emu::atomic_rmw(p, [lim](unsigned o) { return (o == 0 || o > lim) ? lim : o - 1; });
}

// Device math that the host headers do not declare (fast-math intrinsics map to the accurate host functions).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __int_as_float(int v) { return ::cuda_emu::from_bits<float>(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(::cuda_emu::to_bits(v)); }
inline float __uint_as_float(unsigned v) { return ::cuda_emu::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return static_cast<unsigned>(::cuda_emu::to_bits(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
