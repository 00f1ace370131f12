// The scheduler with remote experts: steps of several sequences run as two pipelined
// micro-batches (--micro-batches 2) and every sequence still generates exactly what it
// generates alone; --micro-batches 1 never splits; the idle-time metrics are exported.
#include <memory>
#include <string>
#include <vector>

#include "coordinator/cluster_expert_backend.h"
#include "coordinator/metrics.h"
#include "coordinator/scheduler.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/coordinator/fake_worker_util.h"
#include "tests/coordinator/serve_test_util.h"

namespace moepool {
namespace {

using ::moepool::testing::Drain;
using ::moepool::testing::Drained;
using ::moepool::testing::FakeWorker;
using ::moepool::testing::FakeWorkerOptions;
using ::moepool::testing::LoadTinyEngine;
using ::moepool::testing::PairsForExperts;
using ::moepool::testing::TinyModelPath;
using ::testing::HasSubstr;

constexpr int kMaxTokens = 12;

const std::vector<std::string>& Prompts() {
  static const auto* p =
      new std::vector<std::string>{"The quick brown fox", "Once upon a time, in a land far away",
                                   "1, 2, 3, 4, 5, 6", "Hello", "A list of colours: red, green"};
  return *p;
}

SamplingParams Sampling(size_t i) {
  SamplingParams p;
  p.temperature = i % 2 == 0 ? 0.0f : 0.8f;
  p.seed = 100 + i;
  return p;
}

class SchedulerMicroBatchTest : public ::testing::TestWithParam<int> {};

TEST_P(SchedulerMicroBatchTest, SameTokensAsAloneWithRemoteExperts) {
  const int micro_batches = GetParam();
  auto local = LoadTinyEngine(256);
  ASSERT_NE(local, nullptr);
  const int n_layer = static_cast<int>(local->config().n_layer);
  std::vector<std::vector<int32_t>> refs;
  for (size_t i = 0; i < Prompts().size(); ++i) {
    Engine::GenerateOptions g;
    g.max_tokens = kMaxTokens;
    g.ignore_eos = true;
    g.sampling = Sampling(i);
    auto out = local->Generate(local->Tokenize(Prompts()[i]), g, nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    refs.push_back(*out);
  }

  std::unique_ptr<FakeWorker> w[2];
  ClusterOptions co;
  for (int i = 0; i < 2; ++i) {
    FakeWorkerOptions wo;
    wo.model_path = TinyModelPath();
    wo.pairs = PairsForExperts(n_layer, 4 * i, 4 * i + 3);
    auto started = FakeWorker::Start(wo);
    ASSERT_TRUE(started.ok()) << started.status();
    w[i] = *std::move(started);
    co.workers.push_back(w[i]->address());
  }
  auto backend = ClusterExpertBackend::Create(TinyModelPath(), co);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EngineOptions eo;
  eo.model_path = TinyModelPath();
  eo.threads = 1;
  eo.n_ctx = 256;
  eo.experts = backend->get();
  auto engine = Engine::Load(eo);
  ASSERT_TRUE(engine.ok()) << engine.status();

  ServerMetrics metrics(n_layer, static_cast<int>(local->config().n_expert));
  SchedulerOptions o;
  o.max_active = 8;
  o.step_tokens = 9;  // prompts arrive in chunks next to other sequences' decode rows
  o.micro_batches = micro_batches;
  Scheduler sched(engine->get(), o, &metrics);
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (size_t i = 0; i < Prompts().size(); ++i) {
    GenerationRequest r;
    r.prompt = (*engine)->Tokenize(Prompts()[i]);
    r.sampling = Sampling(i);
    r.max_tokens = kMaxTokens;
    r.ignore_eos = true;
    auto s = sched.Submit(r);
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(*s);
  }
  sched.Start();
  for (size_t i = 0; i < streams.size(); ++i) {
    const Drained d = Drain(streams[i].get());
    ASSERT_FALSE(d.timed_out);
    EXPECT_TRUE(d.error.ok()) << d.error;
    EXPECT_EQ(d.tokens, refs[i]) << "sequence " << i;
  }
  const SchedulerStats st = sched.stats();
  EXPECT_GT(st.steps, 0u);
  if (micro_batches == 2) {
    EXPECT_GT(st.micro_batched_steps, 0u);
  } else {
    EXPECT_EQ(st.micro_batched_steps, 0u);
  }
  EXPECT_EQ(st.kv_blocks_used, 0);
  const std::string text = metrics.Render({});
  EXPECT_THAT(text, HasSubstr("moepool_coordinator_idle_seconds_total "));
  EXPECT_THAT(text, HasSubstr("moepool_step_seconds_total "));
  EXPECT_THAT(text, HasSubstr("moepool_coordinator_idle_ratio_bucket{le=\"0.5\"}"));
  EXPECT_THAT(text, HasSubstr("moepool_forward_steps_total{micro_batches=\"2\"} " +
                              std::to_string(st.micro_batched_steps) + "\n"));
  EXPECT_GT((*backend)->blocked_micros(), 0u);
  sched.Stop();
}

INSTANTIATE_TEST_SUITE_P(MicroBatches, SchedulerMicroBatchTest, ::testing::Values(1, 2));

// Local experts (no overlap to gain): never split, whatever the option says.
TEST(SchedulerMicroBatchLocalTest, LocalExpertsAreNeverSplit) {
  auto engine = LoadTinyEngine(128);
  ASSERT_NE(engine, nullptr);
  SchedulerOptions o;
  o.max_active = 4;
  o.micro_batches = 2;
  Scheduler sched(engine.get(), o, nullptr);
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (size_t i = 0; i < 3; ++i) {
    GenerationRequest r;
    r.prompt = engine->Tokenize(Prompts()[i]);
    r.max_tokens = 4;
    auto s = sched.Submit(r);
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(*s);
  }
  sched.Start();
  for (auto& s : streams) EXPECT_FALSE(Drain(s.get()).timed_out);
  EXPECT_GT(sched.stats().steps, 0u);
  EXPECT_EQ(sched.stats().micro_batched_steps, 0u);
}

}  // namespace
}  // namespace moepool
