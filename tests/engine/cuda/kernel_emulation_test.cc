// The CUDA kernels of engine/cuda/quant_matmul.cuh, compiled by the host compiler and run under
// the emulation of tests/engine/cuda/cuda_emulation.h: checks their indexing (parts, tiles, K
// tails, ragged rows and batches, strides, warp reductions) on every CI machine, GPU or not.
// Device numerics (intrinsics, FMA contraction) are covered by quant_matmul_test on a GPU.
// clang-format off
#include "tests/engine/cuda/cuda_emulation.h"
#include "engine/cuda/quant_matmul.cuh"
// clang-format on

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/cuda/block_math.h"
#include "engine/cuda/quant_matmul_ref.h"
#include "engine/quant/fp16.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"
#include "tests/engine/cuda/quant_test_util.h"

namespace moepool::cuda {
namespace {

using emulation::Dim3;
using emulation::Launch;

unsigned CeilDiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

class KernelEmulationTest : public ::testing::TestWithParam<TensorType> {
 protected:
  // Runs the mat-vec (n <= kMaxVecRows) or tiled kernel (f32 tiles, or the tensor-core one) on
  // strided X / Y and checks every result against the exact dot of the engine's dequantized
  // weights, and the padding of Y. The tensor-core kernel's f16 tiles round both factors.
  void CheckProduct(int64_t rows, int64_t cols, int64_t n, bool tensor_cores = false) {
    const TensorType type = GetParam();
    SCOPED_TRACE(std::string(GetTypeTraits(type).name) + " rows " + std::to_string(rows) +
                 " cols " + std::to_string(cols) + " n " + std::to_string(n));
    const int64_t x_stride = cols + 32, y_stride = rows + 3;
    const std::vector<uint8_t> w = RandomWeights(type, rows, cols, 11);
    const std::vector<float> x = RandomActivations(n, x_stride, 12);
    const float kUntouched = -777.0f;
    std::vector<float> y(static_cast<size_t>(n * y_stride), kUntouched);
    DispatchBlockMath(type, [&](auto tag) {
      using M = typename decltype(tag)::type;
      const int64_t bpr = cols / M::kBlockElems;
      if (n <= kMaxVecRows) {
        Launch(Dim3{CeilDiv(rows, kVecWarpsPerCta)}, Dim3{32 * kVecWarpsPerCta}, MatVecKernel<M>,
               w.data(), rows, bpr, x.data(), x_stride, y.data(), y_stride, static_cast<int>(n));
      } else if (tensor_cores) {
        Launch(Dim3{CeilDiv(rows, kMatTileW), CeilDiv(n, kMatTileX)}, Dim3{kMatThreads},
               MatMulTensorCoreKernel<M>, w.data(), rows, bpr, x.data(), x_stride, y.data(),
               y_stride, n);
      } else {
        Launch(Dim3{CeilDiv(rows, kMatTileW), CeilDiv(n, kMatTileX)}, Dim3{kMatThreads},
               MatMulKernel<M>, w.data(), rows, bpr, x.data(), x_stride, y.data(), y_stride, n);
      }
    });
    std::vector<float> dense(static_cast<size_t>(rows * cols));
    DequantizeRowsReference(type, w.data(), rows, cols, dense.data());
    int64_t bad = 0;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t r = 0; r < y_stride; ++r) {
        const float got = y[t * y_stride + r];
        if (r >= rows) {
          bad += got != kUntouched;
          continue;
        }
        const ExactDot want = DotF64(dense.data() + r * cols, x.data() + t * x_stride, cols);
        const double tolerance = tensor_cores ? kF16TileTolerance : kF32AccumulationTolerance;
        if (!(std::fabs(got - want.value) <= tolerance * want.abs_sum)) {
          if (bad == 0)
            ADD_FAILURE() << "t " << t << " row " << r << ": " << got << " vs " << want.value;
          ++bad;
        }
      }
    }
    EXPECT_EQ(bad, 0);
  }
};

TEST_P(KernelEmulationTest, MatVecKernel) {
  const bool small_blocks = GetTypeTraits(GetParam()).block_size < 256;
  CheckProduct(13, small_blocks ? 96 : 512, 1);
  CheckProduct(6, small_blocks ? 160 : 256, kMaxVecRows);
}

TEST_P(KernelEmulationTest, TiledMatMulKernel) {
  const bool small_blocks = GetTypeTraits(GetParam()).block_size < 256;
  CheckProduct(70, small_blocks ? 160 : 512, 35);
}

// The same shapes on the tensor-core kernel (WMMA emulated in cuda_emulation.h).
TEST_P(KernelEmulationTest, TensorCoreMatMulKernel) {
  const bool small_blocks = GetTypeTraits(GetParam()).block_size < 256;
  CheckProduct(70, small_blocks ? 160 : 512, 35, /*tensor_cores=*/true);
}

TEST_P(KernelEmulationTest, DequantizeKernelBitIdenticalToEngine) {
  const TensorType type = GetParam();
  const int64_t rows = 3, cols = 512;
  const std::vector<uint8_t> w = RandomWeights(type, rows, cols, 21);
  std::vector<float> got(static_cast<size_t>(rows * cols), -1.0f);
  DispatchBlockMath(type, [&](auto tag) {
    using M = typename decltype(tag)::type;
    const int64_t parts = rows * (cols / M::kBlockElems) * M::kParts;
    Launch(Dim3{CeilDiv(parts, 64)}, Dim3{64}, DequantizeKernel<M>, w.data(), parts, got.data());
  });
  std::vector<float> want(got.size());
  const size_t row_bytes = RowBytes(type, cols);
  for (int64_t r = 0; r < rows; ++r) {
    GetTypeTraits(type).dequantize(w.data() + r * row_bytes, want.data() + r * cols, cols);
  }
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += Fp32ToBits(got[i]) != Fp32ToBits(want[i]);
  EXPECT_EQ(bad, 0);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, KernelEmulationTest, ::testing::ValuesIn(KernelTypes()),
                         [](const ::testing::TestParamInfo<TensorType>& info) {
                           return std::string(GetTypeTraits(info.param).name);
                         });

}  // namespace
}  // namespace moepool::cuda
