// The live rebalancer's plan on recorded statistics: pairs chosen together end up on one worker
// (each worker keeping its count per layer), hysteresis keeps a placement that is good enough,
// workers that cannot move keep their pairs, hot experts get a replica where a budget has room
// (ties: most room, then first), cooled replicas are dropped, and the predicted costs follow.
#include "coordinator/rebalance_plan.h"

#include <algorithm>
#include <set>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace moepool {
namespace {

constexpr int kExperts = 4;
constexpr uint64_t kPairBytes = 1000;

uint64_t Bytes(int, int) { return kPairBytes; }

// One layer; rows choose (a, b) `n` times for each entry.
LayerRouting Layer(const std::vector<std::pair<std::pair<int, int>, int64_t>>& chosen) {
  LayerRouting l;
  l.load.assign(kExperts, 0);
  l.pairs.assign(kExperts * kExperts, 0);
  for (const auto& [ab, n] : chosen) {
    const auto [a, b] = ab;
    l.pairs[static_cast<size_t>(std::min(a, b) * kExperts + std::max(a, b))] += n;
    l.load[static_cast<size_t>(a)] += n;
    l.load[static_cast<size_t>(b)] += n;
    l.rows += n;
  }
  return l;
}

RoutingSnapshot Stats(std::vector<LayerRouting> layers) {
  RoutingSnapshot s;
  s.n_expert = kExperts;
  s.layers = std::move(layers);
  return s;
}

RebalanceOptions Options() {
  RebalanceOptions o;
  o.min_rows = 10;
  o.n_embd = 1024;
  o.replicate = false;
  return o;
}

RebalanceWorker Worker(const char* id, std::vector<ExpertPair> pairs, uint64_t budget = 2000) {
  return {id, budget, std::move(pairs), true};
}

std::set<ExpertPair> Set(const std::vector<ExpertPair>& v) { return {v.begin(), v.end()}; }

// (0, 2) and (1, 3) chosen together; the balanced split holds 0-1 | 2-3.
const LayerRouting kPaired = Layer({{{0, 2}, 40}, {{1, 3}, 40}, {{0, 1}, 5}, {{2, 3}, 5}});

TEST(RebalancePlanTest, PairsChosenTogetherMoveOntoOneWorkerWithTheFewestMoves) {
  const std::vector<RebalanceWorker> workers = {Worker("a", {{0, 0}, {0, 1}}),
                                                Worker("b", {{0, 2}, {0, 3}})};
  auto plan = PlanRebalance(Stats({kPaired}), 1, Bytes, workers, Options());
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(plan->changes());
  EXPECT_EQ(plan->layers_dealt, 1);
  // Each worker keeps two experts, and holds one of the pairs chosen together.
  const std::set<std::set<ExpertPair>> got = {Set(plan->target[0]), Set(plan->target[1])};
  const std::set<std::set<ExpertPair>> want = {{{0, 0}, {0, 2}}, {{0, 1}, {0, 3}}};
  EXPECT_EQ(got, want);
  EXPECT_EQ(plan->moves.size(), 2u);  // one expert each way, not four
  EXPECT_EQ(plan->bytes_to_fetch, 2 * kPairBytes);
  // 80 of 90 rows visited two workers; after, 10 do.
  EXPECT_NEAR(plan->before.round_trips_per_token, 1 + 80.0 / 90, 1e-9);
  EXPECT_NEAR(plan->after.round_trips_per_token, 1 + 10.0 / 90, 1e-9);
  EXPECT_NEAR(plan->after.bytes_per_token, plan->after.round_trips_per_token * 2 * 1024 * 4, 1e-6);
  EXPECT_NEAR(plan->after.colocated_share, 80.0 / 90, 1e-9);
}

TEST(RebalancePlanTest, HysteresisKeepsAPlacementThatIsGoodEnough) {
  const std::vector<RebalanceWorker> workers = {Worker("a", {{0, 0}, {0, 1}}),
                                                Worker("b", {{0, 2}, {0, 3}})};
  const LayerRouting mild = Layer({{{0, 2}, 12}, {{1, 3}, 12}, {{0, 1}, 10}, {{2, 3}, 10}});
  RebalanceOptions o = Options();
  auto plan = PlanRebalance(Stats({mild}), 1, Bytes, workers, o);  // gain 4/44 < 0.15
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->changes());
  o.min_gain = 0.05;
  EXPECT_TRUE(PlanRebalance(Stats({mild}), 1, Bytes, workers, o)->changes());
  o.min_rows = 100;  // too few rows to go on
  EXPECT_FALSE(PlanRebalance(Stats({mild}), 1, Bytes, workers, o)->changes());
  o = Options();
  o.colocate = false;  // the switch
  EXPECT_FALSE(PlanRebalance(Stats({kPaired}), 1, Bytes, workers, o)->changes());
}

TEST(RebalancePlanTest, ATieKeepsTheCurrentPlacement) {
  // Already co-located: the other co-located deal (the workers' halves swapped) is as good.
  const std::vector<RebalanceWorker> workers = {Worker("a", {{0, 0}, {0, 2}}),
                                                Worker("b", {{0, 1}, {0, 3}})};
  RebalanceOptions o = Options();
  o.min_gain = 0;
  auto plan = PlanRebalance(Stats({kPaired}), 1, Bytes, workers, o);
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->changes());
}

TEST(RebalancePlanTest, WorkersThatCannotMoveKeepTheirPairs) {
  std::vector<RebalanceWorker> workers = {Worker("a", {{0, 0}, {0, 1}}),
                                          Worker("b", {{0, 2}, {0, 3}})};
  workers[1].movable = false;  // static, fetching or in a change
  auto plan = PlanRebalance(Stats({kPaired}), 1, Bytes, workers, Options());
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE(plan->changes());
  // A third movable worker can trade with a: 0 cannot meet 2 (b cannot move), but a's 0 can go
  // to c for c's 3, so (1, 3) meet.
  workers = {Worker("a", {{0, 0}, {0, 1}}), Worker("b", {{0, 2}}), Worker("c", {{0, 3}})};
  workers[1].movable = false;
  plan = PlanRebalance(Stats({kPaired}), 1, Bytes, workers, Options());
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(Set(plan->target[1]), (std::set<ExpertPair>{{0, 2}}));
  EXPECT_EQ(Set(plan->target[2]), (std::set<ExpertPair>{{0, 0}}));
  EXPECT_EQ(Set(plan->target[0]), (std::set<ExpertPair>{{0, 1}, {0, 3}}));
}

// Expert 0 is chosen by most rows: with 2 of 4 experts per row the mean share is 0.5.
const LayerRouting kHot = Layer({{{0, 2}, 60}, {{0, 3}, 30}, {{1, 2}, 5}, {{1, 3}, 5}});

TEST(RebalancePlanTest, AHotExpertGetsAReplicaOnTheLeastBusyWorkerWithRoom) {
  RebalanceOptions o = Options();
  o.colocate = false;
  o.replicate = true;
  o.hot_share = 1.5;  // 0's share is 0.9 >= 0.75; 2's 0.65 is not
  std::vector<RebalanceWorker> workers = {Worker("a", {{0, 0}, {0, 1}}, 2000),
                                          Worker("b", {{0, 3}}, 2000), Worker("c", {{0, 2}}, 2000)};
  auto plan = PlanRebalance(Stats({kHot}), 1, Bytes, workers, o);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->replicas_added, 1);
  // b computes 35 rows of the layer, c 65.
  EXPECT_EQ(Set(plan->target[1]), (std::set<ExpertPair>{{0, 0}, {0, 3}}));
  ASSERT_EQ(plan->moves.size(), 1u);
  EXPECT_EQ(plan->moves[0].from, -1);
  EXPECT_EQ(plan->moves[0].to, 1);
  EXPECT_EQ(plan->bytes_to_fetch, kPairBytes);
  // a did 100 of 200 choices; now b does the most: 45 + 35.
  EXPECT_NEAR(plan->before.busiest_worker_share, 0.5, 1e-9);
  EXPECT_NEAR(plan->after.busiest_worker_share, 0.4, 1e-9);
  // No room on b: c, the other worker with room.
  workers[1].budget_bytes = 1500;
  plan = PlanRebalance(Stats({kHot}), 1, Bytes, workers, o);
  EXPECT_EQ(Set(plan->target[2]), (std::set<ExpertPair>{{0, 0}, {0, 2}}));
  // No room anywhere: no replica.
  workers[2].budget_bytes = 1000;
  plan = PlanRebalance(Stats({kHot}), 1, Bytes, workers, o);
  EXPECT_FALSE(plan->changes());
  o.replicate = false;  // the switch
  workers[2].budget_bytes = 2000;
  EXPECT_FALSE(PlanRebalance(Stats({kHot}), 1, Bytes, workers, o)->changes());
  // Measured speeds: the worker done first with the layer, not the one with the fewest rows.
  o.replicate = true;
  o.pace = false;
  workers[1].budget_bytes = 2000;
  workers[0].micros_per_row = 1;
  workers[1].micros_per_row = 3;  // b: 35 rows x 3 = 105 us; c: 65 us
  workers[2].micros_per_row = 1;
  plan = PlanRebalance(Stats({kHot}), 1, Bytes, workers, o);
  EXPECT_EQ(Set(plan->target[2]), (std::set<ExpertPair>{{0, 0}, {0, 2}}));
}

TEST(RebalancePlanTest, ReplicaTiesGoToPartnersThenTheMostRoomThenTheFirstWorker) {
  RebalanceOptions o = Options();
  o.colocate = false;
  o.replicate = true;
  o.hot_share = 1.4;
  // 0 is hot; b (3) and c (2) compute 60 rows each; c holds 0's more frequent partner.
  const LayerRouting partners = Layer({{{0, 2}, 60}, {{0, 3}, 30}, {{1, 3}, 30}});
  std::vector<RebalanceWorker> workers = {Worker("a", {{0, 0}, {0, 1}}, 2000),
                                          Worker("b", {{0, 3}}, 9000), Worker("c", {{0, 2}}, 2000)};
  auto plan = PlanRebalance(Stats({partners}), 1, Bytes, workers, o);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->moves.at(0).to, 2);
  // Equal load and partners (b and c hold 2 and 3, chosen with 0 equally often): the most room.
  const LayerRouting even = Layer({{{0, 1}, 90}, {{2, 3}, 10}});
  workers = {Worker("a", {{0, 0}, {0, 1}}, 2000), Worker("b", {{0, 2}}, 3000),
             Worker("c", {{0, 3}}, 5000)};
  plan = PlanRebalance(Stats({even}), 1, Bytes, workers, o);
  EXPECT_EQ(plan->moves.at(0).to, 2);
  workers[2].budget_bytes = 3000;  // equal room: the first
  plan = PlanRebalance(Stats({even}), 1, Bytes, workers, o);
  EXPECT_EQ(plan->moves.at(0).to, 1);
}

TEST(RebalancePlanTest, ACooledReplicaIsDroppedFromTheHolderWithoutItsPartners) {
  RebalanceOptions o = Options();
  o.colocate = false;
  o.replicate = true;
  // 0 is held twice but now rare (share 0.1 < 0.75 / 2); c holds its partner 2, b nothing; no
  // other expert is hot.
  const LayerRouting cool = Layer({{{0, 2}, 10}, {{1, 3}, 35}, {{1, 2}, 20}, {{2, 3}, 35}});
  const std::vector<RebalanceWorker> workers = {Worker("a", {{0, 1}}, 5000),
                                                Worker("b", {{0, 0}, {0, 3}}, 5000),
                                                Worker("c", {{0, 0}, {0, 2}}, 5000)};
  auto plan = PlanRebalance(Stats({cool}), 1, Bytes, workers, o);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->replicas_dropped, 1);
  EXPECT_EQ(Set(plan->target[1]), (std::set<ExpertPair>{{0, 3}}));
  EXPECT_EQ(Set(plan->target[2]), (std::set<ExpertPair>{{0, 0}, {0, 2}}));
}

TEST(RebalancePlanTest, ASlowWorkerSwapsItsHotExpertForAColderOne) {
  RebalanceOptions o = Options();
  o.colocate = false;
  // Loads: 0: 50, 1: 10, 2: 30, 3: 10 (of 50 rows).
  const LayerRouting layer = Layer({{{0, 2}, 30}, {{0, 1}, 10}, {{0, 3}, 10}});
  std::vector<RebalanceWorker> workers = {Worker("a", {{0, 0}, {0, 1}}),
                                          Worker("b", {{0, 2}, {0, 3}})};
  workers[0].micros_per_row = 2;  // a is twice as slow: 120 us against b's 40
  workers[1].micros_per_row = 1;
  auto plan = PlanRebalance(Stats({layer}), 1, Bytes, workers, o);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->pace_swaps, 1);
  EXPECT_EQ(Set(plan->target[0]), (std::set<ExpertPair>{{0, 1}, {0, 2}}));  // 80 us
  EXPECT_EQ(Set(plan->target[1]), (std::set<ExpertPair>{{0, 0}, {0, 3}}));  // 60 us
  EXPECT_NEAR(plan->before.pace_micros_per_token, 120.0 / 50, 1e-9);
  EXPECT_NEAR(plan->after.pace_micros_per_token, 80.0 / 50, 1e-9);
  // Speeds within pace_spread, unknown or the switch off: nothing moves.
  workers[0].micros_per_row = 1.2;
  EXPECT_FALSE(PlanRebalance(Stats({layer}), 1, Bytes, workers, o)->changes());
  workers[0].micros_per_row = 0;
  EXPECT_FALSE(PlanRebalance(Stats({layer}), 1, Bytes, workers, o)->changes());
  workers[0].micros_per_row = 2;
  o.pace = false;
  EXPECT_FALSE(PlanRebalance(Stats({layer}), 1, Bytes, workers, o)->changes());
}

TEST(RebalancePlanTest, CoLocationNeverSlowsALayerOfWorkersOfDifferentSpeed) {
  // (0, 2) is the hot pair; a is twice as slow as b.
  const LayerRouting layer = Layer({{{0, 2}, 40}, {{1, 3}, 5}, {{0, 1}, 5}, {{2, 3}, 5}});
  std::vector<RebalanceWorker> workers = {Worker("a", {{0, 0}, {0, 1}}),
                                          Worker("b", {{0, 2}, {0, 3}})};
  // Same speed: co-location puts 0 and 2 together (on a: the first deal of the best).
  auto plan = PlanRebalance(Stats({layer}), 1, Bytes, workers, Options());
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->layers_dealt, 1);
  EXPECT_EQ(Set(plan->target[0]), (std::set<ExpertPair>{{0, 0}, {0, 2}}));
  // a slow: that deal would double a's time; the pace pass gives the pair to b instead.
  workers[0].micros_per_row = 2;
  workers[1].micros_per_row = 1;
  plan = PlanRebalance(Stats({layer}), 1, Bytes, workers, Options());
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->layers_dealt, 0);
  EXPECT_EQ(plan->pace_swaps, 1);
  EXPECT_EQ(Set(plan->target[0]), (std::set<ExpertPair>{{0, 1}, {0, 3}}));
  EXPECT_EQ(Set(plan->target[1]), (std::set<ExpertPair>{{0, 0}, {0, 2}}));
  EXPECT_LT(plan->after.pace_micros_per_token, plan->before.pace_micros_per_token);
  EXPECT_LT(plan->after.round_trips_per_token, plan->before.round_trips_per_token);
}

TEST(RebalancePlanTest, StatisticsOfAnotherShapeAndPairsOutsideTheModelAreRefused) {
  const std::vector<RebalanceWorker> workers = {Worker("a", {{0, 0}})};
  EXPECT_EQ(PlanRebalance(Stats({kPaired}), 2, Bytes, workers, Options()).status().code(),
            absl::StatusCode::kInvalidArgument);
  RoutingSnapshot bad = Stats({kPaired});
  bad.layers[0].load.pop_back();
  EXPECT_EQ(PlanRebalance(bad, 1, Bytes, workers, Options()).status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<RebalanceWorker> outside = {Worker("a", {{0, 9}})};
  EXPECT_EQ(PlanRebalance(Stats({kPaired}), 1, Bytes, outside, Options()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moepool
