// The CUDA side of the engine as the rest of the program sees it: which devices exist, and an
// ExpertBackend whose experts live in GPU memory. Plain C++ (no CUDA headers), so callers build
// the same with or without the CUDA toolkit.
//
// Build: with CUDA (MOEPOOL_HAVE_CUDA, CMake option MOEPOOL_CUDA) these are implemented by the
// kernels in engine/cuda/*.cu; without it by engine/cuda/cuda_none.cc, which reports that this
// build has no CUDA (FAILED_PRECONDITION), so `--device cuda:0` is a clear error, never a crash.
#ifndef MOEPOOL_ENGINE_CUDA_CUDA_BACKEND_H_
#define MOEPOOL_ENGINE_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/expert_backend.h"
#include "engine/model.h"

namespace moepool {

// True when this binary was built with CUDA kernels.
bool BuiltWithCuda();

struct CudaDeviceInfo {
  int ordinal = 0;
  std::string name;
  int sm_major = 0;
  int sm_minor = 0;
  uint64_t total_bytes = 0;
  uint64_t free_bytes = 0;
};

// The CUDA devices of this machine. FAILED_PRECONDITION when built without CUDA, UNAVAILABLE
// when the driver reports no device (message says why). Thread-safe.
absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices();

// Where a process computes: "cpu", "cuda:N" or "cuda:all".
struct DeviceSpec {
  bool cuda = false;
  std::vector<int> ordinals;  // cuda:N -> {N}; cuda:all -> empty until resolved
  bool all = false;
  std::string ToString() const;
};
// Parses the --device flag; INVALID_ARGUMENT naming the text otherwise.
absl::StatusOr<DeviceSpec> ParseDeviceSpec(std::string_view text);
// Resolves cuda:all to the present devices and checks that every ordinal exists.
absl::StatusOr<DeviceSpec> ResolveDeviceSpec(const DeviceSpec& spec);

struct CudaExpertOptions {
  std::vector<int> devices = {0};         // experts are spread across these, balanced by bytes
  bool show_progress = true;              // upload progress bar on stderr
  int64_t max_rows = 512;                 // rows per Compute call the device buffers are sized for
  uint64_t reserve_bytes = 256ull << 20;  // left free on each device for buffers and the driver
  // Each row's result independent of the other rows of a Compute call (mat-vec kernels in
  // groups of 8 rows, like the CPU engine's batch invariance). false: experts with many rows use
  // the tiled mat-mul (faster prompts; a row's bits then depend on its expert's row count).
  bool batch_invariant = true;
  // With batch_invariant = false: experts with many rows multiply on tensor cores
  // (QuantMatMulTensorCores: f16 tiles, f32 sums; results within 2e-3 x sum |w x| of the f32
  // tiles). Off by default until it has run on a GPU (docs/gpu-backend.md).
  bool tensor_cores = false;
};

// Uploads every expert bound in `model` (once, by expert) to the devices and returns a backend
// that computes them there with the same contract as LocalExpertBackend (ascending expert id,
// products rounded to f32 before they are added). Results agree with the CPU engine within the
// per-type tolerances of the kernel tests, not bit for bit.
// Errors: FAILED_PRECONDITION without CUDA; UNAVAILABLE without a device; RESOURCE_EXHAUSTED
// naming device, bytes needed and bytes free when the experts do not fit; UNIMPLEMENTED for a
// weight type without a kernel. `model` is borrowed and must outlive the backend.
// Threading: Compute is not reentrant (like every ExpertBackend used by one forward pass).
absl::StatusOr<std::unique_ptr<ExpertBackend>> CreateCudaExpertBackend(
    const Model* model, const CudaExpertOptions& options);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_CUDA_CUDA_BACKEND_H_
