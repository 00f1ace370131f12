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

std::vector<int32_t> Tokens(int first, int n) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(first + i);
  return t;
}

TEST(KvBlockPoolTest, PublishedBlockIsSharedUntilEvicted) {
  KvBlockPool pool(SmallConfig(), 4, 3, /*prefix_cache=*/true);
  const std::vector<int32_t> t0 = Tokens(10, 4), t1 = Tokens(20, 4);
  const int32_t a = pool.Allocate();
  const uint64_t k0 = pool.Publish(KvBlockPool::kEmptyPrefix, t0, a);
  ASSERT_NE(k0, 0u);
  EXPECT_EQ(pool.cached_blocks(), 1);
  EXPECT_EQ(pool.free_blocks(), 2);  // still held by its writer
  pool.Free(a);
  EXPECT_EQ(pool.free_blocks(), 3);  // cached, but evictable: counts as free
  EXPECT_EQ(pool.cached_blocks(), 1);

  uint64_t key = 0;
  EXPECT_EQ(pool.Acquire(KvBlockPool::kEmptyPrefix, t1, &key), -1);  // other tokens
  EXPECT_EQ(pool.Acquire(k0, t0, &key), -1);                         // other prefix
  EXPECT_EQ(pool.Acquire(KvBlockPool::kEmptyPrefix, t0, &key), a);
  EXPECT_EQ(key, k0);
  EXPECT_EQ(pool.free_blocks(), 2);
  // A held cached block is never evicted: the pool runs out instead.
  const int32_t b = pool.Allocate(), c = pool.Allocate();
  EXPECT_NE(b, a);
  EXPECT_NE(c, a);
  EXPECT_EQ(pool.Allocate(), -1);
  pool.Free(b);
  pool.Free(c);
  pool.Free(a);
  // Three allocations: two free blocks, then the cached one is evicted.
  std::vector<int32_t> got = {pool.Allocate(), pool.Allocate(), pool.Allocate()};
  EXPECT_EQ(got[2], a);
  EXPECT_EQ(pool.cached_blocks(), 0);
  EXPECT_EQ(pool.free_blocks(), 0);
  for (int32_t g : got) pool.Free(g);
  EXPECT_EQ(pool.Acquire(KvBlockPool::kEmptyPrefix, t0, &key), -1);
  EXPECT_EQ(pool.free_blocks(), 3);
}

TEST(KvBlockPoolTest, EvictsTheLeastRecentlyReleasedCachedBlockFirst) {
  KvBlockPool pool(SmallConfig(), 2, 2, /*prefix_cache=*/true);
  const std::vector<int32_t> tx = Tokens(1, 2), ty = Tokens(5, 2);
  const int32_t x = pool.Allocate(), y = pool.Allocate();
  ASSERT_NE(pool.Publish(KvBlockPool::kEmptyPrefix, tx, x), 0u);
  ASSERT_NE(pool.Publish(KvBlockPool::kEmptyPrefix, ty, y), 0u);
  pool.Free(y);
  pool.Free(x);  // released last: y goes first
  EXPECT_EQ(pool.Allocate(), y);
  uint64_t key = 0;
  EXPECT_EQ(pool.Acquire(KvBlockPool::kEmptyPrefix, ty, &key), -1);
  EXPECT_EQ(pool.Acquire(KvBlockPool::kEmptyPrefix, tx, &key), x);
}

TEST(KvBlockPoolTest, AnEqualBlockIsPublishedOnce) {
  KvBlockPool pool(SmallConfig(), 2, 3, /*prefix_cache=*/true);
  const std::vector<int32_t> t = Tokens(7, 2);
  const int32_t a = pool.Allocate(), b = pool.Allocate();
  const uint64_t ka = pool.Publish(KvBlockPool::kEmptyPrefix, t, a);
  EXPECT_EQ(pool.Publish(KvBlockPool::kEmptyPrefix, t, b), ka);  // same content: a's key
  EXPECT_EQ(pool.cached_blocks(), 1);
  pool.Free(b);  // b was never published: truly free again
  pool.Free(a);
  EXPECT_EQ(pool.free_blocks(), 3);
  EXPECT_EQ(pool.cached_blocks(), 1);
  EXPECT_EQ(pool.Publish(KvBlockPool::kEmptyPrefix, Tokens(7, 3), pool.Allocate()), 0u)
      << "a block holds exactly block_size tokens";
}

TEST(KvBlockPoolTest, WithoutPrefixCachingNothingIsPublished) {
  KvBlockPool pool(SmallConfig(), 2, 2);
  const int32_t a = pool.Allocate();
  EXPECT_EQ(pool.Publish(KvBlockPool::kEmptyPrefix, Tokens(1, 2), a), 0u);
  uint64_t key = 0;
  EXPECT_EQ(pool.Acquire(KvBlockPool::kEmptyPrefix, Tokens(1, 2), &key), -1);
  pool.Free(a);
  EXPECT_EQ(pool.free_blocks(), 2);
  EXPECT_EQ(pool.cached_blocks(), 0);
}

TEST(KvCacheTest, AttachesTheLongestPublishedPrefixOfFullBlocks) {
  KvBlockPool pool(SmallConfig(), 4, 8, /*prefix_cache=*/true);
  const std::vector<int32_t> tokens = Tokens(100, 11);
  {
    KvCache writer(&pool, 64);
    ASSERT_TRUE(writer.Reserve(11).ok());
    writer.set_n_past(6);
    writer.PublishFullBlocks(tokens);  // block 0 only: block 1 is half written
    EXPECT_EQ(pool.cached_blocks(), 1);
    writer.set_n_past(11);
    writer.PublishFullBlocks(tokens);
    EXPECT_EQ(pool.cached_blocks(), 2);
  }
  EXPECT_EQ(pool.used_blocks(), 0);
  KvCache reader(&pool, 64);
  EXPECT_EQ(reader.AttachCachedPrefix(tokens, 7), 4);  // whole blocks within the limit
  EXPECT_EQ(reader.n_past(), 4);
  // Holding only published blocks, it can attach more later (a block published meanwhile).
  EXPECT_EQ(reader.AttachCachedPrefix(tokens, 10), 4);
  EXPECT_EQ(reader.n_past(), 8);
  EXPECT_EQ(reader.n_blocks(), 2);
  EXPECT_EQ(pool.used_blocks(), 2);
  // The reader extends the prefix privately: its new block is its own, and from then on it
  // attaches nothing.
  ASSERT_TRUE(reader.Reserve(11).ok());
  EXPECT_EQ(pool.used_blocks(), 3);
  EXPECT_EQ(reader.AttachCachedPrefix(tokens, 10), 0);
  reader.Release();
  EXPECT_EQ(reader.AttachCachedPrefix(tokens, 10), 8);
  reader.Release();
  std::vector<int32_t> other = tokens;
  other[5] = 1;  // differs in block 1
  EXPECT_EQ(reader.AttachCachedPrefix(other, 10), 4);
  other[0] = 1;  // differs in block 0
  reader.Release();
  EXPECT_EQ(reader.AttachCachedPrefix(other, 10), 0);
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

// The tiny conformance model on a local expert backend, for forward passes through caches.
class KvCacheForwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = SharedTestdataPath("conformance/tiny-F16.gguf");
    REQUIRE_TESTDATA(path);
    auto model = Model::Load(path);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    experts_ = std::make_unique<LocalExpertBackend>(model_.get(), &pool_);
    tf_ = std::make_unique<Transformer>(model_.get(), experts_.get(), &pool_);
  }
  const ModelConfig& config() const { return model_->config(); }

  ThreadPool pool_{2};
  std::unique_ptr<Model> model_;
  std::unique_ptr<LocalExpertBackend> experts_;
  std::unique_ptr<Transformer> tf_;
};

// A prompt and decode steps through a paged cache (with blocks scattered by another sequence)
// give exactly the logits of the contiguous single-sequence cache.
TEST_F(KvCacheForwardTest, ForwardThroughPagedCacheIsBitIdentical) {
  const ModelConfig& c = config();
  std::vector<int32_t> tokens;
  for (int i = 0; i < 40; ++i) tokens.push_back(100 + 37 * i);

  auto run = [&](KvCache* cache, KvCache* other) {
    std::vector<float> logits;
    std::vector<BatchRow> rows;
    for (int i = 0; i < 30; ++i) rows.push_back({tokens[i], i, cache, true});
    EXPECT_TRUE(tf_->Forward(rows, &logits).ok());
    for (int i = 30; i < 40; ++i) {
      std::vector<BatchRow> step = {{tokens[i], i, cache, true}};
      // Interleave another sequence's blocks so this one's are not adjacent.
      if (other != nullptr) step.push_back({tokens[i - 30], i - 30, other, false});
      EXPECT_TRUE(tf_->Forward(step, &logits).ok());
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

// A sequence that attaches another's published prefix computes exactly the logits it computes
// from scratch: the cached KV is what it would have written.
TEST_F(KvCacheForwardTest, ForwardFromACachedPrefixIsBitIdentical) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < 24; ++i) tokens.push_back(200 + 29 * i);
  // Positions [from, 24) of `tokens` through `cache`, one step; the last row's logits.
  auto run = [&](KvCache* cache, int from) {
    EXPECT_TRUE(cache->Reserve(24).ok());
    std::vector<BatchRow> rows;
    for (int i = from; i < 24; ++i) rows.push_back({tokens[i], i, cache, i == 23});
    std::vector<float> logits;
    EXPECT_TRUE(tf_->Forward(rows, &logits).ok());
    cache->set_n_past(24);
    return logits;
  };
  KvBlockPool plain(config(), 8, 4);
  KvCache alone(&plain, 64);
  const std::vector<float> want = run(&alone, 0);

  KvBlockPool cached(config(), 8, 8, /*prefix_cache=*/true);
  {
    KvCache first(&cached, 64);
    run(&first, 0);
    first.PublishFullBlocks(tokens);
  }
  KvCache second(&cached, 64);
  ASSERT_EQ(second.AttachCachedPrefix(tokens, 23), 16);
  const std::vector<float> got = run(&second, 16);
  ASSERT_EQ(want.size(), got.size());
  EXPECT_EQ(0, std::memcmp(want.data(), got.data(), want.size() * sizeof(float)));
}

TEST_F(KvCacheForwardTest, ForwardReportsAnExhaustedPool) {
  KvBlockPool blocks(config(), 4, 2);
  KvCache cache(&blocks, 64);
  std::vector<BatchRow> rows;
  for (int i = 0; i < 9; ++i) rows.push_back({1, i, &cache, false});
  std::vector<float> logits;
  EXPECT_EQ(tf_->Forward(rows, &logits).code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace moepool
