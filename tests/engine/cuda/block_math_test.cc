// engine/cuda/block_math.h on the CPU: the per-block arithmetic the CUDA kernels run dequantizes
// bit-identically to the engine's dequantizers (engine/quant) and its dot products agree with the
// dot of the dequantized rows.
#include "engine/cuda/block_math.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "engine/cuda/quant_matmul_ref.h"
#include "engine/gguf.h"
#include "engine/quant/fp16.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"
#include "tests/engine/cuda/quant_test_util.h"
#include "tests/testdata.h"

namespace moepool::cuda {
namespace {

using ::moepool::testing::SharedTestdataPath;

// Number of elements whose bits differ, and a description of the first.
std::string CompareBits(const std::vector<float>& got, const std::vector<float>& want) {
  int64_t bad = 0;
  std::string first;
  for (size_t i = 0; i < got.size(); ++i) {
    if (Fp32ToBits(got[i]) != Fp32ToBits(want[i]) && bad++ == 0) {
      first = "first at " + std::to_string(i) + ": got " + std::to_string(got[i]) + " want " +
              std::to_string(want[i]);
    }
  }
  if (bad == 0) return "";
  return std::to_string(bad) + " of " + std::to_string(got.size()) + " differ; " + first;
}

std::vector<float> CpuDequantize(TensorType type, const void* w, int64_t rows, int64_t cols) {
  const TypeTraits& traits = GetTypeTraits(type);
  std::vector<float> out(static_cast<size_t>(rows * cols));
  const size_t row_bytes = RowBytes(type, cols);
  for (int64_t r = 0; r < rows; ++r) {
    traits.dequantize(static_cast<const uint8_t*>(w) + r * row_bytes, out.data() + r * cols, cols);
  }
  return out;
}

class BlockMathTypeTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(BlockMathTypeTest, PartsCoverEachElementOnceAndHalvesSplitAt128) {
  DispatchBlockMath(GetParam(), [&](auto tag) {
    using M = typename decltype(tag)::type;
    ASSERT_EQ(M::kParts * M::kPartElems, M::kBlockElems);
    const TypeTraits& traits = GetTypeTraits(GetParam());
    EXPECT_EQ(static_cast<size_t>(M::kBlockBytes) * traits.block_size,
              traits.block_bytes * M::kBlockElems);
    std::vector<int> seen(M::kBlockElems, 0);
    for (int p = 0; p < M::kParts; ++p) {
      for (int i = 0; i < M::kPartElems; ++i) {
        const int e = M::Element(p, i);
        ASSERT_GE(e, 0);
        ASSERT_LT(e, M::kBlockElems);
        ++seen[e];
        // The matmul kernel dequantizes 128-element chunks: part p lies in chunk
        // p * kPartElems / 128 of the block.
        if (M::kBlockElems > 128) {
          EXPECT_EQ(e / 128, p * M::kPartElems / 128) << p << " " << i;
        }
      }
    }
    for (int e = 0; e < M::kBlockElems; ++e) EXPECT_EQ(seen[e], 1) << "element " << e;
  });
}

TEST_P(BlockMathTypeTest, DequantizationBitIdenticalToEngineOnRandomBlocks) {
  const TensorType type = GetParam();
  for (uint32_t seed = 1; seed <= 4; ++seed) {
    const int64_t rows = 3, cols = 1024;
    const std::vector<uint8_t> w = RandomWeights(type, rows, cols, seed);
    std::vector<float> got(static_cast<size_t>(rows * cols));
    DequantizeRowsReference(type, w.data(), rows, cols, got.data());
    const std::string diff = CompareBits(got, CpuDequantize(type, w.data(), rows, cols));
    EXPECT_TRUE(diff.empty()) << "seed " << seed << ": " << diff;
  }
}

TEST_P(BlockMathTypeTest, DotProductsMatchDotOfDequantizedRows) {
  const TensorType type = GetParam();
  const int64_t rows = 16, cols = 2048, n = 3;
  const std::vector<uint8_t> w = RandomWeights(type, rows, cols, 7);
  const std::vector<float> x = RandomActivations(n, cols, 8);
  std::vector<float> y(static_cast<size_t>(n * rows));
  QuantMatMulReference(type, w.data(), rows, cols, x.data(), y.data(), n);
  const std::vector<float> dense = CpuDequantize(type, w.data(), rows, cols);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      const ExactDot want = DotF64(dense.data() + r * cols, x.data() + t * cols, cols);
      EXPECT_NEAR(y[t * rows + r], want.value, kF32AccumulationTolerance * want.abs_sum)
          << "row " << r << " of activation " << t;
    }
  }
  // The mat-vec reference is the n = 1 case.
  std::vector<float> y1(static_cast<size_t>(rows));
  QuantMatVecReference(type, w.data(), rows, cols, x.data(), y1.data());
  for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(y1[r], y[r]);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, BlockMathTypeTest, ::testing::ValuesIn(KernelTypes()),
                         [](const ::testing::TestParamInfo<TensorType>& info) {
                           return std::string(GetTypeTraits(info.param).name);
                         });

class BlockMathVectorsTest : public ::testing::TestWithParam<std::string> {};

TEST_P(BlockMathVectorsTest, DequantizationBitIdenticalToEngine) {
  const std::string path = SharedTestdataPath("conformance/quant-vectors.gguf");
  REQUIRE_TESTDATA(path);
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufTensorInfo* q = (*file)->FindTensor("q." + GetParam());
  ASSERT_NE(q, nullptr);
  ASSERT_TRUE(BlockMathSupports(q->type));
  const int64_t cols = q->dims[0];
  const int64_t rows = q->dims[1];
  std::vector<float> got(static_cast<size_t>(rows * cols));
  DequantizeRowsReference(q->type, q->data, rows, cols, got.data());
  const std::string diff = CompareBits(got, CpuDequantize(q->type, q->data, rows, cols));
  EXPECT_TRUE(diff.empty()) << diff;
}

INSTANTIATE_TEST_SUITE_P(AllTypes, BlockMathVectorsTest,
                         ::testing::Values("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1",
                                           "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"));

}  // namespace
}  // namespace moepool::cuda
