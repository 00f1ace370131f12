#include "wire/row_codec.h"

#include <cmath>
#include <cstring>
#include <vector>

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
  EXPECT_EQ(DTypeBytes(moepool::v1::DTYPE_BF16), 2);
  EXPECT_EQ(DTypeBytes(moepool::v1::DTYPE_UNSPECIFIED), 0);
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
