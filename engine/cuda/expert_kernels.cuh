// The kernels behind expert_kernels.h and the CUDA expert backend, in a header so that the host
// compiler can also run them under tests/engine/cuda/cuda_emulation.h (indexing and reduction
// checks on machines without a GPU). Included by the engine's .cu files; their launchers live
// there (ffn_kernels.cu, norm_rope.cu, attention_rows.cu, moe_ffn_cuda.cu).
//
// Kernel by kernel:
//   GateUpKernel<M, R>    silu(gate x) * up x, one warp per feature, R (1 or 8) activation rows,
//                         both matrices read in one pass (block_math.h parts, coalesced)
//   SiluMulKernel         h = silu(h) * u element-wise (the unfused path)
//   RmsNormKernel         one block per row, f64 sum of squares
//   RopeKernel            one thread per (head, pair)
//   RouteKernel           one thread per row (RouteRow)
//   AttentionTileKernel   causal attention of a batch, tiles of one sequence's rows per KV head,
//                         positions in fixed splits (online softmax); AttentionMergeKernel
//                         merges each query's splits
//   RopeRowsKernel        RoPE of a batch, each row at its own position
//   StoreKvRowsKernel     a batch's K/V rounded to half into its pool slots
//   AddInPlaceKernel      the residual add
//   GatherRowsKernel, ScaleToSlotsKernel, CombineSlotsKernel: the expert backend's dispatch and
//                         combine (products rounded to f32, added from 0 in slot order)
#ifndef MOEPOOL_ENGINE_CUDA_EXPERT_KERNELS_CUH_
#define MOEPOOL_ENGINE_CUDA_EXPERT_KERNELS_CUH_

#include <cmath>
#include <cstdint>

#include "engine/cuda/block_math.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

// Device-only helpers (plain inline functions under the host emulation).
#ifdef __CUDACC__
#define MOEPOOL_DEVICE __device__ __forceinline__
#else
#define MOEPOOL_DEVICE inline
#endif

namespace moepool::cuda {
// Internal linkage: each .cu file that includes this header gets its own copy of the kernels
// it launches (the non-template kernels would otherwise be defined in several objects).
namespace {

inline constexpr int kGateUpWarpsPerCta = 4;
inline constexpr int kFusedTileRows = 8;      // activation rows per warp in the fused kernel
inline constexpr int64_t kFusedMaxRows = 16;  // above this, two tiled mat-muls are faster

// kRows activation rows per warp: 1 for decode (fewer registers, more warps in flight), else
// kFusedTileRows.
template <class M, int kRows>
__global__ void __launch_bounds__(32 * kGateUpWarpsPerCta)
    GateUpKernel(const uint8_t* __restrict__ gate, const uint8_t* __restrict__ up, int64_t n_ff,
                 int64_t blocks_per_row, const float* __restrict__ x, int64_t n_embd, int64_t m,
                 float* __restrict__ h) {
  static_assert(32 % M::kParts == 0, "a warp covers whole blocks");
  constexpr int kBlocksPerStep = 32 / M::kParts;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGateUpWarpsPerCta + threadIdx.x / 32;
  if (row >= n_ff) return;  // whole warps leave together
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int nx = static_cast<int>(m - t0 < kRows ? m - t0 : kRows);
  const int part = lane % M::kParts;
  const size_t row_bytes = static_cast<size_t>(blocks_per_row) * M::kBlockBytes;
  const uint8_t* grow = gate + row * row_bytes;
  const uint8_t* urow = up + row * row_bytes;
  const float* xt = x + t0 * n_embd;
  float ag[kRows];
  float au[kRows];
  MOEPOOL_PRAGMA(unroll)
  for (int t = 0; t < kRows; ++t) ag[t] = au[t] = 0.0f;
  for (int64_t b = lane / M::kParts; b < blocks_per_row; b += kBlocksPerStep) {
    float g[M::kPartElems];
    float u[M::kPartElems];
    M::DequantPart(grow + b * M::kBlockBytes, part, g);
    M::DequantPart(urow + b * M::kBlockBytes, part, u);
    const float* xb = xt + b * M::kBlockElems;
    MOEPOOL_PRAGMA(unroll)
    for (int t = 0; t < kRows; ++t) {
      if (t < nx) {
        MOEPOOL_PRAGMA(unroll)
        for (int i = 0; i < M::kPartElems; ++i) {
          const float xv = __ldg(xb + t * n_embd + M::Element(part, i));
          ag[t] = fmaf(g[i], xv, ag[t]);
          au[t] = fmaf(u[i], xv, au[t]);
        }
      }
    }
  }
  MOEPOOL_PRAGMA(unroll)
  for (int t = 0; t < kRows; ++t) {
    if (t < nx) {
      float sg = ag[t];
      float su = au[t];
      MOEPOOL_PRAGMA(unroll)
      for (int offset = 16; offset > 0; offset /= 2) {
        sg += __shfl_xor_sync(0xffffffffu, sg, offset);
        su += __shfl_xor_sync(0xffffffffu, su, offset);
      }
      if (lane == 0) h[(t0 + t) * n_ff + row] = SiluMul(sg, su);
    }
  }
}

__global__ void SiluMulKernel(float* __restrict__ h, const float* __restrict__ u, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) h[i] = SiluMul(h[i], u[i]);
}

inline constexpr int kNormThreads = 256;

// One block per row. The sum of squares is accumulated in f64 like the CPU RmsNorm, so the
// scale almost always rounds to the same f32 (only the summation order differs).
__global__ void RmsNormKernel(const float* __restrict__ x, const float* __restrict__ w, int64_t d,
                              float eps, float* __restrict__ y) {
  __shared__ double partial[kNormThreads];
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * d;
  float* yr = y + static_cast<int64_t>(blockIdx.x) * d;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < d; i += kNormThreads) {
    sum += static_cast<double>(xr[i]) * xr[i];
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int step = kNormThreads / 2; step > 0; step /= 2) {
    if (static_cast<int>(threadIdx.x) < step) partial[threadIdx.x] += partial[threadIdx.x + step];
    __syncthreads();
  }
  const float mean = static_cast<float>(partial[0] / static_cast<double>(d));
  const float scale = 1.0f / sqrtf(mean + eps);
  for (int64_t i = threadIdx.x; i < d; i += kNormThreads) yr[i] = MulRn(xr[i], scale) * w[i];
}

// One thread per (head, pair).
__global__ void RopeKernel(float* x, int64_t n_heads, int64_t head_dim, int64_t n_pairs,
                           int64_t pos, float theta_scale) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n_heads * n_pairs) return;
  const int64_t h = t / n_pairs;
  const int64_t p = t % n_pairs;
  float* v = x + h * head_dim + 2 * p;
  RopeRotate(RopeTheta(pos, theta_scale, p), &v[0], &v[1]);
}

// One thread per row (n_expert is small: 8 for Mixtral).
__global__ void RouteKernel(const float* __restrict__ logits, int64_t n_rows, int n_expert, int k,
                            int32_t* __restrict__ expert, float* __restrict__ weight) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_rows) return;
  RouteRow(logits + r * n_expert, n_expert, k, expert + r * k, weight + r * k);
}

inline constexpr int kAttnTileThreads = 128;
inline constexpr int kAttnQueryElems = 4096;  // AttnMaxQueries(hd) * hd <= this
inline constexpr int kAttnKStride = 2;        // K rows padded by 2 halves: no bank conflicts
inline constexpr int kAttnKElems = kAttnQueryElems + 32 * kAttnKStride;
inline constexpr int kAttnMaxStep = 32;
inline constexpr int kAttnAccPerThread = kAttnQueryElems / kAttnTileThreads;

// Eight halves, for 16-byte loads of K/V rows.
struct alignas(16) Half8 {
  uint32_t w[4];
};

// Stages positions p0 .. p0 + np - 1 of KV head g: K rows at ks + i * ks_stride (padded), V rows
// at vs + i * hd. 16-byte loads when every row is 16-byte aligned (wide), else one half each;
// the same values either way.
MOEPOOL_DEVICE void StageKvStep(const KvDeviceView& kv, int64_t g, int64_t hd, int64_t p0, int np,
                                bool wide, uint16_t* ks, int64_t ks_stride, uint16_t* vs) {
  const int tid = static_cast<int>(threadIdx.x);
  if (wide) {
    const int64_t per_row = hd / 8;
    for (int64_t e = tid; e < np * per_row; e += kAttnTileThreads) {
      const int64_t i = e / per_row, c = (e % per_row) * 8;
      const Half8 k8 = *reinterpret_cast<const Half8*>(KvRowAt(kv.k, kv, p0 + i) + g * hd + c);
      const Half8 v8 = *reinterpret_cast<const Half8*>(KvRowAt(kv.v, kv, p0 + i) + g * hd + c);
      auto* kd = reinterpret_cast<uint32_t*>(ks + i * ks_stride + c);  // 4-byte aligned (padded)
      for (int j = 0; j < 4; ++j) kd[j] = k8.w[j];
      *reinterpret_cast<Half8*>(vs + i * hd + c) = v8;
    }
    return;
  }
  for (int64_t e = tid; e < np * hd; e += kAttnTileThreads) {
    const int64_t i = e / hd, d = e % hd;
    ks[i * ks_stride + d] = KvRowAt(kv.k, kv, p0 + i)[g * hd + d];
    vs[e] = KvRowAt(kv.v, kv, p0 + i)[g * hd + d];
  }
}

// Grid (n_head_kv, splits, tiles): block (g, s, t) attends the query heads of KV head g of the
// rows of tiles[t] over positions [s * kAttnSplit, (s + 1) * kAttnSplit) (each query only up to
// its own position) and writes each query's partial [head_dim accumulators, max, sum] for split
// s. Query qi of the tile is row first + qi / group, head g * group + qi % group. Per step the
// block loads AttnStepPositions(hd) positions of K and V once into shared memory; every thread
// then scores (query, position) pairs, one thread per query runs its softmax step and every
// thread advances the accumulators of the (query, dimension) elements it owns.
__global__ void __launch_bounds__(kAttnTileThreads)
    AttentionTileKernel(const float* __restrict__ q, const KvRowRef* __restrict__ rows,
                        const AttnTile* __restrict__ tiles, int64_t r0, int64_t layer,
                        int64_t n_head, int64_t group, int64_t hd, float scale, int64_t n_splits,
                        float* __restrict__ partial) {
  __shared__ float qs[kAttnQueryElems];
  __shared__ __align__(16) uint16_t ks[kAttnKElems];
  __shared__ __align__(16) uint16_t vs[kAttnQueryElems];
  __shared__ float ps[kAttnMaxStep * kAttnMaxStep];
  __shared__ float ms[kAttnMaxStep], ls[kAttnMaxStep], fs[kAttnMaxStep];
  const AttnTile tile = tiles[blockIdx.z];
  const int64_t g = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t last_pos = rows[tile.first + tile.count - 1].pos;
  const int64_t s0 = split * kAttnSplit;
  if (s0 > last_pos) return;  // the whole block leaves
  const int64_t s1 = last_pos + 1 < s0 + kAttnSplit ? last_pos + 1 : s0 + kAttnSplit;
  const int nq = static_cast<int>(tile.count * group);
  const int64_t step = AttnStepPositions(hd);
  const int64_t ks_stride = hd + kAttnKStride;
  const int64_t width = n_head * hd;
  const KvDeviceView kv = RowKvView(rows[tile.first], layer, (n_head / group) * hd);
  const bool wide = ((reinterpret_cast<uintptr_t>(kv.k) | reinterpret_cast<uintptr_t>(kv.v)) % 16 |
                     (kv.block_stride | kv.stride | static_cast<size_t>(hd)) % 8) == 0;
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t e = tid; e < nq * hd; e += kAttnTileThreads) {
    const int64_t qi = e / hd;
    qs[e] = q[(tile.first + qi / group) * width + (g * group + qi % group) * hd + e % hd];
  }
  if (tid < nq) {
    ms[tid] = -INFINITY;
    ls[tid] = 0.0f;
  }
  float acc[kAttnAccPerThread];
  MOEPOOL_PRAGMA(unroll)
  for (int k = 0; k < kAttnAccPerThread; ++k) acc[k] = 0.0f;
  __syncthreads();
  for (int64_t p0 = s0; p0 < s1; p0 += step) {
    const int np = static_cast<int>(s1 - p0 < step ? s1 - p0 : step);
    StageKvStep(kv, g, hd, p0, np, wide, ks, ks_stride, vs);
    __syncthreads();
    for (int e = tid; e < nq * np; e += kAttnTileThreads) {
      const int qi = e / np, i = e % np;
      const int64_t qpos = rows[tile.first + qi / group].pos;
      ps[qi * kAttnMaxStep + i] =
          p0 + i <= qpos ? AttnScore(qs + qi * hd, ks + i * ks_stride, hd, scale) : -INFINITY;
    }
    __syncthreads();
    if (tid < nq) fs[tid] = AttnSoftmaxStep(ps + tid * kAttnMaxStep, np, &ms[tid], &ls[tid]);
    __syncthreads();
    MOEPOOL_PRAGMA(unroll)
    for (int k = 0; k < kAttnAccPerThread; ++k) {
      const int64_t e = tid + k * kAttnTileThreads;
      if (e < nq * hd) {
        const int64_t qi = e / hd;
        acc[k] = AttnAccumulate(acc[k], fs[qi], ps + qi * kAttnMaxStep, vs + e % hd, hd, np);
      }
    }
    __syncthreads();  // the next step overwrites ks, vs and ps
  }
  MOEPOOL_PRAGMA(unroll)
  for (int k = 0; k < kAttnAccPerThread; ++k) {
    const int64_t e = tid + k * kAttnTileThreads;
    if (e >= nq * hd) continue;
    const int64_t qi = e / hd, d = e % hd;
    const int64_t row = tile.first + qi / group;
    if (rows[row].pos < s0) continue;  // this split is beyond the query: not merged
    float* out =
        partial + (((row - r0) * n_head + g * group + qi % group) * n_splits + split) * (hd + 2);
    out[d] = acc[k];
    if (d == 0) {
      out[hd] = ms[qi];
      out[hd + 1] = ls[qi];
    }
  }
}

// Grid (n_head, rows): block (h, r) merges the splits of query head h of row r0 + r into out.
__global__ void AttentionMergeKernel(const float* __restrict__ partial,
                                     const KvRowRef* __restrict__ rows, int64_t r0, int64_t n_head,
                                     int64_t hd, int64_t n_splits, float* __restrict__ out) {
  const int64_t h = blockIdx.x;
  const int64_t r = blockIdx.y;
  const int64_t splits = rows[r0 + r].pos / kAttnSplit + 1;
  const float* base = partial + (r * n_head + h) * n_splits * (hd + 2);
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    out[(r0 + r) * n_head * hd + h * hd + d] = AttnMerge(base, splits, hd, d);
  }
}

// Grid (pair tiles, n rows): one thread per (head, pair) of row blockIdx.y.
__global__ void RopeRowsKernel(float* x, int64_t row_stride, int64_t n_heads, int64_t head_dim,
                               int64_t n_pairs, const int64_t* __restrict__ pos,
                               float theta_scale) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n_heads * n_pairs) return;
  const int64_t r = blockIdx.y;
  float* v = x + r * row_stride + (t / n_pairs) * head_dim + 2 * (t % n_pairs);
  RopeRotate(RopeTheta(pos[r], theta_scale, t % n_pairs), &v[0], &v[1]);
}

// One block per row: its K and V rounded to half into its slot of the pool.
__global__ void StoreKvRowsKernel(const KvRowRef* __restrict__ rows, int64_t layer, int64_t kv_dim,
                                  const float* __restrict__ k, const float* __restrict__ v) {
  const int64_t r = blockIdx.x;
  const KvRowRef row = rows[r];
  const size_t at = RowKvOffset(row, layer, kv_dim);
  for (int64_t i = threadIdx.x; i < kv_dim; i += blockDim.x) {
    row.k[at + static_cast<size_t>(i)] = FloatToHalf(k[r * kv_dim + i]);
    row.v[at + static_cast<size_t>(i)] = FloatToHalf(v[r * kv_dim + i]);
  }
}

__global__ void AddInPlaceKernel(float* __restrict__ x, const float* __restrict__ y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = AddRn(x[i], y[i]);
}

__global__ void GatherRowsKernel(const float* __restrict__ x, const int32_t* __restrict__ rows,
                                 int64_t d, float* __restrict__ xg) {
  const int64_t i = blockIdx.x;
  const float* src = x + static_cast<int64_t>(rows[i]) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) xg[i * d + c] = src[c];
}

// slots[slot[i]] = weight[i] * y[i], the product rounded to f32 on its own (never fused).
__global__ void ScaleToSlotsKernel(const float* __restrict__ y, const int32_t* __restrict__ slot,
                                   const float* __restrict__ weight, int64_t d,
                                   float* __restrict__ slots) {
  const int64_t i = blockIdx.x;
  const float w = weight[i];
  float* dst = slots + static_cast<int64_t>(slot[i]) * d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = MulRn(w, y[i * d + c]);
}

// out[r] = ((0 + slot[r][0]) + slot[r][1]) + ... ; unused slots hold +0.0f, which leaves a sum
// that started at +0.0f unchanged.
__global__ void CombineSlotsKernel(const float* __restrict__ slots, int64_t n, int k, int64_t d,
                                   float* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n * d) return;
  const int64_t r = t / d;
  const int64_t c = t % d;
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) sum = AddRn(sum, slots[(r * k + j) * d + c]);
  out[t] = sum;
}

}  // namespace
}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_EXPERT_KERNELS_CUH_
