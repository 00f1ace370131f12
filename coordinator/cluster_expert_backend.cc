#include "coordinator/cluster_expert_backend.h"

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
#include "coordinator/grpc_worker_link.h"
#include "engine/status_macros.h"
#include "wire/row_codec.h"

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

// The data channels' dial settings: the same token, CA, client certificate and name override
// as the gRPC channels.
absl::StatusOr<wire::DataDialOptions> MakeDataDial(const ClusterOptions& o) {
  wire::DataDialOptions d;
  d.token = o.cluster_token;
  d.timeout_s = std::min(5.0, o.connect_timeout_s);
  d.max_frame_bytes =
      static_cast<size_t>(std::max<int64_t>(o.max_message_bytes, int64_t{64} << 20));
  d.tls = !o.tls_ca_path.empty() || !o.tls_cert_path.empty() || !o.tls_key_path.empty();
  if (!o.tls_ca_path.empty()) {
    ASSIGN_OR_RETURN(d.tls_ca_pem, ReadPem("--tls-ca", o.tls_ca_path));
  }
  if (!o.tls_cert_path.empty()) {
    ASSIGN_OR_RETURN(d.tls_cert_pem, ReadPem("--tls-cert", o.tls_cert_path));
    ASSIGN_OR_RETURN(d.tls_key_pem, ReadPem("--tls-key", o.tls_key_path));
  }
  d.tls_server_name = o.tls_server_name;
  d.spin_max_us = o.data_spin_us;
  return d;
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

moepool::v1::DType ReturnDType(const ClusterOptions& options) {
  if (options.wire_return_dtype != moepool::v1::DTYPE_UNSPECIFIED) {
    return options.wire_return_dtype;
  }
  return options.wire_dtype == moepool::v1::DTYPE_Q8_0 ? moepool::v1::DTYPE_F16
                                                       : options.wire_dtype;
}

absl::Status CheckOptions(const ClusterOptions& options) {
  if (options.step_timeout_s <= 0) {
    return absl::InvalidArgumentError("the step timeout must be > 0 seconds");
  }
  if (options.links_per_worker < 1 || options.links_per_worker > 8) {
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
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ClusterExpertBackend>> ClusterExpertBackend::Create(
    const std::string& model_path, const ClusterOptions& options) {
  RETURN_IF_ERROR(CheckOptions(options));
  auto b = std::unique_ptr<ClusterExpertBackend>(new ClusterExpertBackend);
  b->options_ = options;
  ExpertFilter filter;
  filter.non_expert = false;
  ASSIGN_OR_RETURN(b->model_, Model::Load(model_path, filter));
  const ModelConfig& c = b->model_->config();
  RETURN_IF_ERROR(wire::CheckRowDType(options.wire_dtype, c.n_embd));
  RETURN_IF_ERROR(wire::CheckRowDType(ReturnDType(options), c.n_embd));
  for (const int e : options.local_experts) {
    if (e < 0 || e >= c.n_expert) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--local-experts: expert ", e, " out of range (the model has ", c.n_expert, " experts)"));
    }
  }
  ASSIGN_OR_RETURN(const std::shared_ptr<grpc::ChannelCredentials> creds, MakeCredentials(options));
  const grpc::ChannelArguments args = MakeChannelArgs(options);
  b->credentials_ = creds;
  b->channel_args_ = args;
  ASSIGN_OR_RETURN(b->data_dial_, MakeDataDial(options));
  b->MakeLinks();
  ASSIGN_OR_RETURN(b->describes_, b->DescribeWorkers());
  if (!options.local_experts.empty() && options.local_backend_factory) {
    ASSIGN_OR_RETURN(b->local_, options.local_backend_factory());
  } else if (!options.local_experts.empty()) {
    b->local_pool_ = std::make_unique<ThreadPool>(options.local_threads);
    b->local_ = std::make_unique<LocalExpertBackend>(b->model_.get(), b->local_pool_.get());
  }
  if (options.local_fallback) {
    if (b->local_pool_ == nullptr)
      b->local_pool_ = std::make_unique<ThreadPool>(options.local_threads);
    b->fallback_ = std::make_unique<LocalExpertBackend>(b->model_.get(), b->local_pool_.get());
  }
  // Steps time out between their deadline and one tick later.
  const double tick_s = std::clamp(options.step_timeout_s / 10, 0.001, 0.05);
  b->watchdog_ = std::make_unique<RoundWatchdog>(
      std::chrono::microseconds(static_cast<int64_t>(tick_s * 1e6)));
  if (options.transport == wire::TransportKind::kNccl) b->ConnectNccl(creds, args);
  b->StartLinks();
  return b;
}

void ClusterExpertBackend::MakeLinks() {
  for (const std::string& address : options_.workers) links_.push_back(NewLinks(address));
}

std::vector<std::unique_ptr<WorkerLink>> ClusterExpertBackend::NewLinks(
    const std::string& address) const {
  const ClusterOptions& o = options_;
  WorkerLinkConfig lc;
  lc.address = address;
  lc.credentials = credentials_;
  lc.channel_args = channel_args_;
  lc.token = o.cluster_token;
  lc.max_message_bytes = o.max_message_bytes;
  lc.step_timeout_s = o.step_timeout_s;
  lc.describe_timeout_s = std::min(5.0, o.connect_timeout_s);
  lc.backoff_initial_s = o.reconnect_initial_s;
  lc.backoff_max_s = o.reconnect_max_s;
  lc.max_samples = o.max_samples;
  lc.data_channel = o.transport == wire::TransportKind::kTcp;
  lc.data_dial = data_dial_;
  // Each link has its own channel and stream (connected on first use).
  std::vector<std::unique_ptr<WorkerLink>> links;
  for (int link = 0; link < o.links_per_worker; ++link) {
    links.push_back(o.make_link ? o.make_link(lc) : std::make_unique<GrpcWorkerLink>(lc));
  }
  return links;
}

absl::StatusOr<std::vector<moepool::v1::DescribeResponse>> ClusterExpertBackend::DescribeWorkers() {
  const ClusterOptions& o = options_;
  const size_t n_workers = o.workers.size();
  std::vector<absl::StatusOr<moepool::v1::DescribeResponse>> answers(
      n_workers, absl::UnknownError("not asked"));
  {
    std::vector<std::thread> threads;  // all workers at once
    for (size_t i = 0; i < n_workers; ++i) {
      threads.emplace_back([&, i] {
        answers[i] = links_[i][0]->Describe(o.connect_timeout_s, /*wait_for_ready=*/true);
      });
    }
    for (auto& t : threads) t.join();
  }
  const ModelConfig& c = model_->config();
  std::vector<absl::Status> errors;
  std::vector<std::vector<std::pair<int, int>>> pairs(n_workers);
  for (size_t i = 0; i < n_workers; ++i) {
    const std::string& name = o.workers[i];
    absl::Status s = answers[i].status();
    if (s.ok()) s = ValidateWorker(name, *answers[i], *model_);
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
  ASSIGN_OR_RETURN(placement_,
                   ExpertPlacement::Build(c.n_layer, c.n_expert, o.workers, pairs, o.local_experts,
                                          o.local_fallback, /*allow_missing=*/o.elastic));
  routed_ = std::move(pairs);
  std::vector<moepool::v1::DescribeResponse> out;
  for (auto& a : answers) out.push_back(*std::move(a));
  return out;
}

void ClusterExpertBackend::ConnectNccl(const std::shared_ptr<grpc::ChannelCredentials>& creds,
                                       const grpc::ChannelArguments& args) {
  const ClusterOptions& o = options_;
  std::vector<wire::TransportEndpoint> endpoints(o.workers.size());
  for (size_t i = 0; i < o.workers.size(); ++i) {
    endpoints[i] = {o.workers[i], describes_[i], creds, args, o.cluster_token};
  }
  const auto sessions = wire::ConnectNcclSessions(endpoints, o.nccl);
  // Link 0 of each worker carries its rows over NCCL; further links stay on gRPC. A reconnected
  // worker gets a new session (a restarted one has lost the old).
  for (size_t i = 0; i < o.workers.size(); ++i) {
    links_[i][0]->SetRowSession(sessions[i], wire::NcclSessionFactory(endpoints[i], o.nccl));
  }
}

void ClusterExpertBackend::StartLinks() {
  const Model* model = model_.get();
  // A reconnected worker is used again only if it still serves the same model and experts.
  for (size_t i = 0; i < links_.size(); ++i) {
    // The hook reads only immutable state (the model outlives the links).
    const moepool::v1::DescribeResponse startup = describes_[i];
    const std::string name = options_.workers[i];
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
    for (auto& link : links_[i]) link->Start(startup, accept);
  }
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
    s.fallback_rows = fallback_rows_;
    s.local_compute_micros = local_micros_;
    s.retried_steps = retried_steps_;
    s.retried_rows = retried_rows_;
  }
  s.blocked_micros = blocked_micros();
  std::lock_guard<std::mutex> lock(membership_mu_);
  // A worker's links add up to one entry; it is up when every link is.
  for (const auto& links : links_) {
    WorkerStats merged = links[0]->Stats();
    for (size_t link = 1; link < links.size(); ++link) {
      const WorkerStats l = links[link]->Stats();
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
  std::lock_guard<std::mutex> lock(membership_mu_);
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
    steps_ = failed_steps_ = local_rows_ = local_micros_ = fallback_rows_ = 0;
    retried_steps_ = retried_rows_ = 0;
  }
  std::lock_guard<std::mutex> lock(membership_mu_);
  for (const auto& links : links_) {
    for (const auto& l : links) l->ResetStats();
  }
}

}  // namespace moepool
