// Token sampling: greedy, truncation (top-k / top-p / min-p), seeds, penalties, parameter
// validation and log-probabilities.
#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace moepool {
namespace {

SamplingParams Greedy() {
  SamplingParams p;
  p.temperature = 0.0f;
  return p;
}

// Plain softmax sampling: no truncation.
SamplingParams Untruncated(float temperature, uint64_t seed) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.seed = seed;
  return p;
}

std::vector<int32_t> Draw(const SamplingParams& p, const std::vector<float>& logits, int n) {
  Sampler s(p);
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    std::vector<float> l = logits;
    out.push_back(s.Sample(l.data(), static_cast<int64_t>(l.size())));
  }
  return out;
}

const std::vector<float> kLogits = {0.5f, 2.0f, -1.0f, 1.5f, 1.9f, 0.0f, -3.0f, 1.0f};

TEST(SamplerTest, GreedyTakesTheArgmaxAndTheLowestIdOnTies) {
  EXPECT_EQ(Draw(Greedy(), kLogits, 3), (std::vector<int32_t>{1, 1, 1}));
  const std::vector<float> tied = {0.0f, 3.0f, 1.0f, 3.0f};
  EXPECT_EQ(Draw(Greedy(), tied, 1)[0], 1);
  const std::vector<float> negative = {-5.0f, -4.0f, -7.0f};
  EXPECT_EQ(Draw(Greedy(), negative, 1)[0], 1);
  // Infinite and NaN logits are never the argmax; with no finite logit the answer is token 0.
  const std::vector<float> odd = {NAN, -INFINITY, 2.0f, INFINITY, 5.0f, NAN, 5.0f, 1.0f, 0.0f};
  EXPECT_EQ(Draw(Greedy(), odd, 1)[0], 4);
  const std::vector<float> none = {NAN, -INFINITY, INFINITY, -INFINITY};
  EXPECT_EQ(Draw(Greedy(), none, 1)[0], 0);
}

TEST(SamplerTest, TopKOneEqualsGreedyAtAnyTemperature) {
  for (uint64_t seed : {0u, 1u, 77u}) {
    SamplingParams p = Untruncated(1.5f, seed);
    p.top_k = 1;
    EXPECT_EQ(Draw(p, kLogits, 20), std::vector<int32_t>(20, 1));
  }
}

TEST(SamplerTest, SameSeedSameTokensOtherSeedOtherTokens) {
  const SamplingParams a = Untruncated(1.0f, 42);
  const std::vector<int32_t> first = Draw(a, kLogits, 64);
  EXPECT_EQ(Draw(a, kLogits, 64), first);
  EXPECT_NE(Draw(Untruncated(1.0f, 43), kLogits, 64), first);
  // Not constant: several tokens appear.
  std::map<int32_t, int> counts;
  for (int32_t t : first) ++counts[t];
  EXPECT_GE(counts.size(), 3u);
}

// Untruncated sampling at temperature T draws from softmax(logits / T).
TEST(SamplerTest, FrequenciesFollowTheTemperedSoftmax) {
  constexpr int kDraws = 40000;
  for (float temperature : {1.0f, 0.5f}) {
    const std::vector<int32_t> draws = Draw(Untruncated(temperature, 5), kLogits, kDraws);
    std::vector<double> freq(kLogits.size(), 0.0);
    for (int32_t t : draws) freq[t] += 1.0 / kDraws;
    double z = 0;
    for (float l : kLogits) z += std::exp(l / temperature);
    for (size_t i = 0; i < kLogits.size(); ++i) {
      const double p = std::exp(kLogits[i] / temperature) / z;
      // Five standard deviations of a binomial proportion (plus a floor for tiny p).
      EXPECT_NEAR(freq[i], p, 5 * std::sqrt(p * (1 - p) / kDraws) + 1e-4)
          << "token " << i << " at T " << temperature;
    }
  }
}

TEST(SamplerTest, TruncationKeepsOnlyTheAllowedTokens) {
  // Sorted probabilities at T = 1: 1 (2.0), 4 (1.9), 3 (1.5), 7 (1.0), 0 (0.5), ...
  SamplingParams k2 = Untruncated(1.0f, 3);
  k2.top_k = 2;
  for (int32_t t : Draw(k2, kLogits, 500)) EXPECT_TRUE(t == 1 || t == 4) << t;

  // p(1) ~= 0.29, p(1) + p(4) ~= 0.55: top_p 0.5 keeps tokens 1 and 4.
  SamplingParams p50 = Untruncated(1.0f, 3);
  p50.top_p = 0.5f;
  std::map<int32_t, int> seen;
  for (int32_t t : Draw(p50, kLogits, 500)) ++seen[t];
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_GT(seen[1], 0);
  EXPECT_GT(seen[4], 0);

  // min_p 0.5: tokens with p >= 0.5 p(1), i.e. logit >= 2 - ln 2 ~= 1.31: 1, 4 and 3.
  SamplingParams m50 = Untruncated(1.0f, 3);
  m50.min_p = 0.5f;
  seen.clear();
  for (int32_t t : Draw(m50, kLogits, 1000)) ++seen[t];
  EXPECT_EQ(seen.size(), 3u);
  EXPECT_GT(seen[3], 0);

  // -inf and NaN logits are never chosen, truncated or not.
  std::vector<float> masked = kLogits;
  masked[1] = -INFINITY;
  masked[4] = -INFINITY;
  masked[3] = NAN;
  for (int32_t t : Draw(Untruncated(2.0f, 9), masked, 300)) EXPECT_TRUE(t != 1 && t != 4 && t != 3);
  for (int32_t t : Draw(p50, masked, 300)) EXPECT_TRUE(t != 1 && t != 4 && t != 3);
}

TEST(SamplerTest, PenaltiesLowerTokensAlreadyChosen) {
  SamplingParams p = Greedy();
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  Sampler s(p);
  std::vector<float> l = {1.0f, 3.0f, 2.0f};
  EXPECT_EQ(s.Sample(l.data(), 3), 1);
  EXPECT_EQ(l[1], 3.0f);  // nothing chosen yet: unchanged
  l = {1.0f, 3.0f, 2.0f};
  EXPECT_EQ(s.Sample(l.data(), 3), 1);  // 3 - (0.5 + 0.25 * 1) = 2.25 still wins
  EXPECT_FLOAT_EQ(l[1], 2.25f);
  EXPECT_EQ(l[2], 2.0f);
  l = {1.0f, 3.0f, 2.0f};
  EXPECT_EQ(s.Sample(l.data(), 3), 1);  // 3 - (0.5 + 0.25 * 2) = 2.0 ties with token 2: lower id
  EXPECT_FLOAT_EQ(l[1], 2.0f);
  l = {1.0f, 3.0f, 2.0f};
  EXPECT_EQ(s.Sample(l.data(), 3), 2);  // 3 - (0.5 + 0.25 * 3) = 1.75 < 2
  EXPECT_FLOAT_EQ(l[1], 1.75f);
  l = {1.0f, 3.0f, 2.0f};
  s.Sample(l.data(), 3);
  EXPECT_FLOAT_EQ(l[1], 1.75f);  // 3 - (0.5 + 0.25 * 3): token 1 was chosen three times
  EXPECT_FLOAT_EQ(l[2], 1.25f);  // 2 - (0.5 + 0.25 * 1)
  EXPECT_EQ(l[0], 1.0f);         // never chosen
}

TEST(SamplerTest, StrongPenaltyMovesGreedyAway) {
  SamplingParams p = Greedy();
  p.frequency_penalty = 2.0f;
  // Without penalties greedy repeats token 1 forever; with them it cycles through candidates.
  const std::vector<int32_t> draws = Draw(p, kLogits, 6);
  EXPECT_EQ(draws[0], 1);
  EXPECT_NE(draws[1], 1);
  std::map<int32_t, int> counts;
  for (int32_t t : draws) ++counts[t];
  EXPECT_GE(counts.size(), 3u);
  // A negative penalty encourages repetition.
  SamplingParams q = Untruncated(1.0f, 4);
  q.presence_penalty = -2.0f;
  q.frequency_penalty = -2.0f;
  const std::vector<int32_t> sticky = Draw(q, kLogits, 40);
  EXPECT_EQ(std::count(sticky.begin() + 20, sticky.end(), sticky.back()), 20)
      << "should lock onto one token after a few draws";
}

TEST(SamplerTest, ValidateSamplingParams) {
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}).ok());
  EXPECT_TRUE(ValidateSamplingParams(Greedy()).ok());
  EXPECT_TRUE(ValidateSamplingParams(Untruncated(2.0f, 1)).ok());
  auto bad = [](auto change) {
    SamplingParams p;
    change(p);
    return ValidateSamplingParams(p).code() == absl::StatusCode::kInvalidArgument;
  };
  EXPECT_TRUE(bad([](SamplingParams& p) { p.temperature = -0.1f; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.temperature = NAN; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.temperature = 1000.0f; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.top_p = 0.0f; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.top_p = 1.5f; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.top_p = NAN; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.min_p = -0.01f; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.min_p = 1.01f; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.presence_penalty = 2.5f; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.frequency_penalty = -2.5f; }));
  EXPECT_TRUE(bad([](SamplingParams& p) { p.frequency_penalty = NAN; }));
  EXPECT_FALSE(bad([](SamplingParams& p) { p.presence_penalty = -2.0f; }));
}

TEST(SamplerTest, LogprobsAreNormalisedAndSorted) {
  const int64_t n = static_cast<int64_t>(kLogits.size());
  double total = 0;
  for (int32_t t = 0; t < n; ++t) {
    const TokenLogprob lp = Sampler::Logprob(kLogits.data(), n, t);
    EXPECT_EQ(lp.token, t);
    EXPECT_LE(lp.logprob, 0.0f);
    total += std::exp(static_cast<double>(lp.logprob));
  }
  EXPECT_NEAR(total, 1.0, 1e-6);
  // Differences of log-probabilities are differences of logits.
  EXPECT_NEAR(Sampler::Logprob(kLogits.data(), n, 1).logprob -
                  Sampler::Logprob(kLogits.data(), n, 0).logprob,
              1.5, 1e-5);

  const std::vector<TokenLogprob> top = Sampler::TopLogprobs(kLogits.data(), n, 3);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].token, 1);
  EXPECT_EQ(top[1].token, 4);
  EXPECT_EQ(top[2].token, 3);
  EXPECT_FLOAT_EQ(top[0].logprob, Sampler::Logprob(kLogits.data(), n, 1).logprob);
  EXPECT_GT(top[0].logprob, top[1].logprob);
  EXPECT_GT(top[1].logprob, top[2].logprob);
  // More than the vocabulary: all of it, summing to 1.
  const std::vector<TokenLogprob> all = Sampler::TopLogprobs(kLogits.data(), n, 100);
  ASSERT_EQ(all.size(), kLogits.size());
  double sum = 0;
  for (const auto& lp : all) sum += std::exp(static_cast<double>(lp.logprob));
  EXPECT_NEAR(sum, 1.0, 1e-6);
  // Large logits do not overflow.
  const std::vector<float> big = {1000.0f, 999.0f};
  EXPECT_NEAR(Sampler::Logprob(big.data(), 2, 0).logprob, -std::log1p(std::exp(-1.0)), 1e-5);
}

}  // namespace
}  // namespace moepool
