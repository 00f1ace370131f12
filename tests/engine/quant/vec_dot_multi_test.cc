// The multi-row dot kernels (8 and 4 activation rows per weight row) must give exactly the bits
// of the single-row kernel for every row: batching never changes a row's result.
#include <cstring>
#include <random>
#include <vector>

#include "engine/quant/types.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

class VecDotMultiTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(VecDotMultiTest, EveryRowBitIdenticalToSingleRowKernel) {
  const TypeTraits& w = GetTypeTraits(GetParam());
  if (w.vec_dot_multi == nullptr && w.vec_dot_multi4 == nullptr) {
    GTEST_SKIP() << "no multi-row kernel for " << w.name << " on this CPU";
  }
  const TypeTraits& a = GetTypeTraits(w.vec_dot_type);
  constexpr int64_t kCols = 1024;
  std::mt19937 rng(7);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<float> values(kCols);
  for (float& v : values) v = 0.05f * gauss(rng);
  std::vector<uint8_t> weights(RowBytes(w.type, kCols));
  w.quantize(values.data(), weights.data(), kCols);
  const size_t a_bytes = RowBytes(a.type, kCols);
  std::vector<uint8_t> acts(a_bytes * kMultiDotCols);
  for (int c = 0; c < kMultiDotCols; ++c) {
    for (float& v : values) v = gauss(rng) * (c + 1);
    a.quantize(values.data(), acts.data() + c * a_bytes, kCols);
  }
  float single[kMultiDotCols];
  for (int c = 0; c < kMultiDotCols; ++c) {
    single[c] = w.vec_dot(kCols, weights.data(), acts.data() + c * a_bytes);
  }
  if (w.vec_dot_multi != nullptr) {
    float multi[kMultiDotCols];
    w.vec_dot_multi(kCols, weights.data(), acts.data(), a_bytes, multi);
    EXPECT_EQ(std::memcmp(multi, single, sizeof(single)), 0) << w.name;
  }
  if (w.vec_dot_multi4 != nullptr) {
    float multi4[4];
    w.vec_dot_multi4(kCols, weights.data(), acts.data() + 4 * a_bytes, a_bytes, multi4);
    EXPECT_EQ(std::memcmp(multi4, single + 4, sizeof(multi4)), 0) << w.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Types, VecDotMultiTest,
                         ::testing::Values(TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K,
                                           TensorType::kQ8_0),
                         [](const auto& info) {
                           return std::string(GetTypeTraits(info.param).name);
                         });

}  // namespace
}  // namespace moepool
