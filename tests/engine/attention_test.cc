// The AVX2 attention kernel (attention_avx2.cc) against the scalar reference (attention.cc): the
// same result within float rounding for every group width it specialises (and one it does not),
// head sizes, lengths that are not a multiple of 8, and scores peaked enough that most exps
// underflow. The AVX-512 kernel (attention_avx512.cc) against the AVX2 one: the same bits.
#include "engine/attention.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "engine/quant/fp16.h"
#include "engine/quant/types.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

TEST(AttentionAvx2Test, MatchesScalarReference) {
#if !defined(MOEPOOL_HAVE_AVX2_KERNELS)
  GTEST_SKIP() << "the AVX2 kernels are not compiled in";
#else
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2 + F16C on this CPU";
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (const int group : {1, 2, 3, 4, 8, 16}) {
    for (const int64_t hd : {int64_t{8}, int64_t{72}, int64_t{128}}) {
      for (const int64_t n_kv : {int64_t{1}, int64_t{13}, int64_t{300}}) {
        for (const float spread : {1.0f, 30.0f}) {
          SCOPED_TRACE(::testing::Message() << "group " << group << " hd " << hd << " n_kv " << n_kv
                                            << " spread " << spread);
          std::vector<uint16_t> k(n_kv * hd), v(n_kv * hd);
          for (auto& x : k) x = Fp32ToFp16(nd(rng));
          for (auto& x : v) x = Fp32ToFp16(nd(rng));
          std::vector<float> q(group * hd);
          for (auto& x : q) x = spread * nd(rng);
          const int32_t one_block = 0;
          const KvHeadView kv{k.data(), v.data(), &one_block, n_kv, 0, size_t(hd), n_kv};
          std::vector<float> scratch(group * n_kv), want(group * hd), got(group * hd);
          AttendKvHeadScalar(q.data(), group, hd, kv, 0.125f, want.data(), scratch.data());
          AttendKvHeadAvx2(q.data(), group, hd, kv, 0.125f, got.data(), scratch.data());
          for (size_t i = 0; i < want.size(); ++i) {
            // Outputs are convex combinations of V values of magnitude ~1..4; the scores' own
            // rounding (8-wide partial sums) grows with their size.
            const float tol = spread > 1.0f ? 1e-4f : 2e-5f;
            ASSERT_NEAR(got[i], want[i], tol * (1.0f + std::fabs(want[i]))) << i;
          }
        }
      }
    }
  }
#endif
}

// The AVX-512 kernel returns the AVX2 kernel's bits: for every group width, odd lengths (a
// single position at the end), head sizes that are an odd number of 8-column chunks, peaked
// scores, and a paged cache whose blocks hold an odd number of positions.
TEST(AttentionAvx512Test, SameBitsAsTheAvx2Kernel) {
#if !defined(MOEPOOL_HAVE_VNNI_KERNELS)
  GTEST_SKIP() << "the AVX-512 kernels are not compiled in";
#else
  if (!CpuHasAvx512Vnni()) GTEST_SKIP() << "no AVX512-VNNI on this CPU";
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (const int group : {1, 2, 3, 4, 8, 16, 20}) {
    for (const int64_t hd : {int64_t{8}, int64_t{24}, int64_t{128}}) {
      for (const int64_t n_kv : {int64_t{1}, int64_t{2}, int64_t{17}, int64_t{300}}) {
        for (const int64_t block : {n_kv, int64_t{5}}) {
          for (const float spread : {1.0f, 30.0f}) {
            SCOPED_TRACE(::testing::Message()
                         << "group " << group << " hd " << hd << " n_kv " << n_kv << " block "
                         << block << " spread " << spread);
            const int64_t n_blocks = (n_kv + block - 1) / block;
            // Physical blocks in reverse order, as a paged cache may hold them.
            std::vector<int32_t> table(static_cast<size_t>(n_blocks));
            for (int64_t j = 0; j < n_blocks; ++j)
              table[j] = static_cast<int32_t>(n_blocks - 1 - j);
            std::vector<uint16_t> k(n_blocks * block * hd), v(n_blocks * block * hd);
            for (auto& x : k) x = Fp32ToFp16(nd(rng));
            for (auto& x : v) x = Fp32ToFp16(nd(rng));
            std::vector<float> q(group * hd);
            for (auto& x : q) x = spread * nd(rng);
            const KvHeadView kv{k.data(),           v.data(),   table.data(), block,
                                size_t(block * hd), size_t(hd), n_kv};
            std::vector<float> scratch(group * n_kv), want(group * hd), got(group * hd);
            AttendKvHeadAvx2(q.data(), group, hd, kv, 0.125f, want.data(), scratch.data());
            AttendKvHeadAvx512(q.data(), group, hd, kv, 0.125f, got.data(), scratch.data());
            for (size_t i = 0; i < want.size(); ++i) {
              ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
                  << i << ": " << got[i] << " vs " << want[i];
            }
          }
        }
      }
    }
  }
#endif
}

}  // namespace
}  // namespace moepool
