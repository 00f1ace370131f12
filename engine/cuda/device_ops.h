// The few device operations the device forward pass (device_attention.h) is written against:
// memory, copies and the kernels of expert_kernels.h / cuda_ops.h. One interface, two
// implementations: CUDA (device_ops_cuda.cu, CUDA builds only) and the scalar host reference
// (device_ops_ref.cc, every build), which runs the same orchestration on the CPU so that the
// tests check it everywhere, GPU or not. Plain C++, no CUDA headers.
//
// Pointers passed to the kernels are "device" pointers: memory from Allocate of the same ops
// (host memory for the reference). Work is queued in call order; Download returns after all
// queued work and the copy have finished.
// Errors: the kernels' (INVALID_ARGUMENT for shapes, UNIMPLEMENTED for a weight type without a
// kernel), RESOURCE_EXHAUSTED from Allocate when the device is full, INTERNAL for device faults.
// Threading: one caller at a time; Activate makes the device current on the calling thread and
// must be called first on every thread that uses the ops.
#ifndef MOEPOOL_ENGINE_CUDA_DEVICE_OPS_H_
#define MOEPOOL_ENGINE_CUDA_DEVICE_OPS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/cuda/expert_kernels.h"

namespace moepool::cuda {

// Device memory, freed when its last owner lets go.
using DeviceMemory = std::shared_ptr<void>;

class DeviceOps {
 public:
  virtual ~DeviceOps() = default;
  // "cuda:N" or "cpu-reference".
  virtual std::string name() const = 0;
  virtual absl::Status Activate() = 0;
  virtual absl::StatusOr<DeviceMemory> Allocate(size_t bytes) = 0;
  virtual absl::Status Upload(void* device_dst, const void* host_src, size_t bytes) = 0;
  virtual absl::Status Download(void* host_dst, const void* device_src, size_t bytes) = 0;

  // The kernels (see expert_kernels.h for each one's maths).
  virtual absl::Status RmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps,
                               float* y) = 0;
  // y [n x w.rows] = x [n x w.cols] w^T; each row's bits independent of the other rows.
  virtual absl::Status MatMul(const MatrixRef& w, const float* x, int64_t n, float* y) = 0;
  virtual absl::Status RopeRows(float* x, int64_t row_stride, int64_t n, int64_t n_heads,
                                int64_t head_dim, int64_t n_rot, float base,
                                const int64_t* pos) = 0;
  virtual absl::Status StoreKvRows(const KvRowRef* rows, int64_t n, int64_t layer, int64_t kv_dim,
                                   const float* k, const float* v) = 0;
  // LaunchAttentionTiles: the rows of tiles (batch rows r0 .. r0 + n_rows - 1), partial as
  // scratch of n_rows * n_head * n_splits * (head_dim + 2) floats.
  virtual absl::Status AttentionTiles(const float* q, const KvRowRef* rows, const AttnTile* tiles,
                                      int64_t n_tiles, int64_t r0, int64_t n_rows, int64_t layer,
                                      int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                                      float scale, int64_t n_splits, float* partial,
                                      float* out) = 0;
  virtual absl::Status AddInPlace(float* x, const float* y, int64_t n) = 0;
  virtual absl::Status RouteTopK(const float* logits, int64_t n_rows, int n_expert, int k,
                                 int32_t* expert, float* weight) = 0;
};

// The scalar host reference (Ref* of expert_kernels.h, QuantMatMulReference): never fails for
// lack of a device. memory_bytes plays the device's memory size: Allocate beyond it (counting
// what is still allocated) is RESOURCE_EXHAUSTED, as on a full GPU.
std::unique_ptr<DeviceOps> CreateReferenceDeviceOps(uint64_t memory_bytes = UINT64_MAX);

// CUDA device `ordinal` with a stream of its own. FAILED_PRECONDITION in a build without CUDA;
// the runtime's error when the device cannot be used.
absl::StatusOr<std::unique_ptr<DeviceOps>> CreateCudaDeviceOps(int ordinal);

}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_DEVICE_OPS_H_
