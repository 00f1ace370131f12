// ClusterControl: the coordinator's registry of an elastic cluster. Workers join with nothing
// but an address (moepool worker --join); this class assigns them (layer, expert) pairs, serves
// those tensors from the coordinator's own mapping, tells the ClusterExpertBackend when to route
// to them and when to stop, and keeps each worker's state for GET /v1/cluster and /metrics.
// The gRPC service (cluster_service.h) only translates; everything is decided here.
//
// States: joining (registered, assignment being prepared) -> fetching (tensors being fetched)
// -> ready (rows are routed to it) -> draining (no new step routes to it) -> gone (out of the
// placement; also a worker whose Watch stream broke or whose Ready check failed). Each change is
// one line on stderr. Static workers (--workers) appear as ready or gone, following their
// links.
//
// Assignment (the unit is one expert of one layer): a joining worker's fair share is the expert
// bytes over the workers that are not gone, capped by its memory budget. It first gets the pairs
// its cache holds that nobody else holds (all of them, up to its memory, so a restarted worker
// fetches nothing), then unheld pairs in the order expert n-1 on every layer, expert n-2 on every
// layer, ... (every layer's round trip then touches each worker alike), then, up to its share,
// pairs taken over from the ready worker holding most (moved once the new worker is ready; the
// donor keeps serving them until then). A worker gets nothing while others are still fetching
// and nothing is unheld: UNAVAILABLE, and it retries.
//
// Threading: every method may be called from any thread; a mutex guards the registry, and the
// calls into the backend that wait for a step boundary are made without it.
// Errors: as documented per method; bad requests never change the registry.
#ifndef MOEPOOL_COORDINATOR_CLUSTER_CONTROL_H_
#define MOEPOOL_COORDINATOR_CLUSTER_CONTROL_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/cluster_expert_backend.h"
#include "coordinator/rebalance_plan.h"
#include "moepool/v1/cluster_service.pb.h"
#include "nlohmann/json.hpp"

namespace moepool {

enum class MemberState { kJoining, kFetching, kReady, kDraining, kGone };
const char* MemberStateName(MemberState state);  // lower case, as in /v1/cluster

struct ClusterControlOptions {
  // Bytes per Fetch chunk.
  size_t fetch_chunk_bytes = size_t{1} << 20;
  // Checked requests: the largest cache list and address a Join may carry.
  size_t max_cache_entries = 16;
  size_t max_address_bytes = 256;
  // A placement change (StartPlacementChange) whose workers are not all ready after this long
  // ends with the ones that are; the others keep what they had.
  double placement_change_timeout_s = 600;
  // A worker lost without a drain (its control stream broke) and not back after this long:
  // ready workers with room in their memory budget are asked to join again and take its
  // experts (KIND_REJOIN). < 0: never.
  double reassign_after_s = 30;
};

class ClusterControl {
 public:
  // `backend` (not owned) must outlive this object; its workers (--workers) are registered as
  // static members w0, w1, ...
  ClusterControl(ClusterExpertBackend* backend, ClusterControlOptions options = {});
  ~ClusterControl();

  // A worker registers. `peer_host` is the host the request came from (used when the
  // advertised host is empty or a wildcard). FAILED_PRECONDITION for another protocol version,
  // INVALID_ARGUMENT for a malformed request (sizes, address, pairs outside the model),
  // RESOURCE_EXHAUSTED when its memory budget holds no expert, UNAVAILABLE when there is
  // nothing to assign yet.
  absl::StatusOr<moepool::v1::JoinResponse> Join(const moepool::v1::JoinRequest& request,
                                                 const std::string& peer_host);

  // Streams an assigned tensor from `offset` on: `write` returns false when the client is gone
  // (then CANCELLED). NOT_FOUND for an unknown worker, PERMISSION_DENIED for a tensor not
  // assigned to it, OUT_OF_RANGE for an offset past its end, FAILED_PRECONDITION for a worker
  // that is not fetching.
  absl::Status Fetch(const moepool::v1::FetchRequest& request,
                     const std::function<bool(const moepool::v1::FetchChunk&)>& write);

  // The worker serves its pairs: the backend Describes and checks it and routes to it from the
  // next step boundary. The check's error marks it gone.
  absl::StatusOr<moepool::v1::ReadyResponse> Ready(const moepool::v1::ReadyRequest& request);

  // Held open by a member: returns after writing a drained event once it is out of the
  // placement (OK), or when `cancelled()` turns true (the worker went away: it is marked gone
  // and its pairs go to replicas or the fallback; CANCELLED).
  absl::Status Watch(const moepool::v1::WatchRequest& request,
                     const std::function<bool(const moepool::v1::WatchEvent&)>& write,
                     const std::function<bool()>& cancelled);

  // Drains a worker (its own request on SIGTERM, or POST /v1/cluster/workers/{id}/drain): no
  // step after the next boundary routes to it; returns once none does. NOT_FOUND for an
  // unknown or gone id.
  absl::Status Drain(const std::string& worker_id, const std::string& reason);

  // GET /v1/cluster.
  nlohmann::json View() const;

  // Live placement changes (the rebalancer, rebalancer.h). The joined members as the planner
  // sees them, with their memory budgets: ready ones are movable unless a change is under way;
  // other members holding pairs (static, fetching) are listed but not movable.
  std::vector<RebalanceWorker> RebalanceWorkers() const;
  // Starts moving to `target` (one list per entry of `planned`, which must still describe the
  // members: FAILED_PRECONDITION if the cluster changed since, or while another change is under
  // way). Make before break: each worker whose pairs change is sent its current pairs plus the
  // incoming ones (KIND_REASSIGN), fetches what it lacks from here while it keeps serving, and
  // says Ready; rows reach the incoming pairs from the next step boundary on. Once every such
  // worker is ready (or gone, or placement_change_timeout_s passed) each is routed its target,
  // except pairs nobody else serves, and is told to release the rest (KIND_RELEASED).
  absl::Status StartPlacementChange(const std::vector<RebalanceWorker>& planned,
                                    const std::vector<std::vector<ExpertPair>>& target);
  // Ends a change whose workers are all ready, gone or out of time (called by Ready and, once a
  // second, by the rebalancer). True while a change is still under way.
  bool AdvancePlacementChange();

  // The coordinator's model (its mapping holds every pair) and the bytes of one pair.
  const Model& model() const { return backend_->model(); }
  uint64_t PairBytes(int layer, int expert) const;

  // The fingerprint over the whole model that joined workers report.
  const std::string& model_fingerprint() const { return model_fingerprint_; }

 private:
  struct Member {
    std::string id;
    std::string address;
    MemberState state = MemberState::kJoining;
    bool is_static = false;  // from --workers
    int index = -1;          // the backend's worker index, once it has one
    std::vector<std::pair<int, int>> pairs;
    std::set<std::string> tensors;  // assigned shard tensor names
    // Donor id -> the pairs it hands over when this member is ready.
    std::map<std::string, std::vector<std::pair<int, int>>> moved;
    uint64_t bytes_fetched = 0;
    moepool::v1::Capacity capacity;
    bool drained = false;  // out by a drain (Watch then says so)
    std::string last_reason;
    // +1 per Join: a control stream of an earlier membership (a killed process whose loss was
    // not seen before it came back) must not touch this one.
    uint64_t generation = 0;
    // Pairs handed to other workers since the last Watch event (sent as KIND_RELEASED).
    std::vector<std::pair<int, int>> released;
    std::chrono::steady_clock::time_point gone_since;  // lost (not drained)
    bool lost_handled = false;  // its experts were offered to workers with room
    bool rejoin = false;        // send KIND_REJOIN
    // A placement change: the pairs it is routed once the change ends, and whether it already
    // serves its current pairs plus the incoming ones (its Ready for the change came).
    bool changing = false;
    bool change_ready = false;
    std::vector<std::pair<int, int>> target;
    std::unique_ptr<moepool::v1::JoinResponse> reassign;  // KIND_REASSIGN to send
  };
  struct TensorSource {
    std::string name;
    const WeightMatrix* matrix = nullptr;
    int layer = 0;
    int expert = 0;
  };

  absl::Status CheckJoin(const moepool::v1::JoinRequest& request) const;
  // Asks ready workers with room to join again once a lost worker has stayed away (mu_ held).
  void OfferLostExperts();
  uint64_t MemberBytes(const Member& m) const;
  // The pairs for a new member (see the file comment); mu_ held. Fills `moved` with the pairs
  // taken from each donor member.
  absl::StatusOr<std::vector<std::pair<int, int>>> Assign(
      uint64_t memory_bytes, const std::vector<std::pair<int, int>>& cached,
      std::map<std::string, std::vector<std::pair<int, int>>>* moved) const;
  void FillShard(const std::vector<std::pair<int, int>>& pairs,
                 moepool::v1::JoinResponse* response);
  moepool::v1::TensorChecksum ChecksumOf(const TensorSource& source);
  void SetState(Member* m, MemberState state, const std::string& why);  // mu_ held
  Member* Find(const std::string& id);                                  // mu_ held
  // The member `id` if it is fetching: NOT_FOUND / FAILED_PRECONDITION otherwise (mu_ held).
  absl::StatusOr<Member*> FetchingMember(const std::string& id);
  // Checks a worker's Describe answer: same model (the whole-model fingerprint), same
  // hyperparameters, and every pair routed to it present.
  absl::Status Accept(const std::string& id, const moepool::v1::DescribeResponse& d);
  // Ready for a placement change: routes current + incoming pairs to the member.
  absl::StatusOr<moepool::v1::ReadyResponse> ReadyForChange(const std::string& id);
  // Tensor names of a member's pairs (the ones it may Fetch).
  static std::set<std::string> TensorsOf(const std::vector<std::pair<int, int>>& pairs);

  ClusterExpertBackend* const backend_;
  const ClusterControlOptions options_;
  std::string model_fingerprint_;
  std::vector<moepool::v1::MetadataEntry> metadata_;

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Member>> members_;
  int next_id_ = 0;
  std::map<std::string, moepool::v1::TensorChecksum> checksums_;  // by shard tensor name
  bool changing_ = false;                                         // a placement change is under way
  std::chrono::steady_clock::time_point change_started_;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_CLUSTER_CONTROL_H_
