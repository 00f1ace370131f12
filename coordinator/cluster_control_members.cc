// ClusterControl after Join: serving tensors, Ready, Watch, drains and the cluster view.
#include <algorithm>
#include <chrono>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "coordinator/cluster_control.h"
#include "coordinator/expert_placement.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

namespace pb = moepool::v1;
using Pair = std::pair<int, int>;

const WeightMatrix* FindMatrix(const Model& model, const std::string& name) {
  const ModelConfig& c = model.config();
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string prefix = absl::StrCat("blk.", l, ".ffn_");
    if (name.rfind(prefix, 0) != 0) continue;
    for (int e = 0; e < c.n_expert; ++e) {
      const ExpertWeights& E = model.layer(l).experts[static_cast<size_t>(e)];
      const std::string suffix = absl::StrCat(".", e, ".weight");
      if (name == prefix + "gate" + suffix) return &E.gate;
      if (name == prefix + "up" + suffix) return &E.up;
      if (name == prefix + "down" + suffix) return &E.down;
    }
  }
  return nullptr;
}

}  // namespace

absl::StatusOr<ClusterControl::Member*> ClusterControl::FetchingMember(const std::string& id) {
  Member* m = Find(id);
  if (m == nullptr) return absl::NotFoundError(absl::StrCat("no worker '", id.substr(0, 64), "'"));
  const bool changing = m->state == MemberState::kReady && m->changing && !m->change_ready;
  if (m->state != MemberState::kFetching && !changing) {
    return absl::FailedPreconditionError(absl::StrCat(
        "worker ", m->id, " is ", MemberStateName(m->state), ", not fetching: join again"));
  }
  return m;
}

absl::Status ClusterControl::Fetch(const pb::FetchRequest& request,
                                   const std::function<bool(const pb::FetchChunk&)>& write) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(Member * m, FetchingMember(request.worker_id()));
    if (m->tensors.count(request.tensor()) == 0) {
      return absl::PermissionDeniedError(absl::StrCat("tensor '", request.tensor().substr(0, 128),
                                                      "' is not assigned to worker ", m->id));
    }
  }
  // Assigned names were made by Join from bound pairs.
  const WeightMatrix* matrix = FindMatrix(backend_->model(), request.tensor());
  if (matrix == nullptr) return absl::InternalError("assigned tensor not found");
  const uint64_t size = matrix->SizeBytes();
  if (request.offset() > size) {
    return absl::OutOfRangeError(absl::StrCat("offset ", request.offset(), " is past the end of ",
                                              request.tensor(), " (", size, " bytes)"));
  }
  pb::FetchChunk chunk;
  for (uint64_t at = request.offset(); at < size;) {
    const uint64_t n = std::min<uint64_t>(options_.fetch_chunk_bytes, size - at);
    chunk.set_offset(at);
    chunk.set_data(reinterpret_cast<const char*>(matrix->data) + at, n);
    if (!write(chunk)) return absl::CancelledError("the worker went away during the transfer");
    at += n;
    std::lock_guard<std::mutex> lock(mu_);
    if (Member* m = Find(request.worker_id()); m != nullptr) m->bytes_fetched += n;
  }
  return absl::OkStatus();
}

absl::Status ClusterControl::Accept(const std::string& id, const pb::DescribeResponse& d) {
  const ModelConfig& c = backend_->model().config();
  if (d.protocol_version() != pb::PROTOCOL_VERSION_CURRENT) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", id, " speaks expert protocol version ", d.protocol_version()));
  }
  const pb::Hyperparameters& h = d.hparams();
  if (h.n_embd() != c.n_embd || h.n_ff() != c.n_ff || h.n_layer() != c.n_layer ||
      h.n_expert() != c.n_expert || h.n_expert_used() != c.n_expert_used) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", id, " serves other hyperparameters than this model"));
  }
  if (d.model().fingerprint() != model_fingerprint_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "worker ", id, " serves another model (fingerprint ", d.model().fingerprint().substr(0, 64),
        ", this model ", model_fingerprint_, ")"));
  }
  std::set<uint32_t> held(d.experts().packed().begin(), d.experts().packed().end());
  std::lock_guard<std::mutex> lock(mu_);
  const Member* m = Find(id);
  if (m == nullptr) return absl::NotFoundError(absl::StrCat("no worker '", id, "'"));
  for (const auto& [l, e] : m->pairs) {
    if (held.count(PackExpertPair(l, e)) == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("worker ", id, " does not hold its assigned expert ", e, " of layer ", l));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<pb::ReadyResponse> ClusterControl::Ready(const pb::ReadyRequest& request) {
  std::string address;
  std::vector<Pair> pairs;
  int reuse = -1;
  bool change = false;  // ready already: a placement change's Ready
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(Member * m, FetchingMember(request.worker_id()));
    change = m->state == MemberState::kReady;
    address = m->address;
    pairs = m->pairs;
    reuse = m->index;
  }
  if (change) return ReadyForChange(request.worker_id());
  const std::string id = request.worker_id();
  const absl::StatusOr<int> index = backend_->AddWorker(
      address, pairs, [this, id](const pb::DescribeResponse& d) { return Accept(id, d); }, reuse);
  std::map<std::string, std::vector<Pair>> moved;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Member* m = Find(id);
    if (m == nullptr) return absl::NotFoundError(absl::StrCat("no worker '", id, "'"));
    if (!index.ok()) {
      SetState(m, MemberState::kGone, std::string(index.status().message()));
      return index.status();
    }
    m->index = *index;
    SetState(m, MemberState::kReady,
             absl::StrCat("placement version ", backend_->placement_version()));
    moved.swap(m->moved);  // m->moved is empty from here on
  }
  for (const auto& [donor_id, taken] : moved) {  // the donors stop serving what moved
    int donor_index = -1;
    std::vector<Pair> kept;
    {
      std::lock_guard<std::mutex> lock(mu_);
      Member* d = Find(donor_id);
      if (d == nullptr || d->state != MemberState::kReady) continue;
      const std::set<Pair> gone(taken.begin(), taken.end());
      for (const Pair& p : d->pairs) {
        if (gone.count(p) == 0) kept.push_back(p);
      }
      d->pairs = kept;
      d->released.insert(d->released.end(), taken.begin(), taken.end());
      donor_index = d->index;
      std::fprintf(stderr, "moepool: cluster: worker %s hands %zu experts to %s\n",
                   donor_id.c_str(), taken.size(), id.c_str());
    }
    backend_->SetWorkerPairs(donor_index, kept);
  }
  pb::ReadyResponse response;
  response.set_placement_version(backend_->placement_version());
  return response;
}

absl::Status ClusterControl::Watch(const pb::WatchRequest& request,
                                   const std::function<bool(const pb::WatchEvent&)>& write,
                                   const std::function<bool()>& cancelled) {
  uint64_t generation = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const Member* m = Find(request.worker_id());
    if (m == nullptr) {
      return absl::NotFoundError(absl::StrCat("no worker '", request.worker_id(), "'"));
    }
    generation = m->generation;
  }
  for (;;) {
    int index = -1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      Member* m = Find(request.worker_id());
      if (m->generation != generation) return absl::CancelledError("the worker joined again");
      if (m->state == MemberState::kGone) {
        if (!m->drained) return absl::CancelledError("the worker is gone");
        pb::WatchEvent event;
        event.set_kind(pb::WatchEvent::KIND_DRAINED);
        event.set_reason(m->last_reason);
        write(event);
        return absl::OkStatus();
      }
      if (!m->released.empty() && m->state == MemberState::kReady) {
        pb::WatchEvent event;
        event.set_kind(pb::WatchEvent::KIND_RELEASED);
        event.set_reason("handed to another worker");
        std::sort(m->released.begin(), m->released.end());
        for (const auto& [l, e] : m->released)
          event.mutable_experts()->add_packed(PackExpertPair(l, e));
        m->released.clear();
        write(event);
      }
      if (m->reassign != nullptr && m->state == MemberState::kReady) {
        pb::WatchEvent event;
        event.set_kind(pb::WatchEvent::KIND_REASSIGN);
        event.set_reason("the placement follows the routing statistics");
        *event.mutable_assignment() = std::move(*m->reassign);
        m->reassign.reset();
        write(event);
      }
      OfferLostExperts();
      if (m->rejoin && m->state == MemberState::kReady) {
        m->rejoin = false;
        pb::WatchEvent event;
        event.set_kind(pb::WatchEvent::KIND_REJOIN);
        event.set_reason("a lost worker's experts are free");
        write(event);
      }
      if (cancelled()) {
        if (m->state == MemberState::kDraining) return absl::CancelledError("draining");
        SetState(m, MemberState::kGone, "its control stream broke (stopped or unreachable)");
        m->gone_since = std::chrono::steady_clock::now();
        m->lost_handled = false;
        index = m->index;
      }
    }
    if (index >= 0) backend_->RemoveWorker(index);
    if (cancelled()) return absl::CancelledError("the worker went away");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

uint64_t ClusterControl::MemberBytes(const Member& m) const {
  uint64_t bytes = 0;
  for (const auto& [l, e] : m.pairs) bytes += PairBytes(l, e);
  return bytes;
}

void ClusterControl::OfferLostExperts() {
  if (options_.reassign_after_s < 0) return;
  const auto now = std::chrono::steady_clock::now();
  const auto grace = std::chrono::duration<double>(options_.reassign_after_s);
  for (auto& lost : members_) {
    if (lost->is_static || lost->state != MemberState::kGone || lost->drained ||
        lost->lost_handled || now - lost->gone_since < grace) {
      continue;
    }
    lost->lost_handled = true;
    if (lost->pairs.empty()) continue;
    uint64_t smallest = UINT64_MAX;
    for (const auto& [l, e] : lost->pairs) smallest = std::min(smallest, PairBytes(l, e));
    for (auto& m : members_) {
      if (m->is_static || m->state != MemberState::kReady) continue;
      const uint64_t used = MemberBytes(*m), budget = m->capacity.memory_bytes();
      if (used > budget || smallest > budget - used) continue;
      m->rejoin = true;
      std::fprintf(stderr, "moepool: cluster: worker %s has room for lost worker %s's experts\n",
                   m->id.c_str(), lost->id.c_str());
    }
  }
}

absl::Status ClusterControl::Drain(const std::string& worker_id, const std::string& reason) {
  int index = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Member* m = Find(worker_id);
    if (m == nullptr || m->state == MemberState::kGone || m->state == MemberState::kDraining) {
      return absl::NotFoundError(absl::StrCat("no worker '", worker_id.substr(0, 64),
                                              "' to drain (unknown, gone or draining)"));
    }
    SetState(m, MemberState::kDraining, reason);
    index = m->index;
  }
  if (index >= 0) backend_->RemoveWorker(index);  // returns once no step routes to it
  std::lock_guard<std::mutex> lock(mu_);
  Member* m = Find(worker_id);
  m->drained = true;
  SetState(m, MemberState::kGone, "drained");
  return absl::OkStatus();
}

nlohmann::json ClusterControl::View() const {
  const ClusterStats stats = backend_->Stats();
  const auto uncovered = backend_->UncoveredPairs();
  nlohmann::json workers = nlohmann::json::array();
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& m : members_) {
    nlohmann::json experts = nlohmann::json::array();
    for (const auto& [l, e] : m->pairs) experts.push_back({l, e});
    const WorkerStats* link = m->index >= 0 && m->index < static_cast<int>(stats.workers.size())
                                  ? &stats.workers[static_cast<size_t>(m->index)]
                                  : nullptr;
    MemberState state = m->state;
    // Static workers follow their links; joined ones lose their pairs when their stream breaks.
    if (m->is_static && state == MemberState::kReady && link != nullptr && !link->up) {
      state = MemberState::kGone;
    }
    nlohmann::json w = {{"id", m->id},
                        {"address", m->address},
                        {"state", MemberStateName(state)},
                        {"experts", experts},
                        {"bytes_fetched", m->bytes_fetched},
                        {"joined", !m->is_static},
                        {"device", m->capacity.device()},
                        {"memory_budget_bytes", m->capacity.memory_bytes()},
                        {"expert_bytes", MemberBytes(*m)},
                        {"threads", m->capacity.threads()},
                        {"changing", m->changing}};
    if (link != nullptr) {
      w["worker_id"] = link->worker_id;
      w["up"] = link->up;
      w["last_error"] = link->last_error;
      w["requests"] = link->requests;
      w["failures"] = link->failures;
      w["rows"] = link->rows;
      // Means over the latest exchanges: the link's round trip and the worker's own compute.
      double round_trip = 0, compute = 0;
      for (const RoundTripSample& r : link->recent) {
        round_trip += static_cast<double>(r.round_trip_micros);
        compute += static_cast<double>(r.compute_micros);
      }
      const double n = static_cast<double>(std::max<size_t>(link->recent.size(), 1));
      w["round_trip_ms"] = round_trip / n / 1e3;
      w["compute_ms"] = compute / n / 1e3;
    }
    workers.push_back(std::move(w));
  }
  const ClusterOptions& o = backend_->options();
  return {{"placement_version", backend_->placement_version()},
          {"placement_changing", changing_},
          {"workers", workers},
          {"model_fingerprint", model_fingerprint_},
          {"local_fallback", o.local_fallback},
          {"fallback_expert_pairs", o.local_fallback ? uncovered.size() : 0},
          {"local_experts", o.local_experts}};
}

}  // namespace moepool
