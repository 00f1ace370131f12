// The SwiGLU gate (engine/swiglu.h): AVX2 and scalar give the same bits for every input, and
// moepool's exponential stays within 2 ulp of exp.
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

}  // namespace
}  // namespace moepool
