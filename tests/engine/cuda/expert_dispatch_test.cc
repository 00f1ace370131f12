// PlanExpertDispatch (engine/cuda/expert_dispatch.h): the CUDA backend's grouping of rows by
// expert and device, and the slots that make the combine add in ascending expert id.
#include "engine/cuda/expert_dispatch.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace moepool::cuda {
namespace {

TEST(ExpertDispatchTest, SlotsFollowAscendingExpertIdWithinARow) {
  // Row 0: pairs out of order; row 1: one missing pair; row 2: none; row 3: a repeated expert.
  const int k = 3;
  const std::vector<int32_t> expert = {5, 1, 3, -1, 2, 0, -1, -1, -1, 4, 4, 1};
  const std::vector<float> weight = {0.5f, 0.2f, 0.3f, 0.0f, 0.6f, 0.4f,
                                     0.0f, 0.0f, 0.0f, 0.1f, 0.7f, 0.2f};
  const std::vector<int> device_of = {0, 0, 0, 0, 0, 0};
  std::vector<DeviceDispatch> out(1);
  PlanExpertDispatch(expert.data(), weight.data(), 4, k, device_of, &out);
  const DeviceDispatch& d = out[0];
  ASSERT_EQ(d.m(), 8);
  // (row, slot, weight) per entry.
  std::map<std::tuple<int32_t, int32_t>, float> got;
  for (int64_t i = 0; i < d.m(); ++i) {
    EXPECT_TRUE(got.emplace(std::make_tuple(d.rows()[i], d.slots()[i]), d.weights()[i]).second);
  }
  const std::map<std::tuple<int32_t, int32_t>, float> want = {
      {{0, 0}, 0.2f}, {{0, 1}, 0.3f},  {{0, 2}, 0.5f},   // experts 1, 3, 5
      {{1, 3}, 0.4f}, {{1, 4}, 0.6f},                    // experts 0, 2
      {{3, 9}, 0.2f}, {{3, 10}, 0.1f}, {{3, 11}, 0.7f},  // experts 1, 4 (pos 0), 4 (pos 1)
  };
  EXPECT_EQ(got, want);
  // Groups: ascending expert, contiguous, rows in order.
  std::vector<int32_t> experts;
  int64_t next = 0;
  for (const ExpertGroup& g : d.groups) {
    experts.push_back(g.expert);
    EXPECT_EQ(g.begin, next);
    next += g.count;
    for (int64_t i = g.begin + 1; i < g.begin + g.count; ++i) {
      EXPECT_LE(d.rows()[i - 1], d.rows()[i]);
    }
  }
  EXPECT_EQ(next, d.m());
  EXPECT_EQ(experts, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
}

TEST(ExpertDispatchTest, EveryPairLandsOnItsExpertsDeviceOnce) {
  const int64_t n = 50;
  const int k = 2, n_expert = 8;
  std::mt19937 rng(3);
  std::vector<int32_t> expert(static_cast<size_t>(n * k));
  std::vector<float> weight(expert.size());
  for (size_t i = 0; i < expert.size(); ++i) {
    expert[i] = static_cast<int32_t>(rng() % (n_expert + 1)) - 1;  // -1 .. 7
    weight[i] = static_cast<float>(i);
  }
  const std::vector<int> device_of = {0, 0, 1, 1, 1, 2, 2, 0};
  std::vector<DeviceDispatch> out(3);
  PlanExpertDispatch(expert.data(), weight.data(), n, k, device_of, &out);
  std::vector<int> seen(expert.size(), 0);
  for (size_t dev = 0; dev < out.size(); ++dev) {
    const DeviceDispatch& d = out[dev];
    for (const ExpertGroup& g : d.groups) {
      EXPECT_EQ(device_of[static_cast<size_t>(g.expert)], static_cast<int>(dev));
      for (int64_t i = g.begin; i < g.begin + g.count; ++i) {
        const size_t pair = static_cast<size_t>(d.weights()[i]);  // weight = pair index
        EXPECT_EQ(expert[pair], g.expert);
        EXPECT_EQ(d.rows()[i], static_cast<int32_t>(pair / k));
        EXPECT_EQ(d.slots()[i] / k, static_cast<int32_t>(pair / k));
        ++seen[pair];
      }
    }
  }
  for (size_t i = 0; i < expert.size(); ++i) EXPECT_EQ(seen[i], expert[i] >= 0 ? 1 : 0) << i;
}

TEST(ExpertDispatchTest, DevicesWithoutWorkGetEmptyPlans) {
  const std::vector<int32_t> expert = {1, 2};
  const std::vector<float> weight = {0.5f, 0.5f};
  std::vector<DeviceDispatch> out(2);
  out[1].packed = {7, 7, 7};  // stale contents are replaced
  PlanExpertDispatch(expert.data(), weight.data(), 1, 2, {0, 0, 0}, &out);
  EXPECT_EQ(out[0].m(), 2);
  EXPECT_EQ(out[1].m(), 0);
  EXPECT_TRUE(out[1].groups.empty());
}

}  // namespace
}  // namespace moepool::cuda
