// The live rebalancer's plan (issue 21): from the routing statistics of the latest rows and the
// workers' current pairs and memory budgets, where each (layer, expert) pair should live.
//
// Three passes, each with its own switch and hysteresis:
//  1. Co-location: in each layer whose experts are each held by one worker, the experts held by
//     movable workers are dealt again among them (each keeps its count, so its bytes: the pairs
//     of one layer have one size) to put the most rows' two experts on one worker
//     (colocation.h), when that puts at least `min_gain` more of the layer's rows on one worker.
//  2. Replicas: an expert chosen by at least `hot_share` x k / n_expert of its layer's rows (k
//     experts per row) gets a second holder: the movable worker with room in its budget that
//     is done first with that layer's rows (its rows x its time per row: the slowest worker sets
//     the layer's pace); ties
//     go to the one holding the experts most often chosen with it, then to the most room, then
//     to the first. A replica whose expert has cooled below half that share is dropped from the
//     holder with the fewest rows chosen together with it.
//  3. Pace, when the workers' measured times per row differ (a slow machine sets every layer's
//     pace: the slowest worker's rows x its time per row): in each layer whose experts each have
//     one holder, the slowest worker's hot expert is swapped for a colder one of a faster worker
//     (same bytes), as long as that shortens the layer's slowest worker by pace_gain; so a slow
//     worker ends up with colder experts. Co-location then never lengthens a layer's pace by
//     more than pace_gain. Replicas go to the worker done first with the layer's rows.
// The passes run in the order 1, 3, 2. Pairs held by workers that cannot move now (static,
// fetching, being changed) and pairs on the coordinator stay where they are.
//
// Threading: pure functions.
#ifndef MOEPOOL_COORDINATOR_REBALANCE_PLAN_H_
#define MOEPOOL_COORDINATOR_REBALANCE_PLAN_H_

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/routing_stats.h"
#include "nlohmann/json.hpp"

namespace moepool {

using ExpertPair = std::pair<int, int>;  // (layer, expert)

struct RebalanceWorker {
  std::string id;
  uint64_t budget_bytes = 0;      // the most expert bytes it may hold
  std::vector<ExpertPair> pairs;  // held and routed to it now
  bool movable = true;            // its pairs may change now
  // Its measured compute time per routed row (the mean over its latest exchanges); 0: unknown
  // (taken as the median of the measured workers).
  double micros_per_row = 0;
};

struct RebalanceOptions {
  bool colocate = true;
  // Off by default: on equal machines a replica splits its expert's rows over two workers and
  // costs more rows on the wire than it saves in pace (docs/placement.md, measured).
  bool replicate = false;
  // Co-location hysteresis: the share of a layer's rows that must newly share a worker.
  double min_gain = 0.15;
  // Replicas: hot at hot_share x the mean share of a layer's rows per expert (k / n_expert).
  double hot_share = 1.5;
  // Workers of different speed (pass 3): when the movable workers' measured times per row
  // differ by at least pace_spread, a swap must shorten a layer's slowest worker by pace_gain,
  // and co-location may not lengthen it by more than pace_gain.
  bool pace = true;
  double pace_spread = 1.25;
  double pace_gain = 0.10;
  // Layers with fewer rows in the statistics are left alone (too little to go on).
  int64_t min_rows = 1024;
  int n_expert_used = 2;
  // For the predicted bytes per token: values per row and bytes per value (4: f32 rows).
  int64_t n_embd = 0;
  int bytes_per_value = 4;
};

// What a placement costs, predicted from the statistics: per token and layer, the workers its
// row visits (round trips with one stream), the bytes out and back, and the busiest worker's
// share of the routed (row, expert) choices (the slowest worker sets every layer's pace).
struct PlacementCost {
  double round_trips_per_token = 0;  // summed over layers
  double bytes_per_token = 0;        // rows out and sums back, summed over layers
  double colocated_share = 0;        // rows whose experts share a worker
  double busiest_worker_share = 0;   // of all (row, expert) choices on workers
  // The slowest worker's compute per token, summed over layers (times per row as measured).
  double pace_micros_per_token = 0;
};

struct RebalanceMove {
  int layer = 0;
  int expert = 0;
  int from = -1;  // worker index that stops holding it, -1: none (a new replica)
  int to = -1;    // worker index that starts holding it, -1: none (a dropped replica)
  uint64_t bytes = 0;
};

struct RebalancePlan {
  std::vector<std::vector<ExpertPair>> target;  // per worker, ascending
  std::vector<RebalanceMove> moves;
  PlacementCost before, after;
  uint64_t bytes_to_fetch = 0;  // the pairs workers must fetch
  int layers_dealt = 0;
  int replicas_added = 0;
  int replicas_dropped = 0;
  int pace_swaps = 0;
  bool changes() const { return !moves.empty(); }
};

// Plans from `stats` (n_layer layers). `pair_bytes(layer, expert)` sizes a pair.
// INVALID_ARGUMENT when the statistics are for another shape or a worker holds a pair outside
// the model.
absl::StatusOr<RebalancePlan> PlanRebalance(const RoutingSnapshot& stats, int n_layer,
                                            const std::function<uint64_t(int, int)>& pair_bytes,
                                            const std::vector<RebalanceWorker>& workers,
                                            const RebalanceOptions& options);

// The predicted cost of the placement `holders` ([layer][expert] -> worker indices), with rows
// spread evenly over a pair's holders.
// `worker_cost`: each worker's time per row (for pace_micros_per_token; empty: 0).
PlacementCost PredictCost(const RoutingSnapshot& stats,
                          const std::vector<std::vector<std::vector<int>>>& holders,
                          const RebalanceOptions& options,
                          const std::vector<double>& worker_cost = {});

// The plan for GET/POST /v1/cluster/rebalance and the log: costs, moves (worker ids), totals.
nlohmann::json RebalancePlanJson(const RebalancePlan& plan,
                                 const std::vector<RebalanceWorker>& workers);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_REBALANCE_PLAN_H_
