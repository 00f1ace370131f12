// The engine facade: prompt checks, generation determinism and reproducibility, EOS handling and
// token limits.
#include "engine/engine.h"

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::CopyGgufWithEdits;
using ::moepool::testing::GgufEdits;
using ::moepool::testing::PseudoRandomPrompt;
using ::moepool::testing::TempDir;
using ::moepool::testing::TinyModelPath;

constexpr int64_t kCtx = 48;

std::unique_ptr<Engine> LoadEngine(const std::string& path, int64_t n_ctx = kCtx) {
  EngineOptions o;
  o.model_path = path;
  o.threads = 2;
  o.n_ctx = n_ctx;
  auto engine = Engine::Load(o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string& path = TinyModelPath("Q4_K_M");
    ASSERT_FALSE(path.empty());
    engine_ = LoadEngine(path);
    ASSERT_NE(engine_, nullptr);
    prompt_ = engine_->Tokenize("The quick brown fox jumps over the lazy dog.");
  }

  std::vector<int32_t> Generate(const Engine::GenerateOptions& g) {
    auto out = engine_->Generate(prompt_, g, nullptr);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : std::vector<int32_t>{};
  }

  std::unique_ptr<Engine> engine_;
  std::vector<int32_t> prompt_;
};

TEST_F(EngineTest, LoadsWithTheRequestedContextAndTokenizer) {
  EXPECT_EQ(engine_->n_ctx(), kCtx);
  EXPECT_EQ(engine_->config().n_vocab, engine_->tokenizer().n_vocab());
  ASSERT_GE(prompt_.size(), 2u);
  EXPECT_EQ(prompt_[0], engine_->tokenizer().bos_id());
}

TEST(EngineLoadTest, BadOptionsAreErrors) {
  EngineOptions o;
  o.model_path = TempDir() + "/no-such-model.gguf";
  EXPECT_FALSE(Engine::Load(o).ok());
  o.model_path = TinyModelPath("Q4_K_M");
  o.n_ctx = 4097;  // the tiny model was trained for 4096
  const auto too_long = Engine::Load(o);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("4096"), absl::string_view::npos) << too_long.status();
  o.n_ctx = 0;  // default: min(model context, 4096)
  auto engine = Engine::Load(o);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->n_ctx(), 4096);
}

TEST_F(EngineTest, PromptLongerThanContextIsInvalidArgument) {
  const std::vector<int32_t> long_prompt = PseudoRandomPrompt(kCtx + 1, 32000);
  KvCache cache(engine_->config(), kCtx);
  auto logits = engine_->EvalPrompt(long_prompt, &cache, false);
  ASSERT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(logits.status().message().find("49 tokens"), absl::string_view::npos)
      << logits.status();
  EXPECT_NE(logits.status().message().find("context of 48"), absl::string_view::npos)
      << logits.status();
  auto generated = engine_->Generate(long_prompt, {}, nullptr);
  EXPECT_EQ(generated.status().code(), absl::StatusCode::kInvalidArgument);
  // Exactly the context fills it.
  auto full = engine_->EvalPrompt(PseudoRandomPrompt(kCtx, 32000), &cache, false);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(cache.n_past(), kCtx);
  EXPECT_EQ(full->size(), 32000u);
}

TEST_F(EngineTest, EmptyPromptIsInvalidArgument) {
  KvCache cache(engine_->config(), kCtx);
  auto logits = engine_->EvalPrompt({}, &cache, true);
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(logits.status().message().find("empty"), absl::string_view::npos) << logits.status();
  EXPECT_EQ(engine_->Generate({}, {}, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, EvalPromptReturnsLastOrAllRows) {
  KvCache a(engine_->config(), kCtx), b(engine_->config(), kCtx);
  auto last = engine_->EvalPrompt(prompt_, &a, false);
  auto all = engine_->EvalPrompt(prompt_, &b, true);
  ASSERT_TRUE(last.ok() && all.ok());
  ASSERT_EQ(all->size(), prompt_.size() * 32000);
  ASSERT_EQ(last->size(), 32000u);
  EXPECT_TRUE(std::equal(last->begin(), last->end(), all->end() - 32000));
  EXPECT_EQ(a.n_past(), static_cast<int64_t>(prompt_.size()));
}

TEST_F(EngineTest, GreedyIsDeterministicAndFollowsTheArgmax) {
  Engine::GenerateOptions g;
  g.max_tokens = 6;
  g.ignore_eos = true;
  g.sampling.temperature = 0.0f;
  const std::vector<int32_t> first = Generate(g);
  ASSERT_EQ(first.size(), 6u);
  EXPECT_EQ(Generate(g), first);
  // The first token is the argmax of the prompt's last logits.
  KvCache cache(engine_->config(), kCtx);
  auto logits = engine_->EvalPrompt(prompt_, &cache, false);
  ASSERT_TRUE(logits.ok());
  EXPECT_EQ(first[0], std::max_element(logits->begin(), logits->end()) - logits->begin());
  // Sampling parameters besides temperature do not matter at temperature 0.
  g.sampling.top_k = 1;
  g.sampling.top_p = 0.1f;
  g.sampling.seed = 99;
  EXPECT_EQ(Generate(g), first);
}

TEST_F(EngineTest, SeededSamplingIsReproducibleAndSeedsDiffer) {
  Engine::GenerateOptions g;
  g.max_tokens = 16;
  g.ignore_eos = true;
  g.sampling.temperature = 0.8f;
  g.sampling.seed = 1;
  const std::vector<int32_t> a = Generate(g);
  ASSERT_EQ(a.size(), 16u);
  EXPECT_EQ(Generate(g), a);
  g.sampling.seed = 2;
  const std::vector<int32_t> b = Generate(g);
  ASSERT_EQ(b.size(), 16u);
  EXPECT_NE(a, b);
  g.sampling.temperature = 0.0f;
  EXPECT_NE(Generate(g), a);  // sampling is not greedy
}

TEST_F(EngineTest, MaxTokensAndCallbackStopGeneration) {
  Engine::GenerateOptions g;
  g.ignore_eos = true;
  g.sampling.temperature = 0.0f;
  g.max_tokens = 5;
  std::vector<int32_t> seen;
  auto out = engine_->Generate(prompt_, g, [&](int32_t id) {
    seen.push_back(id);
    return true;
  });
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->size(), 5u);
  EXPECT_EQ(seen, *out);
  g.max_tokens = 0;
  EXPECT_TRUE(Generate(g).empty());
  // The callback returning false stops after that token.
  g.max_tokens = 10;
  int calls = 0;
  out = engine_->Generate(prompt_, g, [&](int32_t) { return ++calls < 2; });
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->size(), 2u);
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(*out, std::vector<int32_t>(seen.begin(), seen.begin() + 2));
  // Generation stops when the context is full.
  const int64_t room = kCtx - static_cast<int64_t>(prompt_.size());
  g.max_tokens = static_cast<int>(room) + 10;
  const int64_t n = static_cast<int64_t>(Generate(g).size());
  EXPECT_GE(n, room);
  EXPECT_LE(n, room + 1);
}

TEST_F(EngineTest, InvalidSamplingParamsAreRejected) {
  Engine::GenerateOptions g;
  g.sampling.temperature = -1.0f;
  EXPECT_EQ(engine_->Generate(prompt_, g, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A copy of the model whose EOS id is a token that greedy decoding produces: generation stops
// before it unless ignore_eos.
TEST_F(EngineTest, StopsAtEosUnlessIgnoreEos) {
  Engine::GenerateOptions g;
  g.ignore_eos = true;
  g.sampling.temperature = 0.0f;
  g.max_tokens = 8;
  const std::vector<int32_t> greedy = Generate(g);
  ASSERT_EQ(greedy.size(), 8u);
  const int32_t eos = greedy[3];
  const size_t first_eos = std::find(greedy.begin(), greedy.end(), eos) - greedy.begin();

  GgufEdits edits;
  edits.metadata = [eos](std::vector<std::pair<std::string, GgufValue>>* md) {
    for (auto& [k, v] : *md) {
      if (k == "tokenizer.ggml.eos_token_id") v = GgufValue::Uint32(static_cast<uint32_t>(eos));
    }
  };
  const std::string path = TempDir() + "/eos-moved.gguf";
  ASSERT_TRUE(CopyGgufWithEdits(TinyModelPath("Q4_K_M"), path, edits).ok());
  auto moved = LoadEngine(path);
  ASSERT_NE(moved, nullptr);
  ASSERT_EQ(moved->tokenizer().eos_id(), eos);

  auto ignoring = moved->Generate(prompt_, g, nullptr);
  ASSERT_TRUE(ignoring.ok());
  EXPECT_EQ(*ignoring, greedy);
  g.ignore_eos = false;
  std::vector<int32_t> seen;
  auto stopping = moved->Generate(prompt_, g, [&](int32_t id) {
    seen.push_back(id);
    return true;
  });
  ASSERT_TRUE(stopping.ok());
  EXPECT_EQ(*stopping, std::vector<int32_t>(greedy.begin(), greedy.begin() + first_eos));
  EXPECT_EQ(seen, *stopping);  // EOS is neither returned nor passed to the callback
}

}  // namespace
}  // namespace moepool
