#include "tests/coordinator/cluster_run_util.h"

#include <cstring>
#include <memory>
#include <random>

#include "gtest/gtest.h"

namespace moepool::testing {
namespace {

std::vector<int32_t> Prompt(int64_t n_vocab, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(3 + rng() % static_cast<uint32_t>(n_vocab - 3));
  return t;
}

}  // namespace

absl::StatusOr<std::vector<float>> RunThree(Engine& e, bool pipelined, int n_decode) {
  const int64_t n_vocab = e.config().n_vocab;
  const std::vector<int32_t> seq[3] = {Prompt(n_vocab, 30 + n_decode, 1),
                                       Prompt(n_vocab, 20 + n_decode, 2),
                                       Prompt(n_vocab, 1 + n_decode, 3)};
  const int64_t prompt[3] = {30, 20, 1};
  std::vector<std::unique_ptr<KvCache>> caches;
  for (int s = 0; s < 3; ++s) caches.push_back(std::make_unique<KvCache>(e.config(), e.n_ctx()));
  std::vector<float> all;
  for (int step = 0; step <= n_decode; ++step) {
    std::vector<BatchRow> rows[3];
    for (int s = 0; s < 3; ++s) {
      const int64_t from = step == 0 ? 0 : prompt[s] + step - 1;
      const int64_t to = step == 0 ? prompt[s] : from + 1;
      for (int64_t p = from; p < to; ++p) {
        rows[s].push_back({seq[s][static_cast<size_t>(p)], p, caches[s].get(), true});
      }
    }
    absl::Status st;
    if (pipelined) {
      const absl::Span<const BatchRow> spans[] = {rows[0], rows[1], rows[2]};
      st = e.transformer().ForwardMicroBatches(spans, &all);
    } else {
      for (int s = 0; s < 3 && st.ok(); ++s) st = e.transformer().Forward(rows[s], &all);
    }
    if (!st.ok()) return st;
  }
  return all;
}

void ExpectBitIdentical(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size());
  size_t differ = 0;
  for (size_t i = 0; i < a.size(); ++i) differ += std::memcmp(&a[i], &b[i], 4) != 0;
  EXPECT_EQ(differ, 0u) << "of " << a.size() << " logits";
}

}  // namespace moepool::testing
