// The cost of grammar-constrained sampling (coordinator/token_constraint.h) on the Mistral
// vocabulary (32000 tokens): preparing a schema (compile + the first token mask), and the cost
// per generated token of Mask + Accept along random constrained replies, next to the sampler's
// own cost per token on the same logits (the unconstrained baseline).
//
//   moepool_grammar_bench [vocab.gguf]     (default: the synth vocabulary)
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "coordinator/json_schema.h"
#include "coordinator/token_constraint.h"
#include "engine/gguf.h"
#include "engine/sampler.h"
#include "engine/synth.h"
#include "engine/tokenizer.h"

namespace moepool {
namespace {

using Clock = std::chrono::steady_clock;

double Us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

const char* const kSchemas[][2] = {
    {"person", R"({"type":"object","properties":{"name":{"type":"string","maxLength":24},
       "age":{"type":"integer","minimum":0,"maximum":150},"email":{"type":["string","null"]},
       "tags":{"type":"array","items":{"enum":["a","b","c"]},"maxItems":4}},
       "required":["name","age"],"additionalProperties":false})"},
    {"free strings", R"({"type":"array","items":{"type":"string"},"maxItems":6})"},
    {"numbers", R"({"type":"array","items":{"type":"number"},"maxItems":16})"},
    {"nested", R"({"$defs":{"pt":{"type":"object","properties":{"x":{"type":"integer"},
       "y":{"type":"integer"}},"required":["x","y"]}},"type":"object","properties":{
       "path":{"type":"array","items":{"$ref":"#/$defs/pt"},"maxItems":5},
       "label":{"anyOf":[{"type":"string","maxLength":8},{"type":"null"}]}},
       "required":["path","label"]})"},
};

int Run(const std::string& vocab_path) {
  auto file = GgufFile::Open(vocab_path);
  if (!file.ok()) {
    std::fprintf(stderr, "%s\n", std::string(file.status().message()).c_str());
    return 1;
  }
  auto tok = Tokenizer::FromGguf(**file);
  if (!tok.ok()) return 1;
  const Tokenizer& t = **tok;
  const int64_t n_vocab = t.n_vocab();
  Clock::time_point t0 = Clock::now();
  VocabTrie trie(t);
  std::printf("vocabulary: %lld tokens, trie of %zu nodes built in %.1f ms (once per server)\n",
              static_cast<long long>(n_vocab), trie.nodes().size(), Us(t0, Clock::now()) / 1e3);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> base(static_cast<size_t>(n_vocab));
  std::printf("%-13s %9s %10s %8s %12s %12s %11s\n", "schema", "compile", "first mask", "tokens",
              "mask+accept", "sampler only", "cold masks");
  for (const auto& [name, text] : kSchemas) {
    double compile_us = 0, first_us = 0, step_us = 0, sample_us = 0;
    int64_t tokens = 0, cold = 0;
    for (int reply = 0; reply < 20; ++reply) {
      t0 = Clock::now();
      auto g = GrammarForJsonSchema(nlohmann::ordered_json::parse(text));
      Clock::time_point t1 = Clock::now();
      TokenConstraint c(*g, &trie, {t.eos_id()});
      c.Prepare();
      Clock::time_point t2 = Clock::now();
      compile_us += Us(t0, t1);
      first_us += Us(t1, t2);
      SamplingParams sp;
      sp.seed = static_cast<uint64_t>(reply);
      Sampler constrained(sp), plain(sp);
      for (int step = 0; step < 400 && !c.Finished(); ++step) {
        for (float& x : base) x = normal(rng);
        std::vector<float> logits = base;
        t0 = Clock::now();
        c.Mask(logits.data(), n_vocab);
        const int32_t id = constrained.Sample(logits.data(), n_vocab);
        const bool ok = c.Accept(id);
        t1 = Clock::now();
        logits = base;
        plain.Sample(logits.data(), n_vocab);
        t2 = Clock::now();
        step_us += Us(t0, t1);
        sample_us += Us(t1, t2);
        ++tokens;
        if (!ok || t.IsEndOfGeneration(id)) break;
      }
      cold += static_cast<int64_t>(c.masks_computed());
    }
    std::printf("%-13s %7.1f us %7.0f us %8lld %9.0f us %9.0f us %10.1f%%\n", name, compile_us / 20,
                first_us / 20, static_cast<long long>(tokens),
                step_us / static_cast<double>(tokens), sample_us / static_cast<double>(tokens),
                100.0 * static_cast<double>(cold) / static_cast<double>(tokens));
  }
  std::printf(
      "(mask+accept includes the sampler on the masked logits; per token, mean of 20 "
      "replies of up to 400 tokens with random logits)\n");
  return 0;
}

}  // namespace
}  // namespace moepool

int main(int argc, char** argv) {
  const std::string path =
      argc > 1 ? argv[1] : std::string(MOEPOOL_SOURCE_DIR) + "/" + moepool::kDefaultSynthVocabPath;
  return moepool::Run(path);
}
