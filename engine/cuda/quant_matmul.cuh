// Kernels of the quantized matrix products (host API: engine/cuda/cuda_ops.h). Each kernel is a
// template over a block_math "math" struct M, so one source serves every weight type; the host
// references in quant_matmul_ref.h run the same per-block code on the CPU.
//
// Plain CUDA C++ without host-only constructs: tests/engine/cuda/kernel_emulation_test.cc also
// compiles these kernels with the host compiler against a thread-per-CUDA-thread emulation
// (tests/engine/cuda/cuda_emulation.h) to check their indexing where no GPU exists.
#ifndef MOEPOOL_ENGINE_CUDA_QUANT_MATMUL_CUH_
#define MOEPOOL_ENGINE_CUDA_QUANT_MATMUL_CUH_

#include <cstdint>

#include "engine/cuda/block_math.h"

#ifdef __CUDACC__
#include <mma.h>  // WMMA (tensor cores); the host emulation provides its own nvcuda::wmma
#endif

namespace moepool::cuda {

// ---- Mat-vec (decode): one warp per weight row, up to kMaxVecRows activation rows at once ----
inline constexpr int kMaxVecRows = 8;
inline constexpr int kVecWarpsPerCta = 4;

// y[t * y_stride + r] = dot(W row r, x + t * x_stride) for t < nx (<= kMaxVecRows). Lane l always
// unpacks part l % kParts of blocks l / kParts, l / kParts + 32 / kParts, ...: a warp reads
// 32 / kParts consecutive blocks per step (coalesced) and every weight byte once.
template <class M>
__global__ void __launch_bounds__(32 * kVecWarpsPerCta)
    MatVecKernel(const uint8_t* __restrict__ w, int64_t rows, int64_t blocks_per_row,
                 const float* __restrict__ x, int64_t x_stride, float* __restrict__ y,
                 int64_t y_stride, int nx) {
  static_assert(32 % M::kParts == 0, "a warp covers whole blocks");
  constexpr int kBlocksPerStep = 32 / M::kParts;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kVecWarpsPerCta + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together
  const int part = lane % M::kParts;
  const uint8_t* wrow = w + row * blocks_per_row * M::kBlockBytes;
  float acc[kMaxVecRows];
  MOEPOOL_PRAGMA(unroll)
  for (int t = 0; t < kMaxVecRows; ++t) acc[t] = 0.0f;
  MOEPOOL_PRAGMA(unroll 2)
  for (int64_t b = lane / M::kParts; b < blocks_per_row; b += kBlocksPerStep) {
    float v[M::kPartElems];
    M::DequantPart(wrow + b * M::kBlockBytes, part, v);
    const float* xb = x + b * M::kBlockElems;
    MOEPOOL_PRAGMA(unroll)
    for (int t = 0; t < kMaxVecRows; ++t) {
      if (t < nx) {
        MOEPOOL_PRAGMA(unroll)
        for (int i = 0; i < M::kPartElems; ++i) {
          acc[t] = fmaf(v[i], __ldg(xb + t * x_stride + M::Element(part, i)), acc[t]);
        }
      }
    }
  }
  MOEPOOL_PRAGMA(unroll)
  for (int t = 0; t < kMaxVecRows; ++t) {
    if (t < nx) {
      float s = acc[t];
      MOEPOOL_PRAGMA(unroll)
      for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (lane == 0) y[t * y_stride + row] = s;
    }
  }
}

// ---- Mat-mat (prompts, batches): a CTA computes a kMatTileW x kMatTileX tile of Y^T ----
inline constexpr int kMatTileW = 64;   // weight rows per CTA
inline constexpr int kMatTileX = 32;   // activation rows per CTA
inline constexpr int kMatChunk = 128;  // K elements per step (half a k-quant super-block)
inline constexpr int kMatThreads = 256;

#ifdef __CUDACC__
#define MOEPOOL_TILE_FN __device__ __forceinline__
#else
#define MOEPOOL_TILE_FN inline
#endif

// Hands every weight of the CTA's tile for K chunk k0 (rows r0 .. r0 + kMatTileW - 1, zeros
// outside the matrix) to store(tile row, k within the chunk, value): thread tid dequantizes parts
// of row r0 + tid % kMatTileW. Shared by the f32 and the tensor-core tile kernels.
template <class M, class Store>
MOEPOOL_TILE_FN void DequantizeWeightTile(const uint8_t* __restrict__ w, int64_t rows,
                                          int64_t blocks_per_row, int64_t r0, int64_t k0, int tid,
                                          Store store) {
  static_assert(kMatChunk % M::kPartElems == 0 && kMatThreads % kMatTileW == 0);
  static_assert(M::kBlockElems <= kMatChunk || M::kBlockElems == 2 * kMatChunk);
  constexpr int kPartsPerChunk = kMatChunk / M::kPartElems;
  constexpr int kSlotsPerPass = kMatThreads / kMatTileW;
  const int64_t parts_per_row = blocks_per_row * M::kParts;
  const int wr = tid % kMatTileW;
  const int64_t row = r0 + wr;
  const uint8_t* wrow = w + row * blocks_per_row * M::kBlockBytes;
  MOEPOOL_PRAGMA(unroll)
  for (int s = tid / kMatTileW; s < kPartsPerChunk; s += kSlotsPerPass) {
    const int64_t gp = k0 / M::kPartElems + s;  // part index within the row
    const int64_t b = gp / M::kParts;
    const int part = static_cast<int>(gp % M::kParts);
    float v[M::kPartElems];
    if (row < rows && gp < parts_per_row) {
      M::DequantPart(wrow + b * M::kBlockBytes, part, v);
    } else {
      MOEPOOL_PRAGMA(unroll)
      for (int i = 0; i < M::kPartElems; ++i) v[i] = 0.0f;
    }
    const int64_t base = b * M::kBlockElems - k0;  // chunk offset of the block's element 0
    MOEPOOL_PRAGMA(unroll)
    for (int i = 0; i < M::kPartElems; ++i)
      store(wr, static_cast<int>(base + M::Element(part, i)), v[i]);
  }
}

// Hands every activation of the CTA's tile for K chunk k0 (rows n0 .. n0 + kMatTileX - 1, zeros
// past n or cols) to store(tile row, k within the chunk, value).
template <class Store>
MOEPOOL_TILE_FN void LoadActivationTile(const float* __restrict__ x, int64_t x_stride, int64_t n,
                                        int64_t cols, int64_t n0, int64_t k0, int tid,
                                        Store store) {
  MOEPOOL_PRAGMA(unroll 4)
  for (int idx = tid; idx < kMatTileX * kMatChunk; idx += kMatThreads) {
    const int xr = idx / kMatChunk, k = idx % kMatChunk;
    const int64_t t = n0 + xr;
    store(xr, k, (t < n && k0 + k < cols) ? __ldg(x + t * x_stride + k0 + k) : 0.0f);
  }
}

// Per K chunk: the weight tile is dequantized once into shared memory (k-major, so the compute
// loop reads consecutive rows per lane) and the activation tile copied in; then thread (warp w,
// lane l) accumulates weight rows {l, l + 32} x activation rows {w, w + 8, w + 16, w + 24}.
// Shared memory: 32 KiB (weights) + 16 KiB (activations), f32 throughout.
template <class M>
__global__ void __launch_bounds__(kMatThreads)
    MatMulKernel(const uint8_t* __restrict__ w, int64_t rows, int64_t blocks_per_row,
                 const float* __restrict__ x, int64_t x_stride, float* __restrict__ y,
                 int64_t y_stride, int64_t n) {
  __shared__ float w_tile[kMatChunk][kMatTileW];
  __shared__ float x_tile[kMatTileX][kMatChunk];

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kMatTileW;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kMatTileX;
  const int64_t cols = blocks_per_row * M::kBlockElems;
  float acc[2][4] = {};

  for (int64_t k0 = 0; k0 < cols; k0 += kMatChunk) {
    DequantizeWeightTile<M>(w, rows, blocks_per_row, r0, k0, tid,
                            [&](int wr, int k, float v) { w_tile[k][wr] = v; });
    LoadActivationTile(x, x_stride, n, cols, n0, k0, tid,
                       [&](int xr, int k, float v) { x_tile[xr][k] = v; });
    __syncthreads();
    MOEPOOL_PRAGMA(unroll 8)
    for (int k = 0; k < kMatChunk; ++k) {
      const float w0 = w_tile[k][lane];
      const float w1 = w_tile[k][lane + 32];
      MOEPOOL_PRAGMA(unroll)
      for (int j = 0; j < 4; ++j) {
        const float xv = x_tile[warp + 8 * j][k];
        acc[0][j] = fmaf(w0, xv, acc[0][j]);
        acc[1][j] = fmaf(w1, xv, acc[1][j]);
      }
    }
    __syncthreads();
  }
  MOEPOOL_PRAGMA(unroll)
  for (int j = 0; j < 4; ++j) {
    const int64_t t = n0 + warp + 8 * j;
    if (t >= n) continue;
    MOEPOOL_PRAGMA(unroll)
    for (int i = 0; i < 2; ++i) {
      const int64_t r = r0 + lane + 32 * i;
      if (r < rows) y[t * y_stride + r] = acc[i][j];
    }
  }
}

// ---- Mat-mat on tensor cores (QuantMatMulTensorCores): MatMulKernel's tiles in f16 ----
// Same CTA tile (64 weight rows x 32 activation rows) and K chunks; the weight tile is
// dequantized and the activation tile converted to f16 (round to nearest) in shared memory, and
// the 8 warps each own one 16 x 16 block of the output: warp w takes activation rows
// 16 (w / 4) .. +15 and weight rows 16 (w % 4) .. +15, with eight 16x16x16 WMMA products per
// chunk accumulated in f32. Shared memory: 17 KiB + 8.5 KiB (f16 tiles, rows padded by 8 halves
// against bank conflicts, keeping WMMA's 32-byte alignment) + 8.5 KiB (the f32 result tile).
inline constexpr int kTcLd = kMatChunk + 8;     // halves per tile row
inline constexpr int kTcOutLd = kMatTileW + 4;  // floats per result row

template <class M>
__global__ void __launch_bounds__(kMatThreads)
    MatMulTensorCoreKernel(const uint8_t* __restrict__ w, int64_t rows, int64_t blocks_per_row,
                           const float* __restrict__ x, int64_t x_stride, float* __restrict__ y,
                           int64_t y_stride, int64_t n) {
  static_assert(kMatThreads / 32 == (kMatTileX / 16) * (kMatTileW / 16), "a warp per block");
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) __half w_tile[kMatTileW * kTcLd];  // [weight row][k]
  __shared__ __align__(32) __half x_tile[kMatTileX * kTcLd];  // [activation row][k]
  __shared__ __align__(32) float out_tile[kMatTileX * kTcOutLd];

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int xi = warp / (kMatTileW / 16), wi = warp % (kMatTileW / 16);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kMatTileW;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kMatTileX;
  const int64_t cols = blocks_per_row * M::kBlockElems;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);

  for (int64_t k0 = 0; k0 < cols; k0 += kMatChunk) {
    DequantizeWeightTile<M>(w, rows, blocks_per_row, r0, k0, tid, [&](int wr, int k, float v) {
      w_tile[wr * kTcLd + k] = __float2half(v);
    });
    LoadActivationTile(x, x_stride, n, cols, n0, k0, tid,
                       [&](int xr, int k, float v) { x_tile[xr * kTcLd + k] = __float2half(v); });
    __syncthreads();
    MOEPOOL_PRAGMA(unroll)
    for (int kk = 0; kk < kMatChunk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bt;
      wmma::load_matrix_sync(a, x_tile + xi * 16 * kTcLd + kk, kTcLd);
      wmma::load_matrix_sync(bt, w_tile + wi * 16 * kTcLd + kk, kTcLd);
      wmma::mma_sync(acc, a, bt, acc);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(out_tile + xi * 16 * kTcOutLd + wi * 16, acc, kTcOutLd,
                          wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < kMatTileX * kMatTileW; idx += kMatThreads) {
    const int xr = idx / kMatTileW, wr = idx % kMatTileW;
    const int64_t t = n0 + xr, r = r0 + wr;
    if (t < n && r < rows) y[t * y_stride + r] = out_tile[xr * kTcOutLd + wr];
  }
}

// ---- Dequantization: one thread per part ----
template <class M>
__global__ void DequantizeKernel(const uint8_t* __restrict__ w, int64_t total_parts,
                                 float* __restrict__ out) {
  const int64_t gp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gp >= total_parts) return;
  const int64_t b = gp / M::kParts;
  const int part = static_cast<int>(gp % M::kParts);
  float v[M::kPartElems];
  M::DequantPart(w + b * M::kBlockBytes, part, v);
  float* ob = out + b * M::kBlockElems;
  MOEPOOL_PRAGMA(unroll)
  for (int i = 0; i < M::kPartElems; ++i) ob[M::Element(part, i)] = v[i];
}

}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_QUANT_MATMUL_CUH_
