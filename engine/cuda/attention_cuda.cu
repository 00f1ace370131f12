// Decode attention over an f16 KV cache (see expert_kernels.h). One block per query head: the
// threads score positions in parallel, the block reduces max and sum, then each thread owns
// output dimensions and visits positions in ascending order (as the CPU reference does).
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/expert_kernels.cuh"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

namespace moepool::cuda {
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
