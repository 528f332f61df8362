// Block-sparse attention under DALL-E's masks (dalle_kernels/ops/attention.py, paper appendix B.1): forward,
// backward preprocess (delta), dQ and dK/dV, walking the block lookup tables of masks.block_tables.
//
//   O = softmax(scale * Q K^T + M) V,   M = 0 where the mask allows a pair, -inf elsewhere.
//
// The same algorithm as the Triton kernels (FlashAttention-2, Dao 2023, algorithms 1 and 2): per query block the
// forward visits only the key blocks listed in q_lut (q_full marks tiles entirely allowed and inside the sequence,
// where no predicate is evaluated), with an online softmax in the log2 domain, and saves O and the row
// log-sum-exp (natural log, fp32, (B, heads, N) by raster row) only. The backward recomputes P from the
// log-sum-exp: delta = rowsum(dO * O); dQ = scale * dS K over q_lut; dK = scale * dS^T Q and dV = P^T dO per key
// block over k_lut, with dS = P * (dO V^T - delta). `column` runs the transposed layout (block-diagonal causal,
// paper appendix B.1) by address arithmetic: kernel position T + c*H + r reads and writes raster row T + r*W + c.
//
// Two kernel families, chosen by the entry points from dtype and tile (dalle_kernels/ops/attention.py cuda_tiles):
// - tensor cores, fp16/bf16 (attn_*_mma_kernel): mma.sync m16n8k16 with fp32 accumulators, fragments from shared
//   memory by ldmatrix, streamed tiles double-buffered with cp.async (csrc/ptx.h); 4 warps of 16 rows. P and dS
//   are rounded to the input dtype for the second product, as in the Triton kernels.
// - CUDA cores, fp32 (attn_fwd_kernel, attn_bwd_dq_kernel, attn_bwd_dkdv_kernel): tiles staged in shared memory
//   as fp32 and every product an fp32 FMA, so fp32 inputs are computed exactly in fp32 (no TF32, no 16-bit split
//   of any operand). They take fp16/bf16 too (a square tile asked for explicitly), with P and dS kept in fp32.
//   Tiles BM = BN (16, 32 or 64); a query row belongs to kThreads / BM consecutive lanes, whose softmax statistics
//   combine by warp shuffles, never across warps.
// Outputs are rounded to the input dtype once. One block of 128 threads per (batch * head, query block) or
// (batch * head, key block); head_dim 16, 32, 64, 128.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>

#include "common.h"
#include "dtypes.h"
#include "ptx.h"

namespace dalle {
namespace {

constexpr int kThreads = 128;
// Without a minimum of resident blocks, ptxas (CUDA 13) held these kernels to 72 registers and spilled; with 1 it
// may use up to 255, and none spills (tests/test_aot_cuda.py).
constexpr int kMinBlocks = 1;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Mask codes: masks.MASK_CODES.
enum Mask : int { kCausal = 0, kRow = 1, kColumn = 2, kConv = 3, kConvClipped = 4, kConvTorus = 5, kAxialRow = 6 };

struct Layout {
  int n;      // T + H * W
  int T, H, W, S;  // text length, grid, kernel // 2
  int mask;
};

// Kernel-layout position -> raster row of the tensors (column: the image part is transposed).
__device__ __forceinline__ int64_t raster_row(int pos, const Layout& L) {
  if (L.mask != kColumn || pos < L.T) return pos;
  const int t = pos - L.T;
  return int64_t(L.T) + int64_t(t % L.H) * L.W + t / L.H;
}

// masks.tl_allowed: query position i may attend key position j, both in the kernel's layout and < n. Every / and %
// sees non-negative operands where its result matters.
__device__ __forceinline__ bool allowed(int i, int j, const Layout& L) {
  const bool causal = j <= i;
  if (L.mask == kCausal || !causal) return causal;
  if (j < L.T) return true;
  if (i < L.T) return false;
  const int q = i - L.T, k = j - L.T, W = L.W, S = L.S;
  switch (L.mask) {
    case kRow: return q - k <= W;
    case kColumn: return q / L.H == k / L.H;
    case kConv: {
      const int d = q - k, dm = d % W;
      return d / W <= S && (dm <= S || dm >= W - S);
    }
    case kConvClipped: {
      const int dc = q % W - k % W;
      return q / W - k / W <= S && dc <= S && dc >= -S;
    }
    case kConvTorus: {
      const int dr = q / W - k / W, dc = q % W - k % W, dcm = dc < 0 ? dc + W : dc;
      return (dr <= S || dr >= L.H - S) && (dcm <= S || dcm >= W - S);
    }
    default: return q / W == k / W;  // axial_row
  }
}

// Strides in elements; the head_dim axis is contiguous.
struct Tensor4 {
  const void* p;
  int64_t sb, sh, sn;
};

struct Args {
  Tensor4 q, k, v, o, dout;  // o: the forward output (backward: read); dout: dO
  void* out0;                // forward: O; dQ kernel: dQ; dK/dV kernel: dK
  void* out1;                // dK/dV kernel: dV
  int64_t out_sb, out_sh, out_sn;  // strides of out0 and out1 (made alike by the caller)
  float* lse;                // (B * heads, n) fp32, raster rows
  float* delta;              // (B * heads, n) fp32
  const int* lut;            // (blocks, lut_w) int32
  const int* full;
  const int* count;
  int lut_w;
  int heads;
  Layout L;
  float qk_scale;  // scale * log2(e)
  float scale;
};

// (batch * head, batch, head) of this block (grid x): divided in 32 bits (a 64-bit division is a subroutine call
// with a stack frame), used in 64-bit address arithmetic.
struct BatchHead {
  int64_t bh, b, h;
};
__device__ __forceinline__ BatchHead batch_head(int heads) {
  const int bh = static_cast<int>(blockIdx.x);
  return BatchHead{bh, bh / heads, bh % heads};
}

// rows x D tile of a (b, h) slice into shared memory as fp32, row stride LD; positions past n read as 0.
template <typename T, int ROWS, int D, int LD>
__device__ __forceinline__ void stage(float* dst, const T* base, int64_t sn, int pos0, const Layout& L) {
  for (int idx = threadIdx.x; idx < ROWS * D; idx += kThreads) {
    const int r = idx / D, c = idx % D, pos = pos0 + r;
    dst[r * LD + c] = pos < L.n ? to_f(base[raster_row(pos, L) * sn + c]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ const T* slice(const Tensor4& t, int64_t b, int64_t h) {
  return static_cast<const T*>(t.p) + b * t.sb + h * t.sh;
}

// Two operands' tiles of the same rows (K and V, or Q and dO) of the (b, h) slice, as stage.
template <typename T, int ROWS, int D, int LD>
__device__ __forceinline__ void stage_pair(float* dst0, float* dst1, const Tensor4& t0, const Tensor4& t1, int64_t b,
                                           int64_t h, int pos0, const Layout& L) {
  stage<T, ROWS, D, LD>(dst0, slice<T>(t0, b, h), t0.sn, pos0, L);
  stage<T, ROWS, D, LD>(dst1, slice<T>(t1, b, h), t1.sn, pos0, L);
}

// Row `block` of a lookup table: the blocks it visits and which of those tiles are full.
struct TableRow {
  const int* lut;
  const int* full;
  int count;
};
__device__ __forceinline__ TableRow table_row(const Args& a, int block) {
  return TableRow{a.lut + int64_t(block) * a.lut_w, a.full + int64_t(block) * a.lut_w, a.count[block]};
}

// Reduce over the G consecutive lanes that share a row (G a power of two <= 32).
template <int G>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int D, int BM, int BN>
struct Smem {
  static constexpr int LD = D + 1;    // padded rows: the row-by-row dot products hit distinct banks
  static constexpr int LS = BN + 1;
};

// Dynamic shared memory (bytes) of each kernel, for the launches and for attention_shared_bytes.
constexpr size_t smem_fwd(size_t D, size_t BM, size_t BN) {
  return sizeof(float) * (BM * (D + 1) + BN * (D + 1) + BN * D + BM * (BN + 1));
}
constexpr size_t smem_dq(size_t D, size_t BM, size_t BN) {
  return sizeof(float) * (2 * BM * (D + 1) + 2 * BN * (D + 1) + BM * (BN + 1) + 2 * BM);
}
constexpr size_t smem_dkdv(size_t D, size_t BM, size_t BN) {
  return sizeof(float) * (2 * BM * (D + 1) + 2 * BN * (D + 1) + 2 * BM * (BN + 1) + 2 * BM);
}

// sum_k a[k] * b[k] over a head_dim row of two fp32 tiles in shared memory.
template <int D>
__device__ __forceinline__ float dot_row(const float* a, const float* b) {
  float s = 0.0f;
#pragma unroll 16
  for (int k = 0; k < D; ++k) s = fmaf(a[k], b[k], s);
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: one query block; grid (B * heads, query blocks), the last query block first (most key blocks under the
// causal-like masks: starting it first shortens the tail).
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_fwd_kernel(Args a) {
  using SM = Smem<D, BM, BN>;
  constexpr int LD = SM::LD, LS = SM::LS, G = kThreads / BM, C = D / G;
  extern __shared__ float smem[];
  float* sQ = smem;
  float* sK = sQ + BM * LD;
  float* sV = sK + BN * LD;
  float* sS = sV + BN * D;

  const Layout L = a.L;
  const auto [bh, b, h] = batch_head(a.heads);
  const int mb = gridDim.y - 1 - blockIdx.y, m0 = mb * BM;
  const T* kp = slice<T>(a.k, b, h);
  const T* vp = slice<T>(a.v, b, h);
  stage<T, BM, D, LD>(sQ, slice<T>(a.q, b, h), a.q.sn, m0, L);

  const int tid = threadIdx.x, r = tid / G, part = tid % G;
  float acc[C];
#pragma unroll
  for (int j = 0; j < C; ++j) acc[j] = 0.0f;
  float m_i = -INFINITY, l_i = 0.0f;
  const auto [lut, full_tiles, count] = table_row(a, mb);
  for (int it = 0; it < count; ++it) {
    const int n0 = lut[it] * BN;
    const bool full = full_tiles[it] != 0;
    __syncthreads();  // the previous tile's K, V and P are no longer read
    stage<T, BN, D, LD>(sK, kp, a.k.sn, n0, L);
    stage<T, BN, D, D>(sV, vp, a.v.sn, n0, L);
    __syncthreads();
    for (int idx = tid; idx < BM * BN; idx += kThreads) {
      const int rr = idx / BN, cc = idx % BN;
      float s = dot_row<D>(sQ + rr * LD, sK + cc * LD) * a.qk_scale;
      if (!full) {
        const int i = m0 + rr, j = n0 + cc;
        if (i >= L.n || j >= L.n || !allowed(i, j, L)) s = -INFINITY;
      }
      sS[rr * LS + cc] = s;
    }
    __syncthreads();
    // Row r: each of its G threads folds the columns part, part + G, ... and the group combines by shuffles.
    float* srow = sS + r * LS;
    float mx = -INFINITY;
    for (int c = part; c < BN; c += G) mx = fmaxf(mx, srow[c]);
    const float m_new = fmaxf(m_i, group_max<G>(mx));
    const float shift = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing allowed yet: exp2 gives 0, not NaN
    const float alpha = exp2f(m_i - shift);
    float sum = 0.0f;
    for (int c = part; c < BN; c += G) {
      const float p = exp2f(srow[c] - shift);
      srow[c] = p;
      sum += p;
    }
    l_i = l_i * alpha + group_sum<G>(sum);
    m_i = m_new;
#pragma unroll
    for (int j = 0; j < C; ++j) acc[j] *= alpha;
    __syncthreads();  // P complete
    for (int c = 0; c < BN; ++c) {
      const float p = srow[c];
      const float* vrow = sV + c * D + part;
#pragma unroll
      for (int j = 0; j < C; ++j) acc[j] = fmaf(p, vrow[j * G], acc[j]);
    }
  }

  const int pos = m0 + r;
  if (pos < L.n) {
    // Only positions past n can end with l = 0 (the diagonal is always allowed); they are not stored.
    const float l_safe = l_i == 0.0f ? 1.0f : l_i, m_safe = m_i == -INFINITY ? 0.0f : m_i;
    const float inv = 1.0f / l_safe;
    const int64_t row = raster_row(pos, L);
    T* op = static_cast<T*>(a.out0) + b * a.out_sb + h * a.out_sh + row * a.out_sn + part;
#pragma unroll
    for (int j = 0; j < C; ++j) op[j * G] = from_f<T>(acc[j] * inv);
    if (part == 0) a.lse[bh * L.n + row] = (m_safe + log2f(l_safe)) * kLn2;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward on tensor cores, fp16/bf16: mma.sync m16n8k16 (fp32 accumulators), fragments from shared memory with
// ldmatrix, K/V tiles double-buffered with cp.async (tile i + 1 is in flight while tile i is computed). 4 warps x 16
// query rows = kMmaBM; BN keys per tile. Each thread holds two rows (g and g + 8 of its warp's 16) of S and O in the
// m16n8 accumulator layout (csrc/ptx.h); a row's statistics combine over the 4 lanes of a quad. P is rounded to the
// input dtype for the P V product (as the Triton kernels do); the sums stay fp32. Needs 16-byte aligned rows: the
// entry point checks pointers and strides.
constexpr int kMmaBM = 64;

template <int D>
struct MmaTile {
  static constexpr int LDT = D + 8;  // row stride (elements): 16-byte aligned rows, ldmatrix rows 4 banks apart
};

constexpr size_t mma_fwd_smem(size_t elem, size_t D, size_t BN) { return elem * (D + 8) * (kMmaBM + 4 * BN); }

// ROWS x D tile of T, rows by kernel position, into shared memory with cp.async (16 bytes per copy); positions
// past n are zero-filled (no bytes read).
template <typename T, int ROWS, int D>
__device__ __forceinline__ void stage_async(T* dst, const T* base, int64_t sn, int pos0, const Layout& L) {
  constexpr int kChunks = D / 8, LDT = MmaTile<D>::LDT;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8, pos = pos0 + r;
    const bool ok = pos < L.n;
    ptx::cp_async_16(dst + r * LDT + c, ok ? base + raster_row(pos, L) * sn + c : base, ok ? 16 : 0);
  }
}

// Two operands' tiles of the same rows (K and V, or Q and dO), as stage_async.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void stage_pair_async(T* dst0, T* dst1, const Tensor4& t0, const Tensor4& t1, int64_t b,
                                                 int64_t h, int pos0, const Layout& L) {
  stage_async<T, ROWS, D>(dst0, slice<T>(t0, b, h), t0.sn, pos0, L);
  stage_async<T, ROWS, D>(dst1, slice<T>(t1, b, h), t1.sn, pos0, L);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T v[2] = {from_f<T>(lo), from_f<T>(hi)};
  uint32_t r;
  memcpy(&r, v, sizeof(r));
  return r;
}

// lse (natural log) -> log2 domain, and delta, of BM rows from position pos0 into shared memory (0 past n).
__device__ __forceinline__ void stage_rows(float* s_lse2, float* s_delta, const Args& a, int64_t bh, int pos0, int rows) {
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    const int pos = pos0 + r;
    const bool ok = pos < a.L.n;
    const int64_t i = bh * a.L.n + (ok ? raster_row(pos, a.L) : 0);
    s_lse2[r] = ok ? a.lse[i] * kLog2e : 0.0f;
    s_delta[r] = ok ? a.delta[i] : 0.0f;
  }
}

// One warp: acc (16 x 8 NJ, fp32) = A B^T, A = 16 rows of a tile from a_rows, B = 8 NJ rows from b_rows (both row
// stride LDT, D columns): A fragments by ldmatrix x4, B fragments two 8-row chunks per ldmatrix x4 (rows of B are
// the columns of B^T, the col-major operand of mma .row.col).
template <typename T, int D, int NJ>
__device__ __forceinline__ void warp_abt(float (&acc)[NJ][4], const T* a_rows, const T* b_rows, int lane) {
  constexpr int LDT = MmaTile<D>::LDT;
#pragma unroll
  for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    ptx::ldmatrix<4>(af, a_rows + ((lane & 7) + 8 * ((lane >> 3) & 1)) * LDT + 16 * kk + 8 * (lane >> 4));
#pragma unroll
    for (int j = 0; j < NJ; j += 2) {
      uint32_t bf[4];
      ptx::ldmatrix<4>(bf, b_rows + (8 * (j + (lane >> 4)) + (lane & 7)) * LDT + 16 * kk + 8 * ((lane >> 3) & 1));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      ptx::mma_m16n8k16<T>(acc[j], af, b0, acc[j]);
      ptx::mma_m16n8k16<T>(acc[j + 1], af, b1, acc[j + 1]);
    }
  }
}

// One warp: out (16 x D, fp32) += P B, P = 16 x 8 NJ in the accumulator layout (rounded to T: the A fragments of
// 16-key steps are two accumulator chunks), B = 8 NJ rows x D of a row-major tile (read transposed by ldmatrix
// .trans, two 8-column chunks per x4).
template <typename T, int D, int NJ>
__device__ __forceinline__ void warp_pb(float (&out)[D / 8][4], const float (&p)[NJ][4], const T* b_rows, int lane) {
  constexpr int LDT = MmaTile<D>::LDT;
#pragma unroll
  for (int kk = 0; kk < NJ / 2; ++kk) {
    const uint32_t pa[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                            pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int d = 0; d < D / 8; d += 2) {
      uint32_t bf[4];
      ptx::ldmatrix<4, true>(bf, b_rows + (16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDT + 8 * (d + (lane >> 4)));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      ptx::mma_m16n8k16<T>(out[d], pa, b0, out[d]);
      ptx::mma_m16n8k16<T>(out[d + 1], pa, b1, out[d + 1]);
    }
  }
}

template <typename T, int D, int BN>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_fwd_mma_kernel(Args a) {
  constexpr int LDT = MmaTile<D>::LDT, KD = D / 16, NJ = BN / 8, ND = D / 8;
  extern __shared__ float smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kMmaBM * LDT;   // two buffers of BN rows
  T* sV = sK + 2 * BN * LDT;   // two buffers of BN rows

  const Layout L = a.L;
  const auto [bh, b, h] = batch_head(a.heads);
  const int mb = gridDim.y - 1 - blockIdx.y, m0 = mb * kMmaBM;
  const auto [lut, full, count] = table_row(a, mb);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;

  stage_async<T, kMmaBM, D>(sQ, slice<T>(a.q, b, h), a.q.sn, m0, L);
  if (count > 0) stage_pair_async<T, BN, D>(sK, sV, a.k, a.v, b, h, lut[0] * BN, L);
  ptx::cp_async_commit();

  uint32_t qf[KD][4];
  float o[ND][4];
#pragma unroll
  for (int d = 0; d < ND; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};  // l_i: this thread's share of the row sums
  const int row0 = m0 + 16 * warp + g;  // this thread's rows: row0 and row0 + 8

  for (int it = 0; it < count; ++it) {
    const int buf = it & 1, n0 = lut[it] * BN;
    if (it + 1 < count)  // the other buffer was released by the barrier that ended iteration it - 1
      stage_pair_async<T, BN, D>(sK + (buf ^ 1) * BN * LDT, sV + (buf ^ 1) * BN * LDT, a.k, a.v, b, h,
                                 lut[it + 1] * BN, L);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();  // everything but the newest group: Q and tile it have landed
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk)
        ptx::ldmatrix<4>(qf[kk], sQ + (16 * warp + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDT + 16 * kk + 8 * (lane >> 4));
    }
    const T* k_t = sK + buf * BN * LDT;
    const T* v_t = sV + buf * BN * LDT;

    // S = Q K^T: B fragments are rows of K (K^T column-major), two 8-key chunks per ldmatrix x4.
    float s[NJ][4];
#pragma unroll
    for (int j = 0; j < NJ; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
      for (int j = 0; j < NJ; j += 2) {
        uint32_t kb[4];
        ptx::ldmatrix<4>(kb, k_t + (8 * (j + (lane >> 4)) + (lane & 7)) * LDT + 16 * kk + 8 * ((lane >> 3) & 1));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        ptx::mma_m16n8k16<T>(s[j], qf[kk], b0, s[j]);
        ptx::mma_m16n8k16<T>(s[j + 1], qf[kk], b1, s[j + 1]);
      }
    }
    const bool is_full = full[it] != 0;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[j][e] * a.qk_scale;
        if (!is_full) {
          const int i = row0 + 8 * (e >> 1), jj = n0 + 8 * j + 2 * t4 + (e & 1);
          if (i >= L.n || jj >= L.n || !allowed(i, jj, L)) v = -INFINITY;
        }
        s[j][e] = v;
      }
    }
    // Online softmax per row (r = 0: row0, r = 1: row0 + 8); the max over the quad, the sum per thread.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < NJ; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      const float m_new = fmaxf(m_i[r], group_max<4>(mx));
      const float shift = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m_i[r] - shift);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - shift);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - shift);
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      l_i[r] = l_i[r] * alpha + sum;
      m_i[r] = m_new;
#pragma unroll
      for (int d = 0; d < ND; ++d) {
        o[d][2 * r] *= alpha;
        o[d][2 * r + 1] *= alpha;
      }
    }
    warp_pb<T, D, NJ>(o, s, v_t, lane);  // O += P V
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  ptx::cp_async_wait<0>();  // only empty groups can remain; nothing in flight at exit

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = group_sum<4>(l_i[r]);
    const int pos = row0 + 8 * r;
    if (pos >= L.n) continue;
    const float l_safe = l == 0.0f ? 1.0f : l, m_safe = m_i[r] == -INFINITY ? 0.0f : m_i[r];
    const float inv = 1.0f / l_safe;
    const int64_t row = raster_row(pos, L);
    T* op = static_cast<T*>(a.out0) + b * a.out_sb + h * a.out_sh + row * a.out_sn + 2 * t4;
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      op[8 * d] = from_f<T>(o[d][2 * r] * inv);
      op[8 * d + 1] = from_f<T>(o[d][2 * r + 1] * inv);
    }
    if (t4 == 0) a.lse[bh * L.n + row] = (m_safe + log2f(l_safe)) * kLn2;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward on tensor cores, fp16/bf16, 64 x 64 tiles (4 warps x 16 rows), the same products as the CUDA-core
// kernels below with P and dS rounded to the input dtype for the second product (as the Triton kernels do).
// Operand tiles double-buffered with cp.async; lse and delta of the tile's rows are plain loads.
constexpr int kMmaBwd = 64;

constexpr size_t mma_bwd_smem(size_t elem, size_t D) { return elem * (D + 8) * 6 * kMmaBwd + sizeof(float) * 2 * kMmaBwd; }

// dQ = scale * dS K over q_lut. Warp w: query rows m0 + 16 w + {g, g + 8}.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dq_mma_kernel(Args a) {
  constexpr int LDT = MmaTile<D>::LDT, NJ = kMmaBwd / 8, ND = D / 8, TILE = kMmaBwd * LDT;
  extern __shared__ float smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + TILE;
  T* sK = sdO + TILE;     // two buffers
  T* sV = sK + 2 * TILE;  // two buffers

  const Layout L = a.L;
  const auto [bh, b, h] = batch_head(a.heads);
  const int mb = gridDim.y - 1 - blockIdx.y, m0 = mb * kMmaBwd;
  const auto [lut, full, count] = table_row(a, mb);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  const int row0 = m0 + 16 * warp + g;

  stage_pair_async<T, kMmaBwd, D>(sQ, sdO, a.q, a.dout, b, h, m0, L);
  if (count > 0) stage_pair_async<T, kMmaBwd, D>(sK, sV, a.k, a.v, b, h, lut[0] * kMmaBwd, L);
  ptx::cp_async_commit();
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int pos = row0 + 8 * r;
    const int64_t i = bh * L.n + (pos < L.n ? raster_row(pos, L) : 0);
    lse2[r] = pos < L.n ? a.lse[i] * kLog2e : 0.0f;
    delta[r] = pos < L.n ? a.delta[i] : 0.0f;
  }
  float dq[ND][4];
#pragma unroll
  for (int d = 0; d < ND; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.0f;

  for (int it = 0; it < count; ++it) {
    const int buf = it & 1, n0 = lut[it] * kMmaBwd;
    if (it + 1 < count)
      stage_pair_async<T, kMmaBwd, D>(sK + (buf ^ 1) * TILE, sV + (buf ^ 1) * TILE, a.k, a.v, b, h,
                                      lut[it + 1] * kMmaBwd, L);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();
    __syncthreads();
    const T* k_t = sK + buf * TILE;
    float s[NJ][4], dp[NJ][4];
    warp_abt<T, D, NJ>(s, sQ + 16 * warp * LDT, k_t, lane);
    warp_abt<T, D, NJ>(dp, sdO + 16 * warp * LDT, sV + buf * TILE, lane);
    const bool is_full = full[it] != 0;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float v = s[j][e] * a.qk_scale;
        if (!is_full) {
          const int i = row0 + 8 * r, jj = n0 + 8 * j + 2 * t4 + (e & 1);
          if (i >= L.n || jj >= L.n || !allowed(i, jj, L)) v = -INFINITY;
        }
        // masked pairs exactly 0, also in a row whose lse is NaN (it attends a non-finite key or value)
        const float p = v == -INFINITY ? 0.0f : exp2f(v - lse2[r]);
        s[j][e] = p == 0.0f ? 0.0f : p * (dp[j][e] - delta[r]);  // dS
      }
    }
    warp_pb<T, D, NJ>(dq, s, k_t, lane);  // dQ += dS K
    __syncthreads();
  }
  ptx::cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int pos = row0 + 8 * r;
    if (pos >= L.n) continue;
    T* out = static_cast<T*>(a.out0) + b * a.out_sb + h * a.out_sh + raster_row(pos, L) * a.out_sn + 2 * t4;
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      out[8 * d] = from_f<T>(dq[d][2 * r] * a.scale);
      out[8 * d + 1] = from_f<T>(dq[d][2 * r + 1] * a.scale);
    }
  }
}

// dK = scale * dS^T Q and dV = P^T dO over k_lut, computed transposed: S^T = K Q^T and dP^T = V dO^T per warp of 16
// keys (n0 + 16 w + {g, g + 8}), so that P^T and dS^T are A operands in the accumulator layout. A query tile is
// taken in parts of QP queries (32 at head_dim 128: dK and dV already hold 128 fp32 registers per thread there).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dkdv_mma_kernel(Args a) {
  constexpr int LDT = MmaTile<D>::LDT, QP = D <= 64 ? kMmaBwd : 32, NJ = QP / 8, ND = D / 8, TILE = kMmaBwd * LDT;
  extern __shared__ float smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + TILE;
  T* sQ = sV + TILE;       // two buffers
  T* sdO = sQ + 2 * TILE;  // two buffers
  float* sLse = reinterpret_cast<float*>(sdO + 2 * TILE);
  float* sDelta = sLse + kMmaBwd;

  const Layout L = a.L;
  const auto [bh, b, h] = batch_head(a.heads);
  const int nb = blockIdx.y, n0 = nb * kMmaBwd;
  const auto [lut, full, count] = table_row(a, nb);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  const int key0 = n0 + 16 * warp + g;

  stage_pair_async<T, kMmaBwd, D>(sK, sV, a.k, a.v, b, h, n0, L);
  if (count > 0) stage_pair_async<T, kMmaBwd, D>(sQ, sdO, a.q, a.dout, b, h, lut[0] * kMmaBwd, L);
  ptx::cp_async_commit();
  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    dk[d][0] = dk[d][1] = dk[d][2] = dk[d][3] = 0.0f;
    dv[d][0] = dv[d][1] = dv[d][2] = dv[d][3] = 0.0f;
  }

  for (int it = 0; it < count; ++it) {
    const int buf = it & 1, m0 = lut[it] * kMmaBwd;
    if (it + 1 < count)
      stage_pair_async<T, kMmaBwd, D>(sQ + (buf ^ 1) * TILE, sdO + (buf ^ 1) * TILE, a.q, a.dout, b, h,
                                      lut[it + 1] * kMmaBwd, L);
    ptx::cp_async_commit();
    stage_rows(sLse, sDelta, a, bh, m0, kMmaBwd);  // released by the barrier that ended the previous iteration
    ptx::cp_async_wait<1>();
    __syncthreads();
    const bool is_full = full[it] != 0;
#pragma unroll 1
    for (int q0 = 0; q0 < kMmaBwd; q0 += QP) {
      const T* q_t = sQ + buf * TILE + q0 * LDT;
      const T* do_t = sdO + buf * TILE + q0 * LDT;
      float st[NJ][4], dpt[NJ][4];
      warp_abt<T, D, NJ>(st, sK + 16 * warp * LDT, q_t, lane);
      warp_abt<T, D, NJ>(dpt, sV + 16 * warp * LDT, do_t, lane);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qc = q0 + 8 * j + 2 * t4 + (e & 1);  // query column within the tile
          float v = st[j][e] * a.qk_scale;
          if (!is_full) {
            const int i = m0 + qc, jj = key0 + 8 * (e >> 1);
            if (i >= L.n || jj >= L.n || !allowed(i, jj, L)) v = -INFINITY;
          }
          const float p = v == -INFINITY ? 0.0f : exp2f(v - sLse[qc]);  // masked: 0 even where lse is NaN
          st[j][e] = p;                                                   // P^T
          dpt[j][e] = p == 0.0f ? 0.0f : p * (dpt[j][e] - sDelta[qc]);   // dS^T
        }
      }
      warp_pb<T, D, NJ>(dv, st, do_t, lane);  // dV += P^T dO
      warp_pb<T, D, NJ>(dk, dpt, q_t, lane);  // dK += dS^T Q
    }
    __syncthreads();
  }
  ptx::cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int pos = key0 + 8 * r;
    if (pos >= L.n) continue;
    const int64_t off = b * a.out_sb + h * a.out_sh + raster_row(pos, L) * a.out_sn + 2 * t4;
    T* dkp = static_cast<T*>(a.out0) + off;
    T* dvp = static_cast<T*>(a.out1) + off;
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      dkp[8 * d] = from_f<T>(dk[d][2 * r] * a.scale);
      dkp[8 * d + 1] = from_f<T>(dk[d][2 * r + 1] * a.scale);
      dvp[8 * d] = from_f<T>(dv[d][2 * r]);
      dvp[8 * d + 1] = from_f<T>(dv[d][2 * r + 1]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// delta = rowsum(dO * O) in fp32, one thread per raster row; grid (B * heads, ceil(n / kThreads)).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_delta_kernel(Args a) {
  const auto [bh, b, h] = batch_head(a.heads);
  const int row = blockIdx.y * kThreads + threadIdx.x;
  if (row >= a.L.n) return;
  const T* o = slice<T>(a.o, b, h) + int64_t(row) * a.o.sn;
  const T* d = slice<T>(a.dout, b, h) + int64_t(row) * a.dout.sn;
  float s = 0.0f;
  for (int c = 0; c < D; ++c) s = fmaf(to_f(o[c]), to_f(d[c]), s);
  a.delta[bh * a.L.n + row] = s;
}

// P and dS of one BM x BN tile: p = exp2(scale * q.k * log2e - lse2), dS = p * (dO.v - delta). Past n or where
// the mask forbids a pair, p = dS = 0 exactly, whatever the key, value or lse (NaN in a row that attends a
// non-finite key or value: the NaN stays on that row's allowed pairs).
template <int D>
__device__ __forceinline__ void probs_and_dscores(const float* q, const float* k, const float* v, const float* dout,
                                                  float lse2, float delta, int i, int j, bool full, const Args& a,
                                                  float* p_out, float* ds_out) {
  float s = dot_row<D>(q, k) * a.qk_scale;
  if (!full && (i >= a.L.n || j >= a.L.n || !allowed(i, j, a.L))) s = -INFINITY;
  const float p = s == -INFINITY ? 0.0f : exp2f(s - lse2);
  *p_out = p;
  *ds_out = p == 0.0f ? 0.0f : p * (dot_row<D>(dout, v) - delta);
}

// dQ: one query block over q_lut; grid (B * heads, query blocks), last first.
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dq_kernel(Args a) {
  using SM = Smem<D, BM, BN>;
  constexpr int LD = SM::LD, LS = SM::LS, G = kThreads / BM, C = D / G;
  extern __shared__ float smem[];
  float* sQ = smem;
  float* sdO = sQ + BM * LD;
  float* sK = sdO + BM * LD;
  float* sV = sK + BN * LD;
  float* sS = sV + BN * LD;
  float* sLse = sS + BM * LS;
  float* sDelta = sLse + BM;

  const Layout L = a.L;
  const auto [bh, b, h] = batch_head(a.heads);
  const int mb = gridDim.y - 1 - blockIdx.y, m0 = mb * BM;
  stage_pair<T, BM, D, LD>(sQ, sdO, a.q, a.dout, b, h, m0, L);
  stage_rows(sLse, sDelta, a, bh, m0, BM);

  const int tid = threadIdx.x, r = tid / G, part = tid % G;
  float acc[C];
#pragma unroll
  for (int j = 0; j < C; ++j) acc[j] = 0.0f;
  const auto [lut, full_tiles, count] = table_row(a, mb);
  for (int it = 0; it < count; ++it) {
    const int n0 = lut[it] * BN;
    const bool full = full_tiles[it] != 0;
    __syncthreads();
    stage_pair<T, BN, D, LD>(sK, sV, a.k, a.v, b, h, n0, L);
    __syncthreads();
    for (int idx = tid; idx < BM * BN; idx += kThreads) {
      const int rr = idx / BN, cc = idx % BN;
      float p;
      probs_and_dscores<D>(sQ + rr * LD, sK + cc * LD, sV + cc * LD, sdO + rr * LD, sLse[rr], sDelta[rr], m0 + rr,
                           n0 + cc, full, a, &p, &sS[rr * LS + cc]);
    }
    __syncthreads();
    const float* srow = sS + r * LS;
    for (int c = 0; c < BN; ++c) {
      const float ds = srow[c];
      const float* krow = sK + c * LD + part;
#pragma unroll
      for (int j = 0; j < C; ++j) acc[j] = fmaf(ds, krow[j * G], acc[j]);
    }
  }
  const int pos = m0 + r;
  if (pos < L.n) {
    T* dq = static_cast<T*>(a.out0) + b * a.out_sb + h * a.out_sh + raster_row(pos, L) * a.out_sn + part;
#pragma unroll
    for (int j = 0; j < C; ++j) dq[j * G] = from_f<T>(acc[j] * a.scale);
  }
}

// dK, dV: one key block over k_lut (the query blocks that see it); grid (B * heads, key blocks).
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dkdv_kernel(Args a) {
  using SM = Smem<D, BM, BN>;
  constexpr int LD = SM::LD, LS = SM::LS, G = kThreads / BN, C = D / G;
  extern __shared__ float smem[];
  float* sK = smem;
  float* sV = sK + BN * LD;
  float* sQ = sV + BN * LD;
  float* sdO = sQ + BM * LD;
  float* sP = sdO + BM * LD;
  float* sdS = sP + BM * LS;
  float* sLse = sdS + BM * LS;
  float* sDelta = sLse + BM;

  const Layout L = a.L;
  const auto [bh, b, h] = batch_head(a.heads);
  const int nb = blockIdx.y, n0 = nb * BN;
  stage_pair<T, BN, D, LD>(sK, sV, a.k, a.v, b, h, n0, L);

  const int tid = threadIdx.x, c = tid / G, part = tid % G;  // thread group of key row c
  float dk[C], dv[C];
#pragma unroll
  for (int j = 0; j < C; ++j) dk[j] = dv[j] = 0.0f;
  const auto [lut, full_tiles, count] = table_row(a, nb);
  for (int it = 0; it < count; ++it) {
    const int m0 = lut[it] * BM;
    const bool full = full_tiles[it] != 0;
    __syncthreads();
    stage_pair<T, BM, D, LD>(sQ, sdO, a.q, a.dout, b, h, m0, L);
    stage_rows(sLse, sDelta, a, bh, m0, BM);
    __syncthreads();
    for (int idx = tid; idx < BM * BN; idx += kThreads) {
      const int rr = idx / BN, cc = idx % BN;
      probs_and_dscores<D>(sQ + rr * LD, sK + cc * LD, sV + cc * LD, sdO + rr * LD, sLse[rr], sDelta[rr], m0 + rr,
                           n0 + cc, full, a, &sP[rr * LS + cc], &sdS[rr * LS + cc]);
    }
    __syncthreads();
    for (int rr = 0; rr < BM; ++rr) {
      const float p = sP[rr * LS + c], ds = sdS[rr * LS + c];
      const float* dorow = sdO + rr * LD + part;
      const float* qrow = sQ + rr * LD + part;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        dv[j] = fmaf(p, dorow[j * G], dv[j]);
        dk[j] = fmaf(ds, qrow[j * G], dk[j]);
      }
    }
  }
  const int pos = n0 + c;
  if (pos < L.n) {
    const int64_t off = b * a.out_sb + h * a.out_sh + raster_row(pos, L) * a.out_sn + part;
    T* dkp = static_cast<T*>(a.out0) + off;
    T* dvp = static_cast<T*>(a.out1) + off;
#pragma unroll
    for (int j = 0; j < C; ++j) {
      dkp[j * G] = from_f<T>(dk[j] * a.scale);
      dvp[j * G] = from_f<T>(dv[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: checks, then launches.
enum Kernel { kFwd = 0, kDq = 1, kDkdv = 2 };

template <typename K>
void launch_kernel(K kernel, dim3 grid, size_t smem, const Args& a, cudaStream_t stream) {
  // Above 48 KB of dynamic shared memory a kernel must opt in (the device's limit is checked by the launch).
  if (smem > 48 * 1024)
    DALLE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  DALLE_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int D, int B>
void launch_tile(Kernel which, dim3 grid, const Args& a, cudaStream_t stream) {
  switch (which) {
    case kFwd: return launch_kernel(attn_fwd_kernel<T, D, B, B>, grid, smem_fwd(D, B, B), a, stream);
    case kDq: return launch_kernel(attn_bwd_dq_kernel<T, D, B, B>, grid, smem_dq(D, B, B), a, stream);
    default: return launch_kernel(attn_bwd_dkdv_kernel<T, D, B, B>, grid, smem_dkdv(D, B, B), a, stream);
  }
}

// Tiles (BM = BN): 16 for every head_dim (the emulator's tests: several blocks at small sizes), 64 for head_dim
// <= 64 and 32 for 128 (the GPU's: dK/dV needs 2 x BN x D + 2 x BM x D + 2 x BM x BN fp32 values of shared memory).
bool tile_ok(int D, int block) { return block == 16 || (D <= 64 ? block == 64 : block == 32); }

// The tensor-core forward's tiles: kMmaBM x 64 (head_dim <= 64) or kMmaBM x 32 (128: O, S and Q fragments in
// registers without spilling).
int mma_bn(int D) { return D <= 64 ? 64 : 32; }

template <typename T, int D>
void launch_d(Kernel which, int block, dim3 grid, const Args& a, cudaStream_t stream) {
  if (block == 16) return launch_tile<T, D, 16>(which, grid, a, stream);
  if constexpr (D <= 64) launch_tile<T, D, 64>(which, grid, a, stream);
  else launch_tile<T, D, 32>(which, grid, a, stream);
}

template <typename T>
void launch_t(Kernel which, int D, int block, dim3 grid, const Args& a, cudaStream_t stream) {
  switch (D) {
    case 16: return launch_d<T, 16>(which, block, grid, a, stream);
    case 32: return launch_d<T, 32>(which, block, grid, a, stream);
    case 64: return launch_d<T, 64>(which, block, grid, a, stream);
    default: return launch_d<T, 128>(which, block, grid, a, stream);
  }
}

void launch(Kernel which, int dtype, int D, int block, dim3 grid, const Args& a, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return launch_t<float>(which, D, block, grid, a, stream);
    case kFloat16: return launch_t<__half>(which, D, block, grid, a, stream);
    default: return launch_t<__nv_bfloat16>(which, D, block, grid, a, stream);
  }
}

template <typename T, int D>
void launch_delta_d(dim3 grid, const Args& a, cudaStream_t stream) {
  attn_bwd_delta_kernel<T, D><<<grid, kThreads, 0, stream>>>(a);
}

template <typename T>
void launch_delta_t(int D, dim3 grid, const Args& a, cudaStream_t stream) {
  switch (D) {
    case 16: return launch_delta_d<T, 16>(grid, a, stream);
    case 32: return launch_delta_d<T, 32>(grid, a, stream);
    case 64: return launch_delta_d<T, 64>(grid, a, stream);
    default: return launch_delta_d<T, 128>(grid, a, stream);
  }
}

std::string str(int64_t v) { return std::to_string(v); }

// Everything the kernels assume, checked before any CUDA call. Strides are in elements.
struct Shape {
  int64_t batch, heads, n, head_dim;
  int T, H, W, kernel, mask, block_m, block_n, dtype, lut_rows, lut_w;
};

// Tensor cores: fp16/bf16 with the tensor-core kernels' tiles (forward kMmaBM x mma_bn, backward 64 x 64).
bool use_mma_fwd(const Shape& s) {
  return (s.dtype == kFloat16 || s.dtype == kBFloat16) && s.block_m == kMmaBM &&
         s.block_n == mma_bn(static_cast<int>(s.head_dim));
}
bool use_mma_bwd(const Shape& s) {
  return (s.dtype == kFloat16 || s.dtype == kBFloat16) && s.block_m == kMmaBwd && s.block_n == kMmaBwd;
}

// cp.async copies 16-byte chunks of rows: each operand's rows must start on 16-byte boundaries.
void check_rows_aligned(const char* op, std::initializer_list<Tensor4> ts) {
  bool ok = true;
  for (const Tensor4& t : ts)
    ok = ok && reinterpret_cast<uintptr_t>(t.p) % 16 == 0 && t.sb % 8 == 0 && t.sh % 8 == 0 && t.sn % 8 == 0;
  check_arg(ok, std::string(op) + ": the tensor-core kernels need 16-byte aligned operands with strides divisible "
                                  "by 8 elements (the launcher copies other inputs)");
}

template <typename T, int D>
void launch_mma_bwd_d(dim3 grid, const Args& dq_args, const Args& dkdv_args, cudaStream_t stream) {
  launch_kernel(attn_bwd_dq_mma_kernel<T, D>, grid, mma_bwd_smem(sizeof(T), D), dq_args, stream);
  launch_kernel(attn_bwd_dkdv_mma_kernel<T, D>, grid, mma_bwd_smem(sizeof(T), D), dkdv_args, stream);
}

template <typename T>
void launch_mma_bwd_t(int D, dim3 grid, const Args& dq_args, const Args& dkdv_args, cudaStream_t stream) {
  switch (D) {
    case 16: return launch_mma_bwd_d<T, 16>(grid, dq_args, dkdv_args, stream);
    case 32: return launch_mma_bwd_d<T, 32>(grid, dq_args, dkdv_args, stream);
    case 64: return launch_mma_bwd_d<T, 64>(grid, dq_args, dkdv_args, stream);
    default: return launch_mma_bwd_d<T, 128>(grid, dq_args, dkdv_args, stream);
  }
}

template <typename T, int D>
void launch_mma_d(dim3 grid, const Args& a, cudaStream_t stream) {
  constexpr int BN = D <= 64 ? 64 : 32;
  launch_kernel(attn_fwd_mma_kernel<T, D, BN>, grid, mma_fwd_smem(sizeof(T), D, BN), a, stream);
}

template <typename T>
void launch_mma_t(int D, dim3 grid, const Args& a, cudaStream_t stream) {
  switch (D) {
    case 16: return launch_mma_d<T, 16>(grid, a, stream);
    case 32: return launch_mma_d<T, 32>(grid, a, stream);
    case 64: return launch_mma_d<T, 64>(grid, a, stream);
    default: return launch_mma_d<T, 128>(grid, a, stream);
  }
}

void launch_mma(int dtype, int D, dim3 grid, const Args& a, cudaStream_t stream) {
  if (dtype == kFloat16) launch_mma_t<__half>(D, grid, a, stream);
  else launch_mma_t<__nv_bfloat16>(D, grid, a, stream);
}

void check_shape(const char* op, const Shape& s, bool mma) {
  const std::string p = std::string(op) + ": ";
  check_arg(s.dtype == kFloat32 || s.dtype == kFloat16 || s.dtype == kBFloat16,
            p + "dtype must be float32 (0), float16 (1) or bfloat16 (2), got " + str(s.dtype));
  check_arg(s.batch > 0 && s.heads > 0, p + "batch and heads must be positive, got " + str(s.batch) + ", " + str(s.heads));
  check_arg(s.batch * s.heads <= 2147483647LL, p + "batch * heads must be < 2**31 (grid x)");
  check_arg(s.head_dim == 16 || s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128,
            p + "head_dim must be 16, 32, 64 or 128, got " + str(s.head_dim));
  check_arg(s.mask >= kCausal && s.mask <= kAxialRow, p + "mask code must be in 0..6 (masks.MASK_CODES), got " + str(s.mask));
  check_arg(s.T >= 0 && s.H > 0 && s.W > 0, p + "text_len must be >= 0 and the grid positive, got T=" + str(s.T) +
                                                ", H=" + str(s.H) + ", W=" + str(s.W));
  check_arg(s.kernel > 0 && s.kernel % 2 == 1, p + "kernel must be a positive odd int, got " + str(s.kernel));
  check_arg(s.n == int64_t(s.T) + int64_t(s.H) * s.W,
            p + "n must equal text_len + H * W = " + str(int64_t(s.T) + int64_t(s.H) * s.W) + ", got " + str(s.n));
  check_arg(s.n < (int64_t(1) << 30), p + "n must be < 2**30, got " + str(s.n));
  const int D = static_cast<int>(s.head_dim);
  check_arg((s.block_m == s.block_n && tile_ok(D, s.block_m)) || mma,
            p + "tiles must be square with block 16, or 64 for head_dim <= 64 and 32 for head_dim 128 (or, for "
                "float16/bfloat16 on tensor cores, forward 64 x " + str(mma_bn(D)) + " and backward 64 x 64); got " +
                str(s.block_m) + " x " + str(s.block_n) + " for head_dim " + str(s.head_dim));
  const int64_t rows = (s.n + s.block_m - 1) / s.block_m, cols = (s.n + s.block_n - 1) / s.block_n;
  check_arg(rows <= 65535, p + "n / block_m must be <= 65535 blocks (grid y), got " + str(rows));
  check_arg(s.lut_rows == rows, p + "the lookup tables must have one row per block (" + str(rows) + "), got " +
                                    str(s.lut_rows));
  check_arg(s.lut_w >= 1 && s.lut_w <= cols,
            p + "the lookup table width must be in [1, " + str(cols) + "], got " + str(s.lut_w));
}

struct Pointer {
  uintptr_t ptr;
  const char* name;
};

void check_ptr(const char* op, const Pointer& p) {
  check_arg(p.ptr != 0, std::string(op) + ": " + p.name + ": null data pointer");
}

void check_strides(const char* op, const char* name, int64_t sb, int64_t sh, int64_t sn) {
  check_arg(sb >= 0 && sh >= 0 && sn >= 0,
            std::string(op) + ": " + name + " strides must be >= 0 (head_dim contiguous), got " + str(sb) + ", " +
                str(sh) + ", " + str(sn));
}

Args make_args(const Shape& s, double scale, uintptr_t lut, uintptr_t full, uintptr_t count) {
  Args a{};
  a.lut = reinterpret_cast<const int*>(lut);
  a.full = reinterpret_cast<const int*>(full);
  a.count = reinterpret_cast<const int*>(count);
  a.lut_w = s.lut_w;
  a.heads = static_cast<int>(s.heads);
  a.L = Layout{static_cast<int>(s.n), s.T, s.H, s.W, s.kernel / 2, s.mask};
  a.qk_scale = static_cast<float>(scale * 1.4426950408889634);
  a.scale = static_cast<float>(scale);
  return a;
}

Tensor4 tensor4(uintptr_t p, int64_t sb, int64_t sh, int64_t sn) { return Tensor4{reinterpret_cast<const void*>(p), sb, sh, sn}; }

void forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t lut, uintptr_t full,
             uintptr_t count, int64_t batch, int64_t heads, int64_t n, int64_t head_dim, int64_t sqb, int64_t sqh,
             int64_t sqn, int64_t skb, int64_t skh, int64_t skn, int64_t svb, int64_t svh, int64_t svn, int64_t sob,
             int64_t soh, int64_t son, int lut_rows, int lut_w, int mask, int text_len, int H, int W, int kernel,
             double scale, int block_m, int block_n, int dtype, uintptr_t stream) {
  const char* op = "attention_forward";
  const Shape s{batch, heads, n, head_dim, text_len, H, W, kernel, mask, block_m, block_n, dtype, lut_rows, lut_w};
  check_shape(op, s, use_mma_fwd(s));
  check_arg(scale > 0.0 && std::isfinite(scale), std::string(op) + ": scale must be positive and finite");
  const Pointer pointers[] = {{q, "q"}, {k, "k"}, {v, "v"}, {o, "o"}, {lse, "lse"}, {lut, "lut"}, {full, "full"},
                              {count, "count"}};
  for (const Pointer& ptr : pointers) check_ptr(op, ptr);
  check_strides(op, "q", sqb, sqh, sqn);
  check_strides(op, "k", skb, skh, skn);
  check_strides(op, "v", svb, svh, svn);
  check_strides(op, "o", sob, soh, son);
  Args a = make_args(s, scale, lut, full, count);
  a.q = tensor4(q, sqb, sqh, sqn);
  a.k = tensor4(k, skb, skh, skn);
  a.v = tensor4(v, svb, svh, svn);
  a.out0 = reinterpret_cast<void*>(o);
  a.out_sb = sob, a.out_sh = soh, a.out_sn = son;
  a.lse = reinterpret_cast<float*>(lse);
  const dim3 grid(static_cast<unsigned>(batch * heads), static_cast<unsigned>(lut_rows));
  auto st = reinterpret_cast<cudaStream_t>(stream);
  if (use_mma_fwd(s)) {
    check_rows_aligned(op, {a.q, a.k, a.v});
    launch_mma(dtype, static_cast<int>(head_dim), grid, a, st);
  } else {
    launch(kFwd, dtype, static_cast<int>(head_dim), block_m, grid, a, st);
  }
}

// Backward: delta, then dQ over the query-block tables, then dK and dV over the key-block tables. The tables are
// those of the forward (masks.block_tables with the same block): q_* for dQ, k_* for dK/dV. dk and dv share
// strides (sdb, sdh, sdn); dq has its own.
void backward(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t delta,
              uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t q_lut, uintptr_t q_full, uintptr_t q_count,
              uintptr_t k_lut, uintptr_t k_full, uintptr_t k_count, int64_t batch, int64_t heads, int64_t n,
              int64_t head_dim, int64_t sqb, int64_t sqh, int64_t sqn, int64_t skb, int64_t skh, int64_t skn,
              int64_t svb, int64_t svh, int64_t svn, int64_t sob, int64_t soh, int64_t son, int64_t sdob,
              int64_t sdoh, int64_t sdon, int64_t sdqb, int64_t sdqh, int64_t sdqn, int64_t sdb, int64_t sdh,
              int64_t sdn, int q_lut_w, int k_lut_w, int mask, int text_len, int H, int W, int kernel, double scale,
              int block, int dtype, uintptr_t stream) {
  const char* op = "attention_backward";
  const int64_t blocks = block > 0 ? (n + block - 1) / block : 0;
  const Shape s{batch, heads, n, head_dim, text_len, H, W, kernel, mask, block, block, dtype, static_cast<int>(blocks),
                q_lut_w};
  check_shape(op, s, use_mma_bwd(s));
  check_arg(k_lut_w >= 1 && k_lut_w <= blocks,
            std::string(op) + ": the key-block table width must be in [1, " + str(blocks) + "], got " + str(k_lut_w));
  check_arg(scale > 0.0 && std::isfinite(scale), std::string(op) + ": scale must be positive and finite");
  const Pointer pointers[] = {{dout, "dout"}, {q, "q"}, {k, "k"}, {v, "v"}, {o, "o"}, {lse, "lse"},
                              {delta, "delta"}, {dq, "dq"}, {dk, "dk"}, {dv, "dv"}, {q_lut, "q_lut"},
                              {q_full, "q_full"}, {q_count, "q_count"}, {k_lut, "k_lut"}, {k_full, "k_full"},
                              {k_count, "k_count"}};
  for (const Pointer& ptr : pointers) check_ptr(op, ptr);
  check_strides(op, "q", sqb, sqh, sqn);
  check_strides(op, "k", skb, skh, skn);
  check_strides(op, "v", svb, svh, svn);
  check_strides(op, "o", sob, soh, son);
  check_strides(op, "dout", sdob, sdoh, sdon);
  check_strides(op, "dq", sdqb, sdqh, sdqn);
  check_strides(op, "dk/dv", sdb, sdh, sdn);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  Args a = make_args(s, scale, q_lut, q_full, q_count);
  a.q = tensor4(q, sqb, sqh, sqn);
  a.k = tensor4(k, skb, skh, skn);
  a.v = tensor4(v, svb, svh, svn);
  a.o = tensor4(o, sob, soh, son);
  a.dout = tensor4(dout, sdob, sdoh, sdon);
  a.lse = reinterpret_cast<float*>(lse);
  a.delta = reinterpret_cast<float*>(delta);
  const bool mma = use_mma_bwd(s);
  if (mma) check_rows_aligned(op, {a.q, a.k, a.v, a.dout});
  const unsigned bh = static_cast<unsigned>(batch * heads);
  const dim3 grid_delta(bh, static_cast<unsigned>((n + kThreads - 1) / kThreads));
  switch (dtype) {
    case kFloat32: launch_delta_t<float>(static_cast<int>(head_dim), grid_delta, a, st); break;
    case kFloat16: launch_delta_t<__half>(static_cast<int>(head_dim), grid_delta, a, st); break;
    default: launch_delta_t<__nv_bfloat16>(static_cast<int>(head_dim), grid_delta, a, st); break;
  }
  DALLE_CUDA_CHECK(cudaGetLastError());
  const dim3 grid(bh, static_cast<unsigned>(blocks));
  Args dq_args = a;
  dq_args.out0 = reinterpret_cast<void*>(dq);
  dq_args.out_sb = sdqb, dq_args.out_sh = sdqh, dq_args.out_sn = sdqn;
  Args dkdv_args = a;
  dkdv_args.lut = reinterpret_cast<const int*>(k_lut);
  dkdv_args.full = reinterpret_cast<const int*>(k_full);
  dkdv_args.count = reinterpret_cast<const int*>(k_count);
  dkdv_args.lut_w = k_lut_w;
  dkdv_args.out0 = reinterpret_cast<void*>(dk);
  dkdv_args.out1 = reinterpret_cast<void*>(dv);
  dkdv_args.out_sb = sdb, dkdv_args.out_sh = sdh, dkdv_args.out_sn = sdn;
  const int D = static_cast<int>(head_dim);
  if (mma && dtype == kFloat16) {
    launch_mma_bwd_t<__half>(D, grid, dq_args, dkdv_args, st);
  } else if (mma) {
    launch_mma_bwd_t<__nv_bfloat16>(D, grid, dq_args, dkdv_args, st);
  } else {
    launch(kDq, dtype, D, block, grid, dq_args, st);
    launch(kDkdv, dtype, D, block, grid, dkdv_args, st);
  }
}

// Dynamic shared memory (bytes) one block of `kernel` (its name in csrc/attention.cu) takes at these sizes.
int64_t shared_bytes(const std::string& kernel, int dtype, int head_dim, int block_m, int block_n) {
  const size_t e = dtype == kFloat32 ? 4 : 2, D = head_dim;
  if (kernel == "attn_fwd_kernel") return smem_fwd(D, block_m, block_n);
  if (kernel == "attn_bwd_dq_kernel") return smem_dq(D, block_m, block_n);
  if (kernel == "attn_bwd_dkdv_kernel") return smem_dkdv(D, block_m, block_n);
  if (kernel == "attn_fwd_mma_kernel") return mma_fwd_smem(e, D, block_n);
  if (kernel == "attn_bwd_dq_mma_kernel" || kernel == "attn_bwd_dkdv_mma_kernel") return mma_bwd_smem(e, D);
  check_arg(kernel == "attn_bwd_delta_kernel", "attention_shared_bytes: unknown kernel " + kernel);
  return 0;
}

}  // namespace

void register_attention(pybind11::module_& m) {
  using pybind11::arg;
  m.def("attention_shared_bytes", &shared_bytes, arg("kernel"), arg("dtype"), arg("head_dim"), arg("block_m"),
        arg("block_n"), "Dynamic shared memory (bytes) per block of an attention kernel at these sizes.");
  m.def("attention_forward", &forward, arg("q"), arg("k"), arg("v"), arg("o"), arg("lse"), arg("lut"), arg("full"),
        arg("count"), arg("batch"), arg("heads"), arg("n"), arg("head_dim"), arg("stride_qb"), arg("stride_qh"),
        arg("stride_qn"), arg("stride_kb"), arg("stride_kh"), arg("stride_kn"), arg("stride_vb"), arg("stride_vh"),
        arg("stride_vn"), arg("stride_ob"), arg("stride_oh"), arg("stride_on"), arg("lut_rows"), arg("lut_w"),
        arg("mask"), arg("text_len"), arg("H"), arg("W"), arg("kernel"), arg("scale"), arg("block_m"), arg("block_n"),
        arg("dtype"), arg("stream"),
        "Block-sparse attention forward. Pointers to q, k, v, o (batch, heads, n, head_dim; strides in elements, "
        "head_dim contiguous), lse (batch * heads, n) fp32, and the int32 query-block tables lut/full (lut_rows, "
        "lut_w) and count (lut_rows) of masks.block_tables(mask, text_len, (H, W), kernel, block_m, block_n). "
        "float16/bfloat16 with 64 x 64 tiles (64 x 32 for head_dim 128) run on tensor cores (16-byte aligned rows "
        "needed); square tiles run the fp32 CUDA-core kernel.");
  m.def("attention_backward", &backward, arg("dout"), arg("q"), arg("k"), arg("v"), arg("o"), arg("lse"),
        arg("delta"), arg("dq"), arg("dk"), arg("dv"), arg("q_lut"), arg("q_full"), arg("q_count"), arg("k_lut"),
        arg("k_full"), arg("k_count"), arg("batch"), arg("heads"), arg("n"), arg("head_dim"), arg("stride_qb"),
        arg("stride_qh"), arg("stride_qn"), arg("stride_kb"), arg("stride_kh"), arg("stride_kn"), arg("stride_vb"),
        arg("stride_vh"), arg("stride_vn"), arg("stride_ob"), arg("stride_oh"), arg("stride_on"), arg("stride_dob"),
        arg("stride_doh"), arg("stride_don"), arg("stride_dqb"), arg("stride_dqh"), arg("stride_dqn"),
        arg("stride_db"), arg("stride_dh"), arg("stride_dn"), arg("q_lut_w"), arg("k_lut_w"), arg("mask"),
        arg("text_len"), arg("H"), arg("W"), arg("kernel"), arg("scale"), arg("block"), arg("dtype"), arg("stream"),
        "Block-sparse attention backward: writes delta (batch * heads, n) fp32 workspace, dq, dk, dv (dk and dv share "
        "the strides stride_d*) from dout, q, k, v, o, lse and both tables of the forward's block size.");
}

}  // namespace dalle
