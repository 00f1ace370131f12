// The kernels of engine/cuda/expert_kernels.cuh compiled by the host compiler and run under the
// emulation of tests/engine/cuda/cuda_emulation.h: their indexing, tiling, warp and block
// reductions are checked against the host references on every CI machine, GPU or not. Device
// numerics (intrinsics, FMA contraction, exp/sin/cos) are covered by the suites on a GPU.
// clang-format off
#include "tests/engine/cuda/cuda_emulation.h"
#include "engine/cuda/expert_kernels.cuh"
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/cuda/block_math.h"
#include "engine/cuda/expert_kernels.h"
#include "engine/cuda/expert_math.h"
#include "engine/cuda/quant_matmul_ref.h"
#include "engine/quant/fp16.h"
#include "engine/quant/types.h"
#include "engine/transformer.h"
#include "gtest/gtest.h"
#include "tests/engine/cuda/ffn_test_util.h"
#include "tests/engine/cuda/quant_test_util.h"

namespace moepool::cuda {
namespace {

using emulation::Dim3;
using emulation::Launch;

unsigned CeilDiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

class GateUpEmulationTest : public ::testing::TestWithParam<TensorType> {};

// n_ff = 42 leaves the last CTA with idle warps; 13 rows make a full row tile and a ragged one.
TEST_P(GateUpEmulationTest, FusedKernelMatchesReference) {
  const TensorType type = GetParam();
  const int64_t n_embd = 256, n_ff = 42;
  const std::vector<uint8_t> gate = RandomWeights(type, n_ff, n_embd, 21);
  const std::vector<uint8_t> up = RandomWeights(type, n_ff, n_embd, 22);
  for (const int64_t m : {1, 13}) {
    SCOPED_TRACE(std::string(GetTypeTraits(type).name) + " rows " + std::to_string(m));
    const std::vector<float> x = RandomActivations(m, n_embd, 23);
    std::vector<float> g(static_cast<size_t>(m * n_ff)), u(g.size()), want(g.size());
    QuantMatMulReference(type, gate.data(), n_ff, n_embd, x.data(), g.data(), m);
    QuantMatMulReference(type, up.data(), n_ff, n_embd, x.data(), u.data(), m);
    for (size_t i = 0; i < want.size(); ++i) want[i] = SiluMul(g[i], u[i]);
    std::vector<float> got(want.size(), -777.0f);
    DispatchBlockMath(type, [&](auto tag) {
      using M = typename decltype(tag)::type;
      const Dim3 block{32 * kGateUpWarpsPerCta};
      const int64_t bpr = n_embd / M::kBlockElems;
      if (m == 1) {  // the decode variant, as LaunchExpertGateUp picks it
        Launch(Dim3{CeilDiv(n_ff, kGateUpWarpsPerCta)}, block, GateUpKernel<M, 1>, gate.data(),
               up.data(), n_ff, bpr, x.data(), n_embd, m, got.data());
      } else {
        Launch(Dim3{CeilDiv(n_ff, kGateUpWarpsPerCta), CeilDiv(m, kFusedTileRows)}, block,
               GateUpKernel<M, kFusedTileRows>, gate.data(), up.data(), n_ff, bpr, x.data(), n_embd,
               m, got.data());
      }
    });
    EXPECT_LE(RelMaxError(got, want), 1e-5);
  }
}

// The unfused path's element-wise gate (after two QuantMatMul launches).
TEST(ExpertKernelsEmulationTest, SiluMulKernel) {
  std::vector<float> h = RandomActivations(1, 300, 32);
  const std::vector<float> u = RandomActivations(1, 300, 33);
  std::vector<float> want(h.size());
  for (size_t i = 0; i < h.size(); ++i) want[i] = SiluMul(h[i], u[i]);
  Launch(Dim3{CeilDiv(300, 128)}, Dim3{128}, SiluMulKernel, h.data(), u.data(), int64_t{300});
  EXPECT_EQ(h, want);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, GateUpEmulationTest, ::testing::ValuesIn(KernelTypes()),
                         [](const auto& info) {
                           return std::string(GetTypeTraits(info.param).name);
                         });

TEST(ExpertKernelsEmulationTest, RmsNormKernel) {
  const int64_t n = 3, d = 600;  // d not a multiple of the block size
  const std::vector<float> x = RandomActivations(n, d, 24);
  const std::vector<float> w = RandomActivations(1, d, 25);
  std::vector<float> want(x.size()), got(x.size());
  RefRmsNorm(x.data(), w.data(), n, d, 1e-5f, want.data());
  Launch(Dim3{static_cast<unsigned>(n)}, Dim3{kNormThreads}, RmsNormKernel, x.data(), w.data(), d,
         1e-5f, got.data());
  EXPECT_LE(RelMaxError(got, want), 1e-6);
}

TEST(ExpertKernelsEmulationTest, RopeKernel) {
  const int64_t heads = 3, hd = 64, n_rot = 48, pos = 77;
  std::vector<float> want = RandomActivations(heads, hd, 26);
  std::vector<float> got = want;
  RefRope(want.data(), heads, hd, n_rot, pos, 1e4f);
  const float theta_scale = std::pow(1e4f, -2.0f / static_cast<float>(n_rot));
  const int64_t n = heads * n_rot / 2;
  Launch(Dim3{CeilDiv(n, 64)}, Dim3{64}, RopeKernel, got.data(), heads, hd, n_rot / 2, pos,
         theta_scale);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(Fp32ToBits(got[i]), Fp32ToBits(want[i])) << i;
}

TEST(ExpertKernelsEmulationTest, RouteKernel) {
  const int64_t rows = 70;
  const int n_expert = 8, k = 2;
  const std::vector<float> logits = RandomActivations(rows, n_expert, 27);
  std::vector<int32_t> ex_want(rows * k), ex(rows * k, -5);
  std::vector<float> w_want(rows * k), w(rows * k);
  RefRouteTopK(logits.data(), rows, n_expert, k, ex_want.data(), w_want.data());
  Launch(Dim3{CeilDiv(rows, 32)}, Dim3{32}, RouteKernel, logits.data(), rows, n_expert, k,
         ex.data(), w.data());
  EXPECT_EQ(ex, ex_want);
  EXPECT_EQ(w, w_want);
}

TEST(ExpertKernelsEmulationTest, AttentionDecodeKernel) {
  const int64_t n_head = 4, n_head_kv = 2, hd = 32, kv_dim = n_head_kv * hd;
  const int64_t block_size = 8, n_phys = 6, n_kv = 45;  // positions span ragged paged blocks
  const std::vector<float> kf = RandomActivations(n_phys * block_size, kv_dim, 28);
  const std::vector<float> vf = RandomActivations(n_phys * block_size, kv_dim, 29);
  std::vector<uint16_t> k(kf.size()), v(vf.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = Fp32ToFp16(kf[i]);
    v[i] = Fp32ToFp16(vf[i]);
  }
  const std::vector<int32_t> blocks = {5, 1, 0, 3, 2, 4};
  const std::vector<float> q = RandomActivations(n_head, hd, 30);
  KvDeviceView view{k.data(),
                    v.data(),
                    blocks.data(),
                    block_size,
                    static_cast<size_t>(block_size * kv_dim),
                    static_cast<size_t>(kv_dim),
                    n_kv};
  std::vector<float> want(q.size()), got(q.size());
  std::vector<float> scratch(static_cast<size_t>(n_head * n_kv));
  RefAttentionDecode(q.data(), n_head, n_head_kv, hd, view, 0.125f, want.data());
  Launch(Dim3{static_cast<unsigned>(n_head)}, Dim3{kAttnThreads}, AttentionDecodeKernel, q.data(),
         n_head / n_head_kv, hd, view, 0.125f, got.data(), scratch.data());
  EXPECT_LE(RelMaxError(got, want), 1e-6);
}

// Gather, scale into slots, combine: rows 0..2 with k = 2; expert "A" has rows {2, 0} (slot
// ranks 0 and 1), expert "B" row 0 (rank 0 -> row 0 holds B first only if B < A; here the
// slots are given directly).
TEST(ExpertKernelsEmulationTest, DispatchAndCombineKernels) {
  const int64_t n = 3, d = 40;
  const int k = 2;
  const std::vector<float> x = RandomActivations(n, d, 31);
  const std::vector<int32_t> rows = {2, 0};
  std::vector<float> xg(2 * d, 0.0f);
  Launch(Dim3{2}, Dim3{32}, GatherRowsKernel, x.data(), rows.data(), d, xg.data());
  for (int64_t c = 0; c < d; ++c) {
    ASSERT_EQ(xg[c], x[2 * d + c]);
    ASSERT_EQ(xg[d + c], x[c]);
  }
  // y = xg; slots: row 2 rank 1 and row 0 rank 0.
  const std::vector<int32_t> slot = {2 * k + 1, 0 * k + 0};
  const std::vector<float> weight = {0.25f, 0.75f};
  std::vector<float> slots(static_cast<size_t>(n * k * d), 0.0f);
  Launch(Dim3{2}, Dim3{32}, ScaleToSlotsKernel, xg.data(), slot.data(), weight.data(), d,
         slots.data());
  // A second expert fills row 2 rank 0 with x row 1.
  const std::vector<int32_t> slot2 = {2 * k + 0};
  const std::vector<float> weight2 = {0.5f};
  Launch(Dim3{1}, Dim3{32}, ScaleToSlotsKernel, x.data() + d, slot2.data(), weight2.data(), d,
         slots.data());
  std::vector<float> out(static_cast<size_t>(n * d), -1.0f);
  Launch(Dim3{CeilDiv(n * d, 64)}, Dim3{64}, CombineSlotsKernel, slots.data(), n, k, d, out.data());
  for (int64_t c = 0; c < d; ++c) {
    EXPECT_EQ(out[c], 0.0f + 0.75f * x[c]);
    EXPECT_EQ(out[d + c], 0.0f);
    const float first = 0.5f * x[d + c];
    const float second = 0.25f * x[2 * d + c];
    EXPECT_EQ(Fp32ToBits(out[2 * d + c]), Fp32ToBits((0.0f + first) + second));
  }
}

// ---- The batched kernels of the device forward pass (attention_rows.cu): RoPE, K/V store and
// attention of rows that each have their own position and paged cache, the residual add.

constexpr int64_t kHeads = 4, kHeadsKv = 2, kHeadDim = 32, kKvDim = kHeadsKv * kHeadDim;
constexpr int64_t kLayers = 2, kBlockSize = 8;

// A paged pool in the layout of KvBlockPool: [blocks x layers x block_size x kv_dim] halves.
struct HostPool {
  explicit HostPool(int64_t n_blocks, uint32_t seed)
      : k(static_cast<size_t>(n_blocks * kLayers * kBlockSize * kKvDim)), v(k.size()) {
    const std::vector<float> kf = RandomActivations(1, static_cast<int64_t>(k.size()), seed);
    const std::vector<float> vf = RandomActivations(1, static_cast<int64_t>(v.size()), seed + 1);
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = Fp32ToFp16(kf[i]);
      v[i] = Fp32ToFp16(vf[i]);
    }
  }
  KvRowRef Row(const std::vector<int32_t>& table, int64_t pos) {
    KvRowRef r;
    r.k = k.data();
    r.v = v.data();
    r.blocks = table.data();
    r.block_size = kBlockSize;
    r.block_stride = static_cast<size_t>(kLayers * kBlockSize * kKvDim);
    r.layer_stride = static_cast<size_t>(kBlockSize * kKvDim);
    r.pos = pos;
    return r;
  }
  std::vector<uint16_t> k, v;
};

TEST(AttentionRowsEmulationTest, RopeRowsMatchesApplyRopePerRow) {
  const int64_t n = 3, n_rot = 24;
  const std::vector<int64_t> pos = {0, 17, 4095};
  std::vector<float> want = RandomActivations(n, kHeads * kHeadDim, 40);
  std::vector<float> got = want;
  for (int64_t r = 0; r < n; ++r) {
    ApplyRope(&want[static_cast<size_t>(r * kHeads * kHeadDim)], kHeads, kHeadDim, n_rot, pos[r],
              1e6f);
  }
  const float theta_scale = std::pow(1e6f, -2.0f / static_cast<float>(n_rot));
  Launch(Dim3{CeilDiv(kHeads * n_rot / 2, 32), static_cast<unsigned>(n)}, Dim3{32}, RopeRowsKernel,
         got.data(), kHeads * kHeadDim, kHeads, kHeadDim, n_rot / 2, pos.data(), theta_scale);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(Fp32ToBits(got[i]), Fp32ToBits(want[i])) << i;
}

TEST(AttentionRowsEmulationTest, StoreKvRowsWritesEachRowIntoItsBlockAndLayer) {
  HostPool pool(4, 41);
  const std::vector<int32_t> table = {3, 0, 2};
  const std::vector<KvRowRef> rows = {pool.Row(table, 0), pool.Row(table, 9), pool.Row(table, 23)};
  const std::vector<float> k = RandomActivations(3, kKvDim, 42);
  const std::vector<float> v = RandomActivations(3, kKvDim, 43);
  HostPool want = pool;
  std::vector<KvRowRef> want_rows = rows;
  for (KvRowRef& r : want_rows) {
    r.k = want.k.data();
    r.v = want.v.data();
  }
  RefStoreKvRows(want_rows.data(), 3, /*layer=*/1, kKvDim, k.data(), v.data());
  Launch(Dim3{3}, Dim3{32}, StoreKvRowsKernel, rows.data(), int64_t{1}, kKvDim, k.data(), v.data());
  EXPECT_EQ(pool.k, want.k);
  EXPECT_EQ(pool.v, want.v);
  // Position 9 is logical block 1 -> physical block 0, row 1 of layer 1.
  const size_t at =
      static_cast<size_t>(0 * kLayers * kBlockSize * kKvDim + 1 * kBlockSize * kKvDim + 1 * kKvDim);
  EXPECT_EQ(pool.k[at + 5], Fp32ToFp16(k[kKvDim + 5]));
  EXPECT_EQ(pool.v[at + 7], Fp32ToFp16(v[kKvDim + 7]));
}

// Three rows in two pools: two of one sequence (positions 20 and 21) and one of another whose
// blocks are ordered differently; each row attends over its own positions only.
TEST(AttentionRowsEmulationTest, AttentionRowsMatchesTheReferencePerRow) {
  HostPool a(4, 44), b(3, 45);
  const std::vector<int32_t> ta = {2, 0, 3}, tb = {1, 2};
  const std::vector<KvRowRef> rows = {a.Row(ta, 20), a.Row(ta, 21), b.Row(tb, 12)};
  const int64_t n = 3, max_kv = 22, width = kHeads * kHeadDim;
  const std::vector<float> q = RandomActivations(n, width, 46);
  std::vector<float> want(q.size()), got(q.size(), -9.0f);
  RefAttentionRows(q.data(), rows.data(), n, /*layer=*/1, kHeads, kHeadsKv, kHeadDim, 0.2f,
                   want.data());
  for (int64_t r = 0; r < n; ++r) {  // the reference agrees with the one-token reference
    std::vector<float> one(static_cast<size_t>(width));
    RefAttentionDecode(q.data() + r * width, kHeads, kHeadsKv, kHeadDim,
                       RowKvView(rows[static_cast<size_t>(r)], 1, kKvDim), 0.2f, one.data());
    for (int64_t i = 0; i < width; ++i) ASSERT_EQ(one[i], want[r * width + i]);
  }
  std::vector<float> scratch(static_cast<size_t>(n * kHeads * max_kv));
  Launch(Dim3{static_cast<unsigned>(kHeads), static_cast<unsigned>(n)}, Dim3{kAttnThreads},
         AttentionRowsKernel, q.data(), rows.data(), int64_t{1}, kHeads, kHeads / kHeadsKv,
         kHeadDim, 0.2f, got.data(), scratch.data(), max_kv);
  EXPECT_LE(RelMaxError(got, want), 1e-6);
  // Row 2 must not see pool a: recompute it alone.
  std::vector<float> alone(static_cast<size_t>(width));
  RefAttentionRows(q.data() + 2 * width, rows.data() + 2, 1, 1, kHeads, kHeadsKv, kHeadDim, 0.2f,
                   alone.data());
  for (int64_t i = 0; i < width; ++i) EXPECT_EQ(alone[i], want[2 * width + i]);
}

TEST(AttentionRowsEmulationTest, AddInPlaceKernel) {
  std::vector<float> x = RandomActivations(1, 300, 47);
  const std::vector<float> y = RandomActivations(1, 300, 48);
  std::vector<float> want = x;
  for (size_t i = 0; i < want.size(); ++i) want[i] += y[i];
  Launch(Dim3{CeilDiv(300, 64)}, Dim3{64}, AddInPlaceKernel, x.data(), y.data(), int64_t{300});
  EXPECT_EQ(x, want);
}

}  // namespace
}  // namespace moepool::cuda
