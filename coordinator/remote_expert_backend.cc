#include "coordinator/remote_expert_backend.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

using Clock = std::chrono::steady_clock;

absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, " ", path, ": cannot read"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeCredentials(const ClusterOptions& o) {
  if (o.tls_ca_path.empty() && o.tls_cert_path.empty() && o.tls_key_path.empty()) {
    return grpc::InsecureChannelCredentials();
  }
  if (o.tls_cert_path.empty() != o.tls_key_path.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together (mutual TLS)");
  }
  grpc::SslCredentialsOptions ssl;
  if (!o.tls_ca_path.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem("--tls-ca", o.tls_ca_path));
  }
  if (!o.tls_cert_path.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPem("--tls-cert", o.tls_cert_path));
    ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPem("--tls-key", o.tls_key_path));
  }
  return grpc::SslCredentials(ssl);
}

grpc::ChannelArguments MakeChannelArgs(const ClusterOptions& o) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(static_cast<int>(o.max_message_bytes));
  args.SetMaxReceiveMessageSize(
      static_cast<int>(std::max<int64_t>(o.max_message_bytes, int64_t{64} << 20)));
  // Reconnects are paced by the link (fresh channel per attempt); keep gRPC's own short.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  if (!o.tls_server_name.empty()) args.SetSslTargetNameOverride(o.tls_server_name);
  return args;
}

}  // namespace

absl::Status ClusterExpertBackend::JoinErrors(const std::vector<absl::Status>& errors) {
  std::vector<std::string> parts;
  for (const auto& e : errors) parts.emplace_back(e.message());
  return absl::Status(errors.front().code(), absl::StrJoin(parts, "; "));
}

absl::StatusOr<std::unique_ptr<ClusterExpertBackend>> ClusterExpertBackend::Create(
    const std::string& model_path, const ClusterOptions& options) {
  auto b = std::unique_ptr<ClusterExpertBackend>(new ClusterExpertBackend);
  b->options_ = options;
  if (options.step_timeout_s <= 0) {
    return absl::InvalidArgumentError("the step timeout must be > 0 seconds");
  }
  if (options.streams_per_worker < 1 || options.streams_per_worker > 8) {
    return absl::InvalidArgumentError("the streams per worker must be in [1, 8]");
  }
  if (options.max_message_bytes < 4096 || options.max_message_bytes > (1ll << 30)) {
    return absl::InvalidArgumentError("the maximum message size must be in [4 KiB, 1 GiB]");
  }
  std::set<std::string> seen;
  for (const auto& w : options.workers) {
    if (w.empty()) return absl::InvalidArgumentError("empty worker address in --workers");
    if (!seen.insert(w).second) {
      return absl::InvalidArgumentError(absl::StrCat("worker ", w, " is listed twice"));
    }
  }
  ExpertFilter filter;
  filter.non_expert = false;
  ASSIGN_OR_RETURN(b->model_, Model::Load(model_path, filter));
  const Model* model = b->model_.get();
  const ModelConfig& c = model->config();
  for (const int e : options.local_experts) {
    if (e < 0 || e >= c.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--local-experts: expert ", e, " out of range (the model has ", c.n_expert, " experts)"));
    }
  }
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> creds, MakeCredentials(options));
  const grpc::ChannelArguments args = MakeChannelArgs(options);

  const size_t n_workers = options.workers.size();
  const size_t n_lanes = static_cast<size_t>(options.streams_per_worker);
  b->links_.resize(n_workers);
  for (size_t i = 0; i < n_workers; ++i) {
    WorkerLinkConfig lc;
    lc.address = options.workers[i];
    lc.credentials = creds;
    lc.channel_args = args;
    lc.token = options.cluster_token;
    lc.max_message_bytes = options.max_message_bytes;
    lc.step_timeout_s = options.step_timeout_s;
    lc.describe_timeout_s = std::min(5.0, options.connect_timeout_s);
    lc.backoff_initial_s = options.reconnect_initial_s;
    lc.backoff_max_s = options.reconnect_max_s;
    lc.max_samples = options.max_samples;
    // One link per lane, each with its own channel and stream (connected on first use).
    for (size_t lane = 0; lane < n_lanes; ++lane) {
      b->links_[i].push_back(std::make_unique<WorkerLink>(lc));
    }
  }
  // Startup Describe, all workers at once.
  std::vector<absl::StatusOr<moepool::v1::DescribeResponse>> answers(
      n_workers, absl::UnknownError("not asked"));
  {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < n_workers; ++i) {
      threads.emplace_back([&, i] {
        answers[i] = b->links_[i][0]->Describe(options.connect_timeout_s, /*wait_for_ready=*/true);
      });
    }
    for (auto& t : threads) t.join();
  }
  std::vector<absl::Status> errors;
  std::vector<std::vector<std::pair<int, int>>> pairs(n_workers);
  for (size_t i = 0; i < n_workers; ++i) {
    const std::string& name = options.workers[i];
    absl::Status s = answers[i].status();
    if (s.ok()) s = ValidateWorker(name, *answers[i], *model);
    if (s.ok()) {
      auto p = WorkerExpertPairs(name, *answers[i], c);
      if (p.ok()) {
        pairs[i] = *std::move(p);
      } else {
        s = p.status();
      }
    }
    if (!s.ok()) errors.push_back(s);
  }
  if (!errors.empty()) return JoinErrors(errors);
  ASSIGN_OR_RETURN(b->placement_, ExpertPlacement::Build(c.n_layer, c.n_expert, options.workers,
                                                         pairs, options.local_experts));
  if (!options.local_experts.empty() && options.local_backend_factory) {
    ASSIGN_OR_RETURN(b->local_, options.local_backend_factory());
  } else if (!options.local_experts.empty()) {
    b->local_pool_ = std::make_unique<ThreadPool>(options.local_threads);
    b->local_ = std::make_unique<LocalExpertBackend>(model, b->local_pool_.get());
  }
  for (size_t i = 0; i < n_workers; ++i) {
    b->describes_.push_back(*answers[i]);
  }
  // Steps time out between their deadline and one tick later.
  const double tick_s = std::clamp(options.step_timeout_s / 10, 0.001, 0.05);
  b->watchdog_ =
      std::make_unique<StepWatchdog>(std::chrono::microseconds(static_cast<int64_t>(tick_s * 1e6)));
  if (options.transport == wire::TransportKind::kNccl) {
    std::vector<wire::TransportEndpoint> endpoints(n_workers);
    for (size_t i = 0; i < n_workers; ++i) {
      endpoints[i] = {options.workers[i], *answers[i], creds, args, options.cluster_token};
    }
    const auto transports = wire::ConnectNcclSessions(endpoints, options.nccl);
    // Lane 0 of each worker carries its rows over NCCL; further lanes stay on gRPC. A reconnected
    // worker gets a new session (a restarted one has lost the old).
    for (size_t i = 0; i < n_workers; ++i) {
      b->links_[i][0]->SetRowSession(transports[i],
                                     wire::NcclSessionFactory(endpoints[i], options.nccl));
    }
  }
  // A reconnected worker is used again only if it still serves the same model and experts.
  for (size_t i = 0; i < n_workers; ++i) {
    // The hook reads only immutable state (the model outlives the links).
    const moepool::v1::DescribeResponse startup = *answers[i];
    const std::string name = options.workers[i];
    auto accept = [model, startup, name](const moepool::v1::DescribeResponse& d) -> absl::Status {
      RETURN_IF_ERROR(ValidateWorker(name, d, *model));
      const auto& a = d.experts().packed();
      const auto& s = startup.experts().packed();
      if (!std::equal(a.begin(), a.end(), s.begin(), s.end())) {
        return absl::FailedPreconditionError(absl::StrCat(
            "worker ", name, " came back with other experts than at startup; not using it"));
      }
      return absl::OkStatus();
    };
    for (auto& link : b->links_[i]) link->Start(*answers[i], accept);
  }
  return b;
}

ClusterExpertBackend::~ClusterExpertBackend() {
  watchdog_.reset();
  links_.clear();
}

ClusterStats ClusterExpertBackend::Stats() const {
  ClusterStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    s.steps = steps_;
    s.failed_steps = failed_steps_;
    s.local_rows = local_rows_;
    s.local_compute_micros = local_micros_;
    s.retried_steps = retried_steps_;
    s.retried_rows = retried_rows_;
  }
  s.blocked_micros = blocked_micros();
  // A worker's lanes add up to one entry; it is up when every lane is.
  for (const auto& lanes : links_) {
    WorkerStats merged = lanes[0]->Stats();
    for (size_t lane = 1; lane < lanes.size(); ++lane) {
      const WorkerStats l = lanes[lane]->Stats();
      if (merged.up && !l.up) merged.last_error = l.last_error;
      merged.up = merged.up && l.up;
      merged.requests += l.requests;
      merged.failures += l.failures;
      merged.reconnects += l.reconnects;
      merged.rows += l.rows;
      merged.request_bytes += l.request_bytes;
      merged.response_bytes += l.response_bytes;
      merged.round_trip_micros += l.round_trip_micros;
      merged.compute_micros += l.compute_micros;
      merged.recent.insert(merged.recent.end(), l.recent.begin(), l.recent.end());
    }
    s.workers.push_back(std::move(merged));
  }
  return s;
}

bool ClusterExpertBackend::WorkerUsable(size_t w) const {
  for (const auto& link : links_[w]) {
    if (link->up()) return true;
  }
  return false;
}

std::vector<std::pair<int, int>> ClusterExpertBackend::UncoveredPairs() const {
  std::vector<bool> up(links_.size());
  for (size_t w = 0; w < links_.size(); ++w) up[w] = WorkerUsable(w);
  std::vector<std::pair<int, int>> uncovered;
  for (int l = 0; l < placement_.n_layer(); ++l) {
    for (int e = 0; e < placement_.n_expert(); ++e) {
      bool covered = false;
      for (const int h : placement_.holders(l, e)) {
        covered = covered || h == ExpertPlacement::kLocal || up[static_cast<size_t>(h)];
      }
      if (!covered) uncovered.emplace_back(l, e);
    }
  }
  return uncovered;
}

void ClusterExpertBackend::ResetStats() {
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    steps_ = failed_steps_ = local_rows_ = local_micros_ = 0;
    retried_steps_ = retried_rows_ = 0;
  }
  for (const auto& lanes : links_) {
    for (const auto& l : lanes) l->ResetStats();
  }
}

}  // namespace moepool
