// RMSNorm, RoPE and the softmax + top-k router on the device (see expert_kernels.h).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

namespace moepool::cuda {
namespace {

constexpr int kNormThreads = 256;

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
  for (int64_t i = threadIdx.x; i < d; i += kNormThreads) yr[i] = __fmul_rn(xr[i], scale) * w[i];
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

}  // namespace

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
