// The CUDA entry points of a build without the CUDA toolkit: every call reports it plainly.
#include "absl/status/status.h"
#include "engine/cuda/cuda_backend.h"

namespace moepool {
namespace {

absl::Status NoCuda() {
  return absl::FailedPreconditionError(
      "this moepool was built without CUDA (configure with -DMOEPOOL_CUDA=ON on a machine with "
      "the CUDA toolkit); use --device cpu");
}

}  // namespace

bool BuiltWithCuda() { return false; }

absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices() { return NoCuda(); }

absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCudaExpertBackend(const Model*,
                                                                       const CudaExpertOptions&) {
  return NoCuda();
}

}  // namespace moepool
