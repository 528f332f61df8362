// Every inline-PTX instruction the kernels use, each behind one device function, with its emulated twin next
// to it (DALLE_CUDA_EMU: the CPU emulation build, csrc/cuda_emu.h). The twins implement the register layouts of
// the PTX ISA ("Matrix fragments for mma.m16n8k16 with floating point type", "ldmatrix", "cp.async") lane by
// lane, so a kernel that assembles a fragment wrongly gets the wrong answer on the CPU as it would on the GPU.
//
//   mma_m16n8k16<T>(d, a, b, c)   D = A B + C; A 16x16 row-major (4 regs of T x2), B 16x8 col-major (2 regs),
//                                 C, D 16x8 fp32 (4 regs); T = __half or __nv_bfloat16. Lane l, g = l / 4,
//                                 t = l % 4 holds: a[i] = A[g + 8 (i & 1)][2t + 8 (i / 2) + {0, 1}],
//                                 b[i] = B[2t + 8 i + {0, 1}][g], c[i] = C[g + 8 (i / 2)][2t + (i & 1)]
//                                 (the low half of a register is the lower column/row index).
//   ldmatrix<N, kTrans>(r, p)     N = 1, 2, 4 8x8 matrices of 16-bit elements from shared memory; lanes 8i..8i+7
//                                 give the addresses of the 8 rows (16 bytes each, 16-byte aligned) of matrix
//                                 i; lane l receives in r[i] matrix i's elements (l / 4, 2 (l % 4) + {0, 1}),
//                                 or with kTrans (2 (l % 4) + {0, 1}, l / 4).
//   cp_async_16(dst, src[, n])    16 bytes global -> shared, asynchronous (.cg: bypasses L1); with n < 16 only
//                                 n bytes are read and the rest is zero-filled. cp_async_commit() closes a
//                                 group; cp_async_wait<N>() waits until at most N groups are pending.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace dalle {
namespace ptx {

#ifndef DALLE_CUDA_EMU
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
#ifndef DALLE_CUDA_EMU
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16 or bf16");
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
}
#else
namespace twin {
struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};
template <typename T>
CUDA_EMU_UNCHECKED double b16(uint32_t reg, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu);
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const uint32_t f = uint32_t(bits) << 16;
    float v;
    std::memcpy(&v, &f, 4);
    return v;
  } else {
    __half h;
    std::memcpy(&h, &bits, 2);
    return static_cast<double>(__half2float(h));
  }
}
// The whole warp's product, once: products of f16/bf16 values are exact in double and the sum is rounded once
// to fp32 (the tensor core's internal rounding and order are not specified; results agree to fp32 rounding).
template <typename T>
CUDA_EMU_UNCHECKED void mma_combine(const unsigned char (*in)[::cuda_emu::kSlotBytes],
                                    unsigned char (*out)[::cuda_emu::kSlotBytes], unsigned mask, int t0) {
  if (mask != 0xffffffffu) ::cuda_emu::report("mma.sync: warp of thread %d: needs all 32 lanes, mask 0x%08x", t0, mask);
  double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    MmaIn x;
    std::memcpy(&x, in[l], sizeof(x));
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 8; ++i) A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = b16<T>(x.a[i >> 1], i & 1);
    for (int i = 0; i < 4; ++i) B[2 * t + (i & 1) + 8 * (i >> 1)][g] = b16<T>(x.b[i >> 1], i & 1);
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = x.c[i];
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[i] = static_cast<float>(acc);
    }
    std::memcpy(out[l], d, sizeof(d));
  }
}
}  // namespace twin

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16 or bf16");
  twin::MmaIn x;
  std::memcpy(x.a, a, sizeof(x.a));
  std::memcpy(x.b, b, sizeof(x.b));
  std::memcpy(x.c, c, sizeof(x.c));
  float r[4];
  ::cuda_emu::warp_collective(0xffffffffu, twin::mma_combine<T>, &x, sizeof(x), r, sizeof(r), "mma.sync.m16n8k16");
  std::memcpy(d, r, sizeof(r));
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16
#ifndef DALLE_CUDA_EMU
template <int N, bool kTrans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const uint32_t p = smem_u32(smem_row);
  if constexpr (N == 1 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(p));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(p));
  } else if constexpr (N == 2 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(p));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(p));
  } else if constexpr (!kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(p));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(p));
  }
}
#else
namespace twin {
template <int N, bool kTrans>
CUDA_EMU_UNCHECKED void ldmatrix_combine(const unsigned char (*in)[::cuda_emu::kSlotBytes],
                                         unsigned char (*out)[::cuda_emu::kSlotBytes], unsigned mask, int t0) {
  if (mask != 0xffffffffu) ::cuda_emu::report("ldmatrix: warp of thread %d: needs all 32 lanes, mask 0x%08x", t0, mask);
  uint16_t m[N][8][8];
  for (int i = 0; i < N; ++i) {
    for (int row = 0; row < 8; ++row) {
      const int lane = 8 * i + row;
      const void* p;
      std::memcpy(&p, in[lane], sizeof(p));
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
        ::cuda_emu::report("ldmatrix: thread %d: row address %p is not 16-byte aligned", t0 + lane, p);
      ::cuda_emu::read_shared(t0 + lane, p, 16, m[i][row]);
    }
  }
  for (int l = 0; l < 32; ++l) {
    uint32_t r[N];
    for (int i = 0; i < N; ++i) {
      const int a = l >> 2, b = 2 * (l & 3);
      const uint16_t lo = kTrans ? m[i][b][a] : m[i][a][b], hi = kTrans ? m[i][b + 1][a] : m[i][a][b + 1];
      r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    std::memcpy(out[l], r, sizeof(r));
  }
}
}  // namespace twin

template <int N, bool kTrans = false>
inline void ldmatrix(uint32_t (&r)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  uint32_t out[N];
  ::cuda_emu::warp_collective(0xffffffffu, twin::ldmatrix_combine<N, kTrans>, &smem_row, sizeof(smem_row), out,
                              sizeof(out), "ldmatrix");
  std::memcpy(r, out, sizeof(out));
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// cp.async.cg.shared.global [dst], [src], 16{, src_bytes}; cp.async.commit_group; cp.async.wait_group N
#ifndef DALLE_CUDA_EMU
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#else
inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
  ::cuda_emu::cp_async(smem_dst, gmem_src, 16, src_bytes);
}
inline void cp_async_commit() { ::cuda_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::cuda_emu::cp_async_wait(N);
}
#endif

}  // namespace ptx
}  // namespace dalle
