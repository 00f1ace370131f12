// ClusterExpertBackend: the MoE step of a layer with experts on remote workers (and optionally
// some kept in this process).
//
// Per layer: Route (done by the forward pass) -> Dispatch: one holder is chosen per routed
// expert (ExpertPlacement::ChooseHolders) and rows are grouped per holder; a row goes to each
// holder of any of its experts, carrying only that holder's experts (others -1) -> ExpertCompute:
// every worker's request is sent on its own long-lived Forward stream by its link thread, all
// concurrently, while this thread computes the local experts (LocalExpertBackend) -> Combine:
// each row's partial sums are added, starting from 0.0f, in ascending order of each partial's
// smallest expert id.
//
// Exactness: every (row, expert) product is computed identically anywhere (per-row kernels, f32
// rows on the wire), and each partial is itself a sum in ascending expert id starting from 0.
// With f32 on the wire the result is therefore bit-identical to LocalExpertBackend for k <= 2.
// For k > 2 the additions are grouped per holder: a row with experts a < b < c where a and c
// are on one holder and b on another gives (p_a + p_c) + p_b instead of (p_a + p_b) + p_c, so
// results may differ in the last bits unless each holder's experts are consecutive in the row.
// f16/bf16 on the wire round rows and partials to that type.
//
// Pipelining: Start sends the requests and returns (local experts are computed in Start, after
// the requests went out); Finish waits for the answers and combines. Several steps may be
// outstanding (micro-batches). A link carries one request at a time, so each worker has
// `links_per_worker` links ("links"); a step takes a link no outstanding step holds, or else
// waits for the oldest outstanding step's answers and shares its link (that wait, like Finish's,
// counts as blocked time). A worker takes requests while any of its links is up (a request for a
// link that is down goes on another); Stats reports it up when every link is. Compute is Start +
// Finish, except that without local rows it runs one worker's exchange on the calling thread (no
// hand-off to a link thread).
//
// Failures: a worker that does not answer within the step timeout has its stream cancelled by
// the step watchdog (RoundWatchdog); a lost connection fails its request. The worker is marked
// down and reconnected in the background (exponential backoff) and used again once its
// Describe is accepted (same fingerprint, hyperparameters and experts).
// In-step retry (ClusterOptions::retry_on_replica): when a worker's request fails with
// UNAVAILABLE or DEADLINE_EXCEEDED and other up workers hold its experts, its rows are sent again
// to those replicas within the same step, once; the result is the same bits. Without a replica,
// an UNAVAILABLE worker is tried once more on another of its links that is up (a stream broken
// by a restart this link had not seen yet). If that is not possible or the retry fails too, the
// step fails with the first code, naming the worker(s). Steps after
// that route the worker's experts to replicas if any, else fail with UNAVAILABLE until it is
// back. Nothing here aborts the process.
//
// Ownership: owns its worker links, the Model bound to all experts (for fingerprints and the
// local experts) and, when local experts are kept, their thread pool.
// Threading: Compute / Start / Finish are called from one thread at a time (the forward
// thread; see ExpertBackend for the order); Stats, ResetStats, blocked_micros and placement may
// be called from any thread.
#ifndef MOEPOOL_COORDINATOR_CLUSTER_EXPERT_BACKEND_H_
#define MOEPOOL_COORDINATOR_CLUSTER_EXPERT_BACKEND_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/expert_placement.h"
#include "coordinator/round_watchdog.h"
#include "coordinator/worker_link.h"
#include "engine/expert_backend.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/thread_pool.h"
#include "moepool/v1/expert_service.pb.h"
#include "wire/transport.h"

namespace moepool {

struct ClusterOptions;
// The dtype of the sums workers return under `options` (wire_return_dtype resolved).
moepool::v1::DType ReturnDType(const ClusterOptions& options);

struct ClusterOptions {
  std::vector<std::string> workers;  // host:port each
  std::vector<int> local_experts;    // expert ids computed here on every layer
  moepool::v1::DType wire_dtype = moepool::v1::DTYPE_F32;  // rows sent to workers
  // The sums workers return; DTYPE_UNSPECIFIED: f16 when wire_dtype is q8_0, else wire_dtype.
  moepool::v1::DType wire_return_dtype = moepool::v1::DTYPE_UNSPECIFIED;
  double step_timeout_s = 30;     // per layer step, from sending to the last answer
  double connect_timeout_s = 10;  // startup: how long to wait for each worker's Describe
  std::string cluster_token;      // sent as `authorization: Bearer <token>`; empty: none
  // TLS: any of these set -> TLS channel. tls_ca_path verifies the server (PEM; empty: the
  // system roots); tls_cert_path + tls_key_path present a client certificate (mutual TLS).
  std::string tls_ca_path;
  std::string tls_cert_path;
  std::string tls_key_path;
  std::string tls_server_name;  // overrides the name checked in the server certificate
  // Largest message sent (requests are chunked to fit); messages received may be up to
  // max(this, 64 MiB).
  int64_t max_message_bytes = 4 << 20;
  int local_threads = 0;  // pool for local experts; <= 0: all hardware threads
  // When set and local_experts is not empty, Create calls it once for the backend of the local
  // experts (e.g. on a GPU, --device) instead of a LocalExpertBackend on a pool of its own.
  std::function<absl::StatusOr<std::unique_ptr<ExpertBackend>>()> local_backend_factory;
  // kTcp: Forward exchanges go over the workers' data channels (wire/data_channel.h); kGrpc:
  // over gRPC streams; kNccl: rows to workers that offer it travel over NCCL
  // (wire/transport.h). Each falls back to gRPC per worker, with a line on stderr, wherever
  // it cannot be set up.
  wire::TransportKind transport = wire::TransportKind::kTcp;
  // kTcp: microseconds a link polls for an answer before it sleeps (wire::DataStream).
  int64_t data_spin_us = 2000;
  wire::NcclSessionOptions nccl;
  double reconnect_initial_s = 0.1;
  double reconnect_max_s = 5;
  size_t max_samples = 16384;  // round-trip samples kept per worker
  // Re-send a failed worker's rows to replicas within the step (see the file comment).
  bool retry_on_replica = true;
  // Forward streams (links, each with its own connection) per worker: how many steps can have
  // requests on a worker at once. Two lets two pipelined micro-batches' requests travel and
  // queue at the worker together; with one, a micro-batch's requests wait for the other's
  // answers. Links connect on first use.
  int links_per_worker = 2;
  // Experts that no up worker holds are computed in this process, from its own mapping of the
  // model, with the same bits (--local-fallback on); false: such a call fails UNAVAILABLE, and
  // startup needs every pair held somewhere.
  bool local_fallback = false;
  // Workers may join while serving (`serve --cluster-listen`, coordinator/cluster_control.h):
  // Create accepts an empty `workers` list, and pairs no worker holds yet are computed by the
  // local fallback, or fail UNAVAILABLE with it off.
  bool elastic = false;
  // Makes each link (one per worker and stream); empty: GrpcWorkerLink. Tests pass an
  // in-process link (tests/cluster/in_process_link_util.h).
  WorkerLinkFactory make_link;
};

struct ClusterStats {
  uint64_t steps = 0;  // Compute / Start calls
  uint64_t failed_steps = 0;
  uint64_t retried_steps = 0;   // steps that re-sent a failed worker's rows to replicas
  uint64_t retried_rows = 0;    // rows re-sent (each once per failed worker)
  uint64_t blocked_micros = 0;  // the forward thread waiting for workers (see blocked_micros())
  uint64_t local_rows = 0;      // rows computed by local experts
  uint64_t fallback_rows = 0;   // rows computed here because no up worker held their experts
  uint64_t local_compute_micros = 0;
  std::vector<WorkerStats> workers;  // in --workers order
};

class ClusterExpertBackend : public ExpertBackend {
 public:
  // Opens the model file at `model_path` (the coordinator's copy: fingerprints and local experts
  // come from it), contacts every worker (Describe, concurrently), refuses any that is
  // unreachable, rejects the token, or serves another protocol version / model / hyperparameters,
  // and builds the placement (FAILED_PRECONDITION listing pairs nobody holds). The errors name
  // the workers concerned.
  static absl::StatusOr<std::unique_ptr<ClusterExpertBackend>> Create(
      const std::string& model_path, const ClusterOptions& options);

  ~ClusterExpertBackend() override;

  absl::Status Compute(const ExpertRoutes& routes, float* out) override;
  std::unique_ptr<PendingExperts> Start(const ExpertRoutes& routes, float* out) override;
  bool overlaps() const override { return options_.elastic || !links_.empty(); }
  // Time in Compute / Start / Finish spent waiting for workers' answers (or for the links to be
  // free), including exchanges run on the calling thread.
  uint64_t blocked_micros() const override {
    return blocked_micros_.load(std::memory_order_relaxed);
  }

  // Forward thread only (between steps), or while no worker joins or leaves.
  const ExpertPlacement& placement() const { return placement_; }
  const ModelConfig& config() const { return model_->config(); }
  const ClusterOptions& options() const { return options_; }
  // The coordinator's mapping of the whole model (for serving shard tensors to joining workers).
  const Model& model() const { return *model_; }
  // Describe answers accepted (at startup, in --workers order, then workers added), by index.
  std::vector<moepool::v1::DescribeResponse> workers() const;

  // Membership of an elastic cluster (coordinator/cluster_control.h drives it). Worker indices
  // are stable: an added worker gets the next index, or its old one when `reuse` names a
  // removed worker. Every change takes effect at a step boundary: when no step is outstanding
  // and no forward pass is half-way through its layers (a forward pass that has not reached its
  // last layer for 0.5 s counts as ended, e.g. after a failed step), so placement never
  // changes inside a forward pass. These calls block until the change is applied; call them
  // from a control thread, never from the forward thread.
  //
  // AddWorker: creates the worker's links, Describes it (waiting up to the connect timeout),
  // checks the answer with `accept` (also used whenever the worker reconnects), and routes
  // `pairs` to it from the next boundary on. The error of Describe or `accept` changes nothing.
  absl::StatusOr<int> AddWorker(const std::string& address, std::vector<std::pair<int, int>> pairs,
                                AcceptWorker accept, int reuse = -1);
  // Routes only `pairs` to worker `w` from the next boundary on (it gave some to another).
  void SetWorkerPairs(int w, std::vector<std::pair<int, int>> pairs);
  // Stops routing to worker `w` (its pairs go to replicas or the fallback) and closes its links.
  void RemoveWorker(int w);
  // Starts at 1; +1 per applied change.
  uint64_t placement_version() const;

  ClusterStats Stats() const;
  void ResetStats();

  // (layer, expert) pairs that no up worker and no --local-experts of this process holds right
  // now: computed by the local fallback when it is on, else calls that route to them fail until
  // a holder is back. Empty when the workers (and local experts) cover the whole model.
  std::vector<std::pair<int, int>> UncoveredPairs() const;

 private:
  struct Bucket;
  class Call;
  struct Retry;

  ClusterExpertBackend() = default;

  // Step boundaries for membership changes (cluster_membership.cc).
  void BeginStep(int layer);
  void EndStep(int layer);
  // Runs `change` at the next step boundary under membership_mu_, then rebuilds the placement.
  void ApplyAtBoundary(const std::function<void()>& change);
  absl::Status RebuildPlacement();  // from members_; membership_mu_ held
  std::vector<std::unique_ptr<WorkerLink>> NewLinks(const std::string& address) const;

  // Create's parts: the links (ClusterOptions::make_link, else gRPC), the startup Describe of
  // every worker at once with the checks and the placement, NCCL sessions, starting the links.
  void MakeLinks();
  absl::StatusOr<std::vector<moepool::v1::DescribeResponse>> DescribeWorkers();
  void ConnectNccl(const std::shared_ptr<grpc::ChannelCredentials>& creds,
                   const grpc::ChannelArguments& args);
  void StartLinks();
  // Creates a step and sends its requests (see the file comment).
  std::unique_ptr<Call> Begin(const ExpertRoutes& routes, float* out, bool allow_inline);
  // Validates, chooses holders and groups the rows per holder.
  absl::Status Dispatch(Call* s);
  // Sends the buckets from index `first` on (posting remote ones, computing local ones here).
  void Send(Call* s, size_t first, bool allow_inline);
  // Moves buckets off down links onto an up link of their worker, and waits for the earlier
  // steps on the links used.
  void ChooseLinks(Call* s, size_t first);
  // A bucket computed in this process (local experts or the local fallback): its job's partial
  // and status.
  void ComputeHere(const ExpertRoutes& routes, Bucket* local);
  // Buckets by destination: 0 local experts, 1 + w worker w, 1 + n_workers the local fallback.
  int DestinationOf(int holder) const;
  int HolderOf(size_t destination) const;
  // The failed buckets' pairs and workers, and another up link of worker w (-1: none).
  Retry CollectFailed(const Call& s, const std::vector<size_t>& failed) const;
  int OtherLink(const Retry& r, size_t w) const;
  // Waits for the requests of the current round and disarms its watchdog.
  void WaitRound(Call* s);
  // Re-sends the rows of the failed buckets to up replicas; error if some expert has none.
  absl::Status Resend(Call* s, const std::vector<size_t>& failed);
  // Waits, retries, combines; the step's final status. Idempotent (the second call: OK).
  absl::Status FinishCall(Call* s);
  // Each worker's pace from the answered exchanges of `s`'s first round (NotePace), and the
  // paces ChooseHolders weighs replicas by (HolderPaces: unmeasured workers get the median;
  // none every kRemeasureEvery-th round, so a replica judged slower is measured again, and a
  // dead one is noticed, even when the paces would never send it rows).
  static constexpr uint64_t kRemeasureEvery = 16;
  void NotePace(const Call& s);
  const std::vector<ExpertPlacement::HolderPace>* HolderPaces(uint64_t round);
  // Waits until the other outstanding steps on link `link` (any link: -1) have their answers.
  void WaitForOthers(const Call* s, int link);
  // Chooses the link of a new step.
  int ChooseLink();
  bool WorkerUsable(size_t w) const;  // some link up (steps route to it)
  absl::Status Fail(absl::Status s);
  // Joins the messages of several failures; the code is the first one's.
  static absl::Status JoinErrors(const std::vector<absl::Status>& errors);

  ClusterOptions options_;
  std::unique_ptr<Model> model_;  // all experts bound, no non-expert weights
  std::unique_ptr<ThreadPool> local_pool_;
  std::unique_ptr<ExpertBackend> local_;     // LocalExpertBackend or the factory's
  std::unique_ptr<ExpertBackend> fallback_;  // with local_fallback: every expert, on the CPU
  std::vector<std::vector<std::unique_ptr<WorkerLink>>> links_;  // [worker][link]
  std::unique_ptr<RoundWatchdog> watchdog_;
  std::vector<moepool::v1::DescribeResponse> describes_;
  ExpertPlacement placement_;

  // Membership: links_, describes_, routed_ and placement_ change only in ApplyAtBoundary, with
  // membership_mu_ held and no step outstanding; readers off the forward thread lock it.
  mutable std::mutex membership_mu_;
  std::condition_variable membership_cv_;
  std::vector<std::vector<std::pair<int, int>>> routed_;  // [worker] pairs routed to it
  std::shared_ptr<grpc::ChannelCredentials> credentials_;
  grpc::ChannelArguments channel_args_;
  wire::DataDialOptions data_dial_;  // token and TLS material of the data channels
  int active_steps_ = 0;             // calls begun, not finished
  int passes_open_ = 0;              // forward passes past layer 0, not past the last layer
  int pending_changes_ = 0;          // ApplyAtBoundary calls waiting
  std::chrono::steady_clock::time_point last_begin_;
  uint64_t placement_version_ = 1;

  // Forward thread only.
  uint64_t round_counter_ = 0;  // request rounds sent (ids of steps and retries)
  // Per worker: its compute time per row and its link's part of an exchange, moving averages
  // over its latest exchanges (0 samples: not measured); reset when the placement changes.
  struct MeasuredPace {
    ExpertPlacement::HolderPace pace;
    int64_t samples = 0;
  };
  std::vector<MeasuredPace> measured_pace_;
  std::vector<ExpertPlacement::HolderPace> holder_paces_;
  uint64_t pace_version_ = 0;
  std::vector<Call*> outstanding_;  // started, not finished; oldest first
  std::atomic<uint64_t> blocked_micros_{0};
  mutable std::mutex stats_mu_;
  uint64_t steps_ = 0, failed_steps_ = 0, local_rows_ = 0, local_micros_ = 0, fallback_rows_ = 0;
  uint64_t retried_steps_ = 0, retried_rows_ = 0;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_CLUSTER_EXPERT_BACKEND_H_
