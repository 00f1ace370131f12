// Per-token cost of the sampler on a 32000-token vocabulary (Mistral's): greedy (the floor),
// OpenAI's defaults (temperature 1, whole distribution, what `serve` does unless asked otherwise)
// and moepool run's defaults (top-k 40, top-p 0.95, min-p 0.05).
// Run: ./build/bench/sampler_bench
#include <cstdint>
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "engine/sampler.h"

namespace moepool {
namespace {

constexpr int64_t kVocab = 32000;

void RunSampler(benchmark::State& state, const SamplingParams& params) {
  std::mt19937 rng(7);
  std::normal_distribution<float> gauss(0.0f, 2.0f);
  std::vector<float> logits(kVocab);
  for (float& l : logits) l = gauss(rng);
  Sampler sampler(params);
  std::vector<float> work(kVocab);
  for (auto _ : state) {
    work = logits;  // the sampler applies penalties in place
    benchmark::DoNotOptimize(sampler.Sample(work.data(), kVocab));
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_SampleGreedy(benchmark::State& state) {
  SamplingParams p;
  p.temperature = 0.0f;
  RunSampler(state, p);
}

void BM_SampleWholeDistribution(benchmark::State& state) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  RunSampler(state, p);
}

void BM_SampleRunDefaults(benchmark::State& state) { RunSampler(state, SamplingParams()); }

BENCHMARK(BM_SampleGreedy);
BENCHMARK(BM_SampleWholeDistribution);
BENCHMARK(BM_SampleRunDefaults);

}  // namespace
}  // namespace moepool

BENCHMARK_MAIN();
