// moepool bench: prompt-processing and decode throughput of the engine on a model.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "engine/engine.h"
#include "engine/status_macros.h"
#include "nlohmann/json.hpp"

namespace moepool::cli {
namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "moepool: %s\n", std::string(s.message()).c_str());
  return 1;
}

uint64_t PeakRssBytes() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<uint64_t>(ru.ru_maxrss) * 1024;
}

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

absl::Status Bench(const Args& args) {
  EngineOptions opts;
  opts.model_path = args.Get("model");
  if (opts.model_path.empty()) return absl::InvalidArgumentError("--model is required");
  ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  ASSIGN_OR_RETURN(int64_t n_prompt, args.GetInt("prompt-tokens", 512));
  ASSIGN_OR_RETURN(int64_t n_decode, args.GetInt("decode-tokens", 128));
  ASSIGN_OR_RETURN(int64_t reps, args.GetInt("repeat", 1));
  if (n_prompt < 1 || n_decode < 1 || reps < 1) {
    return absl::InvalidArgumentError("--prompt-tokens, --decode-tokens, --repeat must be >= 1");
  }
  opts.threads = static_cast<int>(threads);
  if (!ParseMoeResidual(args.Get("moe-residual", "reference"), &opts.transformer.moe_residual)) {
    return absl::InvalidArgumentError("--moe-residual must be reference or standard");
  }
  opts.n_ctx = std::max<int64_t>(n_prompt, n_decode);
  ASSIGN_OR_RETURN(auto engine, Engine::Load(opts));
  const ModelConfig& c = engine->config();
  if (opts.n_ctx > c.n_ctx_train) {
    return absl::InvalidArgumentError("benchmark length exceeds the model's context");
  }
  // Deterministic pseudo-random token ids (the content does not matter for speed).
  std::vector<int32_t> tokens(static_cast<size_t>(std::max(n_prompt, n_decode)));
  uint64_t s = 12345;
  for (auto& t : tokens) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<int32_t>(3 + (s >> 33) % static_cast<uint64_t>(c.n_vocab - 3));
  }
  Transformer& tf = engine->transformer();
  KvCache cache(c, opts.n_ctx);
  std::vector<float> logits;
  // Warm-up: touch every weight page once.
  {
    std::vector<BatchRow> rows;
    const int64_t n_warm = std::min<int64_t>(8, opts.n_ctx);
    for (int64_t i = 0; i < n_warm; ++i) rows.push_back({tokens[i], i, &cache, i + 1 == n_warm});
    RETURN_IF_ERROR(tf.Forward(rows, &logits));
  }
  double best_pp = 0, best_tg = 0;
  for (int64_t r = 0; r < reps; ++r) {
    std::vector<BatchRow> rows;
    for (int64_t i = 0; i < n_prompt; ++i)
      rows.push_back({tokens[i], i, &cache, i + 1 == n_prompt});
    logits.clear();
    auto t0 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(tf.Forward(rows, &logits));
    auto t1 = std::chrono::steady_clock::now();
    best_pp = std::max(best_pp, n_prompt / Seconds(t0, t1));
    t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < n_decode; ++i) {
      BatchRow row{tokens[i], i, &cache, true};
      logits.clear();
      RETURN_IF_ERROR(tf.Forward({&row, 1}, &logits));
    }
    t1 = std::chrono::steady_clock::now();
    best_tg = std::max(best_tg, n_decode / Seconds(t0, t1));
  }
  const uint64_t rss = PeakRssBytes();
  if (args.Has("json")) {
    nlohmann::json j;
    j["model"] = opts.model_path;
    j["threads"] = engine->pool().size();
    j["prompt_tokens"] = n_prompt;
    j["decode_tokens"] = n_decode;
    j["prompt_tokens_per_s"] = best_pp;
    j["decode_tokens_per_s"] = best_tg;
    j["peak_rss_bytes"] = rss;
    j["file_bytes"] = engine->model().file().file_size();
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << absl::StrFormat(
        "model %s, %d threads\n  prompt %d tokens: %.1f tokens/s\n  decode %d tokens: %.1f "
        "tokens/s\n  peak RSS %.1f MiB (file %.1f MiB)\n",
        opts.model_path, engine->pool().size(), n_prompt, best_pp, n_decode, best_tg,
        rss / 1048576.0, engine->model().file().file_size() / 1048576.0);
  }
  return absl::OkStatus();
}

}  // namespace

int RunBench(int argc, char** argv) {
  auto args = Args::Parse(
      argc, argv,
      {{"model", "threads", "prompt-tokens", "decode-tokens", "repeat", "moe-residual"}, {"json"}});
  if (!args.ok()) return Fail(args.status());
  const absl::Status s = Bench(*args);
  return s.ok() ? 0 : Fail(s);
}

}  // namespace moepool::cli
