// Launchers of the batched attention kernels of the device forward pass (expert_kernels.h):
// RoPE, K/V store and causal attention (tiled, split positions, merged) over a batch whose rows
// each have their own position and cache, and the residual add.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/expert_kernels.cuh"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"

namespace moepool::cuda {

absl::Status LaunchRopeRows(float* x, int64_t row_stride, int64_t n, int64_t n_heads,
                            int64_t head_dim, int64_t n_rot, float base, const int64_t* pos,
                            void* stream) {
  if (n_rot % 2 != 0 || n_rot > head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("rope dimension ", n_rot, " must be even and <= head size ", head_dim));
  }
  const float theta_scale = std::pow(base, -2.0f / static_cast<float>(n_rot));
  const int64_t per_row = n_heads * (n_rot / 2);
  if (n <= 0 || per_row == 0) return absl::OkStatus();
  // gridDim.y is limited to 65535 rows per launch.
  for (int64_t r0 = 0; r0 < n; r0 += 65535) {
    const int64_t m = std::min<int64_t>(65535, n - r0);
    const dim3 grid(static_cast<unsigned>((per_row + 127) / 128), static_cast<unsigned>(m));
    RopeRowsKernel<<<grid, 128, 0, AsStream(stream)>>>(x + r0 * row_stride, row_stride, n_heads,
                                                       head_dim, n_rot / 2, pos + r0, theta_scale);
    if (absl::Status s = LaunchStatus("RopeRowsKernel"); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status LaunchStoreKvRows(const KvRowRef* rows, int64_t n, int64_t layer, int64_t kv_dim,
                               const float* k, const float* v, void* stream) {
  if (n <= 0) return absl::OkStatus();
  StoreKvRowsKernel<<<static_cast<unsigned>(n), 128, 0, AsStream(stream)>>>(rows, layer, kv_dim, k,
                                                                            v);
  return LaunchStatus("StoreKvRowsKernel");
}

absl::Status LaunchAttentionTiles(const float* q, const KvRowRef* rows, const AttnTile* tiles,
                                  int64_t n_tiles, int64_t r0, int64_t n_rows, int64_t layer,
                                  int64_t n_head, int64_t n_head_kv, int64_t head_dim, float scale,
                                  int64_t n_splits, float* partial, float* out, void* stream) {
  if (absl::Status s = CheckAttentionShape(n_head, n_head_kv, head_dim); !s.ok()) return s;
  if (n_tiles <= 0 || n_rows <= 0) return absl::OkStatus();
  if (n_splits <= 0 || n_splits > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("attention over ", n_splits, " splits"));
  }
  const int64_t group = n_head / n_head_kv;
  // gridDim.z and gridDim.y are limited to 65535 per launch.
  for (int64_t t0 = 0; t0 < n_tiles; t0 += 65535) {
    const int64_t m = std::min<int64_t>(65535, n_tiles - t0);
    const dim3 grid(static_cast<unsigned>(n_head_kv), static_cast<unsigned>(n_splits),
                    static_cast<unsigned>(m));
    AttentionTileKernel<<<grid, kAttnTileThreads, 0, AsStream(stream)>>>(
        q, rows, tiles + t0, r0, layer, n_head, group, head_dim, scale, n_splits, partial);
    if (absl::Status s = LaunchStatus("AttentionTileKernel"); !s.ok()) return s;
  }
  for (int64_t b0 = 0; b0 < n_rows; b0 += 65535) {
    const int64_t m = std::min<int64_t>(65535, n_rows - b0);
    const dim3 grid(static_cast<unsigned>(n_head), static_cast<unsigned>(m));
    AttentionMergeKernel<<<grid, 128, 0, AsStream(stream)>>>(
        partial + b0 * n_head * n_splits * (head_dim + 2), rows, r0 + b0, n_head, head_dim,
        n_splits, out);
    if (absl::Status s = LaunchStatus("AttentionMergeKernel"); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status LaunchAddInPlace(float* x, const float* y, int64_t n, void* stream) {
  if (n <= 0) return absl::OkStatus();
  AddInPlaceKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, AsStream(stream)>>>(x, y, n);
  return LaunchStatus("AddInPlaceKernel");
}

}  // namespace moepool::cuda
