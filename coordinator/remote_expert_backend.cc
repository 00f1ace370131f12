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

// Joins the messages of several failures; the code is the first one's.
absl::Status JoinErrors(const std::vector<absl::Status>& errors) {
  std::vector<std::string> parts;
  for (const auto& e : errors) parts.emplace_back(e.message());
  return absl::Status(errors.front().code(), absl::StrJoin(parts, "; "));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ClusterExpertBackend>> ClusterExpertBackend::Create(
    const std::string& model_path, const ClusterOptions& options) {
  auto b = std::unique_ptr<ClusterExpertBackend>(new ClusterExpertBackend);
  b->options_ = options;
  if (options.step_timeout_s <= 0) {
    return absl::InvalidArgumentError("the step timeout must be > 0 seconds");
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
    b->links_.push_back(std::make_unique<WorkerLink>(std::move(lc)));
  }
  // Startup Describe, all workers at once.
  std::vector<absl::StatusOr<moepool::v1::DescribeResponse>> answers(
      n_workers, absl::UnknownError("not asked"));
  {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < n_workers; ++i) {
      threads.emplace_back([&, i] {
        answers[i] = b->links_[i]->Describe(options.connect_timeout_s, /*wait_for_ready=*/true);
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
  if (options.transport == TransportKind::kNccl) {
    std::vector<TransportEndpoint> endpoints(n_workers);
    for (size_t i = 0; i < n_workers; ++i) {
      endpoints[i] = {options.workers[i], *answers[i], creds, args, options.cluster_token};
    }
    const auto transports = ConnectNcclTransports(endpoints, options.nccl);
    for (size_t i = 0; i < n_workers; ++i) b->links_[i]->SetRowTransport(transports[i]);
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
    b->links_[i]->Start(*answers[i], std::move(accept));
  }
  return b;
}

ClusterExpertBackend::~ClusterExpertBackend() {
  watchdog_.reset();
  links_.clear();
}

absl::Status ClusterExpertBackend::Compute(const ExpertRoutes& routes, float* out) {
  const ModelConfig& c = model_->config();
  if (routes.layer < 0 || routes.layer >= c.n_layer) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", routes.layer, " out of range"));
  }
  if (routes.n_embd != c.n_embd) {
    return absl::InvalidArgumentError(
        absl::StrCat("row width ", routes.n_embd, " != model embedding length ", c.n_embd));
  }
  if (routes.k < 1 || routes.k > c.n_expert) {
    return absl::InvalidArgumentError(absl::StrCat("k = ", routes.k, " out of range"));
  }
  const int64_t n = routes.n_rows;
  const int64_t d = routes.n_embd;
  const int k = routes.k;
  const uint64_t step = ++step_counter_;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++steps_;
  }
  auto fail = [&](absl::Status s) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++failed_steps_;
    return s;
  };

  // Dispatch: a holder per routed expert, rows grouped per holder (bucket 0: local).
  std::vector<int64_t> rows_per_expert(static_cast<size_t>(c.n_expert), 0);
  for (int64_t i = 0; i < n * k; ++i) {
    const int32_t e = routes.expert[i];
    if (e < 0) continue;
    if (e >= c.n_expert) {
      return fail(absl::InvalidArgumentError(absl::StrCat("expert ", e, " out of range")));
    }
    ++rows_per_expert[static_cast<size_t>(e)];
  }
  std::vector<int> holder_of;
  const absl::Status chosen = placement_.ChooseHolders(
      routes.layer, rows_per_expert, [&](int w) { return links_[static_cast<size_t>(w)]->up(); },
      step, &holder_of);
  if (!chosen.ok()) return fail(chosen);

  struct Bucket {
    std::vector<int64_t> rows;
    std::vector<int32_t> expert;
    std::vector<float> weight;
    std::vector<int32_t> first_expert;  // smallest expert of each row in this bucket
  };
  const size_t n_links = links_.size();
  std::vector<Bucket> buckets(1 + n_links);
  for (int64_t r = 0; r < n; ++r) {
    for (int j = 0; j < k; ++j) {
      const int32_t e = routes.expert[r * k + j];
      if (e < 0) continue;
      const int h = holder_of[static_cast<size_t>(e)];
      Bucket& b = buckets[h == ExpertPlacement::kLocal ? 0 : 1 + static_cast<size_t>(h)];
      if (b.rows.empty() || b.rows.back() != r) {
        b.rows.push_back(r);
        b.expert.resize(b.expert.size() + static_cast<size_t>(k), -1);
        b.weight.resize(b.weight.size() + static_cast<size_t>(k), 0.0f);
        b.first_expert.push_back(e);
      }
      const size_t slot = b.rows.size() - 1;
      b.expert[slot * static_cast<size_t>(k) + static_cast<size_t>(j)] = e;
      b.weight[slot * static_cast<size_t>(k) + static_cast<size_t>(j)] = routes.weight[r * k + j];
    }
  }

  // ExpertCompute: remote requests on the link threads, local experts here meanwhile. Without
  // local rows this thread runs one worker's exchange itself (no hand-off to and from a link
  // thread, the common case of a decode step).
  std::vector<LinkJob> jobs(n_links);
  std::vector<WorkerLink*> active;
  std::vector<size_t> active_index;
  for (size_t w = 0; w < n_links; ++w) {
    const Bucket& b = buckets[1 + w];
    if (b.rows.empty()) continue;
    LinkJob& job = jobs[w];
    job.step_id = step;
    job.layer = routes.layer;
    job.dtype = options_.wire_dtype;
    job.n_embd = d;
    job.k = k;
    job.x = routes.x;
    job.rows = &b.rows;
    job.expert = &b.expert;
    job.weight = &b.weight;
    active.push_back(links_[w].get());
    active_index.push_back(w);
  }
  const Bucket& lb = buckets[0];
  const bool run_inline = lb.rows.empty() && !active.empty();
  StepLatch latch(static_cast<int>(active.size()) - (run_inline ? 1 : 0));
  watchdog_->Arm(
      step,
      Clock::now() + std::chrono::microseconds(static_cast<int64_t>(options_.step_timeout_s * 1e6)),
      &active);
  for (size_t i = run_inline ? 1 : 0; i < active.size(); ++i) {
    active[i]->Post(&jobs[active_index[i]], &latch);
  }
  std::vector<float> local_out;
  absl::Status local_status;
  if (run_inline) {
    active[0]->RunInline(&jobs[active_index[0]]);
  } else if (!lb.rows.empty()) {
    const auto t0 = Clock::now();
    const int64_t m = static_cast<int64_t>(lb.rows.size());
    std::vector<float> xg(static_cast<size_t>(m * d));
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(routes.x + lb.rows[static_cast<size_t>(i)] * d, d, xg.data() + i * d);
    }
    ExpertRoutes sub;
    sub.layer = routes.layer;
    sub.n_rows = m;
    sub.n_embd = d;
    sub.k = k;
    sub.x = xg.data();
    sub.expert = lb.expert.data();
    sub.weight = lb.weight.data();
    local_out.resize(static_cast<size_t>(m * d));
    local_status = local_->Compute(sub, local_out.data());
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0);
    std::lock_guard<std::mutex> lock(stats_mu_);
    local_rows_ += static_cast<uint64_t>(m);
    local_micros_ += static_cast<uint64_t>(us.count());
  }
  latch.Wait();
  watchdog_->Disarm();
  std::vector<absl::Status> errors;
  if (!local_status.ok()) errors.push_back(local_status);
  for (size_t w = 0; w < n_links; ++w) {
    if (!buckets[1 + w].rows.empty() && !jobs[w].status.ok()) errors.push_back(jobs[w].status);
  }
  if (!errors.empty()) return fail(JoinErrors(errors));

  // Combine: per row, partials in ascending order of their smallest expert, from 0.0f.
  std::vector<size_t> cursor(1 + n_links, 0);
  std::vector<std::pair<int32_t, const float*>> parts;
  for (int64_t r = 0; r < n; ++r) {
    parts.clear();
    for (size_t h = 0; h < buckets.size(); ++h) {
      const Bucket& b = buckets[h];
      const size_t i = cursor[h];
      if (i >= b.rows.size() || b.rows[i] != r) continue;
      const float* base = h == 0 ? local_out.data() : jobs[h - 1].partial.data();
      parts.emplace_back(b.first_expert[i], base + static_cast<int64_t>(i) * d);
      ++cursor[h];
    }
    std::sort(parts.begin(), parts.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    float* o = out + r * d;
    std::fill(o, o + d, 0.0f);
    for (const auto& [first, p] : parts) {
      for (int64_t j = 0; j < d; ++j) o[j] += p[j];
    }
  }
  return absl::OkStatus();
}

ClusterStats ClusterExpertBackend::Stats() const {
  ClusterStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    s.steps = steps_;
    s.failed_steps = failed_steps_;
    s.local_rows = local_rows_;
    s.local_compute_micros = local_micros_;
  }
  for (const auto& l : links_) s.workers.push_back(l->Stats());
  return s;
}

std::vector<std::pair<int, int>> ClusterExpertBackend::UncoveredPairs() const {
  std::vector<bool> up(links_.size());
  for (size_t w = 0; w < links_.size(); ++w) up[w] = links_[w]->up();
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
  }
  for (const auto& l : links_) l->ResetStats();
}

}  // namespace moepool
