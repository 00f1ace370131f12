// RMSNorm, RoPE and the softmax + top-k router on the device (see expert_kernels.h).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/expert_kernels.cuh"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

namespace moepool::cuda {
absl::Status LaunchRmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps,
                           float* y, void* stream) {
  if (n <= 0 || d <= 0) return absl::OkStatus();
  RmsNormKernel<<<static_cast<unsigned>(n), kNormThreads, 0, AsStream(stream)>>>(x, w, d, eps, y);
  return LaunchStatus("RmsNormKernel");
}

absl::Status LaunchRope(float* x, int64_t n_heads, int64_t head_dim, int64_t n_rot, int64_t pos,
                        float base, void* stream) {
  if (n_rot % 2 != 0 || n_rot > head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("rope dimension ", n_rot, " must be even and <= head size ", head_dim));
  }
  const float theta_scale = std::pow(base, -2.0f / static_cast<float>(n_rot));
  const int64_t n = n_heads * (n_rot / 2);
  if (n == 0) return absl::OkStatus();
  RopeKernel<<<static_cast<unsigned>((n + 127) / 128), 128, 0, AsStream(stream)>>>(
      x, n_heads, head_dim, n_rot / 2, pos, theta_scale);
  return LaunchStatus("RopeKernel");
}

absl::Status LaunchRouteTopK(const float* logits, int64_t n_rows, int n_expert, int k,
                             int32_t* expert, float* weight, void* stream) {
  if (n_expert < 1 || n_expert > kMaxRouted || k < 1 || k > n_expert) {
    return absl::InvalidArgumentError(absl::StrCat("router of ", n_expert, " experts, top-", k,
                                                   ": needs 1 <= k <= n_expert <= ", kMaxRouted));
  }
  if (n_rows == 0) return absl::OkStatus();
  RouteKernel<<<static_cast<unsigned>((n_rows + 127) / 128), 128, 0, AsStream(stream)>>>(
      logits, n_rows, n_expert, k, expert, weight);
  return LaunchStatus("RouteKernel");
}

}  // namespace moepool::cuda
