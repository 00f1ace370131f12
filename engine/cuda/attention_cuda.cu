// Decode attention over an f16 KV cache (see expert_kernels.h). One block per query head: the
// threads score positions in parallel, the block reduces max and sum, then each thread owns
// output dimensions and visits positions in ascending order (as the CPU reference does).
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

namespace moepool::cuda {
namespace {

constexpr int kAttnThreads = 128;
constexpr int kMaxHeadDim = 512;

__device__ const uint16_t* KvRow(const uint16_t* base, const KvDeviceView& kv, int64_t p) {
  return base + static_cast<size_t>(kv.blocks[p / kv.block_size]) * kv.block_stride +
         static_cast<size_t>(p % kv.block_size) * kv.stride;
}

template <bool kMax>
__device__ float BlockReduce(float v, float* shared) {
  for (int off = 16; off > 0; off /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if ((threadIdx.x & 31) == 0) shared[warp] = v;
  __syncthreads();
  float r = shared[0];
  for (int i = 1; i < kAttnThreads / 32; ++i) r = kMax ? fmaxf(r, shared[i]) : r + shared[i];
  __syncthreads();
  return r;
}

__global__ void AttentionDecodeKernel(const float* __restrict__ q, int64_t group, int64_t hd,
                                      KvDeviceView kv, float scale, float* __restrict__ out,
                                      float* __restrict__ scratch) {
  __shared__ float qs[kMaxHeadDim];
  __shared__ float red[kAttnThreads / 32];
  const int64_t h = blockIdx.x;
  const int64_t kv_off = (h / group) * hd;
  for (int64_t i = threadIdx.x; i < hd; i += kAttnThreads) qs[i] = q[h * hd + i];
  __syncthreads();
  float* score = scratch + h * kv.n_kv;
  float mx = -INFINITY;
  for (int64_t p = threadIdx.x; p < kv.n_kv; p += kAttnThreads) {
    const uint16_t* k = KvRow(kv.k, kv, p) + kv_off;
    float dot = 0.0f;
    for (int64_t i = 0; i < hd; ++i) dot += qs[i] * HalfToFloat(k[i]);
    score[p] = dot * scale;
    mx = fmaxf(mx, score[p]);
  }
  mx = BlockReduce<true>(mx, red);
  float sum = 0.0f;
  for (int64_t p = threadIdx.x; p < kv.n_kv; p += kAttnThreads) {
    score[p] = expf(score[p] - mx);
    sum += score[p];
  }
  sum = BlockReduce<false>(sum, red);  // also orders the score writes before the reads below
  const float inv = 1.0f / sum;
  for (int64_t i = threadIdx.x; i < hd; i += kAttnThreads) {
    float o = 0.0f;
    for (int64_t p = 0; p < kv.n_kv; ++p) {
      o += score[p] * inv * HalfToFloat(KvRow(kv.v, kv, p)[kv_off + i]);
    }
    out[h * hd + i] = o;
  }
}

}  // namespace

absl::Status LaunchAttentionDecode(const float* q, int64_t n_head, int64_t n_head_kv,
                                   int64_t head_dim, const KvDeviceView& kv, float scale,
                                   float* out, float* scratch, void* stream) {
  if (n_head_kv <= 0 || n_head % n_head_kv != 0 || head_dim > kMaxHeadDim || kv.n_kv <= 0 ||
      kv.block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention of ", n_head, " heads over ",
                                                   n_head_kv, " KV heads of size ", head_dim,
                                                   " and ", kv.n_kv, " positions"));
  }
  AttentionDecodeKernel<<<static_cast<unsigned>(n_head), kAttnThreads, 0, AsStream(stream)>>>(
      q, n_head / n_head_kv, head_dim, kv, scale, out, scratch);
  return LaunchStatus("AttentionDecodeKernel");
}

}  // namespace moepool::cuda
