// Host side of the quantized matrix kernels (quant_matmul.cuh): argument checks, type dispatch and
// launches. See engine/cuda/cuda_ops.h for the contracts.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/cuda/block_math.h"
#include "engine/cuda/cuda_ops.h"
#include "engine/cuda/quant_matmul.cuh"

namespace moepool::cuda {
namespace {

cudaStream_t AsCuda(Stream stream) { return static_cast<cudaStream_t>(stream); }

absl::Status LaunchStatus(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, " launch failed: ", cudaGetErrorString(err)));
}

// Checks the arguments shared by every entry point; on success *blocks_per_row is set.
template <class M>
absl::Status CheckShape(TensorType type, const void* weights, int64_t rows, int64_t cols,
                        int64_t* blocks_per_row) {
  if (rows < 0 || cols <= 0 || cols % M::kBlockElems != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(GetTypeTraits(type).name, " weights of ", rows, " x ", cols,
                     ": rows must be >= 0 and cols a positive multiple of ", M::kBlockElems));
  }
  if (rows > 0 && weights == nullptr) return absl::InvalidArgumentError("null weights");
  *blocks_per_row = cols / M::kBlockElems;
  return absl::OkStatus();
}

absl::Status Unsupported(TensorType type) {
  return absl::UnimplementedError(
      absl::StrCat("no CUDA matrix kernel for weight type ", GetTypeTraits(type).name));
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class M>
absl::Status QuantMatMulTyped(TensorType type, const void* weights, int64_t rows, int64_t cols,
                              const float* x, int64_t x_stride, float* y, int64_t y_stride,
                              int64_t n, Stream stream, bool tensor_cores) {
  int64_t blocks_per_row = 0;
  const absl::Status shape = CheckShape<M>(type, weights, rows, cols, &blocks_per_row);
  if (!shape.ok()) return shape;
  if (n < 0 || x_stride < cols || y_stride < rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("QuantMatMul: n = ", n, ", x_stride = ", x_stride, " (cols ", cols,
                     "), y_stride = ", y_stride, " (rows ", rows, ")"));
  }
  if (n == 0 || rows == 0) return absl::OkStatus();
  if (x == nullptr || y == nullptr) {
    return absl::InvalidArgumentError("QuantMatMul: null activations or results");
  }
  const auto* w = static_cast<const uint8_t*>(weights);
  if (n <= kMaxVecRows) {
    const dim3 grid(static_cast<unsigned>(CeilDiv(rows, kVecWarpsPerCta)));
    MatVecKernel<M><<<grid, 32 * kVecWarpsPerCta, 0, AsCuda(stream)>>>(
        w, rows, blocks_per_row, x, x_stride, y, y_stride, static_cast<int>(n));
    return LaunchStatus("QuantMatVec");
  }
  const dim3 grid(static_cast<unsigned>(CeilDiv(rows, kMatTileW)),
                  static_cast<unsigned>(CeilDiv(n, kMatTileX)));
  if (tensor_cores) {
    MatMulTensorCoreKernel<M><<<grid, kMatThreads, 0, AsCuda(stream)>>>(w, rows, blocks_per_row, x,
                                                                        x_stride, y, y_stride, n);
    return LaunchStatus("QuantMatMulTensorCores");
  }
  MatMulKernel<M><<<grid, kMatThreads, 0, AsCuda(stream)>>>(w, rows, blocks_per_row, x, x_stride, y,
                                                            y_stride, n);
  return LaunchStatus("QuantMatMul");
}

template <class M>
absl::Status DequantizeRowsTyped(TensorType type, const void* weights, int64_t rows, int64_t cols,
                                 float* out, Stream stream) {
  int64_t blocks_per_row = 0;
  const absl::Status shape = CheckShape<M>(type, weights, rows, cols, &blocks_per_row);
  if (!shape.ok() || rows == 0) return shape;
  if (out == nullptr) return absl::InvalidArgumentError("DequantizeRows: null output");
  const int64_t total_parts = rows * blocks_per_row * M::kParts;
  constexpr int kThreads = 256;
  DequantizeKernel<M>
      <<<static_cast<unsigned>(CeilDiv(total_parts, kThreads)), kThreads, 0, AsCuda(stream)>>>(
          static_cast<const uint8_t*>(weights), total_parts, out);
  return LaunchStatus("DequantizeRows");
}

}  // namespace

bool QuantKernelSupports(TensorType type) {
  return DispatchBlockMath(type, [](auto) {});
}

absl::Status QuantMatVec(TensorType type, const void* weights, int64_t rows, int64_t cols,
                         const float* x, float* y, Stream stream) {
  return QuantMatMul(type, weights, rows, cols, x, cols, y, rows, 1, stream);
}

absl::Status QuantMatMul(TensorType type, const void* weights, int64_t rows, int64_t cols,
                         const float* x, int64_t x_stride, float* y, int64_t y_stride, int64_t n,
                         Stream stream) {
  absl::Status status;
  const bool known = DispatchBlockMath(type, [&](auto tag) {
    status.Update(QuantMatMulTyped<typename decltype(tag)::type>(
        type, weights, rows, cols, x, x_stride, y, y_stride, n, stream, /*tensor_cores=*/false));
  });
  return known ? status : Unsupported(type);
}

absl::Status QuantMatMulTensorCores(TensorType type, const void* weights, int64_t rows,
                                    int64_t cols, const float* x, int64_t x_stride, float* y,
                                    int64_t y_stride, int64_t n, Stream stream) {
  absl::Status status;
  const bool known = DispatchBlockMath(type, [&](auto tag) {
    status.Update(QuantMatMulTyped<typename decltype(tag)::type>(
        type, weights, rows, cols, x, x_stride, y, y_stride, n, stream, /*tensor_cores=*/true));
  });
  return known ? status : Unsupported(type);
}

absl::Status DequantizeRows(TensorType type, const void* weights, int64_t rows, int64_t cols,
                            float* out, Stream stream) {
  absl::Status status;
  const bool known = DispatchBlockMath(type, [&](auto tag) {
    status.Update(
        DequantizeRowsTyped<typename decltype(tag)::type>(type, weights, rows, cols, out, stream));
  });
  return known ? status : Unsupported(type);
}

}  // namespace moepool::cuda
