// A CUDA expert backend over experts that are already in device memory, for benchmarks and
// tests that build weights on the device without a GGUF file. The usual entry point is
// CreateCudaExpertBackend (cuda_backend.h), which uploads a Model's experts itself.
#ifndef MOEPOOL_ENGINE_CUDA_MOE_FFN_CUDA_H_
#define MOEPOOL_ENGINE_CUDA_MOE_FFN_CUDA_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/expert_backend.h"

namespace moepool {

// One expert's matrices as device pointers: gate, up [n_ff rows x n_embd], down [n_embd rows x
// n_ff]. gate.data == nullptr marks an expert that is not held.
struct DeviceExpert {
  cuda::MatrixRef gate, up, down;
};

struct DeviceResidentExperts {
  int device = 0;  // every matrix lives on this device
  int64_t n_embd = 0;
  int max_pairs_per_row = 2;                      // k the buffers are sized for (larger k: chunks)
  std::vector<std::vector<DeviceExpert>> layers;  // [layer][expert]
};

// The weights are borrowed (they must outlive the backend); options.devices is ignored (the
// device is experts.device); the buffers are allocated here. Errors as CreateCudaExpertBackend.
absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCudaExpertBackendOnDeviceExperts(
    const DeviceResidentExperts& experts, const CudaExpertOptions& options);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_CUDA_MOE_FFN_CUDA_H_
