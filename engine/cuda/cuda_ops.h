// Host API of the CUDA quantized matrix kernels (engine/cuda/quant_matmul.cu) and the device
// memory helpers they and the CUDA expert backend use. Plain C++: no CUDA types appear here, so
// .cc files include it without the toolkit. Only CUDA builds (MOEPOOL_HAVE_CUDA) implement it.
//
// Conventions for every function below:
// - Device pointers (`const void* weights`, `const float* x`, `float* y`) are pointers into
//   memory of the CURRENT device of the calling thread (see UseDevice); they are borrowed.
// - `Stream` is an opaque cudaStream_t; nullptr is the legacy default stream. Kernel launches are
//   asynchronous on that stream: the returned Status covers argument checks and launch errors;
//   faults during execution surface from the next synchronizing call (SyncStream, Download).
// - Weights are stored exactly as in the GGUF file: `rows` rows of `cols` elements, each row
//   RowBytes(type, cols) bytes, rows back to back (the engine's Tensor layout), 4-byte aligned for
//   F32 and 2-byte aligned otherwise (a cudaMalloc'd buffer plus whole rows is). `cols` must be a
//   multiple of the block size: 32 for Q4_0..Q8_0, 256 for the k-quants, and 32 for F32, F16 and
//   BF16 too (the kernels treat float rows as blocks of 32).
// - Activations and results are f32. The kernels dequantize weights in registers and accumulate
//   in f32 (no activation quantization), so results agree with the CPU engine (which quantizes
//   activations to q8 for quantized weights) within the per-type tolerances documented in
//   docs/gpu.md, not bit for bit.
// Threading: the functions are thread-safe; a DeviceBuffer is not (one owner at a time).
// Errors: INVALID_ARGUMENT for bad shapes or null pointers, UNIMPLEMENTED for a weight type without
// a kernel, INTERNAL / UNAVAILABLE / RESOURCE_EXHAUSTED carrying the CUDA error string otherwise.
#ifndef MOEPOOL_ENGINE_CUDA_CUDA_OPS_H_
#define MOEPOOL_ENGINE_CUDA_CUDA_OPS_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/quant/types.h"

namespace moepool::cuda {

// An opaque cudaStream_t (nullptr = default stream).
using Stream = void*;

// Makes `ordinal` the current device of the calling thread.
absl::Status UseDevice(int ordinal);

// Owns one cudaStream_t on the device current at creation (non-blocking w.r.t. the default
// stream). Move-only; destroying it destroys the stream (after pending work completes).
class DeviceStream {
 public:
  static absl::StatusOr<DeviceStream> Create();
  DeviceStream() = default;
  DeviceStream(DeviceStream&& other) noexcept;
  DeviceStream& operator=(DeviceStream&& other) noexcept;
  DeviceStream(const DeviceStream&) = delete;
  DeviceStream& operator=(const DeviceStream&) = delete;
  ~DeviceStream();

  Stream get() const { return stream_; }

 private:
  Stream stream_ = nullptr;
};

// Waits for all work queued on `stream`; returns the first asynchronous error.
absl::Status SyncStream(Stream stream);

// Owns `bytes` of device memory on the device current at allocation. Move-only; freed in the
// destructor. Upload/Download are ordered on `stream`; Download and Upload from pageable host
// memory return after the copy has finished, so `host` may be reused at once.
class DeviceBuffer {
 public:
  // RESOURCE_EXHAUSTED (naming bytes requested and free) when the device is full, UNAVAILABLE
  // when there is no usable device. Zero bytes gives an empty buffer without a CUDA call.
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  void* data() const { return data_; }
  float* floats() const { return static_cast<float*>(data_); }
  size_t bytes() const { return bytes_; }

  // Copies `bytes` from host memory into this buffer at `offset` (INVALID_ARGUMENT past the end).
  absl::Status Upload(const void* host, size_t bytes, size_t offset = 0, Stream stream = nullptr);
  // Copies `bytes` at `offset` of this buffer into host memory.
  absl::Status Download(void* host, size_t bytes, size_t offset = 0, Stream stream = nullptr) const;
  // Sets every byte to zero.
  absl::Status Zero(Stream stream = nullptr);

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// True when QuantMatVec / QuantMatMul / DequantizeRows have a kernel for `type` (every stored
// weight type: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).
bool QuantKernelSupports(TensorType type);

// Decode (one activation row): y[r] = sum_c W[r][c] * x[c] for r < rows.
//   weights: device, rows x RowBytes(type, cols) bytes
//   x:       device, [cols] f32
//   y:       device, [rows] f32 (overwritten)
// One warp per output row; each weight byte is read once, coalesced.
absl::Status QuantMatVec(TensorType type, const void* weights, int64_t rows, int64_t cols,
                         const float* x, float* y, Stream stream);

// Batch / prompt: Y[i][r] = sum_c W[r][c] * X[i][c] for i < n, r < rows.
//   x: device, n rows of [cols] f32, row i at x + i * x_stride (x_stride >= cols)
//   y: device, n rows of [rows] f32, row i at y + i * y_stride (y_stride >= rows; overwritten)
// Tiles of W are dequantized once into shared memory and reused for all n rows of X (f32 math;
// no tensor cores). n == 1 is routed to QuantMatVec. n == 0 is a no-op.
absl::Status QuantMatMul(TensorType type, const void* weights, int64_t rows, int64_t cols,
                         const float* x, int64_t x_stride, float* y, int64_t y_stride, int64_t n,
                         Stream stream);
// QuantMatMul with the n > 8 case on tensor cores (WMMA, sm_70 and later): the same tiles, but
// the dequantized weight tile and the activation tile are rounded to f16 (round to nearest) in
// shared memory and multiplied in 16x16x16 blocks with f32 accumulation. Faster for prompts;
// each product then carries the f16 rounding of both factors (within 2^-10 relative), so results
// agree with QuantMatMul within 2e-3 x sum |w_i x_i| (tested), and activations beyond the f16
// range (|x| > 65504) become infinite. n <= 8 takes the mat-vec kernel (no rounding).
absl::Status QuantMatMulTensorCores(TensorType type, const void* weights, int64_t rows,
                                    int64_t cols, const float* x, int64_t x_stride, float* y,
                                    int64_t y_stride, int64_t n, Stream stream);

// Dense X and Y (x_stride = cols, y_stride = rows).
inline absl::Status QuantMatMul(TensorType type, const void* weights, int64_t rows, int64_t cols,
                                const float* x, float* y, int64_t n, Stream stream) {
  return QuantMatMul(type, weights, rows, cols, x, cols, y, rows, n, stream);
}

// Dequantizes `rows` weight rows to f32: out[r][c] (device, rows x cols), bit-identical to the
// CPU's DequantizeRow (up to multiply-add contraction, within 1 ulp).
absl::Status DequantizeRows(TensorType type, const void* weights, int64_t rows, int64_t cols,
                            float* out, Stream stream);

// Properties the benchmark and the tests need.
struct DeviceProperties {
  int ordinal = 0;
  int sm_count = 0;
  int64_t l2_bytes = 0;
  int64_t global_bytes = 0;
};
absl::StatusOr<DeviceProperties> CurrentDeviceProperties();

}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_CUDA_OPS_H_
