// The SwiGLU gate and the sampling weights (engine/swiglu.h): AVX2 and scalar give the same bits
// for every input, and moepool's exponential stays within 2 ulp of exp.
#include "engine/swiglu.h"

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "engine/quant/types.h"
#include "engine/swiglu_math.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Values that exercise every branch: signed zeros, the clamp bounds and their neighbours,
// overflow, denormals, infinities, NaN, and a dense sweep of the useful range.
std::vector<float> EdgeAndSweepInputs() {
  std::vector<float> g = {0.0f,
                          -0.0f,
                          1e-30f,
                          -1e-30f,
                          FLT_MIN,
                          -FLT_MIN,
                          1e-45f,
                          -1e-45f,
                          FLT_MAX,
                          -FLT_MAX,
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN()};
  for (float bound : {swiglu::kMinArg, swiglu::kMaxArg, 88.7f, 88.75f, 103.0f}) {
    g.push_back(bound);
    g.push_back(-bound);
    g.push_back(std::nextafter(bound, INFINITY));
    g.push_back(-std::nextafter(bound, INFINITY));
    g.push_back(std::nextafter(bound, -INFINITY));
    g.push_back(-std::nextafter(bound, -INFINITY));
  }
  for (float v = -120.0f; v <= 120.0f; v += 0.0137f) g.push_back(v);
  std::mt19937 rng(3);
  std::normal_distribution<float> gauss(0.0f, 3.0f);
  for (int i = 0; i < 20000; ++i) g.push_back(gauss(rng));
  return g;
}

TEST(SwiGluTest, Avx2BitIdenticalToScalarForEveryInput) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2 on this CPU";
  const std::vector<float> g = EdgeAndSweepInputs();
  std::mt19937 rng(4);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<float> u(g.size());
  for (float& v : u) v = gauss(rng);
  u[0] = -0.0f;
  // Lengths that are and are not multiples of the vector width (the tail runs the scalar code).
  for (const int64_t n : {static_cast<int64_t>(g.size()), int64_t{13}, int64_t{8}, int64_t{5}}) {
    std::vector<float> scalar(g.begin(), g.begin() + n), avx2 = scalar;
    SwiGluScalar(scalar.data(), u.data(), n);
    SwiGluAvx2(avx2.data(), u.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(scalar[i])) {
        EXPECT_TRUE(std::isnan(avx2[i])) << "g " << g[i];
      } else {
        ASSERT_EQ(Bits(avx2[i]), Bits(scalar[i])) << "g " << g[i] << " u " << u[i];
      }
    }
  }
}

TEST(SwiGluTest, DispatchUsesTheSameArithmetic) {
  std::vector<float> g = {-3.0f, -0.5f, 0.25f, 2.0f, 7.5f, -40.0f, 90.0f, -90.0f, 1.0f};
  std::vector<float> u = {1.0f, 2.0f, -1.0f, 0.5f, 1.0f, 1.0f, 1.0f, 1.0f, 3.0f};
  std::vector<float> expected = g;
  SwiGluScalar(expected.data(), u.data(), static_cast<int64_t>(g.size()));
  SwiGlu(g.data(), u.data(), static_cast<int64_t>(g.size()));
  for (size_t i = 0; i < g.size(); ++i) EXPECT_EQ(Bits(g[i]), Bits(expected[i])) << i;
}

TEST(SwiGluTest, ExpWithinTwoUlpOfExp) {
  double worst = 0.0;
  for (float z = -87.0f; z <= 88.0f; z += 0.00731f) {
    const double want = std::exp(static_cast<double>(z));
    const double got = swiglu::Exp(z);
    worst = std::max(worst, std::abs(got - want) / want);
  }
  EXPECT_LT(worst, 1.5e-7) << "max relative error " << worst;  // FLT_EPSILON is 1.19e-7
  EXPECT_EQ(swiglu::Exp(0.0f), 1.0f);
  EXPECT_EQ(swiglu::Exp(89.0f), std::numeric_limits<float>::infinity());
  EXPECT_GT(swiglu::Exp(-200.0f), 0.0f);
  EXPECT_LT(swiglu::Exp(-200.0f), 2e-38f);
}

TEST(SwiGluTest, SiluMulMatchesItsDefinition) {
  for (float g = -60.0f; g <= 60.0f; g += 0.0113f) {
    const double want = g / (1.0 + std::exp(-static_cast<double>(g))) * 1.5;
    const double got = swiglu::SiluMul(g, 1.5f);
    EXPECT_NEAR(got, want, 4e-7 * std::abs(want) + 1e-30) << g;
  }
  // Large negative gates give (signed) zero, large positive ones the gate itself.
  EXPECT_EQ(swiglu::SiluMul(-100.0f, 1.0f), -0.0f);
  EXPECT_TRUE(std::signbit(swiglu::SiluMul(-100.0f, 1.0f)));
  EXPECT_EQ(swiglu::SiluMul(100.0f, 2.0f), 200.0f);
}

// Sampling weights: the same bits on both paths, 0 for infinite and NaN logits, 1 at the maximum.
TEST(SwiGluTest, SoftmaxWeightsAvx2BitIdenticalToScalar) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2 on this CPU";
  const std::vector<float> x = EdgeAndSweepInputs();
  const int64_t n = static_cast<int64_t>(x.size());
  const float max = MaxFiniteScalar(x.data(), n);
  EXPECT_EQ(max, FLT_MAX);
  for (const int64_t len : {n, int64_t{13}, int64_t{8}, int64_t{5}}) {
    EXPECT_EQ(Bits(MaxFiniteAvx2(x.data(), len)), Bits(MaxFiniteScalar(x.data(), len))) << len;
  }
  // A realistic maximum (the sweep's FLT_MAX would send every other weight to the clamp).
  for (const float temperature : {1.0f, 0.7f, 1e-3f, 3.0f}) {
    std::vector<float> scalar(x.size()), avx2(x.size());
    SoftmaxWeightsScalar(x.data(), n, 120.0f, temperature, scalar.data());
    SoftmaxWeightsAvx2(x.data(), n, 120.0f, temperature, avx2.data());
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(Bits(avx2[i]), Bits(scalar[i])) << "x " << x[i] << " T " << temperature;
      if (!std::isfinite(x[i])) {
        EXPECT_EQ(scalar[i], 0.0f) << x[i];
      }
    }
  }
  const std::vector<float> logits = {1.0f, 3.5f, -INFINITY, 2.0f, NAN, 3.5f, -2.0f, 0.0f, 3.0f};
  const int64_t m = static_cast<int64_t>(logits.size());
  EXPECT_EQ(MaxFinite(logits.data(), m), 3.5f);
  std::vector<float> w(logits.size());
  SoftmaxWeights(logits.data(), m, 3.5f, 0.5f, w.data());
  EXPECT_EQ(w[1], 1.0f);
  EXPECT_EQ(w[5], 1.0f);
  EXPECT_EQ(w[2], 0.0f);
  EXPECT_EQ(w[4], 0.0f);
  EXPECT_NEAR(w[8], std::exp(-1.0), 2e-7);
  const std::vector<float> none = {-INFINITY, NAN, INFINITY};
  EXPECT_EQ(MaxFinite(none.data(), 3), -INFINITY);
}

}  // namespace
}  // namespace moepool
