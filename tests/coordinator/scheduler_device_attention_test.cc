// The scheduler over an engine whose attention, router and head run behind the device backend
// (engine/cuda/device_attention.h) on its host-reference DeviceOps: continuous batching, paging,
// the prefix cache and micro-batches work unchanged on the device's copy of the KV pool, and a
// pool that does not fit the device is a startup error.
#include <memory>
#include <string>
#include <vector>

#include "coordinator/scheduler.h"
#include "engine/cuda/device_attention.h"
#include "engine/cuda/device_ops.h"
#include "gtest/gtest.h"
#include "tests/coordinator/serve_test_util.h"

namespace moepool {
namespace {

using ::moepool::testing::Drain;
using ::moepool::testing::Drained;
using ::moepool::testing::LoadTinyEngine;

constexpr int kMaxTokens = 10;

// The reference "device" with `memory_bytes` of memory.
decltype(EngineOptions::attention) ReferenceDevice(uint64_t memory_bytes = UINT64_MAX) {
  return [memory_bytes](const Model& model) {
    return CreateDeviceAttentionBackend(&model, cuda::CreateReferenceDeviceOps(memory_bytes));
  };
}

GenerationRequest Request(Engine* engine, const std::string& prompt) {
  GenerationRequest r;
  r.prompt = engine->Tokenize(prompt);
  r.sampling.temperature = 0.0f;
  r.max_tokens = kMaxTokens;
  return r;
}

// Three greedy requests, two sharing a 20-token prefix, admitted together and run in chunks of
// 7 rows over two micro-batches: each generates what Engine::Generate gives alone, the shared
// prefix is attached from the cache, and every block returns.
TEST(SchedulerDeviceAttentionTest, BatchedRequestsGenerateWhatTheyWouldAlone) {
  auto engine = LoadTinyEngine(128, ReferenceDevice());
  ASSERT_NE(engine, nullptr);
  const std::string shared =
      "A long shared beginning that several requests repeat word for word, and then";
  const std::vector<std::string> prompts = {shared + " one", shared + " two", "Hello there"};
  std::vector<std::vector<int32_t>> refs;
  for (const std::string& p : prompts) {
    Engine::GenerateOptions g;
    g.max_tokens = kMaxTokens;
    g.sampling.temperature = 0.0f;
    auto out = engine->Generate(engine->Tokenize(p), g, nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    refs.push_back(*out);
  }
  SchedulerOptions o;
  o.max_active = 3;
  o.step_tokens = 7;
  o.micro_batches = 2;
  o.block_size = 4;
  Scheduler sched(engine.get(), o, nullptr);
  ASSERT_TRUE(sched.PrepareBackend().ok());
  // The first request runs alone first, so its prefix blocks are published for the others.
  auto first = sched.Submit(Request(engine.get(), prompts[0]));
  ASSERT_TRUE(first.ok()) << first.status();
  sched.Start();
  const Drained d0 = Drain(first->get());
  EXPECT_EQ(d0.tokens, refs[0]);
  std::vector<std::shared_ptr<GenerationStream>> streams;
  for (size_t i = 1; i < prompts.size(); ++i) {
    auto s = sched.Submit(Request(engine.get(), prompts[i]));
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(*s);
  }
  for (size_t i = 0; i < streams.size(); ++i) {
    const Drained d = Drain(streams[i].get());
    EXPECT_EQ(d.tokens, refs[i + 1]) << "request " << i + 1;
  }
  EXPECT_GT(sched.stats().prefix_hit_tokens, 0u);
  EXPECT_EQ(sched.stats().kv_blocks_used, 0);
}

// A KV pool larger than the device's free memory fails PrepareBackend (ServeSession::Create
// calls it before serving) with RESOURCE_EXHAUSTED that names the remedy.
TEST(SchedulerDeviceAttentionTest, APoolThatDoesNotFitTheDeviceIsAStartupError) {
  auto engine = LoadTinyEngine(4096, ReferenceDevice(/*memory_bytes=*/64ull << 20));
  ASSERT_NE(engine, nullptr);  // the weights fit
  SchedulerOptions o;
  o.max_active = 32;  // 32 x 4096 positions x 4 layers x 64 x 2 x 2 bytes = 128 MiB
  Scheduler sched(engine.get(), o, nullptr);
  const absl::Status s = sched.PrepareBackend();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("--parallel"), std::string::npos) << s;
  SchedulerOptions small;
  small.max_active = 2;
  Scheduler fits(engine.get(), small, nullptr);
  EXPECT_TRUE(fits.PrepareBackend().ok());
}

}  // namespace
}  // namespace moepool
