#include "wire/row_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "engine/quant/kernels.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"

namespace moepool::wire {
namespace {

TEST(RowCodecTest, F32RoundTripIsExact) {
  const std::vector<float> x = {1.0f, -0.0f, 3.14159265f, 1e-40f, -7e30f};
  std::string bytes;
  EncodeRows(moepool::v1::DTYPE_F32, x.data(), 5, &bytes);
  ASSERT_EQ(bytes.size(), 20u);
  std::vector<float> y(5);
  ASSERT_TRUE(DecodeRows(moepool::v1::DTYPE_F32, bytes, 5, y.data()).ok());
  EXPECT_EQ(std::memcmp(x.data(), y.data(), 20), 0);
}

TEST(RowCodecTest, HalfTypesRoundToNearest) {
  const std::vector<float> x = {1.0f, 1.0f + 1.0f / 4096, 1.0f + 3.0f / 2048, -2.5f};
  for (const auto dtype : {moepool::v1::DTYPE_F16, moepool::v1::DTYPE_BF16}) {
    std::string bytes;
    EncodeRows(dtype, x.data(), 4, &bytes);
    ASSERT_EQ(bytes.size(), 8u);
    std::vector<float> y(4);
    ASSERT_TRUE(DecodeRows(dtype, bytes, 4, y.data()).ok());
    const float rel = dtype == moepool::v1::DTYPE_F16 ? 1.0f / 2048 : 1.0f / 256;
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i], x[i], std::fabs(x[i]) * rel) << i;
    EXPECT_EQ(y[0], 1.0f);
    EXPECT_EQ(y[3], -2.5f);
  }
}

TEST(RowCodecTest, DecodeRejectsWrongSize) {
  std::vector<float> y(4);
  EXPECT_FALSE(DecodeRows(moepool::v1::DTYPE_F32, std::string(15, '\0'), 4, y.data()).ok());
  EXPECT_FALSE(DecodeRows(moepool::v1::DTYPE_UNSPECIFIED, "", 0, y.data()).ok());
}

TEST(RowCodecTest, ParseDType) {
  EXPECT_EQ(*ParseDType("bf16"), moepool::v1::DTYPE_BF16);
  EXPECT_FALSE(ParseDType("fp8").ok());
  EXPECT_STREQ(DTypeName(moepool::v1::DTYPE_F16), "f16");
  EXPECT_EQ(*ParseDType("q8_0"), moepool::v1::DTYPE_Q8_0);
  EXPECT_STREQ(DTypeName(moepool::v1::DTYPE_Q8_0), "q8_0");
  EXPECT_EQ(EncodedBytes(moepool::v1::DTYPE_BF16, 3), 6);
  EXPECT_EQ(EncodedBytes(moepool::v1::DTYPE_Q8_0, 64), 68);
  EXPECT_EQ(EncodedBytes(moepool::v1::DTYPE_UNSPECIFIED, 4), 0);
}

// Random rows with a spread of magnitudes per block, including an all-zero block.
std::vector<float> MixedRows(int64_t n, uint32_t seed) {
  std::vector<float> x(static_cast<size_t>(n));
  uint32_t s = seed;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    const float u = static_cast<float>(s >> 8) / 16777216.0f - 0.5f;
    x[static_cast<size_t>(i)] = u * std::ldexp(1.0f, static_cast<int>(i / 32 % 9) - 4);
  }
  for (int i = 0; i < 32 && n >= 64; ++i) x[32 + static_cast<size_t>(i)] = 0.0f;
  return x;
}

// q8_0 rows are the engine's own Q8_0 blocks: the scalar reference quantizer (QuantizeRowQ8_0)
// and the one the engine uses on this CPU give the same bytes as the wire.
TEST(RowCodecTest, Q8RowsAreTheEnginesQ8_0Blocks) {
  const int64_t n = 4096;
  const std::vector<float> x = MixedRows(n, 7);
  std::string bytes;
  EncodeRows(moepool::v1::DTYPE_Q8_0, x.data(), n, &bytes);
  ASSERT_EQ(bytes.size(), static_cast<size_t>(n / 32 * 34));
  std::string reference(bytes.size(), '\0');
  kernels::QuantizeRowQ8_0(x.data(), reference.data(), n);
  EXPECT_EQ(bytes, reference);
  std::string fast(bytes.size(), '\0');
  GetTypeTraits(TensorType::kQ8_0).quantize(x.data(), fast.data(), n);
  EXPECT_EQ(bytes, fast);

  // Decoding gives d * q exactly (the engine's dequantizer): within half a step of each value,
  // plus what rounding the scale to f16 moves the largest one (127 * 2^-11 steps).
  std::vector<float> y(static_cast<size_t>(n));
  ASSERT_TRUE(DecodeRows(moepool::v1::DTYPE_Q8_0, bytes, n, y.data()).ok());
  std::vector<float> want(static_cast<size_t>(n));
  kernels::DequantizeRowQ8_0(reference.data(), want.data(), n);
  EXPECT_EQ(std::memcmp(y.data(), want.data(), static_cast<size_t>(n) * 4), 0);
  for (int64_t b = 0; b < n / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j)
      amax = std::max(amax, std::fabs(x[static_cast<size_t>(b * 32 + j)]));
    for (int j = 0; j < 32; ++j) {
      const size_t i = static_cast<size_t>(b * 32 + j);
      EXPECT_NEAR(y[i], x[i], amax / 127 * 0.57f + 1e-30f) << i;
    }
  }
  // The all-zero block stays zero.
  for (int j = 32; j < 64; ++j) EXPECT_EQ(y[static_cast<size_t>(j)], 0.0f);
}

// Re-encoding decoded q8_0 rows gives the same blocks: a worker whose kernels quantize their
// input to Q8_0 computes on exactly the coordinator's blocks.
TEST(RowCodecTest, Q8RowsSurviveDecodeAndReencode) {
  const int64_t n = 4096;
  for (uint32_t seed = 1; seed <= 20; ++seed) {
    const std::vector<float> x = MixedRows(n, seed);
    std::string bytes;
    EncodeRows(moepool::v1::DTYPE_Q8_0, x.data(), n, &bytes);
    std::vector<float> y(static_cast<size_t>(n));
    ASSERT_TRUE(DecodeRows(moepool::v1::DTYPE_Q8_0, bytes, n, y.data()).ok());
    std::string again;
    EncodeRows(moepool::v1::DTYPE_Q8_0, y.data(), n, &again);
    EXPECT_EQ(again, bytes) << "seed " << seed;
  }
}

TEST(RowCodecTest, Q8RejectsPartialBlocksAndBadSizes) {
  std::vector<float> y(64);
  EXPECT_FALSE(DecodeRows(moepool::v1::DTYPE_Q8_0, std::string(33, '\0'), 32, y.data()).ok());
  EXPECT_FALSE(DecodeRows(moepool::v1::DTYPE_Q8_0, std::string(34, '\0'), 31, y.data()).ok());
  EXPECT_TRUE(DecodeRows(moepool::v1::DTYPE_Q8_0, std::string(68, '\0'), 64, y.data()).ok());
  EXPECT_TRUE(CheckRowDType(moepool::v1::DTYPE_Q8_0, 4096).ok());
  const absl::Status s = CheckRowDType(moepool::v1::DTYPE_Q8_0, 100);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("multiple of 32"), std::string::npos) << s;
  EXPECT_TRUE(CheckRowDType(moepool::v1::DTYPE_F16, 100).ok());
  EXPECT_FALSE(CheckRowDType(static_cast<moepool::v1::DType>(9), 64).ok());
}

TEST(RowCodecTest, GatheredRowsAreEncodedInTheGivenOrder) {
  const std::vector<float> x = {0, 1, 10, 11, 20, 21};  // three rows of two
  const std::vector<int64_t> rows = {2, 0};
  std::string bytes;
  EncodeGatheredRows(moepool::v1::DTYPE_F32, x.data(), 2, rows, &bytes);
  std::vector<float> y(4);
  ASSERT_TRUE(DecodeRows(moepool::v1::DTYPE_F32, bytes, 4, y.data()).ok());
  EXPECT_EQ(y, (std::vector<float>{20, 21, 0, 1}));
}

}  // namespace
}  // namespace moepool::wire
