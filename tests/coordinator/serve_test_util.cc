#include "tests/coordinator/serve_test_util.h"

#include <utility>

#include "engine/synth.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool::testing {

const std::string& TinyModelPath() {
  static const std::string* path = [] {
    SynthOptions o;
    o.shape = *SynthShapeByName("tiny");
    o.type = "F16";
    o.seed = 3;
    o.vocab_path = std::string(MOEPOOL_SOURCE_DIR) + "/" + kDefaultSynthVocabPath;
    o.out_path = TempDir() + "/serve-tiny-F16.gguf";
    const absl::Status s = SynthesizeModel(o);
    EXPECT_TRUE(s.ok()) << s;
    return new std::string(o.out_path);
  }();
  return *path;
}

std::unique_ptr<Engine> LoadTinyEngine(int64_t n_ctx) { return LoadTinyEngine(n_ctx, {}); }

std::unique_ptr<Engine> LoadTinyEngine(int64_t n_ctx,
                                       decltype(EngineOptions::attention) attention) {
  EngineOptions o;
  o.model_path = TinyModelPath();
  o.threads = 1;
  o.n_ctx = n_ctx;
  o.attention = std::move(attention);
  auto engine = Engine::Load(o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

Drained Drain(GenerationStream* stream, std::chrono::seconds limit) {
  Drained d;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    GenerationEvent ev;
    if (!stream->Next(&ev, std::chrono::milliseconds(200))) continue;
    for (const SampledToken& t : ev.tokens) d.tokens.push_back(t.id);
    d.text += ev.text;
    d.deltas.push_back(ev.text);
    if (ev.finish != FinishReason::kNone) {
      d.finish = ev.finish;
      d.error = ev.error;
      d.prompt_tokens = ev.prompt_tokens;
      d.cached_prompt_tokens = ev.cached_prompt_tokens;
      d.completion_tokens = ev.completion_tokens;
      return d;
    }
  }
  d.timed_out = true;
  return d;
}

}  // namespace moepool::testing
