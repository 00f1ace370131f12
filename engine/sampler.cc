#include "engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

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
    chosen = static_cast<int32_t>(std::max_element(logits, logits + n_vocab) - logits);
  } else {
    candidates_.clear();
    for (int64_t i = 0; i < n_vocab; ++i) {
      if (std::isfinite(logits[i])) candidates_.emplace_back(logits[i], static_cast<int32_t>(i));
    }
    auto by_logit = [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    size_t keep = candidates_.size();
    if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
      keep = static_cast<size_t>(params_.top_k);
      std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(),
                        by_logit);
      candidates_.resize(keep);
    } else {
      std::sort(candidates_.begin(), candidates_.end(), by_logit);
    }
    if (candidates_.empty()) return 0;
    // Softmax with temperature, in double for a reproducible, accurate cumulative sum.
    const double max_l = candidates_[0].first;
    std::vector<double> p(candidates_.size());
    double sum = 0.0;
    for (size_t i = 0; i < candidates_.size(); ++i) {
      p[i] = std::exp((candidates_[i].first - max_l) / params_.temperature);
      sum += p[i];
    }
    for (double& v : p) v /= sum;
    size_t n = p.size();
    if (params_.min_p > 0.0f) {
      const double floor = params_.min_p * p[0];
      size_t m = 1;
      while (m < n && p[m] >= floor) ++m;
      n = m;
    }
    if (params_.top_p < 1.0f) {
      double cum = 0.0;
      size_t m = 0;
      while (m < n) {
        cum += p[m++];
        if (cum >= params_.top_p) break;
      }
      n = std::max<size_t>(m, 1);
    }
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) total += p[i];
    const double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
    double cum = 0.0;
    chosen = candidates_[n - 1].second;
    for (size_t i = 0; i < n; ++i) {
      cum += p[i];
      if (r < cum) {
        chosen = candidates_[i].second;
        break;
      }
    }
  }
  ++counts_[chosen];
  return chosen;
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
