// Shared inputs and tolerances of the CUDA kernel tests (block_math_test, quant_matmul_test):
// random weight rows of every kernel type, activations, exact dot products and the CPU engine's
// own dot products (q8-quantized activations) with the tolerance their difference must meet.
#ifndef MOEPOOL_TESTS_ENGINE_CUDA_QUANT_TEST_UTIL_H_
#define MOEPOOL_TESTS_ENGINE_CUDA_QUANT_TEST_UTIL_H_

#include <cstdint>
#include <vector>

#include "engine/quant/types.h"

namespace moepool::cuda {

// Every type the CUDA kernels support (F32, F16, BF16, Q4_0 ... Q6_K).
std::vector<TensorType> KernelTypes();

// rows x cols weights of `type` (rows back to back): random quants, finite random scales.
std::vector<uint8_t> RandomWeights(TensorType type, int64_t rows, int64_t cols, uint32_t seed);
// n x cols standard-normal activations.
std::vector<float> RandomActivations(int64_t n, int64_t cols, uint32_t seed);

// Relative tolerance (to sum |w_i x_i|) of an f32-accumulated dot product against the exact one;
// covers any summation order for the row lengths tested (<= 16384).
inline constexpr double kF32AccumulationTolerance = 2e-5;
// The tensor-core kernel: both factors rounded to f16 (2^-11 relative each) before f32 sums.
inline constexpr double kF16TileTolerance = 2e-3;

struct ExactDot {
  double value = 0;    // sum w_i x_i in double
  double abs_sum = 0;  // sum |w_i x_i|
};
ExactDot DotF64(const float* w, const float* x, int64_t n);

// The CPU engine's result for Y = X W^T (X n x cols, Y n x rows): activations converted to the
// type's vec_dot_type, then the engine's vec_dot, exactly as engine/matmul does.
std::vector<float> EngineMatMul(TensorType type, const uint8_t* w, int64_t rows, int64_t cols,
                                const float* x, int64_t n);

// How far an f32-activation result may be from EngineMatMul for weight row `w_dense`
// (dequantized) and activation row x: 6 standard deviations of the activation rounding error of
// the vec_dot_type, plus its f16 scale rounding, plus f32 accumulation.
double EngineTolerance(TensorType type, const float* w_dense, const float* x, int64_t cols);

}  // namespace moepool::cuda

#endif  // MOEPOOL_TESTS_ENGINE_CUDA_QUANT_TEST_UTIL_H_
