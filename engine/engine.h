// The single-process engine: a loaded model, its tokenizer, a thread pool and the forward pass,
// with experts local (LocalExpertBackend) or behind any ExpertBackend the caller supplies.
//
// Ownership: Engine owns everything it creates; an external ExpertBackend is borrowed.
// Threading: one forward pass at a time (callers serialise; the pool parallelises inside).
#ifndef MOEPOOL_ENGINE_ENGINE_H_
#define MOEPOOL_ENGINE_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/expert_backend.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/sampler.h"
#include "engine/thread_pool.h"
#include "engine/tokenizer.h"
#include "engine/transformer.h"

namespace moepool {

struct EngineOptions {
  std::string model_path;
  int threads = 0;    // <= 0: all hardware threads
  int64_t n_ctx = 0;  // context per sequence; 0: min(model context, 4096)
  // Experts run here unless `experts` is set (then only non-expert weights are bound).
  ExpertBackend* experts = nullptr;
  // Where attention, router and output head run: called once with the loaded model; the engine
  // owns what it returns (its error fails Load). Empty: on the CPU (CpuAttentionBackend).
  std::function<absl::StatusOr<std::unique_ptr<AttentionBackend>>(const Model&)> attention;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Load(const EngineOptions& options);

  const Model& model() const { return *model_; }
  const ModelConfig& config() const { return model_->config(); }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  ThreadPool& pool() { return *pool_; }
  Transformer& transformer() { return *transformer_; }
  int64_t n_ctx() const { return n_ctx_; }

  // Tokenizes a prompt with the model's BOS convention.
  std::vector<int32_t> Tokenize(const std::string& text) const;

  // Evaluates `tokens` in one batch from position 0 of `cache` and returns the logits of every
  // position [n x n_vocab] (all_logits) or of the last only [n_vocab].
  // INVALID_ARGUMENT if the prompt is empty or longer than the context.
  absl::StatusOr<std::vector<float>> EvalPrompt(const std::vector<int32_t>& tokens, KvCache* cache,
                                                bool all_logits);

  struct GenerateOptions {
    int max_tokens = 16;
    bool ignore_eos = false;
    SamplingParams sampling;
  };
  // Generates after `prompt`; on_token(id) is called for each token and may return false to stop.
  // Returns the generated ids (EOS not included).
  absl::StatusOr<std::vector<int32_t>> Generate(const std::vector<int32_t>& prompt,
                                                const GenerateOptions& options,
                                                const std::function<bool(int32_t)>& on_token);

 private:
  Engine() = default;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<LocalExpertBackend> local_experts_;
  std::unique_ptr<AttentionBackend> attention_;
  std::unique_ptr<Transformer> transformer_;
  int64_t n_ctx_ = 0;
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_ENGINE_H_
