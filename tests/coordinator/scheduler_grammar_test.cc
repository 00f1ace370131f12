// Grammar-constrained sequences in the scheduler: every reply that stops is valid for its
// grammar, and constrained sequences keep the scheduler's invariants (the same tokens alone, in
// a shared batch, and after preemption).
#include <memory>
#include <string>
#include <vector>

#include "coordinator/json_schema.h"
#include "coordinator/scheduler.h"
#include "coordinator/tool_calls.h"
#include "gtest/gtest.h"
#include "tests/coordinator/serve_test_util.h"

namespace moepool {
namespace {

using ::moepool::testing::Drain;
using ::moepool::testing::Drained;
using ::moepool::testing::LoadTinyEngine;

const std::vector<std::string>& Schemas() {
  static const auto* s = new std::vector<std::string>{
      R"({"type":"object","properties":{"name":{"type":"string","maxLength":6},
          "age":{"type":"integer","minimum":0,"maximum":120}},"required":["name","age"]})",
      R"({"type":"array","items":{"enum":["red","green","blue"]},"minItems":1,"maxItems":3})",
      R"({"anyOf":[{"type":"boolean"},{"type":"object","properties":{"x":{"type":"null"}},
          "required":["x"]}]})",
      R"({"type":["string","null"],"maxLength":4})",
  };
  return *s;
}

GenerationRequest Request(Engine* engine, size_t i, uint64_t seed) {
  GenerationRequest r;
  r.prompt = engine->Tokenize("Answer in JSON:");
  r.sampling.temperature = 1.0f;
  r.sampling.top_k = 0;
  r.sampling.top_p = 1.0f;
  r.sampling.min_p = 0.0f;
  r.sampling.seed = seed;
  r.max_tokens = 120;
  auto g = GrammarForJsonSchema(nlohmann::ordered_json::parse(Schemas()[i % Schemas().size()]));
  EXPECT_TRUE(g.ok()) << g.status();
  r.grammar = *g;
  return r;
}

void ExpectValid(const GenerationRequest& req, const Drained& d) {
  if (d.finish == FinishReason::kLength) return;
  ASSERT_EQ(d.finish, FinishReason::kStop) << d.text;
  JsonMatcher m(req.grammar.get());
  EXPECT_TRUE(m.Advance(d.text) && m.CanEnd()) << d.text;
  EXPECT_FALSE(nlohmann::json::parse(d.text, nullptr, false).is_discarded()) << d.text;
}

TEST(SchedulerGrammarTest, ConstrainedRepliesAreValidAndBatchInvariant) {
  auto engine = LoadTinyEngine(512);
  ASSERT_NE(engine, nullptr);
  constexpr size_t kN = 8;
  std::vector<Drained> alone;
  {
    Scheduler sched(engine.get(), {}, nullptr);
    sched.Start();
    for (size_t i = 0; i < kN; ++i) {
      GenerationRequest req = Request(engine.get(), i, 100 + i);
      auto s = sched.Submit(req);
      ASSERT_TRUE(s.ok()) << s.status();
      alone.push_back(Drain(s->get()));
      ExpectValid(req, alone.back());
    }
  }
  int stopped = 0;
  for (const Drained& d : alone) stopped += d.finish == FinishReason::kStop;
  EXPECT_GE(stopped, 6);  // the grammar makes a gibberish model end
  // All together in small steps, and again with a pool too small for all: same tokens.
  for (int64_t kv_blocks : {int64_t{0}, int64_t{40}}) {
    SchedulerOptions o;
    o.max_active = kN;
    o.step_tokens = 5;
    o.kv_blocks = kv_blocks;
    Scheduler sched(engine.get(), o, nullptr);
    std::vector<std::shared_ptr<GenerationStream>> streams;
    for (size_t i = 0; i < kN; ++i) {
      auto s = sched.Submit(Request(engine.get(), i, 100 + i));
      ASSERT_TRUE(s.ok()) << s.status();
      streams.push_back(*s);
    }
    sched.Start();
    for (size_t i = 0; i < kN; ++i) {
      const Drained d = Drain(streams[i].get());
      EXPECT_EQ(d.tokens, alone[i].tokens) << "sequence " << i << " kv_blocks " << kv_blocks;
      EXPECT_EQ(d.text, alone[i].text);
      EXPECT_EQ(d.finish, alone[i].finish);
    }
  }
}

TEST(SchedulerGrammarTest, RequiredToolCallIsACompleteCall) {
  auto engine = LoadTinyEngine(512);
  ASSERT_NE(engine, nullptr);
  ToolSpec spec;
  spec.choice = ToolChoice::kRequired;
  spec.parallel = false;
  spec.functions.push_back(
      {"add",
       {},
       nlohmann::ordered_json::parse(
           R"({"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"integer"}},
          "required":["a","b"],"additionalProperties":false})")});
  auto g = ToolCallGrammar(spec);
  ASSERT_TRUE(g.ok()) << g.status();
  Scheduler sched(engine.get(), {}, nullptr);
  sched.Start();
  int calls = 0;
  for (uint64_t seed = 0; seed < 4; ++seed) {
    GenerationRequest r = Request(engine.get(), 0, seed);
    r.grammar = *g;
    auto s = sched.Submit(r);
    ASSERT_TRUE(s.ok()) << s.status();
    const Drained d = Drain(s->get());
    if (d.finish != FinishReason::kStop) continue;
    ToolCallReply reply(true);
    EXPECT_EQ(reply.Push(d.text), "");
    ToolCallReply::Result result = reply.Finish();
    ASSERT_TRUE(result.is_call) << d.text;
    ASSERT_FALSE(result.calls.empty()) << d.text;
    for (const ToolCall& c : result.calls) {
      EXPECT_EQ(c.name, "add");
      const auto args = nlohmann::json::parse(c.arguments);
      EXPECT_TRUE(args["a"].is_number_integer() && args["b"].is_number_integer()) << c.arguments;
    }
    ++calls;
  }
  EXPECT_GE(calls, 3);
}

}  // namespace
}  // namespace moepool
