#include "coordinator/scheduler.h"

#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/coordinator/serve_test_util.h"

namespace moepool {
namespace {

using ::moepool::testing::Drain;
using ::moepool::testing::Drained;
using ::moepool::testing::LoadTinyEngine;

constexpr int kMaxTokens = 24;

struct Case {
  std::string prompt;
  SamplingParams sampling;
};

SamplingParams Greedy() {
  SamplingParams p;
  p.temperature = 0.0f;
  return p;
}

SamplingParams Random(uint64_t seed) {
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_k = 0;
  p.top_p = 0.9f;
  p.min_p = 0.0f;
  p.presence_penalty = 0.5f;
  p.seed = seed;
  return p;
}

const std::vector<Case>& Cases() {
  static const auto* cases = new std::vector<Case>{
      {"The quick brown fox", Greedy()},
      {"Once upon a time, in a land far away, there lived a very old king", Random(1)},
      {"1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16", Random(2)},
      {"Hello", Random(3)},
  };
  return *cases;
}

// What Engine::Generate produces alone (run before the scheduler starts: one forward at a time).
std::vector<std::vector<int32_t>> References(Engine* engine, int max_tokens) {
  std::vector<std::vector<int32_t>> refs;
  for (const Case& c : Cases()) {
    Engine::GenerateOptions g;
    g.max_tokens = max_tokens;
    g.sampling = c.sampling;
    auto out = engine->Generate(engine->Tokenize(c.prompt), g, nullptr);
    EXPECT_TRUE(out.ok()) << out.status();
    refs.push_back(out.ok() ? *out : std::vector<int32_t>{});
  }
  return refs;
}

GenerationRequest Request(Engine* engine, const Case& c, int max_tokens) {
  GenerationRequest r;
  r.prompt = engine->Tokenize(c.prompt);
  r.sampling = c.sampling;
  r.max_tokens = max_tokens;
  return r;
}

std::string Detokenize(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  StreamingDetokenizer d(tok);
  std::string s;
  for (int32_t id : ids) s += d.Push(id);
  return s + d.Flush();
}

TEST(SchedulerTest, GreedyOutputEqualsEngineGenerate) {
  auto engine = LoadTinyEngine(256);
  ASSERT_NE(engine, nullptr);
  const auto refs = References(engine.get(), kMaxTokens);
  Scheduler sched(engine.get(), {}, nullptr);
  sched.Start();
  auto stream = sched.Submit(Request(engine.get(), Cases()[0], kMaxTokens));
  ASSERT_TRUE(stream.ok()) << stream.status();
  const Drained d = Drain(stream->get());
  ASSERT_FALSE(d.timed_out);
  EXPECT_EQ(d.tokens, refs[0]);
  EXPECT_EQ(d.text, Detokenize(engine->tokenizer(), refs[0]));
  EXPECT_EQ(d.completion_tokens, static_cast<int64_t>(refs[0].size()));
  EXPECT_EQ(d.prompt_tokens, static_cast<int64_t>(engine->Tokenize(Cases()[0].prompt).size()));
  EXPECT_EQ(d.finish, refs[0].size() == kMaxTokens ? FinishReason::kLength : FinishReason::kStop);
}

// Four sequences share every batch, prompts arrive in small chunks: each one's tokens are
// exactly what it generates alone.
TEST(SchedulerTest, SequencesSharingTheBatchGenerateWhatTheyWouldAlone) {
  auto engine = LoadTinyEngine(256);
  ASSERT_NE(engine, nullptr);
  const auto refs = References(engine.get(), kMaxTokens);
  SchedulerOptions o;
  o.max_active = 4;
  o.step_tokens = 7;
  Scheduler sched(engine.get(), o, nullptr);
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (const Case& c : Cases()) {
    auto s = sched.Submit(Request(engine.get(), c, kMaxTokens));
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(*s);
  }
  sched.Start();  // all four are admitted together
  for (size_t i = 0; i < streams.size(); ++i) {
    const Drained d = Drain(streams[i].get());
    EXPECT_EQ(d.tokens, refs[i]) << "sequence " << i;
  }
  EXPECT_EQ(sched.stats().kv_blocks_used, 0);
}

// A pool of one context's worth of blocks for four sequences: younger ones are preempted and
// recomputed, and still produce the same tokens.
TEST(SchedulerTest, PreemptedSequencesRecomputeTheSameTokens) {
  auto engine = LoadTinyEngine(64);
  ASSERT_NE(engine, nullptr);
  const auto refs = References(engine.get(), 40);
  SchedulerOptions o;
  o.max_active = 4;
  o.block_size = 4;
  o.kv_blocks = 16;  // 64 positions for four sequences of up to ~60
  Scheduler sched(engine.get(), o, nullptr);
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (const Case& c : Cases()) streams.push_back(*sched.Submit(Request(engine.get(), c, 40)));
  sched.Start();
  for (size_t i = 0; i < streams.size(); ++i) {
    const Drained d = Drain(streams[i].get());
    EXPECT_EQ(d.tokens, refs[i]) << "sequence " << i;
  }
  EXPECT_GT(sched.stats().preempted, 0u);
  EXPECT_EQ(sched.stats().kv_blocks_used, 0);
}

TEST(SchedulerTest, CancellationEndsTheSequenceAndFreesItsBlocks) {
  auto engine = LoadTinyEngine(512);
  ASSERT_NE(engine, nullptr);
  Scheduler sched(engine.get(), {}, nullptr);
  sched.Start();
  GenerationRequest r = Request(engine.get(), Cases()[1], -1);
  r.ignore_eos = true;
  auto stream = sched.Submit(r);
  ASSERT_TRUE(stream.ok());
  GenerationEvent ev;
  while (!(*stream)->Next(&ev, std::chrono::milliseconds(100))) {
  }
  EXPECT_GT(sched.stats().kv_blocks_used, 0);
  (*stream)->Cancel();
  const Drained d = Drain(stream->get());
  EXPECT_EQ(d.finish, FinishReason::kCancelled);
  EXPECT_LT(d.completion_tokens, 500);
  EXPECT_EQ(sched.stats().kv_blocks_used, 0);
  EXPECT_EQ(sched.stats().cancelled, 1u);
  EXPECT_EQ(sched.stats().active, 0);
}

TEST(SchedulerTest, FullQueueRejectsAndStopEndsEverything) {
  auto engine = LoadTinyEngine(128);
  ASSERT_NE(engine, nullptr);
  SchedulerOptions o;
  o.max_active = 1;
  o.max_queue = 1;
  Scheduler sched(engine.get(), o, nullptr);  // not started: nothing leaves the queue
  auto a = sched.Submit(Request(engine.get(), Cases()[0], 4));
  auto b = sched.Submit(Request(engine.get(), Cases()[1], 4));
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(b.ok());
  auto c = sched.Submit(Request(engine.get(), Cases()[2], 4));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(sched.stats().queued, 2);
  sched.Stop();
  for (auto* s : {a->get(), b->get()}) {
    const Drained d = Drain(s);
    EXPECT_EQ(d.finish, FinishReason::kCancelled);
    EXPECT_EQ(d.error.code(), absl::StatusCode::kUnavailable);
  }
  EXPECT_EQ(sched.Submit(Request(engine.get(), Cases()[0], 4)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(SchedulerTest, RejectsBadRequests) {
  auto engine = LoadTinyEngine(16);
  ASSERT_NE(engine, nullptr);
  Scheduler sched(engine.get(), {}, nullptr);
  GenerationRequest r;
  EXPECT_EQ(sched.Submit(r).status().code(), absl::StatusCode::kInvalidArgument);  // empty
  r.prompt = std::vector<int32_t>(16, 5);  // fills the context
  auto s = sched.Submit(r);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("maximum context length is 16"), std::string::npos);
  r.prompt = {1, 99999};
  EXPECT_EQ(sched.Submit(r).status().code(), absl::StatusCode::kInvalidArgument);
  r.prompt = {1, 5};
  r.sampling.temperature = -1;
  EXPECT_EQ(sched.Submit(r).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SchedulerTest, StopStringsAreNeverEmitted) {
  auto engine = LoadTinyEngine(256);
  ASSERT_NE(engine, nullptr);
  const auto refs = References(engine.get(), kMaxTokens);
  const std::string full = Detokenize(engine->tokenizer(), refs[0]);
  ASSERT_GT(full.size(), 20u);
  // A stop string from the middle of the greedy text; the output is the text before it.
  const std::string stop = full.substr(full.size() / 2, 5);
  const std::string want = full.substr(0, full.find(stop));
  Scheduler sched(engine.get(), {}, nullptr);
  sched.Start();
  GenerationRequest r = Request(engine.get(), Cases()[0], kMaxTokens);
  r.stop = {"never appears \xe2\x9c\x93", stop};
  const Drained d = Drain(sched.Submit(r)->get());
  EXPECT_EQ(d.finish, FinishReason::kStop);
  EXPECT_EQ(d.text, want);
  for (const std::string& delta : d.deltas) EXPECT_EQ(delta.find(stop), std::string::npos);
}

TEST(SchedulerTest, ContextEndIsLength) {
  auto engine = LoadTinyEngine(32);
  ASSERT_NE(engine, nullptr);
  Scheduler sched(engine.get(), {}, nullptr);
  sched.Start();
  GenerationRequest r = Request(engine.get(), Cases()[0], -1);
  r.ignore_eos = true;
  const Drained d = Drain(sched.Submit(r)->get());
  EXPECT_EQ(d.finish, FinishReason::kLength);
  // Like Engine::Generate: the last token is emitted without being fed back.
  EXPECT_EQ(d.prompt_tokens + d.completion_tokens, 33);
}

// Many clients at once, some cancelling: afterwards every KV block is back in the pool.
TEST(SchedulerTest, EveryBlockReturnsAfterAConcurrentBurst) {
  auto engine = LoadTinyEngine(128);
  ASSERT_NE(engine, nullptr);
  SchedulerOptions o;
  o.max_active = 3;
  o.max_queue = 100;
  o.block_size = 8;
  o.step_tokens = 32;
  Scheduler sched(engine.get(), o, nullptr);
  sched.Start();
  std::vector<std::thread> clients;
  std::atomic<int> finished{0};
  for (int t = 0; t < 6; ++t) {
    clients.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 3; ++i) {
        GenerationRequest r = Request(engine.get(), Cases()[(t + i) % 4], 1 + rng() % 30);
        r.sampling.seed = rng();
        auto s = sched.Submit(r);
        if (!s.ok()) continue;
        if ((t + i) % 3 == 0) (*s)->Cancel();
        const Drained d = Drain(s->get());
        if (!d.timed_out) finished.fetch_add(1);
      }
    });
  }
  for (auto& c : clients) c.join();
  EXPECT_EQ(finished.load(), 18);
  const SchedulerStats st = sched.stats();
  EXPECT_EQ(st.finished, 18u);
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_EQ(st.active, 0);
  EXPECT_EQ(st.queued, 0);
}

}  // namespace
}  // namespace moepool
