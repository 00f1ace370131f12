// Q8_0 / Q8_1 / Q8_K quantizers: the reference rounding rules, block sums, degenerate blocks,
// bit-identical AVX2 versions, and Q8_0 weights matching the reference quantizer's blocks.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "engine/quant/fp16.h"
#include "engine/quant/kernels.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::SharedTestdataPath;

constexpr int64_t kRow = 8 * kQK_K;

// Rows that exercise the edge cases of all three formats, each kRow long.
std::vector<std::vector<float>> EdgeCaseRows() {
  std::vector<std::vector<float>> rows;
  std::mt19937 rng(77);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (float sigma : {1.0f, 1e-3f, 3e3f}) {
    std::vector<float> r(kRow);
    for (float& v : r) v = sigma * gauss(rng);
    rows.push_back(r);
  }
  // Zero blocks, one lone nonzero, huge and tiny magnitudes, exact ties.
  std::vector<float> r(kRow, 0.0f);
  r[kQK_K + 5] = -2.0f;                                      // lone value in a Q8_K block
  for (int j = 0; j < 32; ++j) r[2 * kQK_K + j] = 6e4f - j;  // near the half range
  for (int j = 0; j < 32; ++j) r[2 * kQK_K + 32 + j] = 1e-30f * (j - 16);   // d underflows half
  for (int j = 0; j < 32; ++j) r[2 * kQK_K + 64 + j] = 1e7f * (j % 3 - 1);  // d overflows half
  // Block with amax 127: x * (1 / d) hits exact halves.
  for (int j = 0; j < kQK_K; ++j) r[3 * kQK_K + j] = j == 0 ? 127.0f : (j % 64) - 31.5f;
  // Q8_K block where +max and -max both occur: the first one decides the sign of d.
  for (int j = 0; j < kQK_K; ++j) r[4 * kQK_K + j] = 0.01f * (j % 17);
  r[4 * kQK_K + 3] = -5.0f;
  r[4 * kQK_K + 200] = 5.0f;
  for (int j = 0; j < kQK_K; ++j) r[5 * kQK_K + j] = (j % 2 ? -1.0f : 1.0f) * 3.25f;
  rows.push_back(r);
  return rows;
}

template <typename Block>
std::vector<Block> Quantize(void (*fn)(const float*, void*, int64_t), const std::vector<float>& x,
                            int64_t block_size) {
  std::vector<Block> out(x.size() / block_size);
  std::memset(out.data(), 0xAB, out.size() * sizeof(Block));  // catch unwritten bytes
  fn(x.data(), out.data(), static_cast<int64_t>(x.size()));
  return out;
}

TEST(Q8ActivationsTest, Avx2QuantizersAreBitIdenticalToScalar) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2 on this CPU";
  int row_index = 0;
  for (const std::vector<float>& x : EdgeCaseRows()) {
    SCOPED_TRACE(row_index++);
    const auto q8_0 = Quantize<BlockQ8_0>(kernels::QuantizeRowQ8_0, x, kQK8_0);
    const auto q8_0_avx2 = Quantize<BlockQ8_0>(kernels::QuantizeRowQ8_0Avx2, x, kQK8_0);
    EXPECT_EQ(std::memcmp(q8_0.data(), q8_0_avx2.data(), q8_0.size() * sizeof(BlockQ8_0)), 0);
    const auto q8_1 = Quantize<BlockQ8_1>(kernels::QuantizeRowQ8_1, x, kQK8_1);
    const auto q8_1_avx2 = Quantize<BlockQ8_1>(kernels::QuantizeRowQ8_1Avx2, x, kQK8_1);
    EXPECT_EQ(std::memcmp(q8_1.data(), q8_1_avx2.data(), q8_1.size() * sizeof(BlockQ8_1)), 0);
    const auto q8_k = Quantize<BlockQ8_K>(kernels::QuantizeRowQ8_K, x, kQK_K);
    const auto q8_k_avx2 = Quantize<BlockQ8_K>(kernels::QuantizeRowQ8_KAvx2, x, kQK_K);
    EXPECT_EQ(std::memcmp(q8_k.data(), q8_k_avx2.data(), q8_k.size() * sizeof(BlockQ8_K)), 0);
  }
}

TEST(Q8ActivationsTest, Q8_0RoundsHalvesAwayFromZero) {
  std::vector<float> x(kQK8_0, 0.0f);
  x[0] = 127.0f;  // d = 1 exactly
  x[1] = 2.5f;
  x[2] = -2.5f;
  x[3] = 0.5f;
  x[4] = -126.5f;
  x[5] = 3.4999998f;
  BlockQ8_0 b;
  kernels::QuantizeRowQ8_0(x.data(), &b, kQK8_0);
  EXPECT_EQ(Fp16ToFp32(b.d), 1.0f);
  EXPECT_EQ(b.qs[0], 127);
  EXPECT_EQ(b.qs[1], 3);
  EXPECT_EQ(b.qs[2], -3);
  EXPECT_EQ(b.qs[3], 1);
  EXPECT_EQ(b.qs[4], -127);
  EXPECT_EQ(b.qs[5], 3);
  EXPECT_EQ(b.qs[6], 0);
}

TEST(Q8ActivationsTest, Q8_KRoundsTiesToEvenAndMapsFirstMaxToMinus127) {
  std::vector<float> x(kQK_K, 0.0f);
  x[0] = -127.0f;  // max = -127: iscale = 1, d = 1
  x[1] = 2.5f;
  x[2] = -2.5f;
  x[3] = 3.5f;
  x[4] = 127.0f;  // same magnitude, later: does not decide the sign
  BlockQ8_K b;
  kernels::QuantizeRowQ8_K(x.data(), &b, kQK_K);
  EXPECT_EQ(b.d, 1.0f);
  EXPECT_EQ(b.qs[0], -127);
  EXPECT_EQ(b.qs[1], 2);
  EXPECT_EQ(b.qs[2], -2);
  EXPECT_EQ(b.qs[3], 4);
  EXPECT_EQ(b.qs[4], 127);

  x[0] = 10.0f;  // positive max: d < 0 and the max maps to -127
  kernels::QuantizeRowQ8_K(x.data(), &b, kQK_K);
  EXPECT_FLOAT_EQ(b.d, -127.0f / 127.0f * 1.0f);
  EXPECT_EQ(b.qs[4], -127);
  EXPECT_EQ(b.qs[0], -10);
}

TEST(Q8ActivationsTest, ZeroBlocksAreAllZero) {
  const std::vector<float> x(kQK_K, 0.0f);
  const auto q0 = Quantize<BlockQ8_0>(kernels::QuantizeRowQ8_0, x, kQK8_0);
  for (const BlockQ8_0& b : q0) {
    EXPECT_EQ(b.d, 0);
    for (int8_t q : b.qs) EXPECT_EQ(q, 0);
  }
  const auto q1 = Quantize<BlockQ8_1>(kernels::QuantizeRowQ8_1, x, kQK8_1);
  for (const BlockQ8_1& b : q1) {
    EXPECT_EQ(b.d, 0);
    EXPECT_EQ(b.s, 0);
    for (int8_t q : b.qs) EXPECT_EQ(q, 0);
  }
  const auto qk = Quantize<BlockQ8_K>(kernels::QuantizeRowQ8_K, x, kQK_K);
  EXPECT_EQ(qk[0].d, 0.0f);
  for (int8_t q : qk[0].qs) EXPECT_EQ(q, 0);
  for (int16_t s : qk[0].bsums) EXPECT_EQ(s, 0);
}

TEST(Q8ActivationsTest, BlockSumsAndRoundTripErrors) {
  const std::vector<float> x = EdgeCaseRows()[0];
  const auto q1 = Quantize<BlockQ8_1>(kernels::QuantizeRowQ8_1, x, kQK8_1);
  std::vector<float> back(kRow);
  kernels::DequantizeRowQ8_1(q1.data(), back.data(), kRow);
  for (size_t b = 0; b < q1.size(); ++b) {
    const float d = Fp16ToFp32(q1[b].d);
    int sum = 0;
    for (int j = 0; j < kQK8_1; ++j) {
      sum += q1[b].qs[j];
      // |x - q * d| <= d / 2 plus the half rounding of d (|q| <= 127, d rel. error 2^-11).
      EXPECT_NEAR(back[b * kQK8_1 + j], x[b * kQK8_1 + j], 0.5f * d + 127.0f * d / 1024.0f);
    }
    // s is d * sum(q) with the unrounded d, rounded to half once.
    const float s = Fp16ToFp32(q1[b].s);
    EXPECT_NEAR(s, static_cast<float>(sum) * d, std::fabs(static_cast<float>(sum) * d) / 512.0f);
  }

  const auto qk = Quantize<BlockQ8_K>(kernels::QuantizeRowQ8_K, x, kQK_K);
  kernels::DequantizeRowQ8_K(qk.data(), back.data(), kRow);
  for (size_t b = 0; b < qk.size(); ++b) {
    for (int g = 0; g < kQK_K / 16; ++g) {
      int sum = 0;
      for (int l = 0; l < 16; ++l) sum += qk[b].qs[16 * g + l];
      EXPECT_EQ(qk[b].bsums[g], sum);
    }
    for (int j = 0; j < kQK_K; ++j) {
      EXPECT_NEAR(back[b * kQK_K + j], x[b * kQK_K + j], 0.5001f * std::fabs(qk[b].d));
    }
  }

  const auto q0 = Quantize<BlockQ8_0>(kernels::QuantizeRowQ8_0, x, kQK8_0);
  kernels::DequantizeRowQ8_0(q0.data(), back.data(), kRow);
  for (size_t i = 0; i < x.size(); ++i) {
    const float d = Fp16ToFp32(q0[i / kQK8_0].d);
    EXPECT_NEAR(back[i], x[i], 0.5f * d + 127.0f * d / 1024.0f);
  }
}

// Requantizing the reference dequantization of reference Q8_0 blocks gives back those blocks.
TEST(Q8ActivationsTest, Q8_0WeightQuantizerReproducesReferenceBlocks) {
  const std::string path = SharedTestdataPath("conformance/quant-vectors.gguf");
  REQUIRE_TESTDATA(path);
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufTensorInfo* q = (*file)->FindTensor("q.Q8_0");
  const GgufTensorInfo* ref = (*file)->FindTensor("ref.Q8_0");
  ASSERT_NE(q, nullptr);
  ASSERT_NE(ref, nullptr);
  ASSERT_EQ(q->type, TensorType::kQ8_0);
  const int64_t n = q->NumElements();
  std::vector<float> values(static_cast<size_t>(n));
  std::memcpy(values.data(), ref->data, values.size() * sizeof(float));
  std::vector<BlockQ8_0> requantized(static_cast<size_t>(n / kQK8_0));
  kernels::QuantizeRowQ8_0(values.data(), requantized.data(), n);
  EXPECT_EQ(std::memcmp(requantized.data(), q->data, requantized.size() * sizeof(BlockQ8_0)), 0);
}

}  // namespace
}  // namespace moepool
