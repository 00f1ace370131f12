#include "coordinator/rebalance_plan.h"

#include <algorithm>
#include <cstddef>
#include <map>
#include <numeric>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "coordinator/colocation.h"

namespace moepool {
namespace {

using Holders = std::vector<std::vector<std::vector<int>>>;  // [layer][expert] -> workers

size_t At(int i) { return static_cast<size_t>(i); }

// Co-selected rows of expert `e` with the experts worker `w` holds in `layer`.
int64_t Affinity(const LayerRouting& layer, int n_expert, const std::vector<std::vector<int>>& h,
                 int e, int w) {
  int64_t rows = 0;
  for (int b = 0; b < n_expert; ++b) {
    if (b == e) continue;
    const auto& hb = h[At(b)];
    if (std::find(hb.begin(), hb.end(), w) != hb.end()) rows += layer.pair(e, b, n_expert);
  }
  return rows;
}

// The time worker `w` computes `layer`'s rows in: its rows (a replicated expert's spread evenly
// over its holders) times its cost per row.
double LayerTime(const LayerRouting& layer, int n_expert, const std::vector<std::vector<int>>& h,
                 int w, const std::vector<double>& cost) {
  double rows = 0;
  for (int e = 0; e < n_expert; ++e) {
    const auto& he = h[At(e)];
    if (std::find(he.begin(), he.end(), w) == he.end()) continue;
    rows += static_cast<double>(layer.load[At(e)]) / static_cast<double>(he.size());
  }
  return rows * cost[At(w)];
}

// The slowest worker's LayerTime: the layer's pace.
double LayerPace(const LayerRouting& layer, int n_expert, const std::vector<std::vector<int>>& h,
                 const std::vector<double>& cost) {
  double slowest = 0;
  for (size_t w = 0; w < cost.size(); ++w) {
    slowest = std::max(slowest, LayerTime(layer, n_expert, h, static_cast<int>(w), cost));
  }
  return slowest;
}

std::vector<std::vector<int>> HoldersOf(const std::vector<int>& owner) {
  std::vector<std::vector<int>> h(owner.size());
  for (size_t e = 0; e < owner.size(); ++e) {
    if (owner[e] >= 0) h[e] = {owner[e]};
  }
  return h;
}

// Each worker's cost per routed row: its measured time, else the median of the measured ones
// (1 when none is measured); `differ` when the movable measured ones differ by pace_spread.
std::vector<double> Costs(const std::vector<RebalanceWorker>& workers,
                          const RebalanceOptions& options, bool* differ) {
  std::vector<double> known, movable;
  for (const RebalanceWorker& w : workers) {
    if (w.micros_per_row <= 0) continue;
    known.push_back(w.micros_per_row);
    if (w.movable) movable.push_back(w.micros_per_row);
  }
  std::sort(known.begin(), known.end());
  const double median = known.empty() ? 1.0 : known[known.size() / 2];
  std::vector<double> cost;
  for (const RebalanceWorker& w : workers) {
    cost.push_back(w.micros_per_row > 0 ? w.micros_per_row : median);
  }
  *differ = movable.size() >= 2 &&
            *std::max_element(movable.begin(), movable.end()) >=
                options.pace_spread * *std::min_element(movable.begin(), movable.end());
  return cost;
}

// Pass 1 (see the header); returns the layers dealt again.
int Colocate(const RoutingSnapshot& stats, const std::vector<bool>& movable,
             const std::vector<double>& cost, bool speeds_differ, const RebalanceOptions& options,
             Holders* holders) {
  const int n_expert = stats.n_expert;
  int dealt = 0;
  for (size_t l = 0; l < holders->size(); ++l) {
    const LayerRouting& layer = stats.layers[l];
    if (layer.rows < options.min_rows) continue;
    std::vector<int> owner(At(n_expert), -1);
    bool single = true;
    for (int e = 0; e < n_expert; ++e) {
      const auto& h = (*holders)[l][At(e)];
      single = single && h.size() <= 1;
      if (h.size() == 1) owner[At(e)] = h.front();
    }
    if (!single) continue;  // a replica's rows go to either holder: left as it is
    const std::vector<int> best = BestDeal(layer, n_expert, owner, movable);
    const int64_t gained =
        ColocatedRows(layer, n_expert, best).first - ColocatedRows(layer, n_expert, owner).first;
    if (best == owner ||
        static_cast<double>(gained) < options.min_gain * static_cast<double>(layer.rows)) {
      continue;
    }
    // Workers of different speed: not at the price of the layer's pace (the pace pass would
    // undo it, and the next plan redo it).
    if (speeds_differ &&
        LayerPace(layer, n_expert, HoldersOf(best), cost) >
            (1 + options.pace_gain) * LayerPace(layer, n_expert, HoldersOf(owner), cost)) {
      continue;
    }
    for (int e = 0; e < n_expert; ++e) {
      if (owner[At(e)] >= 0) (*holders)[l][At(e)] = {best[At(e)]};
    }
    ++dealt;
  }
  return dealt;
}

// Pass 2 (see the header): adds and drops replicas; `bytes[w]` is kept up to date.
void Replicate(const RoutingSnapshot& stats, const std::vector<RebalanceWorker>& workers,
               const std::function<uint64_t(int, int)>& pair_bytes, const std::vector<double>& cost,
               const RebalanceOptions& options, Holders* holders, std::vector<uint64_t>* bytes,
               RebalancePlan* plan) {
  const int n_expert = stats.n_expert;
  const double mean = static_cast<double>(options.n_expert_used) / n_expert;
  for (size_t l = 0; l < holders->size(); ++l) {
    const LayerRouting& layer = stats.layers[l];
    if (layer.rows < options.min_rows) continue;
    std::vector<int> by_load(At(n_expert));
    std::iota(by_load.begin(), by_load.end(), 0);
    std::stable_sort(by_load.begin(), by_load.end(),
                     [&](int a, int b) { return layer.load[At(a)] > layer.load[At(b)]; });
    for (int e : by_load) {
      std::vector<int>& h = (*holders)[l][At(e)];
      const double share = static_cast<double>(layer.load[At(e)]) / static_cast<double>(layer.rows);
      const uint64_t b = pair_bytes(static_cast<int>(l), e);
      if (share >= options.hot_share * mean && h.size() == 1) {
        // The worker with room done first with this layer's rows; then the one holding the experts
        // most often chosen with it; then the most room; then the first.
        int best = -1;
        std::tuple<double, int64_t, uint64_t> best_key;
        for (size_t w = 0; w < workers.size(); ++w) {
          const int wi = static_cast<int>(w);
          if (!workers[w].movable || wi == h.front() || (*bytes)[w] > workers[w].budget_bytes ||
              workers[w].budget_bytes - (*bytes)[w] < b) {
            continue;
          }
          const std::tuple<double, int64_t, uint64_t> key = {
              -LayerTime(layer, n_expert, (*holders)[l], wi, cost),
              Affinity(layer, n_expert, (*holders)[l], e, wi),
              workers[w].budget_bytes - (*bytes)[w]};
          if (best < 0 || key > best_key) {
            best = wi;
            best_key = key;
          }
        }
        if (best < 0) continue;
        h.push_back(best);
        (*bytes)[At(best)] += b;
        ++plan->replicas_added;
      } else if (share < options.hot_share * mean / 2 && h.size() >= 2) {
        int drop = -1;
        int64_t least = INT64_MAX;
        for (int w : h) {
          if (!workers[At(w)].movable) continue;
          const int64_t a = Affinity(layer, n_expert, (*holders)[l], e, w);
          if (a < least) {
            least = a;
            drop = w;
          }
        }
        if (drop < 0) continue;
        h.erase(std::find(h.begin(), h.end(), drop));
        (*bytes)[At(drop)] -= std::min((*bytes)[At(drop)], b);
        ++plan->replicas_dropped;
      }
    }
  }
}

// Pass 3 (see the header), per layer whose experts each have one holder: returns the swaps.
int Pace(const RoutingSnapshot& stats, const std::vector<RebalanceWorker>& workers,
         const std::function<uint64_t(int, int)>& pair_bytes, const std::vector<double>& cost,
         const RebalanceOptions& options, Holders* holders) {
  const int n_expert = stats.n_expert;
  int swaps = 0;
  for (size_t l = 0; l < holders->size(); ++l) {
    const LayerRouting& layer = stats.layers[l];
    auto& h = (*holders)[l];
    if (layer.rows < options.min_rows ||
        std::any_of(h.begin(), h.end(), [](const auto& he) { return he.size() != 1; })) {
      continue;
    }
    for (int round = 0; round < n_expert; ++round) {
      std::vector<double> time(workers.size());
      for (size_t w = 0; w < workers.size(); ++w) {
        time[w] = LayerTime(layer, n_expert, h, static_cast<int>(w), cost);
      }
      const int slow = static_cast<int>(std::max_element(time.begin(), time.end()) - time.begin());
      if (!workers[At(slow)].movable) break;
      double best_pace = time[At(slow)] * (1 - options.pace_gain);  // must beat this
      int best_e = -1, best_f = -1;
      for (int e = 0; e < n_expert; ++e) {  // e leaves the slow worker for f's e2
        if (h[At(e)].front() != slow) continue;
        for (int e2 = 0; e2 < n_expert; ++e2) {
          const int f = h[At(e2)].front();
          if (f == slow || !workers[At(f)].movable ||
              pair_bytes(static_cast<int>(l), e) != pair_bytes(static_cast<int>(l), e2)) {
            continue;
          }
          const double moved = static_cast<double>(layer.load[At(e)] - layer.load[At(e2)]);
          std::vector<double> t = time;
          t[At(slow)] -= moved * cost[At(slow)];
          t[At(f)] += moved * cost[At(f)];
          const double pace = *std::max_element(t.begin(), t.end());
          if (pace < best_pace) {
            best_pace = pace;
            best_e = e;
            best_f = e2;
          }
        }
      }
      if (best_e < 0) break;
      std::swap(h[At(best_e)], h[At(best_f)]);
      ++swaps;
    }
  }
  return swaps;
}

}  // namespace

PlacementCost PredictCost(const RoutingSnapshot& stats, const Holders& holders,
                          const RebalanceOptions& options, const std::vector<double>& worker_cost) {
  const int n_expert = stats.n_expert;
  PlacementCost cost;
  std::map<int, double> choices;  // worker -> expected (row, expert) choices
  double all_choices = 0, rows_all = 0, same_all = 0, pace = 0;
  for (size_t l = 0; l < holders.size() && l < stats.layers.size(); ++l) {
    const LayerRouting& layer = stats.layers[l];
    if (layer.rows == 0) continue;
    const auto& h = holders[l];
    double visits = 0, paired = 0, same = 0;
    for (int a = 0; a < n_expert; ++a) {
      for (int b = a + 1; b < n_expert; ++b) {
        const double c = static_cast<double>(layer.pair(a, b, n_expert));
        if (c == 0) continue;
        paired += c;
        const auto &ha = h[At(a)], &hb = h[At(b)];
        // Rows spread evenly over holders: the chance both experts land on one worker.
        double p_same = 0;
        if (!ha.empty() && !hb.empty()) {
          int common = 0;
          for (int w : ha) common += std::count(hb.begin(), hb.end(), w) > 0 ? 1 : 0;
          p_same = static_cast<double>(common) / static_cast<double>(ha.size() * hb.size());
        }
        visits += c * ((ha.empty() ? 0 : 1) + (hb.empty() ? 0 : 1) - p_same);
        same += c * p_same;
      }
    }
    const double rows = static_cast<double>(layer.rows);
    visits += std::max(0.0, rows - paired);  // rows with one expert: one visit
    cost.round_trips_per_token += visits / rows;
    rows_all += rows;
    same_all += same;
    for (int e = 0; e < n_expert; ++e) {
      const double load = static_cast<double>(layer.load[At(e)]);
      all_choices += h[At(e)].empty() ? 0 : load;
      for (int w : h[At(e)]) choices[w] += load / static_cast<double>(h[At(e)].size());
    }
    pace += worker_cost.empty() ? 0 : LayerPace(layer, n_expert, h, worker_cost) / rows;
  }
  cost.bytes_per_token = cost.round_trips_per_token * 2.0 * static_cast<double>(options.n_embd) *
                         options.bytes_per_value;
  cost.colocated_share = rows_all > 0 ? same_all / rows_all : 0;
  cost.pace_micros_per_token = pace;
  for (const auto& [w, c] : choices) {
    cost.busiest_worker_share = std::max(cost.busiest_worker_share, c / all_choices);
  }
  return cost;
}

absl::StatusOr<RebalancePlan> PlanRebalance(const RoutingSnapshot& stats, int n_layer,
                                            const std::function<uint64_t(int, int)>& pair_bytes,
                                            const std::vector<RebalanceWorker>& workers,
                                            const RebalanceOptions& options) {
  const int n_expert = stats.n_expert;
  if (static_cast<int>(stats.layers.size()) != n_layer || n_expert < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the routing statistics have ", stats.layers.size(), " layers; the model ", n_layer));
  }
  for (const LayerRouting& l : stats.layers) {
    if (l.load.size() != At(n_expert) || l.pairs.size() != At(n_expert * n_expert)) {
      return absl::InvalidArgumentError("the routing statistics are malformed");
    }
  }
  Holders holders(At(n_layer), std::vector<std::vector<int>>(At(n_expert)));
  std::vector<uint64_t> bytes(workers.size(), 0);
  std::vector<bool> movable(workers.size());
  for (size_t w = 0; w < workers.size(); ++w) {
    movable[w] = workers[w].movable;
    for (const auto& [l, e] : workers[w].pairs) {
      if (l < 0 || l >= n_layer || e < 0 || e >= n_expert) {
        return absl::InvalidArgumentError(
            absl::StrCat("worker ", workers[w].id, " holds (", l, ", ", e, "), outside the model"));
      }
      holders[At(l)][At(e)].push_back(static_cast<int>(w));
      bytes[w] += pair_bytes(l, e);
    }
  }
  bool speeds_differ = false;
  const std::vector<double> cost = Costs(workers, options, &speeds_differ);
  RebalancePlan plan;
  plan.before = PredictCost(stats, holders, options, cost);
  if (options.colocate) {
    plan.layers_dealt = Colocate(stats, movable, cost, speeds_differ, options, &holders);
  }
  if (options.pace && speeds_differ) {
    plan.pace_swaps = Pace(stats, workers, pair_bytes, cost, options, &holders);
  }
  if (options.replicate) {
    Replicate(stats, workers, pair_bytes, cost, options, &holders, &bytes, &plan);
  }
  plan.after = PredictCost(stats, holders, options, cost);
  plan.target.assign(workers.size(), {});
  for (int l = 0; l < n_layer; ++l) {
    for (int e = 0; e < n_expert; ++e) {
      for (int w : holders[At(l)][At(e)]) plan.target[At(w)].emplace_back(l, e);
    }
  }
  // The moves: pairs that leave a worker and pairs that arrive, matched per pair.
  for (int l = 0; l < n_layer; ++l) {
    for (int e = 0; e < n_expert; ++e) {
      std::vector<int> from, to;
      for (size_t w = 0; w < workers.size(); ++w) {
        const bool had =
            std::count(workers[w].pairs.begin(), workers[w].pairs.end(), ExpertPair{l, e}) > 0;
        const auto& h = holders[At(l)][At(e)];
        const bool has = std::find(h.begin(), h.end(), static_cast<int>(w)) != h.end();
        if (had && !has) from.push_back(static_cast<int>(w));
        if (!had && has) to.push_back(static_cast<int>(w));
      }
      for (size_t i = 0; i < std::max(from.size(), to.size()); ++i) {
        RebalanceMove m;
        m.layer = l;
        m.expert = e;
        m.from = i < from.size() ? from[i] : -1;
        m.to = i < to.size() ? to[i] : -1;
        m.bytes = pair_bytes(l, e);
        if (m.to >= 0) plan.bytes_to_fetch += m.bytes;
        plan.moves.push_back(m);
      }
    }
  }
  return plan;
}

nlohmann::json RebalancePlanJson(const RebalancePlan& plan,
                                 const std::vector<RebalanceWorker>& workers) {
  auto cost = [](const PlacementCost& c) {
    return nlohmann::json{{"round_trips_per_token", c.round_trips_per_token},
                          {"bytes_per_token", c.bytes_per_token},
                          {"colocated_share", c.colocated_share},
                          {"busiest_worker_share", c.busiest_worker_share},
                          {"pace_micros_per_token", c.pace_micros_per_token}};
  };
  auto name = [&](int w) { return w < 0 ? std::string() : workers[At(w)].id; };
  nlohmann::json micros = nlohmann::json::object();  // measured, by worker id
  for (const RebalanceWorker& w : workers) {
    if (w.micros_per_row > 0) micros[w.id] = w.micros_per_row;
  }
  nlohmann::json moves = nlohmann::json::array();
  for (const RebalanceMove& m : plan.moves) {
    moves.push_back({{"layer", m.layer},
                     {"expert", m.expert},
                     {"from", name(m.from)},
                     {"to", name(m.to)},
                     {"bytes", m.bytes}});
  }
  return {{"changes", plan.changes()},
          {"before", cost(plan.before)},
          {"after", cost(plan.after)},
          {"layers_dealt", plan.layers_dealt},
          {"replicas_added", plan.replicas_added},
          {"replicas_dropped", plan.replicas_dropped},
          {"pace_swaps", plan.pace_swaps},
          {"micros_per_row", micros},
          {"bytes_to_fetch", plan.bytes_to_fetch},
          {"moves", moves}};
}

}  // namespace moepool
