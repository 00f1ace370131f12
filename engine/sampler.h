// Token sampling: greedy, temperature, top-k, top-p, min-p, and OpenAI-style presence/frequency
// penalties. Deterministic: the same seed, parameters and logits give the same tokens.
// Not thread-safe (one Sampler per sequence).
#ifndef MOEPOOL_ENGINE_SAMPLER_H_
#define MOEPOOL_ENGINE_SAMPLER_H_

#include <cstdint>
#include <random>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"

namespace moepool {

struct SamplingParams {
  float temperature = 0.8f;  // <= 0: greedy (largest finite logit, lowest id on ties)
  int top_k = 40;            // <= 0: disabled
  float top_p = 0.95f;       // >= 1: disabled
  float min_p = 0.05f;       // <= 0: disabled
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 0;
};

// INVALID_ARGUMENT for out-of-range values (negative temperature, top_p outside (0, 1], ...).
absl::Status ValidateSamplingParams(const SamplingParams& p);

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // Picks the next token from logits [n_vocab] (modified in place by penalties) and records it
  // for the penalties of later steps.
  int32_t Sample(float* logits, int64_t n_vocab);

  // Log-probabilities (of the unmodified distribution, temperature 1) of `token` and of the
  // `top_n` most likely tokens.
  static TokenLogprob Logprob(const float* logits, int64_t n_vocab, int32_t token);
  static std::vector<TokenLogprob> TopLogprobs(const float* logits, int64_t n_vocab, int top_n);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::unordered_map<int32_t, int> counts_;
  struct Candidate {
    float logit;
    int32_t id;
    double weight;  // exp((logit - max) / temperature) (see SoftmaxWeights)
  };
  std::vector<Candidate> candidates_;
  std::vector<float> weights_;  // [n_vocab] softmax weights of the current step

  // A token drawn from all of weights_ (no truncation).
  int32_t SampleByIdOrder();
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_SAMPLER_H_
