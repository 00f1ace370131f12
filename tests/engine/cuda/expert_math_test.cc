// The host side of the CUDA expert/norm/rope/router/attention maths (engine/cuda/expert_math.h
// and the references of kernel_refs.cc) against the CPU engine's own functions: where the
// engine's evaluation order is reproduced, the results must be bit-identical. Runs in every
// build (no device needed).
#include "engine/cuda/expert_math.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "engine/attention.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/moe_ffn.h"
#include "engine/quant/fp16.h"
#include "engine/swiglu.h"
#include "engine/transformer.h"
#include "gtest/gtest.h"

namespace moepool::cuda {
namespace {

std::vector<float> Normal(size_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

TEST(ExpertMathTest, RouteRowMatchesRouteTopKBitForBit) {
  struct Case {
    int n_expert, k;
  };
  for (const Case c : {Case{8, 2}, Case{8, 1}, Case{16, 4}, Case{64, 8}, Case{3, 3}}) {
    const int64_t rows = 100;
    std::vector<float> logits = Normal(static_cast<size_t>(rows * c.n_expert), 3, 2.0f);
    // Ties: whole rows equal, and pairs equal.
    for (int e = 0; e < c.n_expert; ++e) logits[static_cast<size_t>(e)] = 0.5f;
    for (int e = 0; e < c.n_expert; e += 2) logits[static_cast<size_t>(c.n_expert + e)] = 1.0f;
    std::vector<int32_t> ex_ref(static_cast<size_t>(rows * c.k)), ex(ex_ref.size());
    std::vector<float> w_ref(ex_ref.size()), w(ex_ref.size());
    RouteTopK(logits.data(), rows, c.n_expert, c.k, ex_ref.data(), w_ref.data());
    RefRouteTopK(logits.data(), rows, c.n_expert, c.k, ex.data(), w.data());
    EXPECT_EQ(ex, ex_ref) << c.n_expert << " experts, top-" << c.k;
    for (size_t i = 0; i < w.size(); ++i) {
      ASSERT_EQ(Fp32ToBits(w[i]), Fp32ToBits(w_ref[i])) << "pair " << i;
    }
  }
}

TEST(ExpertMathTest, RopeMatchesApplyRopeBitForBit) {
  for (const int64_t n_rot : {64, 32}) {
    for (const int64_t pos : {0, 1, 17, 4095}) {
      for (const float base : {10000.0f, 1e6f}) {
        std::vector<float> a = Normal(4 * 64, 5);
        std::vector<float> b = a;
        ApplyRope(a.data(), 4, 64, n_rot, pos, base);
        RefRope(b.data(), 4, 64, n_rot, pos, base);
        for (size_t i = 0; i < a.size(); ++i) {
          ASSERT_EQ(Fp32ToBits(a[i]), Fp32ToBits(b[i])) << "n_rot " << n_rot << " pos " << pos;
        }
      }
    }
  }
}

TEST(ExpertMathTest, RmsNormMatchesEngineBitForBit) {
  const int64_t n = 5, d = 320;
  std::vector<float> x = Normal(static_cast<size_t>(n * d), 7, 3.0f);
  std::vector<float> w = Normal(static_cast<size_t>(d), 8);
  std::vector<float> a(x.size()), b(x.size());
  RmsNorm(x.data(), w.data(), n, d, 1e-5f, a.data());
  RefRmsNorm(x.data(), w.data(), n, d, 1e-5f, b.data());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(Fp32ToBits(a[i]), Fp32ToBits(b[i])) << i;
}

TEST(ExpertMathTest, SiluMulIsTheEngineGate) {
  for (const float g : {-30.0f, -2.5f, -0.0f, 0.0f, 1e-3f, 0.7f, 12.0f}) {
    float engine = g;
    const float u = 1.75f;
    SwiGluScalar(&engine, &u, 1);
    EXPECT_EQ(Fp32ToBits(SiluMul(g, u)), Fp32ToBits(engine)) << g;
  }
}

// A paged f16 cache with shuffled physical blocks, grouped-query heads.
TEST(ExpertMathTest, AttentionDecodeMatchesEngineScalarBitForBit) {
  const int64_t n_head = 8, n_head_kv = 2, hd = 64, kv_dim = n_head_kv * hd;
  const int64_t block_size = 16, n_phys = 5, n_kv = 70;
  std::vector<uint16_t> k(static_cast<size_t>(n_phys * block_size * kv_dim));
  std::vector<uint16_t> v(k.size());
  const std::vector<float> kf = Normal(k.size(), 9), vf = Normal(v.size(), 10);
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = Fp32ToFp16(kf[i]);
    v[i] = Fp32ToFp16(vf[i]);
  }
  const std::vector<int32_t> blocks = {3, 0, 4, 1, 2};
  const std::vector<float> q = Normal(static_cast<size_t>(n_head * hd), 11);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  KvDeviceView view;
  view.k = k.data();
  view.v = v.data();
  view.blocks = blocks.data();
  view.block_size = block_size;
  view.block_stride = static_cast<size_t>(block_size * kv_dim);
  view.stride = static_cast<size_t>(kv_dim);
  view.n_kv = n_kv;
  std::vector<float> out(q.size());
  RefAttentionDecode(q.data(), n_head, n_head_kv, hd, view, scale, out.data());

  const int64_t group = n_head / n_head_kv;
  std::vector<float> expect(q.size());
  std::vector<float> scratch(static_cast<size_t>(group * n_kv));
  for (int64_t h = 0; h < n_head_kv; ++h) {
    KvHeadView kv;
    kv.k = k.data() + h * hd;
    kv.v = v.data() + h * hd;
    kv.blocks = blocks.data();
    kv.block_size = block_size;
    kv.block_stride = view.block_stride;
    kv.stride = view.stride;
    kv.n_kv = n_kv;
    AttendKvHeadScalar(q.data() + h * group * hd, static_cast<int>(group), hd, kv, scale,
                       expect.data() + h * group * hd, scratch.data());
  }
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_EQ(Fp32ToBits(out[i]), Fp32ToBits(expect[i])) << i;
  }
}

}  // namespace
}  // namespace moepool::cuda
