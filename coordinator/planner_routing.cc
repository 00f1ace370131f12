// The planner's co-location pass (planner_internal.h): pairs of experts the router chooses
// together on one worker, from routing statistics.
#include <algorithm>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/colocation.h"
#include "coordinator/planner_internal.h"
#include "coordinator/rebalance_plan.h"
#include "engine/status_macros.h"

namespace moepool::planner_internal {

// Layers whose every expert is assigned once: [expert] -> the machine holding it.
using Owners = std::vector<int>;

absl::Status ColocateByRouting(const RoutingSnapshot& stats, const ModelSizes& sizes,
                               double min_gain, Plan* plan) {
  const int n_expert = static_cast<int>(sizes.n_expert());
  if (stats.n_expert != n_expert || static_cast<int64_t>(stats.layers.size()) != sizes.n_layer()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the routing statistics are for ", stats.layers.size(), " layers of ", stats.n_expert,
        " experts; the model has ", sizes.n_layer(), " of ", n_expert));
  }
  // Who holds what now, per layer (layers with a pair held twice are left alone).
  std::vector<Owners> owners(static_cast<size_t>(sizes.n_layer()));
  for (size_t layer = 0; layer < owners.size(); ++layer) {
    Owners o(static_cast<size_t>(n_expert), -1);
    bool once = true;
    for (size_t m = 0; m < plan->machines.size(); ++m) {
      for (const auto& [l, e] : plan->machines[m].pairs) {
        if (l != static_cast<int>(layer)) continue;
        once = once && o[static_cast<size_t>(e)] < 0;
        o[static_cast<size_t>(e)] = static_cast<int>(m);
      }
    }
    const bool all = std::find(o.begin(), o.end(), -1) == o.end();
    // Pairs of one layer must cost the same for a swap to keep every worker's memory.
    bool uniform = true;
    for (int e = 1; e < n_expert; ++e) {
      uniform = uniform && sizes.PairBytes(static_cast<int>(layer), e) ==
                               sizes.PairBytes(static_cast<int>(layer), 0);
    }
    if (once && all && uniform) owners[layer] = std::move(o);
  }
  plan->routing_before = EstimateRouting(stats, owners);
  for (size_t layer = 0; layer < owners.size(); ++layer) {
    Owners& o = owners[layer];
    if (o.empty()) continue;
    const std::vector<bool> every(plan->machines.size(), true);
    const Owners best = BestDeal(stats.layers[layer], n_expert, o, every);
    const int64_t balanced_score = ColocatedRows(stats.layers[layer], n_expert, o).first;
    const int64_t best_score = ColocatedRows(stats.layers[layer], n_expert, best).first;
    // Hysteresis: a layer moves only for a clear gain (statistics of one workload are noisy
    // about another; an unbiased router's chance pairs do not carry over).
    const double gain = static_cast<double>(best_score - balanced_score) /
                        static_cast<double>(std::max<int64_t>(stats.layers[layer].rows, 1));
    if (gain >= min_gain) o = best;
  }
  plan->routing_after = EstimateRouting(stats, owners);
  // Write the deals back into the machines' pairs.
  for (size_t m = 0; m < plan->machines.size(); ++m) {
    std::vector<std::pair<int, int>>& pairs = plan->machines[m].pairs;
    std::vector<std::pair<int, int>> kept;
    for (const auto& p : pairs) {
      if (owners[static_cast<size_t>(p.first)].empty()) kept.push_back(p);
    }
    for (size_t layer = 0; layer < owners.size(); ++layer) {
      for (int e = 0; e < n_expert && !owners[layer].empty(); ++e) {
        if (owners[layer][static_cast<size_t>(e)] == static_cast<int>(m)) {
          kept.emplace_back(static_cast<int>(layer), e);
        }
      }
    }
    std::sort(kept.begin(), kept.end());
    pairs = std::move(kept);
  }
  return absl::OkStatus();
}

absl::Status PaceBySpeed(const RoutingSnapshot& stats, const ModelSizes& sizes, Plan* plan) {
  std::vector<RebalanceWorker> workers;
  std::vector<size_t> machine_of;
  for (size_t m = 0; m < plan->machines.size(); ++m) {
    const MachinePlan& mp = plan->machines[m];
    if (mp.pairs.empty()) continue;
    RebalanceWorker w;
    w.id = mp.name;
    w.budget_bytes = mp.expert_bytes;  // swaps keep every machine's bytes
    w.pairs = mp.pairs;
    w.micros_per_row = 1.0 / mp.speed;
    workers.push_back(std::move(w));
    machine_of.push_back(m);
  }
  RebalanceOptions options;
  options.colocate = false;
  options.replicate = false;
  options.pace = true;
  options.pace_spread = 1.0 + 1e-9;  // given speeds, not noisy measurements
  options.min_rows = 1;
  options.n_expert_used = static_cast<int>(sizes.shape.n_expert_used);
  options.n_embd = sizes.shape.n_embd;
  ASSIGN_OR_RETURN(const RebalancePlan paced,
                   PlanRebalance(
                       stats, static_cast<int>(sizes.n_layer()),
                       [&](int l, int e) { return sizes.PairBytes(l, e); }, workers, options));
  std::vector<Owners> owners(static_cast<size_t>(sizes.n_layer()),
                             Owners(static_cast<size_t>(sizes.n_expert()), -1));
  for (size_t w = 0; w < workers.size(); ++w) {
    MachinePlan& mp = plan->machines[machine_of[w]];
    mp.pairs = paced.target[w];
    for (const auto& [l, e] : mp.pairs) {
      owners[static_cast<size_t>(l)][static_cast<size_t>(e)] = static_cast<int>(machine_of[w]);
    }
  }
  plan->pace_swaps = paced.pace_swaps;
  plan->routing_after = EstimateRouting(stats, owners);
  return absl::OkStatus();
}

double MeasurePace(const PlanRequest& r, Plan* plan) {
  const ModelSizes& sizes = r.sizes;
  const int64_t n_expert = sizes.n_expert();
  std::vector<int> holders(sizes.pair_bytes.size(), 0);
  for (const MachinePlan& m : plan->machines) {
    for (const auto& [l, e] : m.pairs) ++holders[static_cast<size_t>(l * n_expert + e)];
  }
  auto work = [&](int l, int e) {
    if (r.routing.has_value()) {
      return static_cast<double>(
          r.routing->layers[static_cast<size_t>(l)].load[static_cast<size_t>(e)]);
    }
    return static_cast<double>(sizes.PairBytes(l, e));
  };
  double total = 0;
  for (int l = 0; l < sizes.n_layer(); ++l) {
    for (int e = 0; e < n_expert; ++e) total += work(l, e);
  }
  double pace = 0;
  for (MachinePlan& m : plan->machines) {
    double mine = 0;
    for (const auto& [l, e] : m.pairs) {
      mine += work(l, e) / holders[static_cast<size_t>(l * n_expert + e)];
    }
    m.work_share = total > 0 ? mine / total : 0;
    if (!m.pairs.empty()) pace = std::max(pace, m.work_share / m.speed);
  }
  return pace;
}

}  // namespace moepool::planner_internal
