// What the router chooses, over a sliding window: per layer, how many rows chose each expert
// (its load) and how many chose each pair of experts together (co-selection). The placement
// planner reads these (`moepool plan --stats`): hot experts deserve replicas, and a pair chosen
// together often should live on one worker, so a row costs one round trip instead of two.
//
// The window: per layer, `buckets` buckets of window_rows / buckets rows; when the newest is
// full the oldest is cleared and reused, so a snapshot covers the last window_rows rows (at
// least window_rows - window_rows / buckets of them). Recording is a few counter increments per
// row.
//
// Threading: Record and Snapshot are thread-safe (one mutex; Record runs once per layer and
// step on the forward thread).
#ifndef MOEPOOL_COORDINATOR_ROUTING_STATS_H_
#define MOEPOOL_COORDINATOR_ROUTING_STATS_H_

#include <cstdint>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/expert_backend.h"
#include "nlohmann/json.hpp"

namespace moepool {

// One layer's counts (a snapshot, or a file's).
struct LayerRouting {
  int64_t rows = 0;
  std::vector<int64_t> load;   // [n_expert]: rows that chose the expert
  std::vector<int64_t> pairs;  // [n_expert * n_expert], a < b at a * n_expert + b: rows that
                               // chose both
  int64_t pair(int a, int b, int n_expert) const {
    return a < b ? pairs[static_cast<size_t>(a * n_expert + b)]
                 : pairs[static_cast<size_t>(b * n_expert + a)];
  }
};

struct RoutingSnapshot {
  int n_expert = 0;
  int64_t window_rows = 0;
  std::vector<LayerRouting> layers;
};

class RoutingStats {
 public:
  RoutingStats(int n_layer, int n_expert, int64_t window_rows = 1 << 16, int buckets = 8);

  void Record(const ExpertRoutes& routes);
  RoutingSnapshot Snapshot() const;

 private:
  int n_layer_;
  int n_expert_;
  int64_t window_rows_;
  int64_t bucket_rows_;
  mutable std::mutex mu_;
  // [layer][bucket]: counts; current_[layer] is the bucket being filled.
  std::vector<std::vector<LayerRouting>> buckets_;
  std::vector<int> current_;
};

// {"n_expert", "window_rows", "layers": [{"rows", "load": [...], "pairs": [[a, b, n], ...]}]}
// (pairs with n > 0 only).
nlohmann::json RoutingJson(const RoutingSnapshot& s);
// The inverse; INVALID_ARGUMENT naming what is wrong (a statistics file is user input).
absl::StatusOr<RoutingSnapshot> RoutingFromJson(const nlohmann::json& j);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_ROUTING_STATS_H_
