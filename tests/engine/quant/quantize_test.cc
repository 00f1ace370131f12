// Reference quantizers: quantize -> dequantize error bounds, determinism, degenerate inputs.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

constexpr int64_t kRow = 4 * kQK_K;  // a multiple of every block size
constexpr int kRows = 64;

std::vector<float> Gaussian(int64_t n, uint32_t seed, float sigma) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// Quantizes and dequantizes `x` row by row with the type's kernels.
std::vector<float> RoundTrip(TensorType type, const std::vector<float>& x, int64_t row) {
  const TypeTraits& traits = GetTypeTraits(type);
  const size_t row_bytes = RowBytes(type, row);
  std::vector<uint8_t> q(row_bytes);
  std::vector<float> out(x.size());
  for (size_t r = 0; r < x.size() / static_cast<size_t>(row); ++r) {
    traits.quantize(x.data() + r * row, q.data(), row);
    traits.dequantize(q.data(), out.data() + r * row, row);
  }
  return out;
}

// sqrt(sum (a - b)^2 / sum b^2).
double RelativeRmse(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0;
  double sig = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    err += d * d;
    sig += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(err / sig);
}

struct ErrorBound {
  TensorType type;
  double max_relative_rmse;
};

// Bounds on Gaussian data. For a uniform grid of step s the rounding error has RMS s / sqrt(12);
// a block of b Gaussians spans about +-2.1 sigma (b = 32) or +-1.8 sigma (b = 16), so a grid of
// k levels over that span gives roughly span / (k - 1) / 3.46 of sigma. Measured (seed 1234):
//   F16 2.1e-4 (2^-11 rounding), BF16 1.7e-3 (2^-8), Q4_0 8.6%, Q4_1 7.9%, Q5_0 4.3%,
//   Q5_1 3.8%, Q2_K 28.7%, Q3_K 15.3%, Q4_K 7.2%, Q5_K 3.6%, Q6_K 1.8%.
// Each bound sits 10-25% above the measurement: a layout, rounding or scale bug costs far more
// (a wrong nibble order or an off-by-one level gives errors near 100%).
const ErrorBound kBounds[] = {
    {TensorType::kF32, 0.0},   {TensorType::kF16, 4e-4},  {TensorType::kBF16, 3e-3},
    {TensorType::kQ4_0, 0.10}, {TensorType::kQ4_1, 0.10}, {TensorType::kQ5_0, 0.05},
    {TensorType::kQ5_1, 0.05}, {TensorType::kQ2_K, 0.35}, {TensorType::kQ3_K, 0.18},
    {TensorType::kQ4_K, 0.08}, {TensorType::kQ5_K, 0.04}, {TensorType::kQ6_K, 0.02},
};

void PrintTo(const ErrorBound& bound, std::ostream* os) {
  *os << GetTypeTraits(bound.type).name << " (bound " << bound.max_relative_rmse << ")";
}

class QuantizeTest : public ::testing::TestWithParam<ErrorBound> {
 protected:
  TensorType type() const { return GetParam().type; }
  const TypeTraits& traits() const { return GetTypeTraits(type()); }
};

TEST_P(QuantizeTest, GaussianRoundTripErrorIsBounded) {
  const std::vector<float> x = Gaussian(kRow * kRows, 1234, 1.0f);
  const double rel = RelativeRmse(RoundTrip(type(), x, kRow), x);
  EXPECT_LE(rel, GetParam().max_relative_rmse) << traits().name;
  RecordProperty("relative_rmse", std::to_string(rel));
}

// Per-block scales: the relative error must not depend on the magnitude of a row, even when
// blocks of very different magnitudes sit side by side. (Far below 0.01 the half-precision
// super-block scales of Q6_K / Q3_K become subnormal and lose relative precision: a limit of the
// format, not of the quantizer, so the magnitudes stay above it.)
TEST_P(QuantizeTest, ErrorIsRelativeToEachBlock) {
  std::vector<float> x = Gaussian(kRow * 8, 99, 1.0f);
  const float magnitudes[] = {0.01f, 1.0f, 30.0f, 0.1f};
  for (size_t i = 0; i < x.size(); ++i) x[i] *= magnitudes[(i / kQK_K) % 4];
  const std::vector<float> y = RoundTrip(type(), x, kRow);
  // Compare each 256-block separately so that large blocks cannot hide errors in small ones.
  for (size_t b = 0; b < x.size() / kQK_K; ++b) {
    const std::vector<float> xb(x.begin() + b * kQK_K, x.begin() + (b + 1) * kQK_K);
    const std::vector<float> yb(y.begin() + b * kQK_K, y.begin() + (b + 1) * kQK_K);
    EXPECT_LE(RelativeRmse(yb, xb), 1.25 * GetParam().max_relative_rmse + 1e-6)
        << traits().name << " block " << b << " magnitude " << magnitudes[b % 4];
  }
}

TEST_P(QuantizeTest, IsDeterministic) {
  const std::vector<float> x = Gaussian(kRow, 7, 2.0f);
  std::vector<uint8_t> a(RowBytes(type(), kRow), 0xAA);
  std::vector<uint8_t> b(RowBytes(type(), kRow), 0x55);
  traits().quantize(x.data(), a.data(), kRow);
  traits().quantize(x.data(), b.data(), kRow);
  EXPECT_EQ(a, b);  // also proves every byte is written: the buffers started different
}

TEST_P(QuantizeTest, ZeroRowDequantizesToZero) {
  const std::vector<float> x(kRow, 0.0f);
  for (float v : RoundTrip(type(), x, kRow)) ASSERT_EQ(v, 0.0f) << traits().name;
}

TEST_P(QuantizeTest, ConstantAndSparseBlocksStayClose) {
  std::vector<float> x(kRow, 0.0f);
  for (int64_t i = 0; i < kQK_K; ++i) x[i] = -0.75f;        // constant negative block
  for (int64_t i = kQK_K; i < 2 * kQK_K; ++i) x[i] = 2.0f;  // constant positive block
  x[2 * kQK_K + 5] = 1.0f;                                  // one non-zero element in a zero block
  const std::vector<float> y = RoundTrip(type(), x, kRow);
  for (int64_t i = 0; i < kRow; ++i) {
    ASSERT_TRUE(std::isfinite(y[i])) << traits().name << " at " << i;
    // The coarsest grid (Q2_K) represents a constant block to within ~1/3 of its value.
    EXPECT_NEAR(y[i], x[i], 0.34f * std::fabs(x[i]) + 1e-6f) << traits().name << " at " << i;
  }
}

TEST_P(QuantizeTest, ExtremeValuesGiveNoNan) {
  const float big = std::numeric_limits<float>::max();
  const float tiny = std::numeric_limits<float>::denorm_min();
  std::vector<float> x = Gaussian(kRow, 3, 1.0f);
  for (int64_t i = 0; i < kQK_K; ++i) x[i] = (i % 2 ? big : -big) * (i % 3 ? 1.0f : 0.5f);
  for (int64_t i = kQK_K; i < 2 * kQK_K; ++i) x[i] *= 1e-38f;
  x[2 * kQK_K] = tiny;
  x[2 * kQK_K + 100] = 1e30f;  // one outlier among ordinary values
  x[3 * kQK_K + 7] = -65504.0f;
  const std::vector<float> y = RoundTrip(type(), x, kRow);
  const bool saturating =
      type() != TensorType::kF32 && type() != TensorType::kF16 && type() != TensorType::kBF16;
  for (int64_t i = 0; i < kRow; ++i) {
    ASSERT_FALSE(std::isnan(y[i])) << traits().name << " at " << i;
    if (saturating) {
      ASSERT_TRUE(std::isfinite(y[i])) << traits().name << " at " << i;
    }
    // Signs survive wherever the value is representable at all.
    if (i < kQK_K && saturating) {
      EXPECT_GE(y[i] * x[i], 0.0f) << traits().name << " at " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, QuantizeTest, ::testing::ValuesIn(kBounds),
                         [](const ::testing::TestParamInfo<ErrorBound>& info) {
                           return std::string(GetTypeTraits(info.param.type).name);
                         });

// Values that are exactly representable in a type (the reference dequantization of reference
// blocks) should be found again: the quantizer's grid search lands on the reference grid. A
// quantizer that merely round-trips its own layout consistently would not.
TEST(QuantizeReferenceTest, RequantizingReferenceOutputReproducesIt) {
  const std::string path = ::moepool::testing::SharedTestdataPath("conformance/quant-vectors.gguf");
  REQUIRE_TESTDATA(path);
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  for (const char* name :
       {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"}) {
    const GgufTensorInfo* q = (*file)->FindTensor(std::string("q.") + name);
    const GgufTensorInfo* ref = (*file)->FindTensor(std::string("ref.") + name);
    ASSERT_NE(q, nullptr) << name;
    ASSERT_NE(ref, nullptr) << name;
    std::vector<float> x(static_cast<size_t>(ref->NumElements()));
    std::memcpy(x.data(), ref->data, x.size() * sizeof(float));
    const double rel = RelativeRmse(RoundTrip(q->type, x, q->dims[0]), x);
    // Measured: 0 for the 32-blocks, 2- and 3-bit k-quants and float types; 1e-4 (Q4_K),
    // 3e-3 (Q5_K), 9e-3 (Q6_K) where the scale search settles next to the reference grid.
    EXPECT_LE(rel, 0.015) << name;
  }
}

TEST(QuantizeFloatTest, RoundsToNearestEven) {
  // 1 + 2^-11 lies halfway between two halves: rounds to even (1.0); just above rounds up.
  const float x[4] = {1.0f + 0x1p-11f, 1.0f + 0x1p-11f + 0x1p-20f, 1.0f + 0x1p-8f,
                      1.0f + 0x1p-8f + 0x1p-20f};
  float y[4];
  uint16_t q[4];
  GetTypeTraits(TensorType::kF16).quantize(x, q, 4);
  GetTypeTraits(TensorType::kF16).dequantize(q, y, 4);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], 1.0f + 0x1p-10f);
  GetTypeTraits(TensorType::kBF16).quantize(x + 2, q, 2);
  GetTypeTraits(TensorType::kBF16).dequantize(q, y, 2);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], 1.0f + 0x1p-7f);
}

}  // namespace
}  // namespace moepool
