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
#include <random>
#include <string>
#include <utility>
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

// A shuffled block table over blocks 0 .. n - 1.
std::vector<int32_t> ShuffledTable(int32_t n, uint32_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = i;
  std::mt19937 rng(seed);
  std::shuffle(t.begin(), t.end(), rng);
  return t;
}

// Rows of two sequences in two pools: a tile of three rows of sequence A whose positions cross
// the first split boundary (kAttnSplit), a lone row of A far past it, and a tile of two rows of
// B. Attention runs as two chunks (rows 0..2 and 3..5) the way the device pass cuts them.
struct TiledBatch {
  TiledBatch() : a(36, 44), b(3, 45), ta(ShuffledTable(36, 1)), tb({1, 2, 0}) {
    rows = {a.Row(ta, kAttnSplit - 2),
            a.Row(ta, kAttnSplit - 1),
            a.Row(ta, kAttnSplit),
            a.Row(ta, 279),
            b.Row(tb, 11),
            b.Row(tb, 12)};
    q = RandomActivations(n, width, 46);
  }
  // Runs chunk [r0, r0 + 3) of the batch's tiles through `attend` (the reference or the kernel).
  template <class Attend>
  std::vector<float> Run(Attend attend) const {
    std::vector<float> out(q.size(), -9.0f);
    for (const auto& [r0, tiles] : chunks) {
      const int64_t splits = 2;  // position 279 is in split 1
      std::vector<float> partial(static_cast<size_t>(3 * kHeads * splits * (kHeadDim + 2)), -7.0f);
      attend(tiles, r0, splits, partial.data(), out.data());
    }
    return out;
  }
  static constexpr int64_t n = 6, width = kHeads * kHeadDim;
  HostPool a, b;
  std::vector<int32_t> ta, tb;
  std::vector<KvRowRef> rows;
  std::vector<float> q;
  const std::vector<std::pair<int64_t, std::vector<AttnTile>>> chunks = {{0, {{0, 3}}},
                                                                         {3, {{3, 1}, {4, 2}}}};
};

// The tiled reference (online softmax over splits) against the two-pass one-token reference,
// row by row, and each row alone in a tile of its own against the batch: the same bits.
TEST(AttentionRowsEmulationTest, TiledReferenceMatchesTheTwoPassReferenceAndIsBatchInvariant) {
  const TiledBatch t;
  const std::vector<float> got = t.Run([&](const std::vector<AttnTile>& tiles, int64_t r0,
                                           int64_t splits, float* partial, float* out) {
    RefAttentionTiles(t.q.data(), t.rows.data(), tiles.data(), static_cast<int64_t>(tiles.size()),
                      r0, 3, /*layer=*/1, kHeads, kHeadsKv, kHeadDim, 0.2f, splits, partial, out);
  });
  for (int64_t r = 0; r < t.n; ++r) {
    std::vector<float> want(static_cast<size_t>(t.width)), alone(want.size());
    RefAttentionDecode(t.q.data() + r * t.width, kHeads, kHeadsKv, kHeadDim,
                       RowKvView(t.rows[static_cast<size_t>(r)], 1, kKvDim), 0.2f, want.data());
    const std::vector<float> row(got.begin() + r * t.width, got.begin() + (r + 1) * t.width);
    EXPECT_LE(RelMaxError(row, want), 1e-6) << "row " << r;
    // Alone: a one-row tile in a one-row chunk, with more splits than it needs.
    const AttnTile tile{static_cast<int32_t>(r), 1};
    std::vector<float> partial(static_cast<size_t>(kHeads * 3 * (kHeadDim + 2)));
    std::vector<float> out(t.q.size());
    RefAttentionTiles(t.q.data(), t.rows.data(), &tile, 1, r, 1, 1, kHeads, kHeadsKv, kHeadDim,
                      0.2f, 3, partial.data(), out.data());
    for (int64_t i = 0; i < t.width; ++i) {
      ASSERT_EQ(Fp32ToBits(out[r * t.width + i]), Fp32ToBits(row[i])) << "row " << r << " " << i;
    }
  }
}

// The kernel under the emulation computes the reference's bits (the same per-query functions in
// the same order; the host's expf on both sides).
TEST(AttentionRowsEmulationTest, AttentionTileKernelMatchesTheReference) {
  const TiledBatch t;
  const auto reference = [&](const std::vector<AttnTile>& tiles, int64_t r0, int64_t splits,
                             float* partial, float* out) {
    RefAttentionTiles(t.q.data(), t.rows.data(), tiles.data(), static_cast<int64_t>(tiles.size()),
                      r0, 3, 1, kHeads, kHeadsKv, kHeadDim, 0.2f, splits, partial, out);
  };
  const auto kernel = [&](const std::vector<AttnTile>& tiles, int64_t r0, int64_t splits,
                          float* partial, float* out) {
    Launch(Dim3{static_cast<unsigned>(kHeadsKv), static_cast<unsigned>(splits),
                static_cast<unsigned>(tiles.size())},
           Dim3{kAttnTileThreads}, AttentionTileKernel, t.q.data(), t.rows.data(), tiles.data(), r0,
           int64_t{1}, kHeads, kHeads / kHeadsKv, kHeadDim, 0.2f, splits, partial);
    Launch(Dim3{static_cast<unsigned>(kHeads), 3}, Dim3{32}, AttentionMergeKernel, partial,
           t.rows.data(), r0, kHeads, kHeadDim, splits, out);
  };
  const std::vector<float> want = t.Run(reference);
  const std::vector<float> got = t.Run(kernel);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(Fp32ToBits(got[i]), Fp32ToBits(want[i])) << i;
}

// Head sizes that fill the block's buffers: a full tile (AttnTileRows rows, AttnMaxQueries
// queries) across the split boundary and a one-row tile, kernel vs reference, bit for bit. With
// misaligned, the pool starts one half past a 16-byte boundary: the kernel's one-half loads.
struct TileShape {
  int64_t head_dim, n_head, n_head_kv;
  bool misaligned = false;
};
class AttentionTileShapeTest : public ::testing::TestWithParam<TileShape> {};

TEST_P(AttentionTileShapeTest, FullTilesMatchTheReference) {
  const TileShape shape = GetParam();
  const int64_t hd = shape.head_dim, kv_dim = shape.n_head_kv * hd, width = shape.n_head * hd;
  const int64_t group = shape.n_head / shape.n_head_kv;
  const int64_t tile_rows = AttnTileRows(group, hd);
  ASSERT_EQ(tile_rows * group, AttnMaxQueries(hd));  // the block's buffers are full
  const int64_t block = 16, n_blocks = 20;           // one layer, 320 positions
  const std::vector<float> kf = RandomActivations(n_blocks * block, kv_dim, 50);
  const std::vector<float> vf = RandomActivations(n_blocks * block, kv_dim, 51);
  const size_t skip = shape.misaligned ? 1 : 0;
  std::vector<uint16_t> k(kf.size() + skip), v(vf.size() + skip);
  for (size_t i = 0; i < kf.size(); ++i) {
    k[skip + i] = Fp32ToFp16(kf[i]);
    v[skip + i] = Fp32ToFp16(vf[i]);
  }
  const std::vector<int32_t> table = ShuffledTable(n_blocks, 2);
  const auto row = [&](int64_t pos) {
    KvRowRef r;
    r.k = k.data() + skip;
    r.v = v.data() + skip;
    r.blocks = table.data();
    r.block_size = block;
    r.block_stride = static_cast<size_t>(block * kv_dim);
    r.layer_stride = r.block_stride;
    r.pos = pos;
    return r;
  };
  std::vector<KvRowRef> rows;
  for (int64_t i = 0; i < tile_rows; ++i) rows.push_back(row(kAttnSplit - tile_rows / 2 + i));
  rows.push_back(row(300));
  const std::vector<AttnTile> tiles = {{0, static_cast<int32_t>(tile_rows)},
                                       {static_cast<int32_t>(tile_rows), 1}};
  const int64_t n = tile_rows + 1, splits = 2;
  const std::vector<float> q = RandomActivations(n, width, 52);
  std::vector<float> partial(static_cast<size_t>(n * shape.n_head * splits * (hd + 2)));
  std::vector<float> want(q.size()), got(q.size(), -9.0f);
  RefAttentionTiles(q.data(), rows.data(), tiles.data(), 2, 0, n, 0, shape.n_head, shape.n_head_kv,
                    hd, 0.1f, splits, partial.data(), want.data());
  std::fill(partial.begin(), partial.end(), -7.0f);
  Launch(Dim3{static_cast<unsigned>(shape.n_head_kv), static_cast<unsigned>(splits), 2},
         Dim3{kAttnTileThreads}, AttentionTileKernel, q.data(), rows.data(), tiles.data(),
         int64_t{0}, int64_t{0}, shape.n_head, group, hd, 0.1f, splits, partial.data());
  Launch(Dim3{static_cast<unsigned>(shape.n_head), static_cast<unsigned>(n)}, Dim3{64},
         AttentionMergeKernel, partial.data(), rows.data(), int64_t{0}, shape.n_head, hd, splits,
         got.data());
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(Fp32ToBits(got[i]), Fp32ToBits(want[i])) << i;
}

INSTANTIATE_TEST_SUITE_P(HeadSizes, AttentionTileShapeTest,
                         ::testing::Values(TileShape{128, 8, 2}, TileShape{256, 4, 2},
                                           TileShape{64, 16, 2}, TileShape{128, 8, 2, true}),
                         [](const ::testing::TestParamInfo<TileShape>& info) {
                           return "HeadDim" + std::to_string(info.param.head_dim) +
                                  (info.param.misaligned ? "Misaligned" : "");
                         });

TEST(AttentionRowsEmulationTest, ShapesTheKernelCannotHoldAreRefused) {
  EXPECT_TRUE(CheckAttentionShape(32, 8, 128).ok());  // Mixtral
  EXPECT_TRUE(CheckAttentionShape(16, 1, 256).ok());
  EXPECT_EQ(CheckAttentionShape(32, 8, 512).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckAttentionShape(64, 1, 128).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckAttentionShape(32, 5, 128).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AttnTileRows(4, 128), 8);  // Mixtral: 8 rows x 4 query heads per block
  EXPECT_EQ(AttnTileRows(32, 128), 1);
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
