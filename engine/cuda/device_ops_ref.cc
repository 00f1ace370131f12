// DeviceOps on host memory through the scalar references of the CUDA kernels (device_ops.h).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/cuda/device_ops.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"
#include "engine/cuda/quant_matmul_ref.h"

namespace moepool::cuda {
namespace {

class ReferenceDeviceOps : public DeviceOps {
 public:
  explicit ReferenceDeviceOps(uint64_t memory_bytes)
      : memory_bytes_(memory_bytes), used_(std::make_shared<std::atomic<uint64_t>>(0)) {}

  std::string name() const override { return "cpu-reference"; }
  absl::Status Activate() override { return absl::OkStatus(); }

  absl::StatusOr<DeviceMemory> Allocate(size_t bytes) override {
    const uint64_t used = used_->load();
    if (bytes > memory_bytes_ - std::min(used, memory_bytes_)) {
      return absl::ResourceExhaustedError(absl::StrCat("out of memory on ", name(), ": ", bytes,
                                                       " bytes requested, ", memory_bytes_ - used,
                                                       " free"));
    }
    used_->fetch_add(bytes);
    unsigned char* mem = new unsigned char[bytes > 0 ? bytes : 1]();
    std::shared_ptr<std::atomic<uint64_t>> used_count = used_;
    return DeviceMemory(mem, [used_count, bytes](void* p) {
      delete[] static_cast<unsigned char*>(p);
      used_count->fetch_sub(bytes);
    });
  }
  absl::Status Upload(void* device_dst, const void* host_src, size_t bytes) override {
    if (bytes > 0) std::memcpy(device_dst, host_src, bytes);
    return absl::OkStatus();
  }
  absl::Status Download(void* host_dst, const void* device_src, size_t bytes) override {
    if (bytes > 0) std::memcpy(host_dst, device_src, bytes);
    return absl::OkStatus();
  }

  absl::Status RmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps,
                       float* y) override {
    RefRmsNorm(x, w, n, d, eps, y);
    return absl::OkStatus();
  }
  absl::Status MatMul(const MatrixRef& w, const float* x, int64_t n, float* y) override {
    if (!BlockMathSupports(w.type)) {
      return absl::UnimplementedError(
          absl::StrCat("no kernel for weight type ", static_cast<uint32_t>(w.type)));
    }
    QuantMatMulReference(w.type, w.data, w.rows, w.cols, x, y, n);
    return absl::OkStatus();
  }
  absl::Status RopeRows(float* x, int64_t row_stride, int64_t n, int64_t n_heads, int64_t head_dim,
                        int64_t n_rot, float base, const int64_t* pos) override {
    if (n_rot % 2 != 0 || n_rot > head_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat("rope dimension ", n_rot, " must be even and <= head size ", head_dim));
    }
    RefRopeRows(x, row_stride, n, n_heads, head_dim, n_rot, base, pos);
    return absl::OkStatus();
  }
  absl::Status StoreKvRows(const KvRowRef* rows, int64_t n, int64_t layer, int64_t kv_dim,
                           const float* k, const float* v) override {
    RefStoreKvRows(rows, n, layer, kv_dim, k, v);
    return absl::OkStatus();
  }
  absl::Status AttentionTiles(const float* q, const KvRowRef* rows, const AttnTile* tiles,
                              int64_t n_tiles, int64_t r0, int64_t n_rows, int64_t layer,
                              int64_t n_head, int64_t n_head_kv, int64_t head_dim, float scale,
                              int64_t n_splits, float* partial, float* out) override {
    if (absl::Status s = CheckAttentionShape(n_head, n_head_kv, head_dim); !s.ok()) return s;
    RefAttentionTiles(q, rows, tiles, n_tiles, r0, n_rows, layer, n_head, n_head_kv, head_dim,
                      scale, n_splits, partial, out);
    return absl::OkStatus();
  }
  absl::Status AddInPlace(float* x, const float* y, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
    return absl::OkStatus();
  }
  absl::Status RouteTopK(const float* logits, int64_t n_rows, int n_expert, int k, int32_t* expert,
                         float* weight) override {
    if (n_expert < 1 || n_expert > kMaxRouted || k < 1 || k > n_expert) {
      return absl::InvalidArgumentError(
          absl::StrCat("router of ", n_expert, " experts, top-", k, " is not supported"));
    }
    RefRouteTopK(logits, n_rows, n_expert, k, expert, weight);
    return absl::OkStatus();
  }

 private:
  uint64_t memory_bytes_;
  // Shared with the deleters of the memory handed out (which may outlive the ops).
  std::shared_ptr<std::atomic<uint64_t>> used_;
};

}  // namespace

std::unique_ptr<DeviceOps> CreateReferenceDeviceOps(uint64_t memory_bytes) {
  return std::make_unique<ReferenceDeviceOps>(memory_bytes);
}

}  // namespace moepool::cuda
