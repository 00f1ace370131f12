// Scalar host references of the CUDA quantized matrix kernels (engine/cuda/cuda_ops.h), built from
// the same per-block arithmetic (engine/cuda/block_math.h) the kernels run, in plain C++. Always
// compiled (with or without CUDA) so the kernel tests have a CPU "device" to compare against.
// All pointers are host memory, borrowed; the functions are thread-safe. Shapes as in
// cuda_ops.h; `cols` must be a multiple of the type's block size (CHECK: programmer error).
#ifndef MOEPOOL_ENGINE_CUDA_QUANT_MATMUL_REF_H_
#define MOEPOOL_ENGINE_CUDA_QUANT_MATMUL_REF_H_

#include <cstdint>

#include "engine/quant/types.h"

namespace moepool::cuda {

// True when block_math has the arithmetic for `type` (the same set as QuantKernelSupports).
bool BlockMathSupports(TensorType type);

// y[r] = sum_c W[r][c] * x[c]: weights rows x RowBytes(type, cols), x [cols], y [rows].
// Per row: per-block f32 partial sums added in block order.
void QuantMatVecReference(TensorType type, const void* weights, int64_t rows, int64_t cols,
                          const float* x, float* y);

// Y[i][r] = sum_c W[r][c] * X[i][c]: X n x cols, Y n x rows (dense, row-major).
void QuantMatMulReference(TensorType type, const void* weights, int64_t rows, int64_t cols,
                          const float* x, float* y, int64_t n);

// out[r][c] = W[r][c] as f32 (rows x cols).
void DequantizeRowsReference(TensorType type, const void* weights, int64_t rows, int64_t cols,
                             float* out);

}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_QUANT_MATMUL_REF_H_
