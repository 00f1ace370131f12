#include "engine/kv_cache.h"

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/attention.h"
#include "engine/moe_ffn.h"
#include "engine/quant/fp16.h"
#include "engine/quant/types.h"
#include "engine/transformer.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::SharedTestdataPath;

ModelConfig SmallConfig() {
  ModelConfig c;
  c.n_layer = 2;
  c.n_embd = 64;
  c.n_head = 4;
  c.n_head_kv = 2;
  c.head_dim = 16;
  return c;
}

TEST(KvBlockPoolTest, HandsOutEveryBlockOnceAndTakesThemBack) {
  KvBlockPool pool(SmallConfig(), 16, 3);
  EXPECT_EQ(pool.free_blocks(), 3);
  const int32_t a = pool.Allocate(), b = pool.Allocate(), c = pool.Allocate();
  EXPECT_EQ(pool.Allocate(), -1);
  EXPECT_NE(a, b);
  EXPECT_NE(b, c);
  EXPECT_NE(a, c);
  EXPECT_EQ(pool.used_blocks(), 3);
  pool.Free(b);
  EXPECT_EQ(pool.free_blocks(), 1);
  EXPECT_EQ(pool.Allocate(), b);  // most recently freed first
}

TEST(KvCacheTest, PagedCacheTakesBlocksOnDemandAndReturnsThem) {
  KvBlockPool pool(SmallConfig(), 16, 4);
  {
    KvCache cache(&pool, 100);
    EXPECT_EQ(cache.capacity(), 0);
    ASSERT_TRUE(cache.Reserve(17).ok());
    EXPECT_EQ(cache.n_blocks(), 2);
    EXPECT_EQ(cache.capacity(), 32);
    ASSERT_TRUE(cache.Reserve(5).ok());  // already there
    EXPECT_EQ(pool.used_blocks(), 2);
    EXPECT_EQ(cache.Reserve(101).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(cache.Reserve(80).code(), absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(cache.n_blocks(), 4);  // what it got stays until released
    cache.set_n_past(60);
    cache.Release();
    EXPECT_EQ(cache.n_past(), 0);
    EXPECT_EQ(pool.free_blocks(), 4);
    ASSERT_TRUE(cache.Reserve(3).ok());
  }
  EXPECT_EQ(pool.free_blocks(), 4);  // the destructor returned the last one
}

TEST(KvCacheTest, SingleSequenceFormSpansTheWholeContext) {
  KvCache cache(SmallConfig(), 300);
  EXPECT_EQ(cache.capacity(), 300);
  EXPECT_EQ(cache.n_blocks(), 1);
  std::vector<float> k(32, 1.5f), v(32, -2.0f);
  cache.Store(1, 299, k.data(), v.data());
  EXPECT_EQ(HalfToFloat(cache.K(1, 299)[31]), 1.5f);
  EXPECT_EQ(HalfToFloat(cache.V(1, 299)[0]), -2.0f);
  cache.Release();
  EXPECT_EQ(cache.capacity(), 300);
}

// The same K/V values through a contiguous view and through scattered blocks.
TEST(AttentionTest, PagedViewGivesTheContiguousResultBitForBit) {
  const int group = 4;
  const int64_t hd = 32, n_kv = 45, bs = 8;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<uint16_t> kc(n_kv * hd), vc(n_kv * hd);
  for (auto& x : kc) x = Fp32ToFp16(nd(rng));
  for (auto& x : vc) x = Fp32ToFp16(nd(rng));
  std::vector<float> q(group * hd);
  for (auto& x : q) x = nd(rng);
  // Six physical blocks in a shuffled order.
  const std::vector<int32_t> table = {4, 0, 5, 2, 1, 3};
  std::vector<uint16_t> kp(6 * bs * hd), vp(6 * bs * hd);
  for (int64_t p = 0; p < n_kv; ++p) {
    const int64_t dst = (table[p / bs] * bs + p % bs) * hd;
    std::memcpy(&kp[dst], &kc[p * hd], hd * sizeof(uint16_t));
    std::memcpy(&vp[dst], &vc[p * hd], hd * sizeof(uint16_t));
  }
  const int32_t one_block = 0;
  const KvHeadView contiguous{kc.data(), vc.data(), &one_block, n_kv, 0, size_t(hd), n_kv};
  const KvHeadView paged{kp.data(), vp.data(), table.data(), bs, size_t(bs * hd), size_t(hd), n_kv};
  std::vector<float> scratch(group * n_kv), a(group * hd), b(group * hd);
  AttendKvHeadScalar(q.data(), group, hd, contiguous, 0.2f, a.data(), scratch.data());
  AttendKvHeadScalar(q.data(), group, hd, paged, 0.2f, b.data(), scratch.data());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
#if defined(MOEPOOL_HAVE_AVX2_KERNELS)
  if (CpuHasAvx2()) {
    AttendKvHeadAvx2(q.data(), group, hd, contiguous, 0.2f, a.data(), scratch.data());
    AttendKvHeadAvx2(q.data(), group, hd, paged, 0.2f, b.data(), scratch.data());
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
  }
#endif
}

// A prompt and decode steps through a paged cache (with blocks scattered by another sequence)
// give exactly the logits of the contiguous single-sequence cache.
TEST(KvCacheTest, ForwardThroughPagedCacheIsBitIdentical) {
  const std::string path = SharedTestdataPath("conformance/tiny-F16.gguf");
  REQUIRE_TESTDATA(path);
  auto model = Model::Load(path);
  ASSERT_TRUE(model.ok()) << model.status();
  ThreadPool pool(2);
  LocalExpertBackend experts(model->get(), &pool);
  Transformer tf(model->get(), &experts, &pool);
  const ModelConfig& c = (*model)->config();
  std::vector<int32_t> tokens;
  for (int i = 0; i < 40; ++i) tokens.push_back(100 + 37 * i);

  auto run = [&](KvCache* cache, KvCache* other) {
    std::vector<float> logits;
    std::vector<BatchRow> rows;
    for (int i = 0; i < 30; ++i) rows.push_back({tokens[i], i, cache, true});
    EXPECT_TRUE(tf.Forward(rows, &logits).ok());
    for (int i = 30; i < 40; ++i) {
      std::vector<BatchRow> step = {{tokens[i], i, cache, true}};
      // Interleave another sequence's blocks so this one's are not adjacent.
      if (other != nullptr) step.push_back({tokens[i - 30], i - 30, other, false});
      EXPECT_TRUE(tf.Forward(step, &logits).ok());
    }
    return logits;
  };
  KvCache contiguous(c, 64);
  const std::vector<float> want = run(&contiguous, nullptr);
  KvBlockPool blocks(c, 4, 32);
  KvCache paged(&blocks, 64), other(&blocks, 64);
  const std::vector<float> got = run(&paged, &other);
  ASSERT_EQ(want.size(), got.size());
  EXPECT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)));
  EXPECT_EQ(paged.n_blocks(), 10);
  EXPECT_EQ(other.n_blocks(), 3);
}

TEST(KvCacheTest, ForwardReportsAnExhaustedPool) {
  const std::string path = SharedTestdataPath("conformance/tiny-F16.gguf");
  REQUIRE_TESTDATA(path);
  auto model = Model::Load(path);
  ASSERT_TRUE(model.ok()) << model.status();
  ThreadPool pool(1);
  LocalExpertBackend experts(model->get(), &pool);
  Transformer tf(model->get(), &experts, &pool);
  KvBlockPool blocks((*model)->config(), 4, 2);
  KvCache cache(&blocks, 64);
  std::vector<BatchRow> rows;
  for (int i = 0; i < 9; ++i) rows.push_back({1, i, &cache, false});
  std::vector<float> logits;
  EXPECT_EQ(tf.Forward(rows, &logits).code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace moepool
