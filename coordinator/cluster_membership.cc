// ClusterExpertBackend's membership changes (elastic cluster): workers added, narrowed and
// removed at step boundaries. See cluster_expert_backend.h.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"
#include "coordinator/cluster_expert_backend.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

// A forward pass that has not reached its last layer for this long is taken as ended (a
// failed step leaves it half-way, and nothing else would close it).
constexpr auto kAbandonedPass = std::chrono::milliseconds(500);

}  // namespace

void ClusterExpertBackend::BeginStep(int layer) {
  std::unique_lock<std::mutex> lock(membership_mu_);
  // Layer 0 with nothing outstanding starts a new forward pass: earlier ones are over.
  if (layer == 0 && active_steps_ == 0) passes_open_ = 0;
  // At a boundary, waiting changes go first.
  membership_cv_.wait(
      lock, [&] { return pending_changes_ == 0 || active_steps_ > 0 || passes_open_ > 0; });
  ++active_steps_;
  if (layer == 0) ++passes_open_;
  last_begin_ = std::chrono::steady_clock::now();
}

void ClusterExpertBackend::EndStep(int layer) {
  {
    std::lock_guard<std::mutex> lock(membership_mu_);
    --active_steps_;
    if (layer == model_->config().n_layer - 1 && passes_open_ > 0) --passes_open_;
  }
  membership_cv_.notify_all();
}

void ClusterExpertBackend::ApplyAtBoundary(const std::function<void()>& change) {
  std::unique_lock<std::mutex> lock(membership_mu_);
  ++pending_changes_;
  const auto at_boundary = [&] {
    if (active_steps_ > 0) return false;
    return passes_open_ == 0 || std::chrono::steady_clock::now() - last_begin_ > kAbandonedPass;
  };
  while (!at_boundary()) membership_cv_.wait_for(lock, std::chrono::milliseconds(20));
  change();
  const absl::Status rebuilt = RebuildPlacement();
  if (!rebuilt.ok()) {  // the pairs were checked against the model before they got here
    std::fprintf(stderr, "moepool: internal error: %s\n", std::string(rebuilt.message()).c_str());
    std::abort();
  }
  ++placement_version_;
  --pending_changes_;
  lock.unlock();
  membership_cv_.notify_all();
}

absl::Status ClusterExpertBackend::RebuildPlacement() {
  const ModelConfig& c = model_->config();
  std::vector<std::string> names;
  for (const auto& links : links_) names.push_back(links.front()->address());
  ASSIGN_OR_RETURN(placement_,
                   ExpertPlacement::Build(c.n_layer, c.n_expert, names, routed_,
                                          options_.local_experts, options_.local_fallback,
                                          /*allow_missing=*/options_.elastic));
  return absl::OkStatus();
}

absl::StatusOr<int> ClusterExpertBackend::AddWorker(const std::string& address,
                                                    std::vector<std::pair<int, int>> pairs,
                                                    AcceptWorker accept, int reuse) {
  const ModelConfig& c = model_->config();
  for (const auto& [layer, expert] : pairs) {
    if (layer < 0 || layer >= c.n_layer || expert < 0 || expert >= c.n_expert) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker ", address, ": pair (", layer, ", ", expert, ") out of range"));
    }
  }
  std::vector<std::unique_ptr<WorkerLink>> links = NewLinks(address);
  ASSIGN_OR_RETURN(const moepool::v1::DescribeResponse describe,
                   links.front()->Describe(options_.connect_timeout_s, /*wait_for_ready=*/true));
  RETURN_IF_ERROR(accept(describe));
  for (auto& link : links) link->Start(describe, accept);
  std::vector<std::unique_ptr<WorkerLink>> retired;
  int index = reuse;
  ApplyAtBoundary([&] {
    if (index < 0 || index >= static_cast<int>(links_.size())) {
      index = static_cast<int>(links_.size());
      links_.emplace_back();
      describes_.emplace_back();
      routed_.emplace_back();
    }
    const size_t w = static_cast<size_t>(index);
    retired = std::move(links_[w]);
    links_[w] = std::move(links);
    describes_[w] = describe;
    routed_[w] = std::move(pairs);
  });
  return index;  // `retired` closes the old links outside the lock
}

void ClusterExpertBackend::SetWorkerPairs(int w, std::vector<std::pair<int, int>> pairs) {
  ApplyAtBoundary([&] { routed_[static_cast<size_t>(w)] = std::move(pairs); });
}

void ClusterExpertBackend::RemoveWorker(int w) {
  std::vector<std::unique_ptr<WorkerLink>> retired;
  ApplyAtBoundary([&] {
    const size_t i = static_cast<size_t>(w);
    routed_[i].clear();
    // Links never started: down, no reconnects, the address kept for Stats.
    retired = std::move(links_[i]);
    links_[i] = NewLinks(retired.front()->address());
  });
}

uint64_t ClusterExpertBackend::placement_version() const {
  std::lock_guard<std::mutex> lock(membership_mu_);
  return placement_version_;
}

std::vector<moepool::v1::DescribeResponse> ClusterExpertBackend::workers() const {
  std::lock_guard<std::mutex> lock(membership_mu_);
  return describes_;
}

}  // namespace moepool
