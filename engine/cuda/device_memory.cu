// Device memory, streams and device properties for the CUDA kernels (engine/cuda/cuda_ops.h).
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/cuda/cuda_ops.h"

namespace moepool::cuda {
namespace {

cudaStream_t AsCuda(Stream stream) { return static_cast<cudaStream_t>(stream); }

absl::Status CudaError(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(err)));
}

absl::Status CheckRange(size_t offset, size_t bytes, size_t size, const char* what) {
  if (offset > size || bytes > size - offset) {
    return absl::InvalidArgumentError(absl::StrCat(what, " of ", bytes, " bytes at offset ", offset,
                                                   " exceeds the buffer of ", size));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status UseDevice(int ordinal) { return CudaError(cudaSetDevice(ordinal), "cudaSetDevice"); }

absl::Status SyncStream(Stream stream) {
  return CudaError(cudaStreamSynchronize(AsCuda(stream)), "cudaStreamSynchronize");
}

absl::StatusOr<DeviceStream> DeviceStream::Create() {
  cudaStream_t s = nullptr;
  absl::Status status =
      CudaError(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  if (!status.ok()) return status;
  DeviceStream out;
  out.stream_ = s;
  return out;
}

DeviceStream::DeviceStream(DeviceStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}

DeviceStream& DeviceStream::operator=(DeviceStream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) cudaStreamDestroy(AsCuda(stream_));
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

DeviceStream::~DeviceStream() {
  if (stream_ != nullptr) cudaStreamDestroy(AsCuda(stream_));
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer out;
  if (bytes == 0) return out;
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    if (err != cudaErrorMemoryAllocation) {
      return absl::UnavailableError(
          absl::StrCat("cudaMalloc of ", bytes, " bytes: ", cudaGetErrorString(err)));
    }
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) cudaGetLastError();
    return absl::ResourceExhaustedError(absl::StrCat(
        "cudaMalloc of ", bytes, " bytes (", free_bytes, " free): ", cudaGetErrorString(err)));
  }
  out.data_ = p;
  out.bytes_ = bytes;
  return out;
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) cudaFree(data_);
}

absl::Status DeviceBuffer::Upload(const void* host, size_t bytes, size_t offset, Stream stream) {
  const absl::Status range = CheckRange(offset, bytes, bytes_, "upload");
  if (!range.ok() || bytes == 0) return range;
  const absl::Status copy =
      CudaError(cudaMemcpyAsync(static_cast<char*>(data_) + offset, host, bytes,
                                cudaMemcpyHostToDevice, AsCuda(stream)),
                "upload");
  if (!copy.ok()) return copy;
  // The host buffer may be reused as soon as this returns.
  return SyncStream(stream);
}

absl::Status DeviceBuffer::Download(void* host, size_t bytes, size_t offset, Stream stream) const {
  const absl::Status range = CheckRange(offset, bytes, bytes_, "download");
  if (!range.ok() || bytes == 0) return range;
  const absl::Status copy =
      CudaError(cudaMemcpyAsync(host, static_cast<const char*>(data_) + offset, bytes,
                                cudaMemcpyDeviceToHost, AsCuda(stream)),
                "download");
  if (!copy.ok()) return copy;
  return SyncStream(stream);
}

absl::Status DeviceBuffer::Zero(Stream stream) {
  if (bytes_ == 0) return absl::OkStatus();
  return CudaError(cudaMemsetAsync(data_, 0, bytes_, AsCuda(stream)), "cudaMemset");
}

absl::StatusOr<DeviceProperties> CurrentDeviceProperties() {
  int ordinal = 0;
  const absl::Status got = CudaError(cudaGetDevice(&ordinal), "cudaGetDevice");
  if (!got.ok()) return got;
  cudaDeviceProp prop;
  const absl::Status props =
      CudaError(cudaGetDeviceProperties(&prop, ordinal), "cudaGetDeviceProperties");
  if (!props.ok()) return props;
  DeviceProperties out;
  out.ordinal = ordinal;
  out.sm_count = prop.multiProcessorCount;
  out.l2_bytes = prop.l2CacheSize;
  out.global_bytes = static_cast<int64_t>(prop.totalGlobalMem);
  return out;
}

}  // namespace moepool::cuda
