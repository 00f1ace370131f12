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
// Failures: a worker that does not answer within the step timeout has its stream cancelled by
// the step watchdog (StepWatchdog); a lost connection fails its request. The step then fails with
// DEADLINE_EXCEEDED / UNAVAILABLE naming the worker; the worker is marked down and reconnected
// in the background (exponential backoff) and used again once its Describe is accepted (same
// fingerprint, hyperparameters and experts). Steps after that route its experts to replicas if
// any, else fail with UNAVAILABLE until it is back. Nothing here aborts the process.
//
// Ownership: owns its worker links, the Model bound to all experts (for fingerprints and the
// local experts) and, when local experts are kept, their thread pool.
// Threading: Compute is not reentrant (the forward pass calls one at a time); Stats,
// ResetStats and placement may be called from any thread.
#ifndef MOEPOOL_COORDINATOR_REMOTE_EXPERT_BACKEND_H_
#define MOEPOOL_COORDINATOR_REMOTE_EXPERT_BACKEND_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/expert_placement.h"
#include "coordinator/step_watchdog.h"
#include "coordinator/transport.h"
#include "coordinator/worker_link.h"
#include "engine/expert_backend.h"
#include "engine/model.h"
#include "engine/moe_ffn.h"
#include "engine/thread_pool.h"
#include "moepool/v1/expert_service.pb.h"

namespace moepool {

struct ClusterOptions {
  std::vector<std::string> workers;  // host:port each
  std::vector<int> local_experts;    // expert ids computed here on every layer
  moepool::v1::DType wire_dtype = moepool::v1::DTYPE_F32;
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
  // kNccl: rows to workers that offer it travel over NCCL (coordinator/transport.h); falls
  // back to gRPC per worker, with a line on stderr, wherever NCCL cannot be set up.
  TransportKind transport = TransportKind::kGrpc;
  NcclTransportOptions nccl;
  double reconnect_initial_s = 0.1;
  double reconnect_max_s = 5;
  size_t max_samples = 16384;  // round-trip samples kept per worker
};

struct ClusterStats {
  uint64_t steps = 0;  // Compute calls
  uint64_t failed_steps = 0;
  uint64_t local_rows = 0;  // rows computed by local experts
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

  const ExpertPlacement& placement() const { return placement_; }
  const ModelConfig& config() const { return model_->config(); }
  const ClusterOptions& options() const { return options_; }
  // Describe answers accepted at startup, in --workers order.
  const std::vector<moepool::v1::DescribeResponse>& workers() const { return describes_; }

  ClusterStats Stats() const;
  void ResetStats();

  // (layer, expert) pairs that no up worker and not this process holds right now (steps that
  // route to them fail until a holder is back); empty when the whole model is covered.
  std::vector<std::pair<int, int>> UncoveredPairs() const;

 private:
  ClusterExpertBackend() = default;

  ClusterOptions options_;
  std::unique_ptr<Model> model_;  // all experts bound, no non-expert weights
  std::unique_ptr<ThreadPool> local_pool_;
  std::unique_ptr<ExpertBackend> local_;  // LocalExpertBackend or the factory's
  std::vector<std::unique_ptr<WorkerLink>> links_;
  std::unique_ptr<StepWatchdog> watchdog_;
  std::vector<moepool::v1::DescribeResponse> describes_;
  ExpertPlacement placement_;

  uint64_t step_counter_ = 0;  // Compute thread only
  mutable std::mutex stats_mu_;
  uint64_t steps_ = 0, failed_steps_ = 0, local_rows_ = 0, local_micros_ = 0;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_REMOTE_EXPERT_BACKEND_H_
