// The planner's co-location pass (planner_internal.h): pairs of experts the router chooses
// together on one worker, from routing statistics.
#include <algorithm>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/planner_internal.h"

namespace moepool::planner_internal {
namespace {

// Layers whose every expert is assigned once: [expert] -> the machine holding it.
using Owners = std::vector<int>;

// Rows of `layer` whose two experts share a machine, and all pair rows.
std::pair<int64_t, int64_t> Colocated(const LayerRouting& l, int n_expert, const Owners& owner) {
  int64_t same = 0, all = 0;
  for (int a = 0; a < n_expert; ++a) {
    for (int b = a + 1; b < n_expert; ++b) {
      const int64_t c = l.pair(a, b, n_expert);
      all += c;
      if (owner[static_cast<size_t>(a)] == owner[static_cast<size_t>(b)]) same += c;
    }
  }
  return {same, all};
}

// The best deal of experts to machines with these counts (exhaustive: 8 experts over a few
// workers is at most a few thousand deals); `best` starts as the current one and changes only
// for a strictly better one.
void Search(const LayerRouting& l, int n_expert, int e, std::map<int, int>* left, Owners* owner,
            int64_t* best_score, Owners* best) {
  if (e == n_expert) {
    const int64_t score = Colocated(l, n_expert, *owner).first;
    if (score > *best_score) {
      *best_score = score;
      *best = *owner;
    }
    return;
  }
  for (auto& [machine, count] : *left) {
    if (count == 0) continue;
    --count;
    (*owner)[static_cast<size_t>(e)] = machine;
    Search(l, n_expert, e + 1, left, owner, best_score, best);
    ++count;
  }
}

RoutingEstimate Estimate(const RoutingSnapshot& stats, const std::vector<Owners>& owners) {
  double rows = 0, visits = 0, colocated = 0;
  for (size_t layer = 0; layer < owners.size(); ++layer) {
    const LayerRouting& l = stats.layers[layer];
    if (owners[layer].empty() || l.rows == 0) continue;
    const auto [same, all] = Colocated(l, stats.n_expert, owners[layer]);
    rows += static_cast<double>(l.rows);
    // A row with both experts on one worker visits it once; split, it visits two; a row whose
    // pair was not counted (one expert) visits one.
    visits += static_cast<double>(l.rows) + static_cast<double>(all - same);
    colocated += static_cast<double>(same);
  }
  RoutingEstimate e;
  if (rows > 0) {
    e.visits_per_row = visits / rows;
    e.colocated_share = colocated / rows;
  }
  return e;
}

}  // namespace

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
  plan->routing_before = Estimate(stats, owners);
  for (size_t layer = 0; layer < owners.size(); ++layer) {
    Owners& o = owners[layer];
    if (o.empty()) continue;
    std::map<int, int> left;
    for (int m : o) ++left[m];
    Owners current = o, best = o;
    const int64_t balanced_score = Colocated(stats.layers[layer], n_expert, o).first;
    int64_t best_score = balanced_score;
    Search(stats.layers[layer], n_expert, 0, &left, &current, &best_score, &best);
    // Hysteresis: a layer moves only for a clear gain (statistics of one workload are noisy
    // about another; an unbiased router's chance pairs do not carry over).
    const double gain = static_cast<double>(best_score - balanced_score) /
                        static_cast<double>(std::max<int64_t>(stats.layers[layer].rows, 1));
    if (gain >= min_gain) o = best;
  }
  plan->routing_after = Estimate(stats, owners);
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
