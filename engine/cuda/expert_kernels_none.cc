// The CUDA kernel entry points of a build without the CUDA toolkit: each reports it plainly.
#include "engine/cuda/device_ops.h"
#include "engine/cuda/expert_kernels.h"

namespace moepool::cuda {
namespace {

absl::Status NoCuda() {
  return absl::FailedPreconditionError("this moepool was built without CUDA kernels");
}

}  // namespace

absl::Status LaunchExpertGateUp(const MatrixRef&, const MatrixRef&, const float*, int64_t, float*,
                                float*, bool, void*, bool) {
  return NoCuda();
}
absl::Status LaunchMatMulRows(const MatrixRef&, const float*, int64_t, float*, bool, void*, bool) {
  return NoCuda();
}
absl::Status LaunchRmsNorm(const float*, const float*, int64_t, int64_t, float, float*, void*) {
  return NoCuda();
}
absl::Status LaunchRope(float*, int64_t, int64_t, int64_t, int64_t, float, void*) {
  return NoCuda();
}
absl::Status LaunchRouteTopK(const float*, int64_t, int, int, int32_t*, float*, void*) {
  return NoCuda();
}
absl::Status LaunchRopeRows(float*, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                            const int64_t*, void*) {
  return NoCuda();
}
absl::Status LaunchStoreKvRows(const KvRowRef*, int64_t, int64_t, int64_t, const float*,
                               const float*, void*) {
  return NoCuda();
}
absl::Status LaunchAttentionTiles(const float*, const KvRowRef*, const AttnTile*, int64_t, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t,
                                  float*, float*, void*) {
  return NoCuda();
}
absl::Status LaunchAddInPlace(float*, const float*, int64_t, void*) { return NoCuda(); }
absl::StatusOr<std::unique_ptr<DeviceOps>> CreateCudaDeviceOps(int) { return NoCuda(); }
absl::Status RunExpertFfnOnDevice(int, const MatrixRef&, const MatrixRef&, const MatrixRef&,
                                  const float*, int64_t, float*) {
  return NoCuda();
}
absl::Status RunRmsNormOnDevice(int, const float*, const float*, int64_t, int64_t, float, float*) {
  return NoCuda();
}
absl::Status RunRopeOnDevice(int, float*, int64_t, int64_t, int64_t, int64_t, float) {
  return NoCuda();
}
absl::Status RunRouteTopKOnDevice(int, const float*, int64_t, int, int, int32_t*, float*) {
  return NoCuda();
}
absl::Status RunAttentionDecodeOnDevice(int, const float*, int64_t, int64_t, int64_t,
                                        const KvDeviceView&, int64_t, float, float*) {
  return NoCuda();
}

}  // namespace moepool::cuda
