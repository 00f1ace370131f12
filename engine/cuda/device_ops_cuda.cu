// DeviceOps on a CUDA device (device_ops.h): one stream, the kernels of expert_kernels.h and
// cuda_ops.h queued on it, memory from DeviceBuffer.
#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_check.cuh"
#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/device_ops.h"
#include "engine/cuda/expert_kernels.h"

namespace moepool::cuda {
namespace {

class CudaDeviceOps : public DeviceOps {
 public:
  CudaDeviceOps(int ordinal, DeviceStream stream) : ordinal_(ordinal), stream_(std::move(stream)) {}

  std::string name() const override { return absl::StrCat("cuda:", ordinal_); }
  absl::Status Activate() override { return UseDevice(ordinal_); }

  absl::StatusOr<DeviceMemory> Allocate(size_t bytes) override {
    absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(bytes > 0 ? bytes : 1);
    if (!b.ok()) return b.status();
    auto owner = std::make_shared<DeviceBuffer>(std::move(*b));
    return DeviceMemory(owner, owner->data());
  }
  absl::Status Upload(void* device_dst, const void* host_src, size_t bytes) override {
    if (bytes == 0) return absl::OkStatus();
    MOEPOOL_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, stream()));
    return absl::OkStatus();
  }
  absl::Status Download(void* host_dst, const void* device_src, size_t bytes) override {
    if (bytes > 0) {
      MOEPOOL_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, stream()));
    }
    MOEPOOL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream()));
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps,
                       float* y) override {
    return LaunchRmsNorm(x, w, n, d, eps, y, stream_.get());
  }
  absl::Status MatMul(const MatrixRef& w, const float* x, int64_t n, float* y) override {
    return LaunchMatMulRows(w, x, n, y, /*batch_invariant=*/true, stream_.get());
  }
  absl::Status RopeRows(float* x, int64_t row_stride, int64_t n, int64_t n_heads, int64_t head_dim,
                        int64_t n_rot, float base, const int64_t* pos) override {
    return LaunchRopeRows(x, row_stride, n, n_heads, head_dim, n_rot, base, pos, stream_.get());
  }
  absl::Status StoreKvRows(const KvRowRef* rows, int64_t n, int64_t layer, int64_t kv_dim,
                           const float* k, const float* v) override {
    return LaunchStoreKvRows(rows, n, layer, kv_dim, k, v, stream_.get());
  }
  absl::Status AttentionTiles(const float* q, const KvRowRef* rows, const AttnTile* tiles,
                              int64_t n_tiles, int64_t r0, int64_t n_rows, int64_t layer,
                              int64_t n_head, int64_t n_head_kv, int64_t head_dim, float scale,
                              int64_t n_splits, float* partial, float* out) override {
    return LaunchAttentionTiles(q, rows, tiles, n_tiles, r0, n_rows, layer, n_head, n_head_kv,
                                head_dim, scale, n_splits, partial, out, stream_.get());
  }
  absl::Status AddInPlace(float* x, const float* y, int64_t n) override {
    return LaunchAddInPlace(x, y, n, stream_.get());
  }
  absl::Status RouteTopK(const float* logits, int64_t n_rows, int n_expert, int k, int32_t* expert,
                         float* weight) override {
    return LaunchRouteTopK(logits, n_rows, n_expert, k, expert, weight, stream_.get());
  }

 private:
  cudaStream_t stream() const { return AsStream(stream_.get()); }

  int ordinal_;
  DeviceStream stream_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceOps>> CreateCudaDeviceOps(int ordinal) {
  if (absl::Status s = UseDevice(ordinal); !s.ok()) return s;
  absl::StatusOr<DeviceStream> stream = DeviceStream::Create();
  if (!stream.ok()) return stream.status();
  return std::unique_ptr<DeviceOps>(new CudaDeviceOps(ordinal, std::move(*stream)));
}

}  // namespace moepool::cuda
