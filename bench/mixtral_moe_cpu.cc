#include "bench/mixtral_moe_cpu.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/thread_pool.h"

namespace moepool {
namespace {

// Random bytes whose every uint16 is a finite half below 1 (valid scales for every k-quant),
// from a xorshift generator (gigabytes of them).
std::vector<uint8_t> RandomBlocks(size_t bytes, uint64_t seed) {
  std::vector<uint8_t> out(bytes);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (uint8_t& b : out) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    b = static_cast<uint8_t>((s >> 24) % 0x3c);
  }
  return out;
}

}  // namespace

absl::StatusOr<double> MixtralMoeCpuMs(int layers, int64_t n_embd, int64_t n_ff, int64_t n_experts,
                                       TensorType type, int threads, int iterations) {
  if (layers < 1 || n_experts < 2 || iterations < 1) {
    return absl::InvalidArgumentError("needs a layer, two experts and one iteration");
  }
  const size_t up_bytes = RowBytes(type, n_embd) * static_cast<size_t>(n_ff);
  const size_t down_bytes = RowBytes(type, n_ff) * static_cast<size_t>(n_embd);
  std::vector<std::vector<uint8_t>> memory;
  std::vector<std::vector<ExpertWeights>> experts(static_cast<size_t>(layers));
  uint64_t seed = 100;
  for (auto& layer : experts) {
    for (int64_t e = 0; e < n_experts; ++e) {
      ExpertWeights w;
      WeightMatrix* m[3] = {&w.gate, &w.up, &w.down};
      for (int j = 0; j < 3; ++j) {
        const bool down = j == 2;
        memory.push_back(RandomBlocks(down ? down_bytes : up_bytes, seed++));
        m[j]->type = type;
        m[j]->cols = down ? n_ff : n_embd;
        m[j]->rows = down ? n_embd : n_ff;
        m[j]->row_bytes = RowBytes(type, m[j]->cols);
        m[j]->data = memory.back().data();
      }
      layer.push_back(w);
    }
  }
  ThreadPool pool(threads);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n_embd)), out(x.size());
  for (float& v : x) v = normal(rng);
  std::vector<double> token_ms;
  for (int it = -1; it < iterations; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& layer : experts) {
      const int64_t a = static_cast<int64_t>(rng() % n_experts);
      const int64_t c = (a + 1 + static_cast<int64_t>(rng() % (n_experts - 1))) % n_experts;
      for (const int64_t e : {std::min(a, c), std::max(a, c)}) {
        ExpertFfnCpu(layer[static_cast<size_t>(e)], x.data(), 1, out.data(), &pool);
      }
    }
    const std::chrono::duration<double, std::milli> ms = std::chrono::steady_clock::now() - t0;
    if (it >= 0) token_ms.push_back(ms.count());
  }
  std::sort(token_ms.begin(), token_ms.end());
  return token_ms[token_ms.size() / 2];
}

}  // namespace moepool
