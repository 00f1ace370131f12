// ClusterControl's live placement changes (the rebalancer's, rebalancer.h): make before break.
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/cluster_control.h"
#include "coordinator/expert_placement.h"

namespace moepool {
namespace {

namespace pb = moepool::v1;
using Pair = std::pair<int, int>;

std::vector<Pair> Union(const std::vector<Pair>& a, const std::vector<Pair>& b) {
  std::set<Pair> all(a.begin(), a.end());
  all.insert(b.begin(), b.end());
  return {all.begin(), all.end()};
}

}  // namespace

std::vector<RebalanceWorker> ClusterControl::RebalanceWorkers() const {
  const ClusterStats stats = backend_->Stats();
  std::vector<RebalanceWorker> out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& m : members_) {
    if (m->state == MemberState::kGone || m->pairs.empty()) continue;
    RebalanceWorker w;
    w.id = m->id;
    w.budget_bytes = m->is_static ? MemberBytes(*m) : m->capacity.memory_bytes();
    w.pairs = m->pairs;
    std::sort(w.pairs.begin(), w.pairs.end());
    w.movable = !m->is_static && m->state == MemberState::kReady && !changing_;
    if (m->index >= 0 && m->index < static_cast<int>(stats.workers.size())) {
      double rows = 0, micros = 0;  // its latest exchanges
      for (const RoundTripSample& r : stats.workers[static_cast<size_t>(m->index)].recent) {
        rows += static_cast<double>(r.rows);
        micros += static_cast<double>(r.compute_micros);
      }
      if (rows > 0) w.micros_per_row = micros / rows;
    }
    out.push_back(std::move(w));
  }
  return out;
}

absl::Status ClusterControl::StartPlacementChange(
    const std::vector<RebalanceWorker>& planned,
    const std::vector<std::vector<ExpertPair>>& target) {
  if (planned.size() != target.size()) {
    return absl::InvalidArgumentError("one target per planned worker");
  }
  std::vector<std::pair<std::string, std::vector<Pair>>> changed;  // id, current + incoming
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (changing_) return absl::FailedPreconditionError("a placement change is under way");
    for (size_t i = 0; i < planned.size(); ++i) {
      Member* m = Find(planned[i].id);
      std::vector<Pair> now = m != nullptr ? m->pairs : std::vector<Pair>{};
      std::sort(now.begin(), now.end());
      if (m == nullptr || now != planned[i].pairs) {
        return absl::FailedPreconditionError(
            absl::StrCat("worker ", planned[i].id, " changed since the plan"));
      }
      std::vector<Pair> want = target[i];
      std::sort(want.begin(), want.end());
      want.erase(std::unique(want.begin(), want.end()), want.end());
      if (want == now) continue;
      if (!planned[i].movable || m->is_static || m->state != MemberState::kReady) {
        return absl::FailedPreconditionError(
            absl::StrCat("worker ", m->id, " cannot change its pairs now"));
      }
      changed.emplace_back(m->id, Union(now, want));
    }
    if (changed.empty()) return absl::OkStatus();
    for (const auto& [id, all] : changed) {
      Member* m = Find(id);
      m->changing = true;
      m->change_ready = false;
      const size_t i = static_cast<size_t>(
          std::find_if(planned.begin(), planned.end(),
                       [&m](const RebalanceWorker& w) { return w.id == m->id; }) -
          planned.begin());
      m->target = target[i];
      std::sort(m->target.begin(), m->target.end());
      m->target.erase(std::unique(m->target.begin(), m->target.end()), m->target.end());
      m->tensors = TensorsOf(all);
    }
    changing_ = true;
    change_started_ = std::chrono::steady_clock::now();
  }
  for (const auto& [id, all] : changed) {
    auto assignment = std::make_unique<pb::JoinResponse>();
    FillShard(all, assignment.get());  // checksums: reads the tensors, without the lock
    assignment->set_worker_id(id);
    assignment->set_placement_version(backend_->placement_version());
    std::lock_guard<std::mutex> lock(mu_);
    Member* m = Find(id);
    if (m == nullptr || !m->changing) continue;
    std::fprintf(stderr, "moepool: cluster: worker %s changes placement: %s -> %s\n", id.c_str(),
                 DescribeExpertPairs(m->pairs).c_str(), DescribeExpertPairs(m->target).c_str());
    m->reassign = std::move(assignment);
  }
  return absl::OkStatus();
}

absl::StatusOr<pb::ReadyResponse> ClusterControl::ReadyForChange(const std::string& id) {
  std::string address;
  std::vector<Pair> before, all;
  int index = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Member* m = Find(id);
    if (m == nullptr || !m->changing) return absl::NotFoundError("no placement change");
    address = m->address;
    before = m->pairs;
    all = Union(m->pairs, m->target);
    index = m->index;
    m->pairs = all;  // what Accept checks the worker's Describe against
  }
  const absl::StatusOr<int> added = backend_->AddWorker(
      address, all, [this, id](const pb::DescribeResponse& d) { return Accept(id, d); }, index);
  {
    std::lock_guard<std::mutex> lock(mu_);
    Member* m = Find(id);
    if (m == nullptr) return absl::NotFoundError(absl::StrCat("no worker '", id, "'"));
    if (!added.ok()) {  // it keeps what it had; the change goes on without it
      m->pairs = before;
      m->changing = false;
      std::fprintf(stderr, "moepool: cluster: worker %s left out of the placement change: %s\n",
                   id.c_str(), std::string(added.status().message()).c_str());
      return added.status();
    }
    m->change_ready = true;
    std::fprintf(stderr, "moepool: cluster: worker %s serves its incoming experts\n", id.c_str());
  }
  AdvancePlacementChange();
  pb::ReadyResponse response;
  response.set_placement_version(backend_->placement_version());
  return response;
}

bool ClusterControl::AdvancePlacementChange() {
  std::vector<std::pair<int, std::vector<Pair>>> routes;            // backend index, pairs
  std::vector<std::pair<std::string, std::vector<Pair>>> releases;  // told once routed
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!changing_) return false;
    const bool late = std::chrono::steady_clock::now() - change_started_ >
                      std::chrono::duration<double>(options_.placement_change_timeout_s);
    for (const auto& m : members_) {
      if (m->changing && m->state == MemberState::kReady && !m->change_ready && !late) {
        return true;
      }
    }
    // Who serves what once the change ends: a pair leaves a worker only if another serves it.
    std::map<Pair, int> servers;
    for (const auto& m : members_) {
      if (m->state != MemberState::kReady) continue;
      const bool done = m->changing && m->change_ready;
      for (const Pair& p : done ? m->target : m->pairs) ++servers[p];
    }
    for (auto& m : members_) {
      const bool done = m->changing && m->change_ready && m->state == MemberState::kReady;
      m->changing = false;
      m->reassign.reset();
      if (!done) continue;
      std::vector<Pair> kept, released;
      const std::set<Pair> target(m->target.begin(), m->target.end());
      for (const Pair& p : m->pairs) {
        const bool stays = target.count(p) > 0 || servers[p] == 0;
        (stays ? kept : released).push_back(p);
        if (stays && target.count(p) == 0) ++servers[p];
      }
      m->pairs = kept;
      releases.emplace_back(m->id, released);
      routes.emplace_back(m->index, kept);
      std::fprintf(stderr, "moepool: cluster: worker %s serves %zu experts, releases %zu\n",
                   m->id.c_str(), kept.size(), released.size());
    }
    changing_ = false;
  }
  for (const auto& [index, pairs] : routes) backend_->SetWorkerPairs(index, pairs);
  std::lock_guard<std::mutex> lock(mu_);  // no step routes to them now: the workers may drop them
  for (const auto& [id, released] : releases) {
    if (Member* m = Find(id); m != nullptr) {
      m->released.insert(m->released.end(), released.begin(), released.end());
    }
  }
  return false;
}

}  // namespace moepool
