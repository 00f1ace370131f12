#include "engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/swiglu.h"
#include "engine/swiglu_math.h"

namespace moepool {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || p.temperature > 100.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be in [0, 100], got ", p.temperature));
  }
  if (!(p.top_p > 0.0f) || p.top_p > 1.0f) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  if (!(p.min_p >= 0.0f) || p.min_p > 1.0f) {
    return absl::InvalidArgumentError(absl::StrCat("min_p must be in [0, 1], got ", p.min_p));
  }
  if (!(std::fabs(p.presence_penalty) <= 2.0f) || !(std::fabs(p.frequency_penalty) <= 2.0f)) {
    return absl::InvalidArgumentError("presence_penalty and frequency_penalty must be in [-2, 2]");
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

int32_t Sampler::Sample(float* logits, int64_t n_vocab) {
  for (const auto& [tok, count] : counts_) {
    logits[tok] -= params_.presence_penalty + params_.frequency_penalty * static_cast<float>(count);
  }
  int32_t chosen = 0;
  if (params_.temperature <= 0.0f) {
    // The lowest id with the largest finite logit (0 when there is none).
    const float max_l = MaxFinite(logits, n_vocab);
    if (max_l != -INFINITY) {
      chosen = static_cast<int32_t>(std::find(logits, logits + n_vocab, max_l) - logits);
    }
  } else {
    // Softmax weights with temperature, by the engine's exponential (the same bits on every CPU);
    // probabilities are normalised and summed in double.
    const float max_l = MaxFinite(logits, n_vocab);
    if (max_l == -INFINITY) return 0;  // no finite logit: nothing to choose from
    const bool top_k = params_.top_k > 0 && params_.top_k < n_vocab;
    if (!top_k) {  // every token's weight is needed
      weights_.resize(static_cast<size_t>(n_vocab));
      SoftmaxWeights(logits, n_vocab, max_l, params_.temperature, weights_.data());
    }
    if (!top_k && params_.top_p >= 1.0f && params_.min_p <= 0.0f) {
      // The whole distribution: no order needed, the tokens are walked by id.
      chosen = SampleByIdOrder();
      ++counts_[chosen];
      return chosen;
    }
    candidates_.clear();
    for (int64_t i = 0; i < n_vocab; ++i) {
      if (std::isfinite(logits[i])) {
        candidates_.push_back(
            {logits[i], static_cast<int32_t>(i), top_k ? 0.0 : weights_[static_cast<size_t>(i)]});
      }
    }
    auto by_logit = [](const Candidate& a, const Candidate& b) {
      return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
    };
    // Only the head of the distribution is ever needed in order: sort the top kHead candidates
    // and the rest only if min-p / top-p reach past them (a full sort of a 32000-token vocabulary
    // per token was a fifth of a 16-stream serving step).
    constexpr size_t kHead = 64;
    size_t sorted = candidates_.size();
    if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < candidates_.size()) {
      sorted = static_cast<size_t>(params_.top_k);
      std::partial_sort(candidates_.begin(), candidates_.begin() + sorted, candidates_.end(),
                        by_logit);
      candidates_.resize(sorted);
    } else if (candidates_.size() > kHead) {
      sorted = kHead;
      std::partial_sort(candidates_.begin(), candidates_.begin() + sorted, candidates_.end(),
                        by_logit);
    } else {
      std::sort(candidates_.begin(), candidates_.end(), by_logit);
    }
    if (candidates_.empty()) return 0;
    auto ensure_sorted = [&](size_t upto) {
      if (upto > sorted) {
        std::sort(candidates_.begin() + sorted, candidates_.end(), by_logit);
        sorted = candidates_.size();
      }
    };
    // Each candidate's weight travels with it through later sorting (with top-k, only the kept
    // candidates' weights are computed, here).
    double sum = 0.0;
    for (Candidate& c : candidates_) {
      if (top_k) c.weight = swiglu::Exp((c.logit - max_l) / params_.temperature);
      sum += c.weight;
    }
    auto prob = [&](size_t i) { return candidates_[i].weight / sum; };
    size_t n = candidates_.size();
    if (params_.min_p > 0.0f) {
      const double floor = params_.min_p * prob(0);
      size_t m = 1;
      for (; m < n; ++m) {
        ensure_sorted(m + 1);
        if (prob(m) < floor) break;
      }
      n = m;
    }
    if (params_.top_p < 1.0f) {
      double cum = 0.0;
      size_t m = 0;
      while (m < n) {
        ensure_sorted(m + 1);
        cum += prob(m++);
        if (cum >= params_.top_p) break;
      }
      n = std::max<size_t>(m, 1);
    }
    // Sampling from the whole distribution needs no order; a cut one needs its head sorted.
    if (n < candidates_.size()) ensure_sorted(n);
    std::vector<double> p(n);
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) {
      p[i] = prob(i);
      total += p[i];
    }
    const double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
    double cum = 0.0;
    chosen = candidates_[n - 1].id;
    for (size_t i = 0; i < n; ++i) {
      cum += p[i];
      if (r < cum) {
        chosen = candidates_[i].id;
        break;
      }
    }
  }
  ++counts_[chosen];
  return chosen;
}

int32_t Sampler::SampleByIdOrder() {
  const size_t n = weights_.size();
  // The total in four interleaved partial sums (a fixed order, so reproducible), then one
  // cumulative walk by id.
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int k = 0; k < 4; ++k) part[k] += weights_[i + k];
  }
  for (; i < n; ++i) part[0] += weights_[i];
  const double total = (part[0] + part[1]) + (part[2] + part[3]);
  const double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
  double cum = 0.0;
  size_t last_positive = 0;
  for (size_t id = 0; id < n; ++id) {
    if (weights_[id] <= 0.0f) continue;
    cum += weights_[id];
    last_positive = id;
    if (r < cum) return static_cast<int32_t>(id);
  }
  return static_cast<int32_t>(last_positive);  // r at the very top of the range (rounding)
}

namespace {
double LogSumExp(const float* logits, int64_t n) {
  const float mx = *std::max_element(logits, logits + n);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  return mx + std::log(sum);
}
}  // namespace

TokenLogprob Sampler::Logprob(const float* logits, int64_t n_vocab, int32_t token) {
  const double lse = LogSumExp(logits, n_vocab);
  return {token, static_cast<float>(logits[token] - lse)};
}

std::vector<TokenLogprob> Sampler::TopLogprobs(const float* logits, int64_t n_vocab, int top_n) {
  const double lse = LogSumExp(logits, n_vocab);
  std::vector<int32_t> idx(static_cast<size_t>(n_vocab));
  for (int64_t i = 0; i < n_vocab; ++i) idx[i] = static_cast<int32_t>(i);
  top_n = static_cast<int>(std::min<int64_t>(top_n, n_vocab));
  std::partial_sort(idx.begin(), idx.begin() + top_n, idx.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<TokenLogprob> out;
  for (int i = 0; i < top_n; ++i) {
    out.push_back({idx[i], static_cast<float>(logits[idx[i]] - lse)});
  }
  return out;
}

}  // namespace moepool
