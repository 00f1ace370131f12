// Host references of the CUDA quantized matrix kernels, from engine/cuda/block_math.h.
#include "engine/cuda/quant_matmul_ref.h"

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "engine/cuda/block_math.h"

namespace moepool::cuda {
namespace {

// A bad shape here is a bug in the caller (a test), not bad input.
template <class M>
void CheckCols(int64_t cols) {
  if (cols <= 0 || cols % M::kBlockElems != 0) std::abort();
}

}  // namespace

bool BlockMathSupports(TensorType type) {
  return DispatchBlockMath(type, [](auto) {});
}

void QuantMatVecReference(TensorType type, const void* weights, int64_t rows, int64_t cols,
                          const float* x, float* y) {
  QuantMatMulReference(type, weights, rows, cols, x, y, 1);
}

void QuantMatMulReference(TensorType type, const void* weights, int64_t rows, int64_t cols,
                          const float* x, float* y, int64_t n) {
  const bool known = DispatchBlockMath(type, [&](auto tag) {
    using M = typename decltype(tag)::type;
    CheckCols<M>(cols);
    const int64_t blocks = cols / M::kBlockElems;
    const auto* w = static_cast<const uint8_t*>(weights);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* row = w + r * blocks * M::kBlockBytes;
        float sum = 0.0f;
        for (int64_t b = 0; b < blocks; ++b) {
          sum += DotBlock<M>(row + b * M::kBlockBytes, x + t * cols + b * M::kBlockElems);
        }
        y[t * rows + r] = sum;
      }
    }
  });
  if (!known) std::abort();
}

void DequantizeRowsReference(TensorType type, const void* weights, int64_t rows, int64_t cols,
                             float* out) {
  const bool known = DispatchBlockMath(type, [&](auto tag) {
    using M = typename decltype(tag)::type;
    CheckCols<M>(cols);
    const int64_t blocks = rows * (cols / M::kBlockElems);
    const auto* w = static_cast<const uint8_t*>(weights);
    for (int64_t b = 0; b < blocks; ++b) {
      DequantBlock<M>(w + b * M::kBlockBytes, out + b * M::kBlockElems);
    }
  });
  if (!known) std::abort();
}

}  // namespace moepool::cuda
