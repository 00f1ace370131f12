// moepool plan --stats: experts the router chooses together end up on one worker, with every
// worker keeping as many pairs per layer (so as many bytes) as the balanced plan gives it.
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "coordinator/planner.h"
#include "engine/synth.h"
#include "gtest/gtest.h"

namespace moepool {
namespace {

// Tiny's shape (4 layers, 8 experts); in each layer pair (e, e ^ 4) is chosen together `hot`
// times and every other pair once.
RoutingSnapshot PairedStats(int64_t hot) {
  RoutingSnapshot s;
  s.n_expert = 8;
  for (int l = 0; l < 4; ++l) {
    LayerRouting layer;
    layer.load.assign(8, 0);
    layer.pairs.assign(64, 0);
    for (int a = 0; a < 8; ++a) {
      for (int b = a + 1; b < 8; ++b) {
        const int64_t n = (a ^ 4) == b ? hot : 1;
        layer.pairs[static_cast<size_t>(a * 8 + b)] = n;
        layer.rows += n;
        layer.load[static_cast<size_t>(a)] += n;
        layer.load[static_cast<size_t>(b)] += n;
      }
    }
    s.layers.push_back(layer);
  }
  return s;
}

PlanRequest TwoWorkers() {
  PlanRequest r;
  r.sizes = *SizesFromShape(*SynthShapeByName("tiny"), "Q8_0");
  r.coordinator_machine = 8ull << 30;
  r.machines = {8ull << 30, 8ull << 30};
  return r;
}

// Per layer: the machine index holding each expert.
std::map<int, std::map<int, int>> Owners(const Plan& p) {
  std::map<int, std::map<int, int>> out;
  for (size_t m = 0; m < p.machines.size(); ++m) {
    for (const auto& [l, e] : p.machines[m].pairs) out[l][e] = static_cast<int>(m);
  }
  return out;
}

TEST(PlannerRoutingTest, ChosenTogetherMeansPlacedTogether) {
  const Plan balanced = *MakePlan(TwoWorkers());
  PlanRequest r = TwoWorkers();
  r.routing = PairedStats(50);
  auto plan = MakePlan(r);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(plan->fits);
  const auto owners = Owners(*plan);
  for (int l = 0; l < 4; ++l) {
    for (int e = 0; e < 8; ++e) {
      EXPECT_EQ(owners.at(l).at(e), owners.at(l).at(e ^ 4)) << "layer " << l << " expert " << e;
    }
  }
  // Same pairs per worker and layer, so the same bytes.
  for (size_t m = 0; m < plan->machines.size(); ++m) {
    EXPECT_EQ(plan->machines[m].pairs.size(), balanced.machines[m].pairs.size());
    EXPECT_EQ(plan->machines[m].expert_bytes, balanced.machines[m].expert_bytes);
  }
  ASSERT_TRUE(plan->routing_before.has_value() && plan->routing_after.has_value());
  // Balanced ranges (0-3 | 4-7) split every hot pair; co-located, all hot pairs are together.
  EXPECT_GT(plan->routing_before->visits_per_row, 1.5);
  EXPECT_LT(plan->routing_after->visits_per_row, plan->routing_before->visits_per_row);
  EXPECT_GT(plan->routing_after->colocated_share, 0.85);
  EXPECT_NE(FormatPlan(r, *plan).find("workers a routed row visits"), std::string::npos);
}

TEST(PlannerRoutingTest, NoPreferenceKeepsTheBalancedPlanAndShapesMustMatch) {
  PlanRequest r = TwoWorkers();
  r.routing = PairedStats(1);  // every pair alike: nothing is better than the balanced split
  auto plan = MakePlan(r);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(Owners(*plan), Owners(*MakePlan(TwoWorkers())));
  RoutingSnapshot wrong = PairedStats(5);
  wrong.layers.pop_back();
  r.routing = wrong;
  EXPECT_EQ(MakePlan(r).status().code(), absl::StatusCode::kInvalidArgument);
}

// Tiny's shape with skewed loads: in each layer expert 0 is chosen with every other expert
// `hot` times, every other pair once.
RoutingSnapshot HotExpertStats(int64_t hot) {
  RoutingSnapshot s;
  s.n_expert = 8;
  for (int l = 0; l < 4; ++l) {
    LayerRouting layer;
    layer.load.assign(8, 0);
    layer.pairs.assign(64, 0);
    for (int a = 0; a < 8; ++a) {
      for (int b = a + 1; b < 8; ++b) {
        const int64_t n = a == 0 ? hot : 1;
        layer.pairs[static_cast<size_t>(a * 8 + b)] = n;
        layer.rows += n;
        layer.load[static_cast<size_t>(a)] += n;
        layer.load[static_cast<size_t>(b)] += n;
      }
    }
    s.layers.push_back(layer);
  }
  return s;
}

// With statistics, a slow machine also ends up with colder experts: the hot expert 0, which the
// expert-range split puts on the first worker, is traded for a cold one of the fast worker
// (co-location is held off so that the pace pass alone moves it).
TEST(PlannerRoutingTest, ASlowMachineGetsColderExperts) {
  PlanRequest r = TwoWorkers();
  r.routing = HotExpertStats(40);
  r.routing_min_gain = 1.0;
  r.machine_speeds = {0.5, 1.0};
  auto plan = MakePlan(r);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(plan->fits);
  const auto owners = Owners(*plan);
  const int slow = 1, fast = 2;  // machine 0 is the coordinator's
  size_t slow_pairs = 0;
  for (int l = 0; l < 4; ++l) {
    EXPECT_EQ(owners.at(l).at(0), fast) << "layer " << l;
    for (int e = 0; e < 8; ++e) slow_pairs += owners.at(l).at(e) == slow ? 1 : 0;
  }
  EXPECT_GT(plan->pace_swaps, 0);
  EXPECT_EQ(slow_pairs, plan->machines[slow].pairs.size());
  ASSERT_TRUE(plan->pace_memory_split.has_value());
  EXPECT_LT(plan->pace, *plan->pace_memory_split);
  // work_share comes from the statistics' loads: the slow machine's share is the colder one.
  EXPECT_LT(plan->machines[slow].work_share / 0.5, plan->pace + 1e-12);
  EXPECT_NEAR(plan->machines[slow].work_share + plan->machines[fast].work_share, 1.0, 1e-9);
  EXPECT_NE(FormatPlan(r, *plan).find("traded for colder ones"), std::string::npos);
}

}  // namespace
}  // namespace moepool
