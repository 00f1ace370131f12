// CUDA runtime errors as absl::Status (internal to engine/cuda/*.cu).
#ifndef MOEPOOL_ENGINE_CUDA_CUDA_CHECK_CUH_
#define MOEPOOL_ENGINE_CUDA_CUDA_CHECK_CUH_

#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_ops.h"

namespace moepool::cuda {

// INTERNAL naming the failed call and the runtime's message; clears the (non-sticky) error.
inline absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

// The error of the last kernel launch, if any.
inline absl::Status LaunchStatus(const char* kernel) {
  return CudaStatus(cudaGetLastError(), kernel);
}

inline cudaStream_t AsStream(void* stream) { return static_cast<cudaStream_t>(stream); }

// *out = a new device buffer of `bytes` on the current device.
inline absl::Status AllocateInto(size_t bytes, DeviceBuffer* out) {
  absl::StatusOr<DeviceBuffer> b = DeviceBuffer::Allocate(bytes);
  if (!b.ok()) return b.status();
  *out = std::move(*b);
  return absl::OkStatus();
}

// *out = a new device buffer holding a copy of `bytes` of host memory.
inline absl::Status UploadInto(const void* host, size_t bytes, DeviceBuffer* out) {
  if (absl::Status s = AllocateInto(bytes, out); !s.ok()) return s;
  return out->Upload(host, bytes);
}

template <typename T>
T* Ptr(const DeviceBuffer& b) {
  return static_cast<T*>(b.data());
}

}  // namespace moepool::cuda

#define MOEPOOL_CUDA_RETURN_IF_ERROR(call)                                                \
  do {                                                                                    \
    const absl::Status moepool_cuda_status_ = ::moepool::cuda::CudaStatus((call), #call); \
    if (!moepool_cuda_status_.ok()) return moepool_cuda_status_;                          \
  } while (false)

#endif  // MOEPOOL_ENGINE_CUDA_CUDA_CHECK_CUH_
