#include "coordinator/wire_format.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"

namespace moepool {
namespace {

TEST(WireFormatTest, F32RoundTripIsExact) {
  const std::vector<float> x = {1.0f, -0.0f, 3.14159265f, 1e-40f, -7e30f};
  std::string bytes;
  EncodeRows(moepool::v1::DTYPE_F32, x.data(), 5, &bytes);
  ASSERT_EQ(bytes.size(), 20u);
  std::vector<float> y(5);
  ASSERT_TRUE(DecodeRows(moepool::v1::DTYPE_F32, bytes, 5, y.data()).ok());
  EXPECT_EQ(std::memcmp(x.data(), y.data(), 20), 0);
}

TEST(WireFormatTest, HalfTypesRoundToNearest) {
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

TEST(WireFormatTest, DecodeRejectsWrongSize) {
  std::vector<float> y(4);
  EXPECT_FALSE(DecodeRows(moepool::v1::DTYPE_F32, std::string(15, '\0'), 4, y.data()).ok());
  EXPECT_FALSE(DecodeRows(moepool::v1::DTYPE_UNSPECIFIED, "", 0, y.data()).ok());
}

TEST(WireFormatTest, ParseDType) {
  EXPECT_EQ(*ParseWireDType("bf16"), moepool::v1::DTYPE_BF16);
  EXPECT_FALSE(ParseWireDType("fp8").ok());
}

TEST(WireFormatTest, RowsPerChunkFitsTheLimit) {
  // 4096 f32 values + 2 pairs per row: 16414 bytes; 4 MiB holds 255 such rows.
  EXPECT_EQ(RowsPerChunk(4 << 20, 4096, moepool::v1::DTYPE_F32, 2), 255);
  EXPECT_EQ(RowsPerChunk(4096, 4096, moepool::v1::DTYPE_F32, 2), 1);
}

TEST(RowAssemblerTest, AssemblesChunksAndRejectsOverlap) {
  RowAssembler a(3, 2);
  std::string c0, c1;
  const float r0[] = {1, 2, 3, 4};
  const float r1[] = {5, 6};
  EncodeRows(moepool::v1::DTYPE_F32, r0, 4, &c0);
  EncodeRows(moepool::v1::DTYPE_F32, r1, 2, &c1);
  ASSERT_TRUE(a.Add(moepool::v1::DTYPE_F32, 2, 1, c1).ok());
  EXPECT_FALSE(a.complete());
  EXPECT_FALSE(a.Add(moepool::v1::DTYPE_F32, 2, 1, c1).ok());  // twice
  EXPECT_FALSE(a.Add(moepool::v1::DTYPE_F32, 3, 1, c1).ok());  // outside
  ASSERT_TRUE(a.Add(moepool::v1::DTYPE_F32, 0, 2, c0).ok());
  EXPECT_TRUE(a.complete());
  EXPECT_EQ(a.values(), (std::vector<float>{1, 2, 3, 4, 5, 6}));
}

}  // namespace
}  // namespace moepool
