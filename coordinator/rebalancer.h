// The live rebalancer (issue 21): every `interval_s` it plans from the routing statistics of the
// latest rows (rebalance_plan.h: co-location and replicas, with hysteresis) and, when the plan
// changes anything, moves the joined workers to it through ClusterControl's make-before-break
// placement change (workers fetch what they lack from the coordinator while they keep serving;
// changes take effect between forward passes). Completions do not change: with f32 rows the
// bits do not depend on where an expert runs.
//
// Modes: off (only POST /v1/cluster/rebalance plans, and applies on request), dry-run (plans on
// the interval and logs the plan and its predicted round trips and bytes per token, applies
// nothing), on.
//
// Threading: RunOnce and View may be called from any thread; the interval thread runs from
// Start until destruction. Ownership: borrows the ClusterControl, which must outlive it.
#ifndef MOEPOOL_COORDINATOR_REBALANCER_H_
#define MOEPOOL_COORDINATOR_REBALANCER_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "coordinator/cluster_control.h"
#include "coordinator/rebalance_plan.h"
#include "coordinator/routing_stats.h"
#include "nlohmann/json.hpp"

namespace moepool {

enum class RebalanceMode { kOff, kDryRun, kOn };
// "off", "dry-run", "on"; INVALID_ARGUMENT naming the text otherwise.
absl::StatusOr<RebalanceMode> ParseRebalanceMode(const std::string& text);
const char* RebalanceModeName(RebalanceMode mode);

struct RebalancerOptions {
  RebalanceMode mode = RebalanceMode::kOn;
  // Between plans on the interval (the first one too), so also the least time between changes.
  double interval_s = 300;
  RebalanceOptions plan;  // n_embd and n_expert_used are filled from the model
};

class Rebalancer {
 public:
  Rebalancer(ClusterControl* control, RebalancerOptions options);
  ~Rebalancer();  // stops the interval thread
  Rebalancer(const Rebalancer&) = delete;
  Rebalancer& operator=(const Rebalancer&) = delete;

  // Starts the interval thread; `snapshot` gives the statistics. With the mode off it plans
  // nothing but still ends placement changes (started over HTTP) whose workers are gone or late.
  void Start(std::function<RoutingSnapshot()> snapshot);

  // Plans from `stats` now and applies the plan unless `dry_run`. The answer: the plan
  // (RebalancePlanJson) with "applied". FAILED_PRECONDITION while a change is under way; the
  // planner's errors.
  absl::StatusOr<nlohmann::json> RunOnce(const RoutingSnapshot& stats, bool dry_run);

  // For GET /v1/cluster: the mode, the interval, plans made and applied, the latest plan.
  nlohmann::json View() const;

 private:
  void Loop();

  ClusterControl* const control_;
  RebalancerOptions options_;
  std::function<RoutingSnapshot()> snapshot_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  int64_t plans_ = 0;
  int64_t applied_ = 0;
  nlohmann::json last_;  // the latest plan, with "applied"
  std::thread thread_;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_REBALANCER_H_
