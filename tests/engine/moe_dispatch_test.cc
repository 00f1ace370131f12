// PlanDispatch and Combine (engine/moe_dispatch.h): the grouping every expert backend uses, and
// the order rule that makes a row's bits independent of where its experts ran.
#include "engine/moe_dispatch.h"

#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace moepool {
namespace {

TEST(MoeDispatchTest, PairsAreInRowOrderWithSlotsByAscendingExpert) {
  // Row 0: experts 5, 2 (slots 1, 0); row 1: -1, 3 (slot 2: rank 0 of row 1); row 2: 0, 7.
  const std::vector<int32_t> expert = {5, 2, -1, 3, 0, 7};
  const std::vector<float> weight = {0.1f, 0.2f, 0.0f, 0.4f, 0.5f, 0.6f};
  const std::vector<int> dest = {1, 0, 0, 1, 0, 0, 0, 1};  // experts 0, 3, 7 on destination 1
  DispatchPlan plan;
  PlanDispatch(expert.data(), weight.data(), 3, 2, dest, 2, &plan);
  ASSERT_EQ(plan.pairs.size(), 5u);
  const int32_t want_slot[] = {1, 0, 2, 4, 5};
  const int32_t want_expert[] = {5, 2, 3, 0, 7};
  const int32_t want_dest[] = {0, 0, 1, 1, 1};
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(plan.pairs[i].slot, want_slot[i]) << i;
    EXPECT_EQ(plan.pairs[i].expert, want_expert[i]) << i;
    EXPECT_EQ(plan.pairs[i].destination, want_dest[i]) << i;
  }
  EXPECT_EQ(plan.pairs[1].position, 1);
  EXPECT_EQ(plan.pairs[1].weight, 0.2f);
  // Destination 0 computes experts 2 then 5; destination 1: 0, 3, 7.
  EXPECT_EQ(plan.by_destination[0], (std::vector<int32_t>{1, 0}));
  EXPECT_EQ(plan.by_destination[1], (std::vector<int32_t>{3, 2, 4}));
  ASSERT_EQ(plan.runs[1].size(), 3u);
  EXPECT_EQ(plan.runs[1][2].expert, 7);
  EXPECT_EQ(plan.runs[1][2].begin, 2);
  EXPECT_EQ(plan.runs[1][2].count, 1);
}

TEST(MoeDispatchTest, OneExpertsRowsKeepRowOrderInOneRun) {
  const std::vector<int32_t> expert = {4, 1, 1, 4, 4, -1};
  const std::vector<float> weight(6, 1.0f);
  DispatchPlan plan;
  PlanDispatch(expert.data(), weight.data(), 3, 2, std::vector<int>(8, 0), 1, &plan);
  ASSERT_EQ(plan.runs[0].size(), 2u);
  EXPECT_EQ(plan.runs[0][0].expert, 1);
  EXPECT_EQ(plan.runs[0][1].expert, 4);
  EXPECT_EQ(plan.runs[0][1].count, 3);
  std::vector<int64_t> rows;
  for (const int32_t i : plan.by_destination[0]) rows.push_back(plan.pairs[i].row);
  EXPECT_EQ(rows, (std::vector<int64_t>{0, 1, 0, 1, 2}));
}

TEST(MoeDispatchTest, CombineAddsInSlotOrderFromZeroWhateverTheInputOrder) {
  // Values where the order of f32 additions shows: 1e8 + 1 - 1e8 is 0 in f32, 1 - 1e8 + 1e8 is 0
  // too, but (1e8 - 1e8) + 1 is 1.
  const float a[] = {1e8f}, b[] = {-1e8f}, c[] = {1.0f};
  std::vector<DispatchPartial> parts = {{0, 2, 1.0f, c}, {0, 0, 1.0f, a}, {0, 1, 1.0f, b}};
  float out[2] = {7, 7};
  Combine(&parts, 2, 1, out);
  EXPECT_EQ(out[0], 1.0f);  // slots 0, 1, 2: (1e8 - 1e8) + 1
  EXPECT_EQ(out[1], 0.0f);  // no partial: zero
  const float w[] = {3.0f};
  std::vector<DispatchPartial> weighted = {{0, 0, 0.5f, w}};
  Combine(&weighted, 1, 1, out);
  EXPECT_EQ(out[0], 1.5f);
}

// The exactness contract: per-pair partials (one destination) and per-destination row sums
// computed in ascending expert order (a split over workers) give the same bits for k = 2.
TEST(MoeDispatchTest, SplitOverDestinationsIsBitIdenticalForTopTwo) {
  std::mt19937 rng(5);
  std::normal_distribution<float> g(0, 1);
  const int64_t n = 9, d = 16;
  const int k = 2, n_expert = 8;
  std::vector<int32_t> expert(n * k);
  std::vector<float> weight(n * k);
  for (int64_t r = 0; r < n; ++r) {
    expert[r * k] = static_cast<int32_t>(rng() % n_expert);
    expert[r * k + 1] =
        static_cast<int32_t>((expert[r * k] + 1 + rng() % (n_expert - 1)) % n_expert);
    weight[r * k] = std::abs(g(rng));
    weight[r * k + 1] = std::abs(g(rng));
  }
  std::vector<float> y(static_cast<size_t>(n_expert * n * d));  // y(expert, row)
  for (float& v : y) v = g(rng);
  auto y_of = [&](int32_t e, int64_t r) { return y.data() + (e * n + r) * d; };

  DispatchPlan one;
  PlanDispatch(expert.data(), weight.data(), n, k, std::vector<int>(n_expert, 0), 1, &one);
  std::vector<DispatchPartial> parts;
  for (const DispatchPair& p : one.pairs)
    parts.push_back({p.row, p.slot, p.weight, y_of(p.expert, p.row)});
  std::vector<float> want(n * d);
  Combine(&parts, n, d, want.data());

  const std::vector<int> dest = {0, 1, 2, 0, 1, 2, 0, 1};
  DispatchPlan split;
  PlanDispatch(expert.data(), weight.data(), n, k, dest, 3, &split);
  // Each destination sums a row's pairs in ascending expert order from 0 (as a worker does).
  std::vector<std::vector<float>> sums(3 * n, std::vector<float>(d, 0.0f));
  std::vector<int32_t> first(3 * n, 1 << 30);
  for (int di = 0; di < 3; ++di) {
    for (const int32_t i : split.by_destination[di]) {
      const DispatchPair& p = split.pairs[i];
      std::vector<float>& s = sums[di * n + p.row];
      for (int64_t j = 0; j < d; ++j) s[j] += p.weight * y_of(p.expert, p.row)[j];
      first[di * n + p.row] = std::min(first[di * n + p.row], p.slot);
    }
  }
  parts.clear();
  for (int di = 0; di < 3; ++di) {
    for (int64_t r = 0; r < n; ++r) {
      if (first[di * n + r] != (1 << 30))
        parts.push_back({r, first[di * n + r], 1.0f, sums[di * n + r].data()});
    }
  }
  std::vector<float> got(n * d);
  Combine(&parts, n, d, got.data());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0);
}

}  // namespace
}  // namespace moepool
