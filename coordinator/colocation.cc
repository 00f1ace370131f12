#include "coordinator/colocation.h"

#include <algorithm>
#include <cstddef>
#include <map>

namespace moepool {
namespace {

struct Search {
  const LayerRouting& layer;
  int n_expert;
  const std::vector<int>& current;
  const std::vector<bool>& movable;
  std::map<int, int> left;  // movable worker -> experts still to deal it
  std::vector<int> deal;
  int64_t best_rows = -1;
  int best_moved = 0;
  std::vector<int> best;

  bool Movable(int worker) const {
    return worker >= 0 && static_cast<size_t>(worker) < movable.size() &&
           movable[static_cast<size_t>(worker)];
  }

  void Run(int e) {
    if (e == n_expert) {
      const int64_t rows = ColocatedRows(layer, n_expert, deal).first;
      const int moved = MovedExperts(current, deal);
      if (rows > best_rows || (rows == best_rows && moved < best_moved)) {
        best_rows = rows;
        best_moved = moved;
        best = deal;
      }
      return;
    }
    if (!Movable(current[static_cast<size_t>(e)])) {
      Run(e + 1);  // stays where it is
      return;
    }
    for (auto& [worker, count] : left) {
      if (count == 0) continue;
      --count;
      deal[static_cast<size_t>(e)] = worker;
      Run(e + 1);
      ++count;
    }
  }
};

}  // namespace

std::pair<int64_t, int64_t> ColocatedRows(const LayerRouting& layer, int n_expert,
                                          const std::vector<int>& owner) {
  int64_t same = 0, all = 0;
  for (int a = 0; a < n_expert; ++a) {
    for (int b = a + 1; b < n_expert; ++b) {
      const int64_t c = layer.pair(a, b, n_expert);
      all += c;
      const int oa = owner[static_cast<size_t>(a)];
      if (oa >= 0 && oa == owner[static_cast<size_t>(b)]) same += c;
    }
  }
  return {same, all};
}

int MovedExperts(const std::vector<int>& from, const std::vector<int>& to) {
  int moved = 0;
  for (size_t e = 0; e < from.size() && e < to.size(); ++e) moved += from[e] != to[e] ? 1 : 0;
  return moved;
}

std::vector<int> BestDeal(const LayerRouting& layer, int n_expert, const std::vector<int>& owner,
                          const std::vector<bool>& movable) {
  Search s{layer, n_expert, owner, movable, {}, owner, -1, 0, owner};
  for (int w : owner) {
    if (s.Movable(w)) ++s.left[w];
  }
  // The current deal first: a later deal must be strictly better, or as good with fewer moves.
  s.best_rows = ColocatedRows(layer, n_expert, owner).first;
  s.best_moved = 0;
  s.Run(0);
  return s.best;
}

RoutingEstimate EstimateRouting(const RoutingSnapshot& stats,
                                const std::vector<std::vector<int>>& owners) {
  double rows = 0, visits = 0, colocated = 0;
  for (size_t l = 0; l < owners.size() && l < stats.layers.size(); ++l) {
    const LayerRouting& layer = stats.layers[l];
    if (owners[l].empty() || layer.rows == 0) continue;
    const auto [same, all] = ColocatedRows(layer, stats.n_expert, owners[l]);
    rows += static_cast<double>(layer.rows);
    // A row with both experts on one worker visits it once; split, it visits two; a row whose
    // pair was not counted (one expert) visits one.
    visits += static_cast<double>(layer.rows) + static_cast<double>(all - same);
    colocated += static_cast<double>(same);
  }
  RoutingEstimate e;
  if (rows > 0) {
    e.visits_per_row = visits / rows;
    e.colocated_share = colocated / rows;
  }
  return e;
}

}  // namespace moepool
