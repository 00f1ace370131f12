#include "engine/engine.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace moepool {

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const EngineOptions& options) {
  auto engine = std::unique_ptr<Engine>(new Engine);
  ExpertFilter filter;
  if (options.experts != nullptr) filter.keep = [](int, int) { return false; };
  ASSIGN_OR_RETURN(engine->model_, Model::Load(options.model_path, filter));
  ASSIGN_OR_RETURN(engine->tokenizer_, Tokenizer::FromGguf(engine->model_->file()));
  const ModelConfig& c = engine->model_->config();
  if (engine->tokenizer_->n_vocab() != c.n_vocab) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.model_path, ": tokenizer has ", engine->tokenizer_->n_vocab(),
                     " tokens but token_embd.weight has ", c.n_vocab, " rows"));
  }
  engine->n_ctx_ = options.n_ctx > 0 ? options.n_ctx : std::min<int64_t>(c.n_ctx_train, 4096);
  if (engine->n_ctx_ > c.n_ctx_train) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--ctx ", engine->n_ctx_, " exceeds the model's context length ", c.n_ctx_train));
  }
  engine->pool_ = std::make_unique<ThreadPool>(options.threads);
  ExpertBackend* experts = options.experts;
  if (experts == nullptr) {
    engine->local_experts_ =
        std::make_unique<LocalExpertBackend>(engine->model_.get(), engine->pool_.get());
    experts = engine->local_experts_.get();
  }
  TransformerOptions transformer;
  if (options.attention) {
    ASSIGN_OR_RETURN(engine->attention_, options.attention(*engine->model_));
    transformer.attention = engine->attention_.get();
  }
  engine->transformer_ = std::make_unique<Transformer>(engine->model_.get(), experts,
                                                       engine->pool_.get(), transformer);
  return engine;
}

std::vector<int32_t> Engine::Tokenize(const std::string& text) const {
  return tokenizer_->Encode(text, tokenizer_->add_bos_default());
}

absl::StatusOr<std::vector<float>> Engine::EvalPrompt(const std::vector<int32_t>& tokens,
                                                      KvCache* cache, bool all_logits) {
  if (tokens.empty()) return absl::InvalidArgumentError("the prompt is empty");
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n > cache->n_ctx()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the prompt has ", n, " tokens, more than the context of ", cache->n_ctx(), " tokens"));
  }
  std::vector<BatchRow> rows(tokens.size());
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = {tokens[i], i, cache, all_logits || i + 1 == n};
  }
  std::vector<float> logits;
  RETURN_IF_ERROR(transformer_->Forward(rows, &logits));
  cache->set_n_past(n);
  return logits;
}

absl::StatusOr<std::vector<int32_t>> Engine::Generate(
    const std::vector<int32_t>& prompt, const GenerateOptions& options,
    const std::function<bool(int32_t)>& on_token) {
  RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  KvCache cache(config(), n_ctx_);
  ASSIGN_OR_RETURN(std::vector<float> logits, EvalPrompt(prompt, &cache, false));
  Sampler sampler(options.sampling);
  std::vector<int32_t> out;
  const int64_t n_vocab = config().n_vocab;
  for (int step = 0; step < options.max_tokens; ++step) {
    const int32_t tok = sampler.Sample(logits.data(), n_vocab);
    if (!options.ignore_eos && tokenizer_->IsEndOfGeneration(tok)) break;
    out.push_back(tok);
    if (on_token && !on_token(tok)) break;
    if (step + 1 == options.max_tokens) break;
    const int64_t pos = cache.n_past();
    if (pos >= cache.n_ctx()) break;  // context full: stop like max_tokens
    BatchRow row{tok, pos, &cache, true};
    logits.clear();
    RETURN_IF_ERROR(transformer_->Forward({&row, 1}, &logits));
    cache.set_n_past(pos + 1);
  }
  return out;
}

}  // namespace moepool
