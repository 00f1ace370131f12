// CUDA runtime errors as absl::Status (internal to engine/cuda/*.cu).
#ifndef MOEPOOL_ENGINE_CUDA_CUDA_CHECK_CUH_
#define MOEPOOL_ENGINE_CUDA_CUDA_CHECK_CUH_

#include <cuda_runtime.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

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

// Owns one cudaMalloc allocation on the current device (freed on destruction; move-only).
class DeviceMem {
 public:
  DeviceMem() = default;
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  DeviceMem(DeviceMem&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceMem& operator=(DeviceMem&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      o.ptr_ = nullptr;
    }
    return *this;
  }
  ~DeviceMem() { Reset(); }

  absl::Status Allocate(size_t bytes) {
    Reset();
    if (bytes == 0) return absl::OkStatus();
    const cudaError_t err = cudaMalloc(&ptr_, bytes);
    if (err != cudaSuccess) {
      ptr_ = nullptr;
      return CudaStatus(err, "cudaMalloc");
    }
    bytes_ = bytes;
    return absl::OkStatus();
  }
  // Allocates and copies `bytes` from host memory.
  absl::Status Upload(const void* host, size_t bytes) {
    absl::Status s = Allocate(bytes);
    if (!s.ok() || bytes == 0) return s;
    return CudaStatus(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  void Reset() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace moepool::cuda

#define MOEPOOL_CUDA_RETURN_IF_ERROR(call)                                                \
  do {                                                                                    \
    const absl::Status moepool_cuda_status_ = ::moepool::cuda::CudaStatus((call), #call); \
    if (!moepool_cuda_status_.ok()) return moepool_cuda_status_;                          \
  } while (false)

#endif  // MOEPOOL_ENGINE_CUDA_CUDA_CHECK_CUH_
