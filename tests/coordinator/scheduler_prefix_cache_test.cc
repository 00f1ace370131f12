// The scheduler's prefix caching: a sequence whose tokens start like an earlier one's attaches
// that one's published KV blocks, prefills only the rest, and still generates exactly the tokens
// it generates alone (Engine::Generate).
#include <memory>
#include <string>
#include <vector>

#include "coordinator/scheduler.h"
#include "gtest/gtest.h"
#include "tests/coordinator/serve_test_util.h"

namespace moepool {
namespace {

using ::moepool::testing::Drain;
using ::moepool::testing::Drained;
using ::moepool::testing::LoadTinyEngine;

constexpr int kMaxTokens = 12;
constexpr int64_t kBlock = 16;  // SchedulerOptions' default block size

SamplingParams Sampled(uint64_t seed) {
  SamplingParams p;
  p.temperature = 0.8f;
  p.top_p = 0.95f;
  p.seed = seed;
  return p;
}

std::vector<int32_t> Reference(Engine* engine, const std::vector<int32_t>& prompt,
                               const SamplingParams& sampling) {
  Engine::GenerateOptions g;
  g.max_tokens = kMaxTokens;
  g.sampling = sampling;
  auto out = engine->Generate(prompt, g, nullptr);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : std::vector<int32_t>{};
}

Drained Generate(Scheduler* sched, const std::vector<int32_t>& prompt,
                 const SamplingParams& sampling) {
  GenerationRequest r;
  r.prompt = prompt;
  r.sampling = sampling;
  r.max_tokens = kMaxTokens;
  r.ignore_eos = true;
  auto stream = sched->Submit(std::move(r));
  EXPECT_TRUE(stream.ok()) << stream.status();
  if (!stream.ok()) return {};
  return Drain(stream->get());
}

// Whole blocks below `positions`.
int64_t WholeBlocks(int64_t positions) { return positions / kBlock * kBlock; }

class SchedulerPrefixCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    engine_ = LoadTinyEngine(256);
    ASSERT_NE(engine_, nullptr);
    system_ = engine_->Tokenize(
        "You are a helpful assistant. Answer briefly, in plain words, and say when you are not "
        "sure. The user is a student of marine biology who likes short lists.");
    ASSERT_GT(system_.size(), 2 * kBlock);
  }
  std::vector<int32_t> WithQuestion(const std::string& q) const {
    std::vector<int32_t> p = system_;
    const std::vector<int32_t> t = engine_->tokenizer().Encode(q, /*add_bos=*/false);
    p.insert(p.end(), t.begin(), t.end());
    return p;
  }
  std::unique_ptr<Engine> engine_;
  std::vector<int32_t> system_;  // a shared system prompt, BOS first
};

TEST_F(SchedulerPrefixCacheTest, ASharedPrefixIsComputedOnceAndChangesNoToken) {
  const std::vector<int32_t> a = WithQuestion(" Which fish live longest?");
  const std::vector<int32_t> b = WithQuestion(" Name three kinds of coral.");
  const std::vector<int32_t> want_a = Reference(engine_.get(), a, Sampled(1));
  const std::vector<int32_t> want_b = Reference(engine_.get(), b, Sampled(2));
  Scheduler sched(engine_.get(), {}, nullptr);
  sched.Start();

  const Drained first = Generate(&sched, a, Sampled(1));
  EXPECT_EQ(first.tokens, want_a);
  EXPECT_EQ(first.cached_prompt_tokens, 0);
  const Drained again = Generate(&sched, a, Sampled(1));
  EXPECT_EQ(again.tokens, want_a);
  EXPECT_EQ(again.cached_prompt_tokens, WholeBlocks(static_cast<int64_t>(a.size()) - 1));
  const Drained other = Generate(&sched, b, Sampled(2));
  EXPECT_EQ(other.tokens, want_b);
  // The blocks that hold only the shared system prompt.
  int64_t common = 0;
  while (a[static_cast<size_t>(common)] == b[static_cast<size_t>(common)]) ++common;
  EXPECT_EQ(other.cached_prompt_tokens, WholeBlocks(common));
  EXPECT_GE(other.cached_prompt_tokens, 2 * kBlock);

  const SchedulerStats st = sched.stats();
  EXPECT_EQ(st.prefix_hit_tokens,
            static_cast<uint64_t>(again.cached_prompt_tokens + other.cached_prompt_tokens));
  EXPECT_EQ(st.kv_blocks_used, 0);  // cached blocks nobody holds count as free
  EXPECT_GT(st.kv_blocks_cached, 0);
}

// Four requests with one system prompt arrive together: the first computes the shared blocks, the
// others wait one step and attach them instead of computing them too.
TEST_F(SchedulerPrefixCacheTest, RequestsArrivingTogetherComputeTheirSharedPrefixOnce) {
  const char* questions[] = {" Which fish live longest?", " Name three kinds of coral.",
                             " Why do whales sing?", " What is a tide pool?"};
  Scheduler sched(engine_.get(), {}, nullptr);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (int i = 0; i < 4; ++i) {
    prompts.push_back(WithQuestion(questions[i]));
    GenerationRequest r;
    r.prompt = prompts.back();
    r.sampling = Sampled(30 + i);
    r.max_tokens = kMaxTokens;
    r.ignore_eos = true;
    auto stream = sched.Submit(std::move(r));
    ASSERT_TRUE(stream.ok()) << stream.status();
    streams.push_back(*stream);
  }
  sched.Start();  // all four are admitted in the first step, which has room for all prompts
  int64_t common = static_cast<int64_t>(system_.size());
  for (int i = 0; i < 4; ++i) {
    const Drained d = Drain(streams[static_cast<size_t>(i)].get());
    EXPECT_EQ(d.tokens, Reference(engine_.get(), prompts[static_cast<size_t>(i)], Sampled(30 + i)))
        << "request " << i;
    EXPECT_EQ(d.cached_prompt_tokens, i == 0 ? 0 : WholeBlocks(common)) << "request " << i;
  }
  EXPECT_EQ(sched.stats().prefix_hit_tokens, static_cast<uint64_t>(3 * WholeBlocks(common)));
}

// The second turn of a chat resends the first turn and its reply: everything up to the reply's
// last computed position comes from the cache.
TEST_F(SchedulerPrefixCacheTest, ANextTurnReusesTheWholeConversationSoFar) {
  const std::vector<int32_t> turn1 = WithQuestion(" What is a reef?");
  Scheduler sched(engine_.get(), {}, nullptr);
  sched.Start();
  const Drained reply = Generate(&sched, turn1, Sampled(3));
  ASSERT_EQ(reply.tokens.size(), static_cast<size_t>(kMaxTokens));
  std::vector<int32_t> turn2 = turn1;
  turn2.insert(turn2.end(), reply.tokens.begin(), reply.tokens.end());
  const std::vector<int32_t> more = engine_->tokenizer().Encode(" And a lagoon?", false);
  turn2.insert(turn2.end(), more.begin(), more.end());

  const Drained second = Generate(&sched, turn2, Sampled(4));
  EXPECT_EQ(second.tokens, Reference(engine_.get(), turn2, Sampled(4)));
  // The last reply token was sampled but never fed back, so its position was not computed.
  EXPECT_EQ(second.cached_prompt_tokens,
            WholeBlocks(static_cast<int64_t>(turn1.size() + reply.tokens.size()) - 1));
}

TEST_F(SchedulerPrefixCacheTest, OffMeansEveryPromptIsComputed) {
  const std::vector<int32_t> a = WithQuestion(" Which fish live longest?");
  SchedulerOptions o;
  o.prefix_cache = false;
  Scheduler sched(engine_.get(), o, nullptr);
  sched.Start();
  const Drained first = Generate(&sched, a, Sampled(5));
  const Drained again = Generate(&sched, a, Sampled(5));
  EXPECT_EQ(first.tokens, again.tokens);
  EXPECT_EQ(again.cached_prompt_tokens, 0);
  EXPECT_EQ(sched.stats().prefix_hit_tokens, 0u);
  EXPECT_EQ(sched.stats().kv_blocks_cached, 0);
}

// A pool of one context (6 blocks). Each request computes 2 full blocks and part of a third, so
// from the third request on, new blocks come from evicting cached ones: least recently released
// first, and of one sequence its tail before its head.
TEST_F(SchedulerPrefixCacheTest, CachedBlocksAreEvictedLeastRecentlyReleasedFirst) {
  SchedulerOptions o;
  o.n_ctx = 96;
  o.kv_blocks = 96 / kBlock;
  Scheduler sched(engine_.get(), o, nullptr);
  sched.Start();
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 3; ++i) {
    // Different from the first token on: nothing is shared between them.
    prompts.push_back(engine_->tokenizer().Encode(
        "Note " + std::to_string(i) +
            ". Answer briefly, in plain words, and say when you are not "
            "sure. The user likes short lists about the sea, its fish and birds.",
        true));
    const int64_t computed = static_cast<int64_t>(prompts.back().size()) + kMaxTokens - 1;
    ASSERT_GT(prompts.back().size(), 2 * kBlock);  // a repeat can attach two blocks
    ASSERT_LT(computed, 3 * kBlock);               // two full blocks, one partial
  }
  auto check = [&](int i, uint64_t seed) {
    const Drained d = Generate(&sched, prompts[static_cast<size_t>(i)], Sampled(seed));
    EXPECT_EQ(d.tokens, Reference(engine_.get(), prompts[static_cast<size_t>(i)], Sampled(seed)))
        << "prompt " << i;
    return d.cached_prompt_tokens;
  };
  // Free blocks in the pool after each request: 6 - 3 = 3 + 1 (the partial block) = 4; then
  // 4 - 3 + 1 = 2; the third request takes both and evicts prompt 0's second block.
  EXPECT_EQ(check(0, 20), 0);
  EXPECT_EQ(check(1, 21), 0);
  EXPECT_EQ(check(2, 22), 0);
  EXPECT_EQ(check(2, 23), 2 * kBlock) << "the latest prompt is cached whole";
  EXPECT_EQ(check(0, 24), kBlock) << "the oldest prompt lost its tail block, not its head";
  EXPECT_EQ(check(1, 25), kBlock) << "the request before evicted prompt 1's tail block";
  const SchedulerStats st = sched.stats();
  EXPECT_EQ(st.preempted, 0u);
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_EQ(st.kv_blocks_free, st.kv_blocks_total);
}

}  // namespace
}  // namespace moepool
