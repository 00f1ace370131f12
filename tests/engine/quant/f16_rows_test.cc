// The F16C row conversions against the scalar reference (QuantizeRowF16 / DequantizeRowF16):
// every half bit pattern, and floats around every rounding boundary, bit for bit.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "engine/quant/kernels.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

std::vector<uint32_t> Bits(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  std::memcpy(b.data(), v.data(), v.size() * 4);
  return b;
}

TEST(F16RowsTest, DequantizeEveryHalfLikeTheScalarReference) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2 + F16C on this CPU";
  std::vector<uint16_t> h(65536 + 5);  // + 5: a tail shorter than a vector
  for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<uint16_t>(i * 40503u);
  for (uint32_t i = 0; i < 65536; ++i) h[i] = static_cast<uint16_t>(i);
  const int64_t n = static_cast<int64_t>(h.size());
  std::vector<float> want(h.size()), got(h.size());
  kernels::DequantizeRowF16(h.data(), want.data(), n);
  kernels::DequantizeRowF16Avx2(h.data(), got.data(), n);
  EXPECT_EQ(Bits(want), Bits(got));
}

TEST(F16RowsTest, QuantizeLikeTheScalarReferenceAtEveryBoundary) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2 + F16C on this CPU";
  std::vector<float> x;
  // Each half value, the midpoints to its neighbour (ties) and one ulp either side of them.
  for (uint32_t i = 0; i < 0x7c00; ++i) {
    for (const uint32_t sign : {0u, 0x8000u}) {
      uint16_t a = static_cast<uint16_t>(i | sign), b = static_cast<uint16_t>((i + 1) | sign);
      std::vector<float> ab(2);
      kernels::DequantizeRowF16(&a, &ab[0], 1);
      kernels::DequantizeRowF16(&b, &ab[1], 1);
      const float mid = ab[0] + (ab[1] - ab[0]) / 2;
      x.insert(x.end(), {ab[0], mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f),
                         std::nextafter(mid, -1e9f)});
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  x.insert(x.end(),
           {65504.0f, 65519.0f, 65520.0f, 1e10f, -1e10f, inf, -inf, 1e-30f, -1e-30f,
            std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
            std::numeric_limits<float>::signaling_NaN(), 0.0f, -0.0f});
  std::mt19937 rng(5);
  for (int i = 0; i < 100000; ++i) {
    uint32_t b = static_cast<uint32_t>(rng());
    float f;
    std::memcpy(&f, &b, 4);
    x.push_back(f);
  }
  x.resize(x.size() + 3, 0.5f);  // a tail shorter than a vector
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<uint16_t> want(x.size()), got(x.size());
  kernels::QuantizeRowF16(x.data(), want.data(), n);
  kernels::QuantizeRowF16Avx2(x.data(), got.data(), n);
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(want[i], got[i]) << "x = " << x[i] << " (index " << i << ")";
  }
}

}  // namespace
}  // namespace moepool
