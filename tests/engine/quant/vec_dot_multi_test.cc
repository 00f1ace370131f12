// The multi-row dot kernels (2 to 8 activation rows per weight row) must give exactly the bits of
// the single-row kernel for every row: batching never changes a row's result.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "engine/quant/kernels.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

class VecDotMultiTest : public ::testing::TestWithParam<TensorType> {};

TEST_P(VecDotMultiTest, EveryRowBitIdenticalToSingleRowKernel) {
  const TypeTraits& w = GetTypeTraits(GetParam());
  if (w.vec_dot_cols == nullptr) {
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
  for (int c = 2; c <= kMultiDotCols; ++c) {
    ASSERT_NE(w.vec_dot_cols[c], nullptr) << c;
    // Start at a different row for each count, so every row position is exercised.
    const int first = (c * 3) % (kMultiDotCols - c + 1);
    float multi[kMultiDotCols];
    w.vec_dot_cols[c](kCols, weights.data(), acts.data() + first * a_bytes, a_bytes, multi);
    EXPECT_EQ(std::memcmp(multi, single + first, c * sizeof(float)), 0) << w.name << " x" << c;
  }
}

// The AVX512-VNNI build of the multi-row kernels gives the AVX2 build's bits for every row count
// (a cluster may mix CPUs with and without VNNI).
TEST_P(VecDotMultiTest, VnniBuildBitIdenticalToAvx2Build) {
#ifndef MOEPOOL_HAVE_VNNI_KERNELS
  GTEST_SKIP() << "the AVX512-VNNI kernels are not compiled in";
#else
  if (!CpuHasAvx512Vnni()) GTEST_SKIP() << "no AVX512-VNNI on this CPU";
  const TypeTraits& w = GetTypeTraits(GetParam());
  const kernels::MultiDotKernel* avx2 = nullptr;
  const kernels::MultiDotKernel* vnni = nullptr;
  switch (w.type) {
    case TensorType::kQ4_K:
      avx2 = kernels::kVecDotQ4_KColsAvx2, vnni = kernels::kVecDotQ4_KColsVnni;
      break;
    case TensorType::kQ5_K:
      avx2 = kernels::kVecDotQ5_KColsAvx2, vnni = kernels::kVecDotQ5_KColsVnni;
      break;
    case TensorType::kQ6_K:
      avx2 = kernels::kVecDotQ6_KColsAvx2, vnni = kernels::kVecDotQ6_KColsVnni;
      break;
    default:
      avx2 = kernels::kVecDotQ8_0ColsAvx2, vnni = kernels::kVecDotQ8_0ColsVnni;
      break;
  }
  EXPECT_EQ(w.vec_dot_cols, vnni) << "dispatch should pick the VNNI build here";
  const TypeTraits& a = GetTypeTraits(w.vec_dot_type);
  constexpr int64_t kCols = 2048;
  std::mt19937 rng(11);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::vector<float> values(kCols);
  for (int rep = 0; rep < 3; ++rep) {
    // Heavy-tailed weights and activations push the integer sums towards their limits.
    for (float& v : values) v = 0.05f * gauss(rng) * (rep == 2 ? std::abs(gauss(rng)) * 4 : 1);
    std::vector<uint8_t> weights(RowBytes(w.type, kCols));
    w.quantize(values.data(), weights.data(), kCols);
    const size_t a_bytes = RowBytes(a.type, kCols);
    std::vector<uint8_t> acts(a_bytes * kMultiDotCols);
    for (int c = 0; c < kMultiDotCols; ++c) {
      for (float& v : values) v = gauss(rng) * (rep == 1 ? 100.0f : c + 1.0f);
      a.quantize(values.data(), acts.data() + c * a_bytes, kCols);
    }
    for (int c = 2; c <= kMultiDotCols; ++c) {
      float from_avx2[kMultiDotCols];
      float from_vnni[kMultiDotCols];
      avx2[c](kCols, weights.data(), acts.data(), a_bytes, from_avx2);
      vnni[c](kCols, weights.data(), acts.data(), a_bytes, from_vnni);
      EXPECT_EQ(std::memcmp(from_avx2, from_vnni, c * sizeof(float)), 0) << w.name << " x" << c;
    }
  }
#endif
}

INSTANTIATE_TEST_SUITE_P(Types, VecDotMultiTest,
                         ::testing::Values(TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K,
                                           TensorType::kQ8_0),
                         [](const auto& info) {
                           return std::string(GetTypeTraits(info.param).name);
                         });

}  // namespace
}  // namespace moepool
