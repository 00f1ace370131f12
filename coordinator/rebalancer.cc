#include "coordinator/rebalancer.h"

#include <chrono>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moepool {

absl::StatusOr<RebalanceMode> ParseRebalanceMode(const std::string& text) {
  if (text == "off") return RebalanceMode::kOff;
  if (text == "dry-run") return RebalanceMode::kDryRun;
  if (text == "on") return RebalanceMode::kOn;
  return absl::InvalidArgumentError(
      absl::StrCat("--rebalance must be on, off or dry-run, got '", text.substr(0, 64), "'"));
}

const char* RebalanceModeName(RebalanceMode mode) {
  switch (mode) {
    case RebalanceMode::kOff:
      return "off";
    case RebalanceMode::kDryRun:
      return "dry-run";
    case RebalanceMode::kOn:
      return "on";
  }
  return "off";
}

Rebalancer::Rebalancer(ClusterControl* control, RebalancerOptions options)
    : control_(control), options_(std::move(options)) {
  const ModelConfig& c = control_->model().config();
  options_.plan.n_embd = c.n_embd;
  options_.plan.n_expert_used = static_cast<int>(c.n_expert_used);
}

Rebalancer::~Rebalancer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Rebalancer::Start(std::function<RoutingSnapshot()> snapshot) {
  snapshot_ = std::move(snapshot);
  thread_ = std::thread([this] { Loop(); });  // with the mode off too: it ends changes
}

absl::StatusOr<nlohmann::json> Rebalancer::RunOnce(const RoutingSnapshot& stats, bool dry_run) {
  if (control_->AdvancePlacementChange()) {
    return absl::FailedPreconditionError("a placement change is under way; try again later");
  }
  const ModelConfig& c = control_->model().config();
  const std::vector<RebalanceWorker> workers = control_->RebalanceWorkers();
  auto pair_bytes = [this](int l, int e) { return control_->PairBytes(l, e); };
  absl::StatusOr<RebalancePlan> plan =
      PlanRebalance(stats, static_cast<int>(c.n_layer), pair_bytes, workers, options_.plan);
  if (!plan.ok()) return plan.status();
  nlohmann::json j = RebalancePlanJson(*plan, workers);
  bool applied = false;
  if (!dry_run && plan->changes()) {
    if (absl::Status s = control_->StartPlacementChange(workers, plan->target); !s.ok()) return s;
    applied = true;
  }
  j["applied"] = applied;
  j["dry_run"] = dry_run;
  if (plan->changes()) {
    std::fprintf(stderr,
                 "moepool: rebalance%s: %zu moves (%d layers co-located, %d pace swaps, %d "
                 "replicas added, %d dropped, %.1f MiB to fetch); predicted round trips per token "
                 "%.2f -> %.2f, bytes per token %.0f -> %.0f, busiest worker %.0f%% -> %.0f%%\n",
                 applied ? "" : " (dry run)", plan->moves.size(), plan->layers_dealt,
                 plan->pace_swaps, plan->replicas_added, plan->replicas_dropped,
                 static_cast<double>(plan->bytes_to_fetch) / (1 << 20),
                 plan->before.round_trips_per_token, plan->after.round_trips_per_token,
                 plan->before.bytes_per_token, plan->after.bytes_per_token,
                 100 * plan->before.busiest_worker_share, 100 * plan->after.busiest_worker_share);
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++plans_;
  applied_ += applied ? 1 : 0;
  last_ = j;
  return j;
}

nlohmann::json Rebalancer::View() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {{"mode", RebalanceModeName(options_.mode)},
          {"interval_s", options_.interval_s},
          {"min_gain", options_.plan.min_gain},
          {"colocate", options_.plan.colocate},
          {"replicate", options_.plan.replicate},
          {"plans", plans_},
          {"applied", applied_},
          {"last", last_}};
}

void Rebalancer::Loop() {
  auto next = std::chrono::steady_clock::now() +
              std::chrono::milliseconds(static_cast<int64_t>(options_.interval_s * 1e3));
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::seconds(1), [this] { return stop_; });
    if (stop_) break;
    lock.unlock();
    control_->AdvancePlacementChange();  // ends a change whose workers are ready or late
    if (options_.mode != RebalanceMode::kOff && std::chrono::steady_clock::now() >= next) {
      next = std::chrono::steady_clock::now() +
             std::chrono::milliseconds(static_cast<int64_t>(options_.interval_s * 1e3));
      const absl::StatusOr<nlohmann::json> r =
          RunOnce(snapshot_(), options_.mode == RebalanceMode::kDryRun);
      if (!r.ok()) {
        std::fprintf(stderr, "moepool: rebalance: %s\n", std::string(r.status().message()).c_str());
      }
    }
    lock.lock();
  }
}

}  // namespace moepool
