// The planner's co-location pass (planner_internal.h): pairs of experts the router chooses
// together on one worker, from routing statistics.
#include <algorithm>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/colocation.h"
#include "coordinator/planner_internal.h"

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

}  // namespace moepool::planner_internal
