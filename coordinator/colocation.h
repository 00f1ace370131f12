// Co-location of experts the router chooses together: the arithmetic that both the planner
// (`moepool plan --stats`) and the live rebalancer (rebalance_plan.h) use.
//
// A layer's placement is an owner list: owner[e] = the worker holding expert e (each expert held
// by one worker), or -1 when unknown. A routed row whose two experts share a worker costs that
// worker one row out, one sum back and one round trip; split over two workers it costs two of
// each.
//
// Threading: pure functions.
#ifndef MOEPOOL_COORDINATOR_COLOCATION_H_
#define MOEPOOL_COORDINATOR_COLOCATION_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "coordinator/routing_stats.h"

namespace moepool {

// What a placement costs per routed row under routing statistics: the workers a row visits (1
// when both its experts share a worker), averaged over rows and layers.
struct RoutingEstimate {
  double visits_per_row = 0;
  double colocated_share = 0;  // rows whose experts share a worker
};

// Rows of a layer whose two experts share a worker (first) and all rows counted in pairs
// (second), for `owner` (-1 owners share nothing).
std::pair<int64_t, int64_t> ColocatedRows(const LayerRouting& layer, int n_expert,
                                          const std::vector<int>& owner);

// The best deal of a layer's experts: the experts owned by a worker in `movable` are dealt again
// among those workers, each keeping as many as it has, so that the most rows have both experts
// on one worker; other experts stay. Ties go to the deal that moves the fewest experts, then to
// `owner` itself, so an unchanged answer means nothing better was found. Exhaustive (8 experts
// over a few workers: at most a few thousand deals).
std::vector<int> BestDeal(const LayerRouting& layer, int n_expert, const std::vector<int>& owner,
                          const std::vector<bool>& movable);

// Experts whose owner differs between two deals of one layer.
int MovedExperts(const std::vector<int>& from, const std::vector<int>& to);

// The estimate over the layers whose owner list is not empty (others are not counted).
RoutingEstimate EstimateRouting(const RoutingSnapshot& stats,
                                const std::vector<std::vector<int>>& owners);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_COLOCATION_H_
