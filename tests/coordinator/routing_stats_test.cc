// RoutingStats: load and co-selection counts over a sliding window, and their JSON (the
// statistics file `moepool plan --stats` reads, user input).
#include "coordinator/routing_stats.h"

#include <vector>

#include "gtest/gtest.h"

namespace moepool {
namespace {

ExpertRoutes Routes(int layer, const std::vector<int32_t>& experts) {
  ExpertRoutes r;
  r.layer = layer;
  r.k = 2;
  r.n_rows = static_cast<int64_t>(experts.size() / 2);
  r.expert = experts.data();
  return r;
}

TEST(RoutingStatsTest, CountsLoadAndPairsPerLayer) {
  RoutingStats stats(2, 4, /*window_rows=*/100, /*buckets=*/4);
  const std::vector<int32_t> a = {0, 1, 0, 1, 2, 3, 1, -1};
  stats.Record(Routes(1, a));
  stats.Record(Routes(7, a));  // no such layer: ignored
  const RoutingSnapshot s = stats.Snapshot();
  ASSERT_EQ(s.layers.size(), 2u);
  EXPECT_EQ(s.layers[0].rows, 0);
  EXPECT_EQ(s.layers[1].rows, 4);
  EXPECT_EQ(s.layers[1].load, (std::vector<int64_t>{2, 3, 1, 1}));
  EXPECT_EQ(s.layers[1].pair(0, 1, 4), 2);
  EXPECT_EQ(s.layers[1].pair(1, 0, 4), 2);
  EXPECT_EQ(s.layers[1].pair(2, 3, 4), 1);
  EXPECT_EQ(s.layers[1].pair(0, 2, 4), 0);
}

TEST(RoutingStatsTest, OldRowsLeaveTheWindow) {
  RoutingStats stats(1, 4, /*window_rows=*/8, /*buckets=*/4);  // buckets of 2 rows
  std::vector<int32_t> old_rows;
  for (int i = 0; i < 8; ++i) old_rows.insert(old_rows.end(), {0, 1});
  stats.Record(Routes(0, old_rows));
  EXPECT_EQ(stats.Snapshot().layers[0].pair(0, 1, 4), 8);
  std::vector<int32_t> new_rows;
  for (int i = 0; i < 8; ++i) new_rows.insert(new_rows.end(), {2, 3});
  stats.Record(Routes(0, new_rows));
  const LayerRouting l = stats.Snapshot().layers[0];
  EXPECT_EQ(l.pair(2, 3, 4), 8);
  EXPECT_EQ(l.pair(0, 1, 4), 0);  // all evicted: the window holds the latest 8 rows
  EXPECT_EQ(l.rows, 8);
}

TEST(RoutingStatsTest, JsonRoundTripsAndRejectsBadFiles) {
  RoutingStats stats(2, 4);
  const std::vector<int32_t> a = {0, 3, 1, 2, 0, 3};
  stats.Record(Routes(0, a));
  const RoutingSnapshot s = stats.Snapshot();
  auto back = RoutingFromJson(RoutingJson(s));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->n_expert, 4);
  ASSERT_EQ(back->layers.size(), 2u);
  EXPECT_EQ(back->layers[0].load, s.layers[0].load);
  EXPECT_EQ(back->layers[0].pairs, s.layers[0].pairs);
  EXPECT_EQ(back->layers[0].rows, 3);
  for (const char* bad : {
           R"([])",
           R"({"n_expert": 0, "layers": []})",
           R"({"n_expert": 2, "layers": [{"load": [1]}]})",
           R"({"n_expert": 2, "layers": [{"load": [1, -1]}]})",
           R"({"n_expert": 2, "layers": [{"load": [1, 1], "pairs": [[0, 2, 1]]}]})",
           R"({"n_expert": 2, "layers": [{"load": [1, 1], "pairs": [[0, 0, 1]]}]})",
           R"({"n_expert": 2, "layers": [{"load": [1, 1], "pairs": [[0, 1]]}]})",
       }) {
    auto r = RoutingFromJson(nlohmann::json::parse(bad));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

}  // namespace
}  // namespace moepool
